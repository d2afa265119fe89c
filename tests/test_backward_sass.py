"""Step 11's SASS (marker ``sass``: needs nvcc + cuobjdump, no GPU): every instantiation of the backward's main
kernel (dtype × headdim × causal) compiles without spills and runs its five GEMMs on HGMMA."""
from __future__ import annotations

import re

import pytest

from fa3_lab import _build, _env
from fa3_lab.lab import sass

pytestmark = [pytest.mark.sass, pytest.mark.step11]

SOURCE = _env.CUDA_DIR / "steps" / "bwd" / "11_bwd.cu"


def test_backward_has_no_spills_and_every_main_kernel_uses_hgmma():
    cubin, log = sass.compile_source(SOURCE)
    rows = [r for r in _build.ptxas_report(log) if "bwd_kernel" in r["kernel"]]
    assert len(rows) == 12, [r["kernel"] for r in rows]  # {fp16, bf16} × {64, 128, 256} × {causal, not}
    for r in rows:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert r["registers"] <= 255, r
    funcs = sass.dump_sass(cubin)
    mains = {name: text for name, text in funcs.items() if "bwd_kernel" in name}
    assert len(mains) == 12
    for name, text in mains.items():
        hgmma = len(re.findall(r"\bHGMMA\.", text))
        assert hgmma >= 5, f"{name}: {hgmma} HGMMA"  # Sᵀ, dPᵀ, dV, dK, dQ: at least one instruction each
        assert not re.search(r"\b(LDL|STL)\b", text), f"{name}: local memory in the SASS"
