"""fa3_lab.lab.trace on synthetic buffers (no GPU): decoding, window pairing, the overlap fraction."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fa3_lab.lab import trace

CAP = 16


def make_buffer(rows_events, ghz=2.0, smid=7, span_ns=1000):
    """One CTA: rows_events {row: [(t_ns, code, tile)]} → int64 (1, 4, 2·CAP) as trace.h writes it."""
    buf = np.zeros((1, len(trace.ROWS), 2 * CAP), dtype=np.int64)
    start_clk = 10_000
    for r, name in enumerate(trace.ROWS):
        if name not in rows_events:
            continue
        rec = buf[0, r].reshape(-1, 2)
        rec[0] = (start_clk, (smid << 32) | trace.HEADER)
        rec[1] = (5_000, 5_000 + span_ns)  # %globaltimer at start and end
        for i, (t_ns, code, tile) in enumerate(rows_events[name]):
            rec[2 + i] = (start_clk + int(round(t_ns * ghz)), (code << 32) | tile)
    return buf


def test_decode_converts_cycles_with_the_globaltimer_span():
    events = {"consumer0": [(0, 10, 0), (100, 11, 0), (100, 12, 0), (400, 13, 0), (500, 14, 0), (1000, 15, 0)]}
    (cta,) = trace.decode(make_buffer(events, ghz=2.0, span_ns=1000))
    assert cta["smid"] == 7
    assert cta["ghz"] == pytest.approx(2.0)
    times = [t for t, _, _ in cta["rows"]["consumer0"]]
    assert times == pytest.approx([0, 100, 100, 400, 500, 1000])
    assert [e for _, e, _ in cta["rows"]["consumer0"]][:2] == ["gemm0_issue", "gemm0_done"]


def test_windows_pair_begin_and_end_by_tile():
    ev = [(0, "gemm0_issue", 1), (5, "gemm1_issue", 0), (10, "gemm0_done", 1), (20, "gemm1_done", 0),
          (10, "softmax_begin", 1), (30, "softmax_end", 1), (40, "softmax_end", 9)]  # unmatched end ignored
    got = sorted(trace.windows(ev))
    assert got == [("gemm0", 0, 10, 1), ("gemm1", 5, 20, 0), ("softmax", 10, 30, 1)]


def _cta(rows):
    return {"rows": rows}


def test_fraction_counts_overlapping_gemm_windows_once():
    """Two GEMM windows of the other warpgroup in flight at once must not count the softmax twice."""
    c0 = [(0, "softmax_begin", 0), (100, "softmax_end", 0)]
    c1 = [(0, "gemm0_issue", 1), (100, "gemm0_done", 1), (0, "gemm1_issue", 0), (100, "gemm1_done", 0)]
    f = trace.softmax_under_other_gemms(_cta({"consumer0": c0, "consumer1": c1}))
    assert f["consumer0"] == pytest.approx(1.0)  # not 2.0


def test_fraction_partial_and_zero():
    c0 = [(0, "softmax_begin", 0), (100, "softmax_end", 0)]
    c1 = [(75, "gemm0_issue", 1), (200, "gemm0_done", 1)]
    f = trace.softmax_under_other_gemms(_cta({"consumer0": c0, "consumer1": c1}))
    assert f["consumer0"] == pytest.approx(0.25)
    assert f["consumer1"] == 0.0  # consumer1 has no softmax window


def test_recorded_traces_are_consistent():
    """The committed traces decode, and every fraction lies in [0, 1]."""
    from fa3_lab.lab import results

    paths = sorted((results.RESULTS_DIR / "traces").glob("*/trace_step*.json"))
    if not paths:
        pytest.skip("no recorded traces")
    for path in paths:
        doc = json.loads(path.read_text())
        assert {"meta", "step", "shape", "summary", "overhead", "ctas"} <= set(doc)
        for cta in doc["ctas"]:
            for v in trace.softmax_under_other_gemms(cta).values():
                assert 0.0 <= v <= 1.0 + 1e-9, path


def test_cli_rejects_bad_shape():
    from fa3_lab.lab.cli import UsageError

    with pytest.raises(UsageError, match="--shape"):
        trace.parse_shape("4,8448,16,96")
    with pytest.raises(UsageError, match="--shape"):
        trace.parse_shape("a,b")


# ---------------------------------------------------------------- the backward's trace (tools/experiments/bwd_trace.py)

def _bwd_trace_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "experiments" / "bwd_trace.py"
    spec = importlib.util.spec_from_file_location("bwd_trace", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bwd_trace_splits_a_cta_into_its_phases():
    """Two CTAs on one SM, stamped as step 18's FA3_TRACE build does (codes of trace.h): prologue, two m_blocks, the
    epilogue, the writer's last add, and the gap before the second CTA."""
    bt = _bwd_trace_module()
    buf = np.zeros((2, 4, 2 * CAP), dtype=np.int64)
    for cta, t0 in enumerate((1_000, 9_000)):
        for r in range(4):
            buf[cta, r].reshape(-1, 2)[:2] = ((t0, (5 << 32) | bt.HEADER), (100, 4_100))
        consumer = buf[cta, 2].reshape(-1, 2)
        for i, (dt, code) in enumerate(((500, 24), (900, 25), (2_900, 26), (3_000, 25), (5_000, 26), (5_600, 27))):
            consumer[2 + i] = (t0 + dt, (code << 32) | (i // 2))
        buf[cta, 1].reshape(-1, 2)[2] = (t0 + 5_900, (23 << 32) | 1)
    ctas = bt.decode(buf)
    assert [c["smid"] for c in ctas] == [5, 5]
    p = bt.phases(ctas[0])
    assert p == {"m_blocks": 2, "to_kv_ready": 500, "to_first_q": 900, "loop": 4_100, "iter_median": 2_000,
                 "ring_waits": 100, "epilogue": 600, "writer_after_epilogue": 300, "span": 5_900}
    s = bt.summarize(ctas)
    assert s["gap_between_ctas"] == 9_000 - (1_000 + 5_900)
    assert s["ghz"] == pytest.approx((5_900 + 5_600) / 2 / 4_000)  # median over the rows of cycles ÷ ns


def test_recorded_bwd_traces_hold_their_medians():
    from fa3_lab.lab import results

    paths = sorted((results.RESULTS_DIR / "traces").glob("*/bwd_trace_step*.json"))
    if not paths:
        pytest.skip("no recorded backward traces")
    for path in paths:
        doc = json.loads(path.read_text())
        assert {"meta", "step", "headdim", "runs"} <= set(doc), path
        for run in doc["runs"]:
            c = run["median_cycles"]
            assert run["recorded"] == run["ctas"] and c["m_blocks"] >= 1, path
            assert c["to_first_q"] + c["loop"] + c["epilogue"] <= c["span"] * 1.05, path


# ---------------------------------------------------------------- Nsight Compute's stall samples (tools/experiments/ncu_stalls.py)

def _ncu_stalls_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "experiments" / "ncu_stalls.py"
    spec = importlib.util.spec_from_file_location("ncu_stalls", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ncu_stalls_reads_the_source_page_and_its_trimmed_copy(tmp_path, capsys):
    """ncu's source page (a kernel-name line, then the table) and the --trim file both read; the instruction with the
    most samples is listed first with its main reason; rows without samples are left out of the trimmed copy."""
    ns = _ncu_stalls_module()
    page = tmp_path / "page.csv"
    page.write_text('"Kernel Name","k"\n'
                    '"Address","Source","Warp Stall Sampling (All Samples)","stall_long_sb","stall_wait",'
                    '"stall_long_sb (Not Issued)"\n'
                    '"0x10","  LDS.64 R2, [R0]","3","0","3","0"\n'
                    '"0x20","  FFMA R1, R2, R3, R4","7","6","1","6"\n'
                    '"0x30","  EXIT","0","0","0","0"\n')
    reasons, rows = ns.read(page)
    assert reasons == ["stall_long_sb", "stall_wait"] and len(rows) == 3
    trim = tmp_path / "trim.csv"
    assert ns.main([str(page), "--top", "1", "--trim", str(trim)]) == 0
    out = capsys.readouterr().out
    assert "10 samples over 3 instructions" in out and "FFMA R1, R2, R3, R4" in out and "long_sb 6" in out
    assert "LDS.64" not in out.split("top 1 instructions")[1]
    reasons, rows = ns.read(trim)
    assert [r["Source"] for r in rows] == ["LDS.64 R2, [R0]", "FFMA R1, R2, R3, R4"]
    with pytest.raises(ValueError, match="no header row"):
        bad = tmp_path / "bad.csv"
        bad.write_text("x,y\n1,2\n")
        ns.read(bad)
