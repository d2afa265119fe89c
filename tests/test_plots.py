"""fa3_lab.lab.plots: the Figure-5 grid and the ablation bars drawn from the recorded JSON runs."""
from __future__ import annotations

import copy

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from fa3_lab.lab import plots, results  # noqa: E402


def _run(name):
    try:
        return plots.latest_run(name.removesuffix(".json"))
    except FileNotFoundError:
        pytest.skip(f"no recorded {name} under fa3_lab/results/")


@pytest.fixture(scope="module")
def bench_run():
    return _run("bench.json")


@pytest.fixture(scope="module")
def ablation_run():
    return _run("ablation.json")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _bars(ax):
    return [p for p in ax.patches if isinstance(p, matplotlib.patches.Rectangle)]


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_plot_bench_grid_and_bar_count(bench_run, dtype):
    rows = [r for r in bench_run.rows if r["dtype"] == dtype]
    fig = plots.plot_bench(bench_run, dtype=dtype)
    headdims = sorted({r["headdim"] for r in rows})
    impls = {r["impl"] for r in rows}
    assert len(fig.axes) == 2 * len(headdims)
    for ax in fig.axes:
        causal = "causal" in ax.get_title() and "no mask" not in ax.get_title()
        d = int(ax.get_title().split(",")[0].split()[-1])
        seqlens = {r["seqlen_q"] for r in rows if r["headdim"] == d and r["causal"] == causal}
        # one bar per (seqlen, impl); a missing row is a NaN bar, still a patch
        assert len(_bars(ax)) == len(seqlens) * len(impls), ax.get_title()
        heights = sorted(b.get_height() for b in _bars(ax) if b.get_height() == b.get_height())
        expected = sorted(r["tflops"] for r in rows if r["headdim"] == d and r["causal"] == causal)
        assert heights == pytest.approx(expected)
    title = fig._suptitle.get_text()
    assert bench_run.meta["gpu"] in title and bench_run.meta["commit"] in title
    assert bench_run.meta["date"][:10] in title


def test_plot_bench_fp16_has_no_fa3_bars(bench_run):
    fp16 = [r for r in bench_run.rows if r["dtype"] == "fp16"]
    if not fp16:
        pytest.skip("the current run has no fp16 rows")
    fig = plots.plot_bench(bench_run, dtype="fp16")
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert plots.LABELS["fa3"] not in labels            # the official FA3 wheel runs bf16 only
    step = min(r["impl"] for r in fp16 if r["impl"] in results.STEP_IMPLS)
    assert plots.LABELS[step] in labels


def test_plot_bench_into_given_axes(bench_run):
    fig, axes = plt.subplots(2, 3)
    assert plots.plot_bench(bench_run, ax=axes) is fig
    with pytest.raises(ValueError, match="ax: expected 6 Axes"):
        plots.plot_bench(bench_run, ax=axes[0])


def test_plot_ablation_bars_and_paper_values(ablation_run):
    fig = plots.plot_ablation(ablation_run, dtype="bf16")
    (ax,) = fig.axes
    rows = [r for r in ablation_run.rows if r["dtype"] == "bf16"]
    n_paper = sum(1 for r in rows if r["impl"] in plots.PAPER_ABLATION)
    assert len(_bars(ax)) == len(rows) + n_paper
    heights = sorted(round(b.get_height(), 2) for b in _bars(ax))
    expected = sorted([round(r["tflops"], 2) for r in rows] +
                      [float(plots.PAPER_ABLATION[r["impl"]]) for r in rows if r["impl"] in plots.PAPER_ABLATION])
    assert heights == pytest.approx(expected)
    assert ablation_run.meta["commit"] in ax.get_title()
    assert plots.PAPER_ABLATION == {"step01": 570, "step02": 582, "step03": 620, "step04": 661}


def test_ablation_table_order_and_custom_paper(ablation_run):
    dtype = sorted({r["dtype"] for r in ablation_run.rows})[0]
    table = plots.ablation_table(ablation_run, dtype, paper={"step02": 1.0})
    steps = sorted({r["impl"] for r in ablation_run.rows if r["dtype"] == dtype and r["impl"] in results.STEP_IMPLS})
    assert [i for i, _, _ in table][:len(steps)] == steps                      # steps first, in id order
    assert [p for i, _, p in table if i in ("step01", "step02", "step03")] == \
        [1.0 if i == "step02" else None for i in steps if i in ("step01", "step02", "step03")]


def test_bench_table_matches_rows(bench_run):
    table = plots.bench_table(bench_run, "bf16")
    for r in bench_run.rows:
        if r["dtype"] == "bf16" and r.get("pass", "fwd") == "fwd":
            assert table[(r["headdim"], r["causal"], r["seqlen_q"])][r["impl"]] == r["tflops"]


def test_rows_without_meta_say_so(ablation_run):
    fig = plots.plot_ablation(list(ablation_run.rows))
    assert "without run metadata" in fig.axes[0].get_title()


@pytest.mark.parametrize("fn", [plots.plot_bench, plots.plot_ablation])
def test_empty_input_raises(fn):
    with pytest.raises(ValueError, match="empty"):
        fn([])
    with pytest.raises(ValueError, match="non-empty list of rows"):
        fn({"meta": None, "rows": []})
    with pytest.raises(TypeError, match="Run, a results document or a list"):
        fn("bench.json")
    with pytest.raises(TypeError, match=r"rows\[0\]: expected a dict"):
        fn([1, 2])


def test_several_runs_raise(bench_run, ablation_run):
    with pytest.raises(ValueError, match="expected one run, got 2"):
        plots.plot_bench([bench_run, ablation_run])
    assert len(plots.plot_bench([bench_run]).axes) == 6


def test_latest_run(bench_run, tmp_path):
    assert bench_run.path.name == "bench.json" and bench_run.rows
    with pytest.raises(FileNotFoundError, match="no recorded run nope.json"):
        plots.latest_run("nope")
    with pytest.raises(TypeError, match="name"):
        plots.latest_run(None)
    (tmp_path / "gpu-a").mkdir()
    (tmp_path / "gpu-a" / "bench.json").write_text('{"meta": {}}')
    with pytest.raises(results.SchemaError, match="bench.json"):
        plots.latest_run("bench", root=tmp_path)


def test_bad_dtype_and_duplicates(bench_run, ablation_run):
    with pytest.raises(ValueError, match="dtype: expected one of"):
        plots.plot_bench(bench_run, dtype="e4m3")
    with pytest.raises(TypeError, match="dtype"):
        plots.plot_bench(bench_run, dtype=16)
    doubled = list(bench_run.rows) + [copy.deepcopy(bench_run.rows[0])]
    with pytest.raises(ValueError, match="two rows for"):
        plots.plot_bench(doubled, dtype=bench_run.rows[0]["dtype"])
    with pytest.raises(ValueError, match="one configuration"):
        plots.plot_ablation(bench_run)
    with pytest.raises(TypeError, match="paper"):
        plots.plot_ablation(ablation_run, paper=[570])


# ------------------------------------------------------------------------------------------ FP8

@pytest.fixture(scope="module")
def fp8_run():
    return _run("bench_fp8.json")


def _fp8_rows(quantize=True, **extra):
    """A synthetic bench --fp8 run: headdim 128, seqlens 4k and 16k, step05 / fa3 e4m3 / step04 bf16;
    step05 rows with the keys of runs before the fused quantize kernel (torch path in quantize_ms)."""
    rows = []
    for s in (4096, 16384):
        b, h = 16384 // s, 16
        fl = results.flops(b, h, s, s, 128, False)
        for impl, dtype, ms in (("step05", "e4m3", 1.0), ("fa3", "e4m3", 0.8), ("step04", "bf16", 1.3)):
            r = {"impl": impl, "dtype": dtype, "headdim": 128, "causal": False, "batch": b, "seqlen_q": s,
                 "seqlen_k": s, "nheads": h, "nheads_kv": h, "ms": ms, "tflops": fl / (ms * 1e-3) / 1e12}
            if impl == "step05":
                if quantize:
                    r.update(quantize_ms=0.5, v_layout_ms=0.25)
                r.update(extra)
            rows.append(r)
    return rows


def _lines(ax):
    return {ln.get_label(): ln for ln in ax.get_lines()}


FUSED, TORCH = "step 05 + fused quantize (V layout incl.)", "step 05 + torch quantize + V layout"


def test_plot_fp8_lines_are_the_recorded_rows(fp8_run):
    fig = plots.plot_fp8(fp8_run)
    step05 = [r for r in fp8_run.rows if r["impl"] == "step05" and r["dtype"] == "e4m3"]
    headdims = sorted({r["headdim"] for r in step05})
    assert len(fig.axes) == len(headdims)
    for ax, d in zip(fig.axes, headdims):
        assert ax.get_title().startswith(f"headdim {d},")
        lines = _lines(ax)
        for label, impl, dtype in (("step 05 e4m3 (kernel)", "step05", "e4m3"), ("FA3 e4m3 (fa3-fwd)", "fa3", "e4m3")):
            rows = sorted((r for r in fp8_run.rows if r["impl"] == impl and r["dtype"] == dtype
                           and r["headdim"] == d), key=lambda r: r["seqlen_q"])
            assert list(lines[label].get_xdata()) == [r["seqlen_q"] for r in rows]
            assert list(lines[label].get_ydata()) == pytest.approx([r["tflops"] for r in rows])
        bf16 = sorted((r for r in fp8_run.rows if r["dtype"] == "bf16" and r["headdim"] == d), key=lambda r: r["seqlen_q"])
        (bf16_label,) = [k for k in lines if k.startswith("ours bf16")]
        assert list(lines[bf16_label].get_ydata()) == pytest.approx([r["tflops"] for r in bf16])
        rows = sorted((r for r in step05 if r["headdim"] == d), key=lambda r: r["seqlen_q"])
        fused = "quantize_torch_ms" in rows[0]          # the run's generation of keys (plots.FP8_EXTRA_MS)
        torch_q = [r["quantize_torch_ms" if fused else "quantize_ms"] + r["v_layout_ms"] for r in rows]
        assert list(lines[TORCH].get_ydata()) == pytest.approx(
            [r["tflops"] * r["ms"] / (r["ms"] + t) for r, t in zip(rows, torch_q)], rel=1e-9)
        if fused:
            assert list(lines[FUSED].get_ydata()) == pytest.approx(
                [r["tflops"] * r["ms"] / (r["ms"] + r["quantize_ms"]) for r in rows], rel=1e-9)
        else:
            assert FUSED not in lines
    title = fig._suptitle.get_text()
    assert fp8_run.meta["gpu"] in title and fp8_run.meta["commit"] in title and fp8_run.meta["date"][:10] in title


def test_fp8_table_reads_both_generations_of_quantize_keys():
    # before the fused kernel: quantize_ms is the torch path, V layout separate
    p = plots.fp8_table(_fp8_rows())[0]
    assert (p["quantize_fused_ms"], p["quantize_torch_ms"], p["v_layout_ms"]) == (None, 0.5, 0.25)
    assert p["end_to_end_fused"] is None
    assert p["end_to_end_torch"] == pytest.approx(p["step05"] * 1.0 / (1.0 + 0.5 + 0.25))
    assert p["bf16_impl"] == "step04" and p["fa3"] == pytest.approx(p["step05"] / 0.8)
    assert [(q["headdim"], q["seqlen"]) for q in plots.fp8_table(_fp8_rows())] == [(128, 4096), (128, 16384)]
    # with the fused kernel: quantize_ms is fused (V layout included), the torch path rides along
    p = plots.fp8_table(_fp8_rows(quantize_ms=0.2, quantize_torch_ms=3.0, v_layout_ms=0.1, quantize_gbps=900.0))[1]
    assert (p["quantize_fused_ms"], p["quantize_torch_ms"], p["v_layout_ms"]) == (0.2, 3.0, 0.1)
    assert p["end_to_end_fused"] == pytest.approx(p["step05"] / 1.2)
    assert p["end_to_end_torch"] == pytest.approx(p["step05"] / 4.1)
    (ax,) = plots.plot_fp8(_fp8_rows(quantize_ms=0.2, quantize_torch_ms=3.0, v_layout_ms=0.1)).axes
    assert FUSED in _lines(ax) and TORCH in _lines(ax)
    # fused recorded, torch path not: only the fused line
    (ax,) = plots.plot_fp8(_fp8_rows(quantize=False, quantize_ms=0.2, quantize_torch_ms=None)).axes
    assert FUSED in _lines(ax) and TORCH not in _lines(ax)


def test_fp8_not_recorded_is_said():
    for rows in (_fp8_rows(quantize=False), _fp8_rows(quantize=False, quantize_ms=0.5),
                 _fp8_rows(quantize=True, v_layout_ms=None)):
        assert all(p["end_to_end_torch"] is None and p["end_to_end_fused"] is None for p in plots.fp8_table(rows))
        (ax,) = plots.plot_fp8(rows).axes
        assert FUSED not in _lines(ax) and TORCH not in _lines(ax)
        assert "quantize time not recorded" in [t.get_text() for t in ax.texts]
    # FA3 not importable in that run: no FA3 line, the rest drawn
    rows = [r for r in _fp8_rows() if r["impl"] != "fa3"]
    assert plots.fp8_table(rows)[0]["fa3"] is None
    assert "FA3 e4m3 (fa3-fwd)" not in _lines(plots.plot_fp8(rows).axes[0])
    assert "without run metadata" in plots.plot_fp8(rows)._suptitle.get_text()


def test_plot_fp8_validation(fp8_run, bench_run):
    with pytest.raises(ValueError, match="empty"):
        plots.plot_fp8([])
    with pytest.raises(TypeError, match="Run, a results document or a list"):
        plots.plot_fp8("bench_fp8.json")
    with pytest.raises(ValueError, match="no step05 e4m3 rows"):
        plots.plot_fp8(bench_run)
    with pytest.raises(ValueError, match="no step05 e4m3 rows with causal=True"):
        plots.plot_fp8(fp8_run, causal=True)
    with pytest.raises(TypeError, match="causal"):
        plots.fp8_table(fp8_run, causal="no")
    with pytest.raises(ValueError, match="expected one run, got 2"):
        plots.plot_fp8([fp8_run, bench_run])
    with pytest.raises(ValueError, match="two rows for step05"):
        plots.plot_fp8(_fp8_rows() + [_fp8_rows()[0]])
    twice = _fp8_rows() + [dict(_fp8_rows()[2], impl="step03")]
    with pytest.raises(ValueError, match="two bf16 steps"):
        plots.fp8_table(twice)
    with pytest.raises(ValueError, match=r"headdims: expected a non-empty subset"):
        plots.plot_fp8(fp8_run, headdims=[64])
    with pytest.raises(ValueError, match="headdims"):
        plots.plot_fp8(fp8_run, headdims=[])
    with pytest.raises(TypeError, match="headdims"):
        plots.plot_fp8(fp8_run, headdims=128)
    fig, axes = plt.subplots(1, 2)
    with pytest.raises(ValueError, match="ax: expected 1 Axes"):
        plots.plot_fp8(fp8_run, headdims=[128], ax=axes)
    assert plots.plot_fp8(_fp8_rows(), ax=axes[:1]) is fig


# ------------------------------------------------------------------------------------- backward

def _bwd_doc():
    """A synthetic bench_backward run: headdim 64/128, both masks, 3 seqlens, bf16 + fp16, both passes; step13, its
    deterministic mode, cuDNN and FA2."""
    rows = []
    for dtype in ("bf16", "fp16"):
        for d in (64, 128):
            for causal in (False, True):
                for s in (512, 2048, 8192):
                    for p in ("bwd", "fwd_bwd"):
                        for impl, ms in (("step13", 1.0), ("step13_det", 1.1), ("cudnn", 1.2), ("sdpa_flash", 1.6)):
                            r = {"impl": impl, "dtype": dtype, "pass": p, "headdim": d, "causal": causal,
                                 "batch": 16384 // s, "seqlen_q": s, "seqlen_k": s, "nheads": 2048 // d,
                                 "nheads_kv": 2048 // d, "ms": ms * (0.5 if dtype == "fp16" else 1.0)}
                            r["tflops"] = results.tflops(r)
                            rows.append(r)
    meta = {"gpu": "NVIDIA H200", "sm_count": 132, "torch": "2.11.0+cu130", "cuda": "13.0", "cudnn": 91900,
            "commit": "abc1234", "date": "2026-12-03T10:00:00Z", "command": "python -m fa3_lab bench --backward"}
    return results.validate({"meta": meta, "rows": rows})


def test_plot_backward_lines_are_the_bwd_rows_with_the_paper_reference():
    doc = _bwd_doc()
    fig = plots.plot_backward(doc)  # bf16 (present), the "bwd" pass
    panels = [a for a in fig.axes if a.get_title()]
    assert [a.get_title() for a in panels] == ["headdim 64, no mask", "headdim 128, no mask",
                                               "headdim 64, causal", "headdim 128, causal"]
    title = fig._suptitle.get_text()
    assert title.startswith("Backward (2.5 × forward FLOPs), bf16: our step vs cuDNN, SDPA FA2\nNVIDIA H200")
    assert "commit abc1234" in title and "2026-12-03" in title
    hd128 = _lines(panels[1])
    ref = hd128[plots.PAPER_FA3_BWD_LABEL]
    assert list(ref.get_xdata()) == [512, 2048, 8192]
    assert list(ref.get_ydata()) == [results.PAPER_FA3_BWD_HD128[s] for s in (512, 2048, 8192)]
    assert all(plots.PAPER_FA3_BWD_LABEL not in _lines(a) for a in panels if a is not panels[1])
    want = sorted((r["seqlen_q"], r["tflops"]) for r in doc["rows"] if r["impl"] == "step13" and r["dtype"] == "bf16"
                  and r["pass"] == "bwd" and r["headdim"] == 128 and not r["causal"])
    line = hd128[plots.LABELS["step13"]]
    assert list(zip(line.get_xdata(), line.get_ydata())) == want
    assert hd128[plots.LABELS["step13_det"]].get_linestyle() == "--"
    assert set(hd128) == {plots.LABELS[i] for i in ("step13", "step13_det", "cudnn", "sdpa_flash")} | {
        plots.PAPER_FA3_BWD_LABEL}


def test_plot_backward_fwd_bwd_pass_has_no_paper_line_and_validates():
    doc = _bwd_doc()
    fig = plots.plot_backward(doc, dtype="fp16", pass_="fwd_bwd")
    assert fig._suptitle.get_text().startswith("Forward + backward (3.5 × forward FLOPs), fp16")
    assert all(plots.PAPER_FA3_BWD_LABEL not in _lines(a) for a in fig.axes)
    with pytest.raises(ValueError, match="no 'bwd' rows"):
        plots.plot_backward([r for r in doc["rows"] if r["pass"] == "fwd_bwd"])
    with pytest.raises(ValueError, match="pass_"):
        plots.backward_table(doc, pass_="fwd")
    with pytest.raises(ValueError, match="expected 4 Axes"):
        plots.plot_backward(doc, ax=plt.subplots(1, 3)[1])
    table = plots.backward_table(doc)
    assert table[(128, False, 8192)]["step13"] == next(
        r["tflops"] for r in doc["rows"] if r["impl"] == "step13" and r["dtype"] == "bf16" and r["pass"] == "bwd"
        and r["headdim"] == 128 and not r["causal"] and r["seqlen_q"] == 8192)
