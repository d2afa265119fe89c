"""fa3_lab.plots: the Figure-5 grid and the ablation bars drawn from the recorded JSON runs."""
from __future__ import annotations

import copy

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from fa3_lab import plots, results  # noqa: E402


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
    fig = plots.plot_bench(bench_run, dtype="fp16")
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert plots.LABELS["fa3"] not in labels
    assert plots.LABELS["step02"] in labels


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
    table = plots.ablation_table(ablation_run, "fp16", paper={"step02": 1.0})
    assert [i for i, _, _ in table][:4] == ["step01", "step02", "step03", "step04"]
    assert [p for _, _, p in table][:3] == [None, 1.0, None]


def test_bench_table_matches_rows(bench_run):
    table = plots.bench_table(bench_run, "bf16")
    r = next(r for r in bench_run.rows if r["dtype"] == "bf16" and r["impl"] == "step02")
    assert table[(r["headdim"], r["causal"], r["seqlen_q"])]["step02"] == r["tflops"]


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
