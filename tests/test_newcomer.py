"""Issue #20, "A newcomer trusts it": each example of the issue gives its clear error or its correct
behaviour, and what the README promises is what the repository does.

* the README's two quickstart commands are what CI runs, verbatim, with no extra it does not name;
* one current run per GPU (files of one commit), older runs out of the package;
* the README: at most 150 lines above the generated results, one picture, no result of another run;
* the step table and the notebooks' "Steps covered" lines come from fa3_lab.registry;
* the generators take a run of any step ids (the best step is whichever stepNN row is fastest);
* shapes, steps and scales are checked before the device (CPU and meta tensors alike);
* the NumPy references validate ``causal`` and non-finite inputs the same way;
* a missing optional dependency names the extra that installs it.
"""
from __future__ import annotations

import json
import re
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from fa3_lab import _env, registry
from fa3_lab.lab import readme, results

ROOT = _env.REPO_ROOT


def _quickstart() -> list[str]:
    """The lines of the first code block under "## Quickstart" (the hook's rule, .ci/run's input)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1]
    block = section.split("```", 2)[1]
    return [ln for ln in block.splitlines()[1:] if ln.strip()]


# ------------------------------------------------------------------------- README and CI agree

def test_quickstart_is_two_commands_that_ci_runs_verbatim():
    lines = _quickstart()
    assert lines == ['pip install -e ".[test]" && python -m fa3_lab tour', "pytest --nbval"]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for line in lines:
        assert line in [c.strip() for c in ci], f".ci/run does not run the README line {line!r} as written"
    # CI installs no extra the README's command does not: the path a newcomer takes is the one CI takes
    installs = [c for c in ci if "pip install" in c and "-e" in c]
    assert all('".[test]"' in c for c in installs), installs


def test_cpu_torch_is_said_in_one_line_right_above_the_commands():
    text = (ROOT / "README.md").read_text()
    before = text.split("## Quickstart", 1)[1].split("```", 1)[0].strip().splitlines()
    assert "download.pytorch.org/whl/cpu" in before[-1] and before[-1].startswith("**")


def test_course_kit_dependency_is_in_the_test_extra():
    """nbgrader is what the autograde test needs; CI installs only `.[test]` (the README's line)."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("nbgrader") for d in extras["test"])
    assert not any(d.startswith("nbgrader") for d in extras["lab"])
    assert any(d.startswith("jupyterlab") for d in extras["lab"])


def test_readme_is_short_with_one_picture_of_the_current_run():
    text = (ROOT / "README.md").read_text()
    above = text.split(readme.BEGIN, 1)[0]
    assert len(above.splitlines()) <= 150, f"README has {len(above.splitlines())} lines above the results"
    assert len(re.findall(r"!\[", text)) == 1
    current = results.current_runs()
    commits = {r.meta["commit"] for runs in current.values() for r in runs}
    block = text.split(readme.BEGIN, 1)[1].split(readme.END, 1)[0]
    shown = set(re.findall(r"commit `?([0-9a-f]{7,})`?", block))
    assert shown and shown <= commits, f"README shows commits {shown}, current runs are {commits}"
    assert "(planned)" not in text and "(later)" not in text


def test_step_table_rows_are_the_step_files_present():
    text = (ROOT / "README.md").read_text()
    block = text.split(readme.STEPS_BEGIN, 1)[1].split(readme.STEPS_END, 1)[0]
    rows = [ln for ln in block.splitlines() if re.match(r"^\| \d\d \|", ln)]
    present = [s for s in registry.STEPS if (ROOT / s.path).exists()]
    assert [int(r[2:4]) for r in rows] == [s.id for s in present]
    for s in registry.STEPS:
        if s not in present:
            assert f"step {s.id:02d} `{s.name}`" in block.split("Not in the repository yet", 1)[1]


def test_each_notebook_carries_the_generated_steps_line():
    """tests/test_ids.py checks the ids; here: the line is the one readme.steps_line writes."""
    for chapter in registry.CHAPTERS:
        nb = json.loads((ROOT / "notebooks" / f"{chapter.name}.ipynb").read_text())
        first = next(c for c in nb["cells"] if c["cell_type"] == "markdown")
        assert readme.steps_line(chapter.id) in "".join(first["source"]), chapter.name


# --------------------------------------------------------------------------- one current run

def test_each_gpu_folder_holds_one_run():
    """Files of one commit per GPU folder (current_runs raises otherwise); no A/B files in the package."""
    current = results.current_runs()
    for slug, runs in current.items():
        assert len({r.meta["commit"] for r in runs}) == 1, slug
        assert all(r.path.parent.name == slug == results.gpu_slug(r.meta["gpu"]) for r in runs)
    assert not (results.RESULTS_DIR / "experiments").exists()
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert not any("experiments" in p or "tools" in p for pats in data.values() for p in pats)


def _row(impl, ms, **kw):
    row = {"impl": impl, "dtype": "bf16", "headdim": 128, "causal": False, "batch": 4, "seqlen_q": 4096,
           "seqlen_k": 4096, "nheads": 16, "nheads_kv": 16, "ms": ms}
    row.update(kw)
    row["tflops"] = results.tflops(row)
    return row


def _meta(commit="abc1234", date="2026-12-03T08:00:00Z", command="python -m fa3_lab bench", gpu="NVIDIA H200"):
    return {"gpu": gpu, "sm_count": 132, "torch": "2.13.0", "cuda": "13.0", "cudnn": 91900,
            "commit": commit, "date": date, "command": command}


def test_two_commits_in_one_gpu_folder_fail_loudly(tmp_path):
    results.save("bench", [_row("step04", 1.0)], _meta(), root=tmp_path)
    results.save("ablation", [_row("step04", 1.0)], _meta(commit="def5678"), root=tmp_path)
    with pytest.raises(ValueError, match="files of 2 commits.*tools/experiments/results/nvidia-h200/"):
        results.current_runs(tmp_path)


def test_generators_take_any_step_ids(tmp_path):
    """A run of the new steps (06-10) renders: the best step is the fastest stepNN row at each point."""
    rows = []
    for s, causal in ((512, False), (4096, False), (4096, True)):
        for d in (64, 128):
            kw = dict(seqlen_q=s, seqlen_k=s, headdim=d, causal=causal, batch=16384 // s, nheads=2048 // d)
            rows += [_row("step04", 1.2, **kw), _row("step06", 1.1, **kw), _row("step10", 1.0, **kw),
                     _row("fa3", 0.95, **kw), _row("cudnn", 1.1, **kw), _row("sdpa_flash", 2.0, **kw)]
    results.save("bench", rows, _meta(), root=tmp_path)
    table2 = dict(batch=4, seqlen_q=8448, seqlen_k=8448, nheads=16, headdim=128)
    abl = [_row(f"step{n:02d}", 2.0 - n / 10, dtype=dt, **table2) for n in (1, 2, 3, 4, 6, 7, 8, 9, 10)
           for dt in ("bf16", "fp16")] + [_row("fa3", 1.05, **table2)]
    results.save("ablation", abl, _meta(command="python -m fa3_lab bench --ablation"), root=tmp_path)
    fp8 = [_row(impl, ms, dtype="e4m3", seqlen_q=s, seqlen_k=s, batch=16384 // s)
           for s in (4096, 8192) for impl, ms in (("step05", 0.5), ("fa3", 0.55))]
    results.save("bench_fp8", fp8, _meta(command="python -m fa3_lab bench --fp8"), root=tmp_path)
    bwd = [_row(impl, ms, **{"pass": p, "seqlen_q": s, "seqlen_k": s, "batch": 16384 // s})
           for s in (2048, 4096) for p in ("bwd", "fwd_bwd") for impl, ms in (("step04", 1.0), ("cudnn", 1.2))]
    results.save("bench_backward", bwd, _meta(command="python -m fa3_lab bench --backward"), root=tmp_path)
    current = results.current_runs(tmp_path)
    block = readme.render(current)
    assert "step10" in block and "Fastest of our steps, bf16 grid (6 points): step10 at 6." in block
    assert "→ step10 " in block and "the paper's (H100 SXM5, FP16): step01 570" in block   # ablation, any ids
    assert "FP8 e4m3 (2 points)" in block and "1.10×" in block                               # 0.55 / 0.5
    assert "Current run on **NVIDIA H200** (132 SMs), commit `abc1234`" in block
    assert "Our fastest step ÷ cuDNN, backward, bf16, 2 points: median 1.20×" in block      # pass kept apart
    full = readme.render_results_md(current)
    assert full.count("### `") == 4 and "| pass | dtype |" in full
    assert "step10" in block.split("Fastest of our steps, bf16 grid")[1].split("\n")[0]    # not mixed with bwd
    header, table = readme.compact(current["nvidia-h200"][0])
    assert all(r[header.index("ours")].endswith("step10") for r in table)
    from fa3_lab.lab import plots

    fig = plots.plot_fig5(current["nvidia-h200"][0])
    assert "fastest step (10)" in fig.legends[0].texts[0].get_text()
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_archived_runs_are_found_only_when_no_current_run_has_the_file(tmp_path):
    cur, arch = tmp_path / "cur", tmp_path / "arch"
    results.save("bench", [_row("step04", 1.0)], _meta(), root=cur)
    old = results.save("bench_fp8", [_row("step04", 1.0)], _meta(commit="0123456"), root=arch)
    moved = arch / "nvidia-h200" / "0123456" / "bench_fp8.json"
    moved.parent.mkdir()
    old.rename(moved)
    assert results.find("bench", cur, arch).parent.name == "nvidia-h200"
    assert results.find("bench_fp8", cur, arch) == moved
    with pytest.raises(FileNotFoundError, match="no recorded run nope.json"):
        results.find("nope", cur, arch)


# -------------------------------------------------------------- shapes before the device (#20)

torch = pytest.importorskip("torch")


def _qkv(device, heads_q=4, heads_kv=4, dtype=None, d=128):
    dtype = dtype or torch.bfloat16
    return (torch.empty(2, 256, heads_q, d, dtype=dtype, device=device),
            torch.empty(2, 256, heads_kv, d, dtype=dtype, device=device),
            torch.empty(2, 256, heads_kv, d, dtype=dtype, device=device))


def _not_a_step() -> int:
    return max(s.id for s in registry.STEPS) + 90


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_shape_step_and_scale_errors_come_before_the_device(device):
    import fa3_lab

    cases = [
        (dict(), dict(heads_q=4, heads_kv=3), r"nheads \(4\) must be a multiple of nheads_kv \(3\)|nheads"),
        (dict(step=_not_a_step()), dict(), r"step: expected one of"),
        (dict(step=registry.FP8_STEP), dict(), r"step: expected one of"),   # the FP8 step is not a 16-bit step
        (dict(softmax_scale=-1.0), dict(), r"softmax_scale: expected a positive finite number, got -1"),
        (dict(causal="False"), dict(), r"causal: expected a bool"),
    ]
    for kwargs, shape, match in cases:
        q, k, v = _qkv(device, **shape)
        with pytest.raises((ValueError, TypeError), match=match) as e:
            fa3_lab.flash_attn_func(q, k, v, **kwargs)
        assert "CUDA" not in str(e.value) and "sm_90" not in str(e.value)
    q, k, v = _qkv(device, heads_q=4, heads_kv=3)
    with pytest.raises(ValueError, match="nheads") as e:
        fa3_lab.flash_attn_fp8_func(q, k, v)
    assert "CUDA" not in str(e.value)
    with pytest.raises(ValueError, match="softmax_scale"):
        fa3_lab.flash_attn_fp8_func(*_qkv(device), softmax_scale=-1.0)


def test_meta_tensors_pass_every_shape_check():
    """Valid shapes on meta tensors reach the device check and nothing else (a laptop can check shapes)."""
    import fa3_lab

    for heads_kv in (4, 2, 1):                      # MHA, GQA, MQA
        for d in (64, 128, 256):
            q, k, v = _qkv("meta", heads_q=4, heads_kv=heads_kv, d=d)
            with pytest.raises(TypeError, match="expected a CUDA tensor"):
                fa3_lab.flash_attn_func(q, k, v, causal=True, softmax_scale=0.1)
            with pytest.raises(TypeError, match="expected a CUDA tensor"):
                fa3_lab.flash_attn_fp8_func(q, k, v, causal=True)


# ------------------------------------------------------------------- the references agree (#20)

def _references():
    from reference.attention import standard_attention
    from reference.fa3_pipeline import pipelined_forward, warp_specialized_forward
    from reference.flash_forward import flash_attention_forward
    from reference.fp8 import baseline_fp8_attention, flash_fp16_attention, fp8_attention

    return [standard_attention, flash_attention_forward, warp_specialized_forward, pipelined_forward,
            fp8_attention, baseline_fp8_attention, flash_fp16_attention]


@pytest.mark.parametrize("fn", _references(), ids=lambda f: f.__name__)
def test_references_refuse_a_string_causal(fn):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 64, 2, 64)) for _ in range(3))
    with pytest.raises(TypeError, match=r"causal: expected a bool, got str"):
        fn(q, k, v, causal="False")


@pytest.mark.parametrize("fn", _references(), ids=lambda f: f.__name__)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_references_refuse_non_finite_inputs(fn, bad):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 64, 2, 64)) for _ in range(3))
    k[0, 3, 1, 5] = bad
    with pytest.raises(ValueError, match=r"k: expected finite values, got NaN or inf"):
        fn(q, k, v)


def test_standard_attention_bool_causal_still_works():
    from reference.attention import standard_attention

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 16, 1, 8)) for _ in range(3))
    a, _ = standard_attention(q, k, v, causal=np.bool_(True))
    b, _ = standard_attention(q, k, v, causal=True)
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- missing optional dependency

def test_missing_optional_dependency_names_the_extra(monkeypatch):
    from fa3_lab import hf

    monkeypatch.setitem(sys.modules, "transformers", None)   # import transformers -> ImportError
    with pytest.raises(_env.MissingExtra, match=r'fa3_lab.hf.register needs transformers, .*pip install -e "\.\[test\]"'):
        hf.register("fa3_lab_test_missing")
    assert isinstance(_env.MissingExtra("x"), ImportError)


def test_cli_prints_a_missing_extra_in_one_line(monkeypatch, capsys, tmp_path):
    """No traceback, exit 2, nothing written: the retry after `pip install` starts clean."""
    from fa3_lab.lab import cli, tour

    def needs_it(args):
        _env.require("fa3_lab_no_such_module", "lab", "tour")
        (tmp_path / "written").write_text("x")

    monkeypatch.setattr(tour, "run", needs_it)
    assert cli.main(["tour"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'the `lab` extra installs: pip install -e ".[lab]"' in err
    assert not (tmp_path / "written").exists()


# --------------------------------------------------------------------------- CPU behaviour

def test_trace_on_cpu_points_to_the_traces_folder(capsys):
    from fa3_lab.lab import cli

    if not _env.why_no_sm90():
        pytest.skip("an sm_90 GPU is here: trace records instead")
    status = cli.main(["trace", "--step", "3"])
    out = capsys.readouterr().out
    assert status == 0
    assert "fa3_lab/results/traces/" in out
    for line in out.splitlines():
        m = re.search(r"(fa3_lab/results/traces/[\w.-]+/trace_step\d\d\.(json|png))", line)
        if m:
            assert (ROOT / m.group(1)).exists(), m.group(1)
