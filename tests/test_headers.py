"""fa3_lab.lab.headers: the steps' "Measured" paragraphs are generated from the current run (CPU, no GPU)."""
from __future__ import annotations

from pathlib import Path

import pytest

from fa3_lab import registry
from fa3_lab.lab import headers, results


def _meta():
    return {"gpu": "NVIDIA H200", "sm_count": 132, "torch": "2.11.0+cu130", "cuda": "13.0", "cudnn": 91900,
            "commit": "abc1234", "date": "2026-12-03T10:00:00Z", "command": "python -m fa3_lab bench --ablation"}


def _row(impl, dtype, ms, **kw):
    row = {"impl": impl, "dtype": dtype, "headdim": 128, "causal": False, "batch": 4, "seqlen_q": 8448,
           "seqlen_k": 8448, "nheads": 16, "nheads_kv": 16, "ms": ms}
    row.update(kw)
    row["tflops"] = results.tflops(row)
    return row


def _run(name, rows):
    return results.Run(Path(headers._env.REPO_ROOT / "fa3_lab" / "results" / "nvidia-h200" / f"{name}.json"),
                       _meta(), rows)


def test_forward_step_reads_the_ablation_and_its_parent():
    run = _run("ablation", [_row("step03", "bf16", 2.0), _row("step04", "bf16", 1.6), _row("step04", "fp16", 1.8),
                            _row("step03", "fp16", 2.0)])
    text = headers.measured(registry.step(4), [run])
    assert "commit abc1234" in text and "fa3_lab/results/nvidia-h200/ablation.json" in text
    assert f"bf16 {run.rows[1]['tflops']:.0f}" in text and "(1.25× step 03)" in text


def test_backward_step_reads_bench_backward_against_cudnn():
    rows = [_row(impl, "bf16", ms, seqlen_q=8192, seqlen_k=8192, batch=2, **{"pass": "bwd"})
            for impl, ms in (("step11", 2.0), ("cudnn", 1.0), ("sdpa_flash", 3.0))]
    text = headers.measured(registry.step(11), [_run("bench_backward", rows)])
    assert "non-causal" in text and "0.50× cudnn" in text and "1.50× sdpa_flash" in text


def test_a_step_the_run_does_not_cover_says_so():
    assert "has no row for this step" in headers.measured(registry.step(5), [])


def test_rewrite_replaces_exactly_the_measured_paragraph():
    text = "// Twin: x\n// Measured: old\n//   old too\n// Known limits: keep\n#include <x>\n"
    new = headers.rewrite(text, ["// Measured: new"], "f.cu")
    assert new == "// Twin: x\n// Measured: new\n// Known limits: keep\n#include <x>\n"
    with pytest.raises(ValueError, match="no '// Measured' paragraph"):
        headers.rewrite("// Twin: x\n", ["// Measured: new"], "f.cu")


def test_wrap_keeps_lines_within_the_width():
    lines = headers._wrap("Measured " + "word " * 80)
    assert all(len(ln) <= headers.WIDTH for ln in lines) and lines[0].startswith("// Measured")
    assert all(ln.startswith("//   ") for ln in lines[1:])


# ---------------------------------------------------------------------- backward: ablation_backward.json

def _bwd_abl(rows_ms, **shape):
    """Rows of ablation_backward.json: bf16, pass bwd, at ``shape`` (default headdim 128, seqlen 8k, batch 2)."""
    kw = dict(seqlen_q=8192, seqlen_k=8192, batch=2, **{"pass": "bwd"})
    kw.update(shape)
    return [_row(impl, "bf16", ms, **kw) for impl, ms in rows_ms]


_ABL_MS = (("step11", 2.0), ("step12", 1.6), ("step13", 1.25), ("step13_det", 1.4), ("step14", 1.2), ("step15", 1.15),
           ("step16", 1.1), ("step17", 1.08), ("step18", 1.07), ("step19", 1.02),
           ("step20", 1.01), ("step21", 1.005), ("step22", 0.99), ("step23", 0.98), ("step24", 0.975), ("step25", 0.97),
           ("step26", 0.965), ("step27", 0.96), ("step28", 0.955),
           ("cudnn", 1.3), ("sdpa_flash", 1.8))


def _abl_run():
    rows = _bwd_abl(_ABL_MS) + _bwd_abl(_ABL_MS, causal=True)
    rows += _bwd_abl((("step13", 0.5), ("cudnn", 0.1)), headdim=64, seqlen_q=16384, seqlen_k=16384, batch=1)
    rows += _bwd_abl((("step13", 9.0),), **{"pass": "fwd_bwd"})  # another pass: never read
    return _run("ablation_backward", rows)


def test_backward_step_reads_the_backward_ablation_against_parent_and_peers():
    run = _abl_run()
    tf = {impl: _row(impl, "bf16", ms, seqlen_q=8192, seqlen_k=8192, batch=2, **{"pass": "bwd"})["tflops"]
          for impl, ms in _ABL_MS}
    text = headers.measured(registry.step(12), [run, _run("bench_backward", _bwd_abl((("step12", 0.1),)))])
    assert text.startswith("Measured (NVIDIA H200, commit abc1234, 2026-12-03; "
                           "fa3_lab/results/nvidia-h200/ablation_backward.json): the backward alone")
    assert "bf16, headdim 128, seqlen 8k (batch 2, 16 heads): " in text
    assert (f"non-causal {tf['step12']:.0f} TFLOPs/s ({tf['step12'] / tf['step11']:.2f}× step 11, "
            f"{tf['step12'] / tf['cudnn']:.2f}× cuDNN, {tf['step12'] / tf['sdpa_flash']:.2f}× FA2); causal ") in text
    assert text.count("TFLOPs/s") == 2  # non-causal and causal, the other shape and pass not read
    first = headers.measured(registry.step(11), [run])
    assert "× step" not in first and "× cuDNN" in first  # the first step has no parent
    det = headers.measured(registry.step(13), [run])
    pct = (tf["step13_det"] / tf["step13"] - 1) * 100
    assert f", deterministic {tf['step13_det']:.0f} (−{-pct:.1f} %)" in det
    assert f"({tf['step13'] / tf['step12']:.2f}× step 12, " in det


def test_backward_ablation_takes_the_largest_shape_without_8k_and_falls_back_to_bench_backward():
    run = _run("ablation_backward", _bwd_abl(_ABL_MS, headdim=64, seqlen_q=2048, seqlen_k=2048)
               + _bwd_abl(_ABL_MS, headdim=256, seqlen_q=4096, seqlen_k=4096, nheads=8, nheads_kv=8))
    assert "headdim 256, seqlen 4k (batch 2, 8 heads): non-causal" in headers.measured(registry.step(14), [run])
    no_step = _run("ablation_backward", _bwd_abl((("cudnn", 1.0),)))
    bench = _run("bench_backward", _bwd_abl((("step13", 2.0), ("cudnn", 1.0))))
    text = headers.measured(registry.step(13), [no_step, bench])
    assert "bench_backward.json" in text and "0.50× cudnn" in text


def test_a_backward_step_that_changes_one_headdim_is_measured_there():
    # steps 24 and 25 change only headdim 256, step 22 only 64: their paragraph is at that headdim, seqlen 8k
    run = _run("ablation_backward", _bwd_abl(_ABL_MS) + _bwd_abl(_ABL_MS, headdim=256, nheads=8, nheads_kv=8)
               + _bwd_abl(_ABL_MS, headdim=64, nheads=32, nheads_kv=32))
    assert registry.step(25).headdims == (256,) and registry.step(22).headdims == (64,)
    assert "bf16, headdim 256, seqlen 8k (batch 2, 8 heads): non-causal" in headers.measured(registry.step(25), [run])
    assert "bf16, headdim 64, seqlen 8k (batch 2, 32 heads): non-causal" in headers.measured(registry.step(22), [run])
    assert "bf16, headdim 128, seqlen 8k (batch 2, 16 heads)" in headers.measured(registry.step(21), [run])


def test_backward_headers_are_generated_within_the_width_and_drift_is_detected(monkeypatch):
    run = _abl_run()
    for s in registry.series("bwd"):
        block = headers._wrap(headers.measured(s, [run]))
        assert block[0].startswith("// Measured (NVIDIA H200, commit abc1234")
        assert all(len(ln) <= headers.WIDTH for ln in block)
        text = "// Twin: x\n// Measured: old\n// Known limits: keep\n"
        assert headers.rewrite(text, block, s.path) == "\n".join(["// Twin: x", *block, "// Known limits: keep", ""])
    paths = [headers._env.REPO_ROOT / s.path for s in registry.series("bwd")]
    before = [p.read_text() if p.is_file() else None for p in paths]
    recorded = headers._current()
    monkeypatch.setattr(headers, "_current", lambda: [run] + recorded)  # the forward steps keep their run
    stale = headers.update(check=True)  # new backward numbers: every present backward step drifts, no other
    assert set(stale) == {p for p, b in zip(paths, before) if b is not None}
    assert [p.read_text() if p.is_file() else None for p in paths] == before  # check changes nothing
