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
