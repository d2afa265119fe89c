"""fa3_lab.lab.table3 on the CPU: argument checks, the float64 reference, the record (build, validate,
save, load, latest — and that the timing-run loaders never read it), and the CLI without a GPU.

The measurement itself needs an sm_90 GPU: tests/test_fp8_kernel.py::test_table3_on_the_gpu runs it.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fa3_lab import _env
from fa3_lab.lab import plots, results, table3  # noqa: E402
from fa3_lab.lab.cli import main  # noqa: E402
from reference import fp8 as R  # noqa: E402
from reference.attention import standard_attention  # noqa: E402


def _meta(**kw):
    m = {"gpu": "NVIDIA H100 80GB HBM3", "sm_count": 132, "torch": "2.11.0+cu130", "cuda": "13.0",
         "cudnn": 91900, "commit": "abc1234", "date": "2026-11-23T10:00:00Z",
         "command": "python -m fa3_lab table3 --seqlen 8192 --seed 0"}
    m.update(kw)
    return m


def _rows(scale=1.0, emulate=False):
    """Rows as table3.measure returns them (made-up RMSEs, distinct per method)."""
    return [{"impl": m.impl, "method": m.method, "dtype": m.dtype, "block_quant": m.block_quant,
             "incoherent": m.incoherent, "rmse": scale * 1e-3 * (i + 1),
             "emulation_rmse": (2e-3 * (i + 1) if emulate and m.dtype != "bf16" else None)}
            for i, m in enumerate(table3.METHODS)]


@pytest.fixture(scope="module")
def numpy_doc():
    return table3.load_numpy()


@pytest.fixture
def record(numpy_doc):
    shape, seed = table3.default_shape(numpy_doc)
    return table3.build_record(_rows(), _meta(), shape, seed, numpy_doc)


@pytest.fixture
def no_gpu(monkeypatch):
    """Take the no-GPU path on any machine."""
    monkeypatch.setattr(_env, "why_no_sm90", lambda: "no CUDA GPU (test)")


# --------------------------------------------------------------------------------------- checks

def test_check_seqlen_seed_out():
    assert table3.check_seqlen(1) == 1 and table3.check_seqlen(table3.MAX_SEQLEN) == table3.MAX_SEQLEN
    for bad in (0, -5, table3.MAX_SEQLEN + 1):
        with pytest.raises(ValueError, match="seqlen: expected 1 <= seqlen"):
            table3.check_seqlen(bad)
    for bad in (8192.0, "8192", True, None):
        with pytest.raises(TypeError, match="seqlen: expected an int"):
            table3.check_seqlen(bad)
    assert table3.check_seed(0) == 0
    with pytest.raises(ValueError, match="seed: expected an int >= 0"):
        table3.check_seed(-1)
    with pytest.raises(TypeError, match="seed"):
        table3.check_seed(1.5)
    with pytest.raises(ValueError, match="out: expected a path ending in .json"):
        table3.check_out("table3.txt")
    for gpu_folder in ("nvidia-h200", "nvidia-h100-80gb-hbm3"):
        with pytest.raises(ValueError, match="GPU timing folder"):
            table3.check_out(results.RESULTS_DIR / gpu_folder / "table3.json")
    with pytest.raises(ValueError, match="directly in fa3_lab/results"):
        table3.check_out(results.RESULTS_DIR / "table3.json")
    ok = results.RESULTS_DIR / "experiments" / "nvidia-h200" / "table3.json"
    assert table3.check_out(ok) == ok


@pytest.mark.parametrize("argv,where", [
    (["--seqlen", "0"], "--seqlen: expected 1 <= seqlen"),
    (["--seqlen", str(table3.MAX_SEQLEN + 1)], "--seqlen: expected 1 <= seqlen"),
    (["--seed", "-3"], "--seed: expected an int >= 0"),
    (["--out", "fa3_lab/results/nvidia-h200/table3.json"], "--out: "),
    (["--out", "t3.csv"], "--out: expected a path ending in .json"),
])
def test_cli_bad_arguments_exit_2_with_one_line(argv, where, capsys):
    assert main(["table3", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert where in err and len(err.splitlines()) == 1, err


def test_cli_non_int_seqlen_is_argparse_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["table3", "--seqlen", "8k"])
    assert e.value.code == 2 and "--seqlen" in capsys.readouterr().err


def test_subcommand_is_listed(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "table3" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ reference

@pytest.mark.parametrize("sq,sk,h,hkv,d,chunk", [(300, 257, 4, 2, 64, 77), (1, 9, 2, 2, 128, 2048),
                                                 (130, 130, 3, 1, 32, 128)])
def test_reference_fp64_is_standard_attention(sq, sk, h, hkv, d, chunk, rng):
    q = rng.standard_normal((2, sq, h, d))
    k, v = rng.standard_normal((2, 2, sk, hkv, d))
    ref, _ = standard_attention(q, k, v)
    out = table3.reference_fp64(*(torch.from_numpy(x) for x in (q, k, v)), chunk=chunk)
    assert out.dtype == torch.float64 and tuple(out.shape) == q.shape
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-13)
    # the same through float16 tensors (as measure passes them): used as float64, no extra rounding
    q16, k16, v16 = (torch.from_numpy(x).half() for x in (q, k, v))
    ref16, _ = standard_attention(*(x.double().numpy() for x in (q16, k16, v16)))
    np.testing.assert_allclose(table3.reference_fp64(q16, k16, v16).numpy(), ref16, rtol=0, atol=1e-13)


def test_reference_fp64_rejects_bad_input():
    q = torch.zeros(1, 4, 4, 64, dtype=torch.float64)
    with pytest.raises(TypeError, match="k: expected a floating torch.Tensor"):
        table3.reference_fp64(q, np.zeros((1, 4, 4, 64)), q)
    with pytest.raises(ValueError, match="nheads_kv"):
        table3.reference_fp64(q, q[:, :, :3], q[:, :, :3])
    with pytest.raises(ValueError, match="chunk"):
        table3.reference_fp64(q, q, q, chunk=0)
    with pytest.raises(ValueError, match="expected 4 dims"):
        table3.reference_fp64(q[0], q, q)


def test_rmse_matches_reference_metric(rng):
    a, b = rng.standard_normal((2, 3, 50, 2, 16))
    assert table3.rmse(torch.from_numpy(a).float(), torch.from_numpy(b)) == pytest.approx(
        R.rmse(a.astype(np.float32), b), rel=1e-12)
    with pytest.raises(ValueError, match="shape"):
        table3.rmse(torch.zeros(2), torch.zeros(3))


def test_measure_needs_an_sm90_gpu_and_computes_nothing(no_gpu, monkeypatch):
    monkeypatch.setattr(R, "table3_inputs", lambda *a, **k: pytest.fail("inputs drawn without a GPU"))
    with pytest.raises(RuntimeError, match="needs an sm_90 GPU"):
        table3.measure(1, 256, 2, 128)
    with pytest.raises(ValueError, match="seqlen"):
        table3.measure(1, 0, 2, 128)


# --------------------------------------------------------------------------------------- record

def test_numpy_record_covers_every_paper_row(numpy_doc):
    shape, seed = table3.default_shape(numpy_doc)
    assert set(shape) == set(table3.SHAPE_KEYS) and seed >= 0
    have = {r["impl"] for r in numpy_doc["rows"]}
    assert {m.paper_key for m in table3.METHODS if m.paper_key} <= have
    assert set(R.PAPER_TABLE3) == have


def test_load_numpy_names_a_bad_file(tmp_path):
    p = tmp_path / "t.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        table3.load_numpy(p)
    p.write_text(json.dumps({"meta": {"shape": {"batch": 1}}, "rows": []}))
    with pytest.raises(ValueError, match="shape"):
        table3.load_numpy(p)
    with pytest.raises(FileNotFoundError):
        table3.load_numpy(tmp_path / "missing.json")


def test_build_record_adds_numpy_and_paper_numbers(record, numpy_doc):
    numpy_rmse = {r["impl"]: r["rmse"] for r in numpy_doc["rows"]}
    assert [r["impl"] for r in record["rows"]] == list(table3.IMPLS)
    for r in record["rows"]:
        m = next(m for m in table3.METHODS if m.impl == r["impl"])
        assert r["paper_rmse"] == (R.PAPER_TABLE3[m.paper_key] if m.paper_key else None)
        assert r["numpy_rmse"] == (numpy_rmse[m.paper_key] if m.paper_key else None)
    meta = record["meta"]
    assert all(k in meta for k in results.META_KEYS + table3.EXTRA_META_KEYS)
    assert meta["numpy_record"]["same_inputs"] is True
    assert meta["numpy_record"]["path"] == "fa3_lab/results/cpu/table3_numpy.json"


def test_other_inputs_leave_the_numpy_column_empty(numpy_doc):
    shape, seed = table3.default_shape(numpy_doc)
    for sh, sd in ((dict(shape, seqlen=shape["seqlen"] // 2), seed), (shape, seed + 1)):
        doc = table3.build_record(_rows(), _meta(), sh, sd, numpy_doc)
        assert all(r["numpy_rmse"] is None for r in doc["rows"])
        assert doc["meta"]["numpy_record"]["same_inputs"] is False
        assert "NOT the same inputs" in table3.format_table(doc)


def test_format_table_rows_and_notes(record):
    text = table3.format_table(record)
    lines = text.splitlines()
    assert record["meta"]["gpu"] in lines[0] and record["meta"]["commit"] in lines[0]
    for r in record["rows"]:
        line = next(ln for ln in lines if ln.startswith(r["impl"] + " "))
        assert f"{r['rmse']:.2e}" in line
        assert (f"{r['paper_rmse']:.1e}" if r["paper_rmse"] is not None else "—") in line
    assert "emulation" not in lines[2]                      # no column when nothing was emulated
    assert "standard attention, per-tensor e4m3, FP16 softmax" in text  # baseline_fp8 is not the paper's
    emu = table3.format_table(table3.build_record(_rows(emulate=True), _meta(), record["meta"]["shape"],
                                                  record["meta"]["seed"]))
    assert "emulation" in emu.splitlines()[2] and "no NumPy record" in emu


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d["rows"][0].update(impl="flash_fp32"), r"rows\[0\]\.impl"),
    (lambda d: d["rows"][1].update(impl=d["rows"][0]["impl"]), "appears twice"),
    (lambda d: d["rows"][2].update(rmse=0.0), r"rows\[2\]\.rmse"),
    (lambda d: d["rows"][2].update(rmse=float("nan")), r"rows\[2\]\.rmse"),
    (lambda d: d["rows"][3].update(numpy_rmse="9e-3"), r"rows\[3\]\.numpy_rmse"),
    (lambda d: d["meta"].pop("sm_count"), "meta: missing key"),
    (lambda d: d["meta"].pop("shape"), "meta: missing key.*shape"),
    (lambda d: d["meta"]["shape"].update(seqlen=0), "meta.shape"),
    (lambda d: d["meta"].update(seed=-1), "meta.seed"),
    (lambda d: d["meta"].update(numpy_record="cpu/table3_numpy.json"), "meta.numpy_record"),
    (lambda d: d.update(rows=[]), "rows: expected a non-empty list"),
])
def test_validate_names_the_problem(record, mutate, match):
    doc = json.loads(json.dumps(record))
    mutate(doc)
    with pytest.raises(results.SchemaError, match=match):
        table3.validate(doc)


def test_save_load_latest_and_the_timing_loaders_never_read_it(record, tmp_path, monkeypatch):
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="python -m fa3_lab table3"):
        table3.latest()
    path = table3.save(record)
    assert path == tmp_path / "experiments" / "nvidia-h100-80gb-hbm3" / "table3.json"
    newer = json.loads(json.dumps(record))
    newer["meta"].update(gpu="NVIDIA H200", date="2026-11-24T08:00:00Z")
    newer["rows"][0]["rmse"] = 5e-5
    table3.save(newer)
    run = table3.latest()
    assert run.meta["gpu"] == "NVIDIA H200" and run.rows[0]["rmse"] == 5e-5
    assert run.describe() == "recorded on NVIDIA H200 (132 SMs), 2026-11-24, commit abc1234"
    assert table3.load(path).rows == record["rows"]
    # a timing run beside it: load_all and latest_run see only the timing run
    results.save("bench", [{"impl": "step04", "dtype": "bf16", "headdim": 128, "causal": False, "batch": 1,
                            "seqlen_q": 1024, "seqlen_k": 1024, "nheads": 16, "nheads_kv": 16, "ms": 0.1,
                            "tflops": results.flops(1, 16, 1024, 1024, 128, False) / 1e-4 / 1e12}],
                 _meta(command="python -m fa3_lab bench"), root=tmp_path)
    assert [r.path.name for r in results.load_all(tmp_path)] == ["bench.json"]
    with pytest.raises(FileNotFoundError):
        plots.latest_run("table3", root=tmp_path)
    # nothing written on a bad document or a path in a GPU timing folder
    bad = json.loads(json.dumps(record))
    bad["rows"][0]["rmse"] = -1.0
    with pytest.raises(results.SchemaError):
        table3.save(bad, tmp_path / "bad.json")
    with pytest.raises(ValueError, match="GPU timing folder"):
        table3.save(record, results.RESULTS_DIR / "nvidia-h200" / "table3.json")
    assert not (tmp_path / "bad.json").exists() and not (tmp_path / "nvidia-h200" / "table3.json").exists()


def test_load_names_a_broken_file(tmp_path):
    p = tmp_path / "table3.json"
    p.write_text('{"meta": {}, "rows": []}')
    with pytest.raises(results.SchemaError, match=r"table3\.json: meta: missing key"):
        table3.load(p)


def test_recorded_gpu_table3_is_valid():
    try:
        run = table3.latest()
    except FileNotFoundError:
        pytest.skip("no GPU Table 3 recorded yet (python -m fa3_lab table3 on an H100/H200)")
    assert run.path.parent.name == results.gpu_slug(run.meta["gpu"])
    assert run.path.parent.parent.name == table3.RECORD_DIR
    by = {r["impl"]: r for r in run.rows}
    assert set(by) == set(table3.IMPLS)
    assert by["fa3_fp8"]["rmse"] < by["baseline_fp8"]["rmse"]     # the paper's claim, on the kernel


# ------------------------------------------------------------------------------------------ CLI

def test_cli_without_gpu_says_so_and_shows_the_recorded_table(no_gpu, record, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(table3, "measure", lambda *a, **k: pytest.fail("measured without a GPU"))
    assert main(["table3"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("table3 needs an sm_90 GPU: no CUDA GPU (test).")
    assert "no GPU Table 3 recorded" in out
    table3.save(record)
    assert main(["table3", "--seqlen", "4096"]) == 1
    out = capsys.readouterr().out
    assert "needs an sm_90 GPU" in out and "recorded on NVIDIA H100 80GB HBM3 (132 SMs), 2026-11-23" in out
    assert table3.format_table(table3.latest()) in out


def test_cli_on_a_gpu_writes_the_record_with_full_meta(tmp_path, monkeypatch, capsys):
    """The GPU path with the measurement replaced: arguments reach measure, meta and the file are complete."""
    calls = {}

    def fake_measure(batch, seqlen, nheads, headdim, seed=0, *, emulate=False, progress=None):
        calls.update(batch=batch, seqlen=seqlen, nheads=nheads, headdim=headdim, seed=seed, emulate=emulate)
        return _rows(emulate=emulate)

    monkeypatch.setattr(_env, "why_no_sm90", lambda: "")
    monkeypatch.setattr(_env, "sm90_gpu", lambda: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(_env, "git_commit", lambda: "abc1234")
    monkeypatch.setattr(results, "_gpu_facts", lambda: {"gpu": "NVIDIA H100 80GB HBM3", "sm_count": 132,
                                                        "torch": "2.11.0+cu130", "cuda": "13.0", "cudnn": 91900})
    monkeypatch.setattr(table3, "measure", fake_measure)
    out_path = tmp_path / "t3.json"
    assert main(["table3", "--seqlen", "2048", "--seed", "3", "--emulate", "--out", str(out_path)]) == 0
    shape, _ = table3.default_shape(table3.load_numpy())
    assert calls == dict(shape, seqlen=2048, seed=3, emulate=True)
    run = table3.load(out_path)
    assert run.meta["command"] == f"python -m fa3_lab table3 --seqlen 2048 --seed 3 --emulate --out {out_path}"
    assert run.meta["shape"]["seqlen"] == 2048 and run.meta["seed"] == 3
    assert run.meta["numpy_record"]["same_inputs"] is False
    assert [r["emulation_rmse"] is None for r in run.rows] == [m.dtype == "bf16" for m in table3.METHODS]
    assert f"saved {out_path}" in capsys.readouterr().out
    assert main(["table3", "--no-save", "--out", str(tmp_path / "x.json")]) == 0
    assert not (tmp_path / "x.json").exists()
