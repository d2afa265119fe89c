"""fa3-lab: FlashAttention-3 (Shah et al., 2024) from NumPy references to a Hopper kernel.

Public API (FlashAttention's conventions, BSHD layout; see docs/design.md):

* :func:`flash_attn_func` — 16-bit forward on an sm_90 GPU, one of the lab's kernel steps.
* :func:`flash_attn_fp8_func` — FP8 e4m3 forward with block quantization and incoherent processing.
* :func:`steps` — the kernel steps and what each adds.

Attributes are loaded lazily so that ``python -m fa3_lab --help`` does not import torch.
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "flash_attn_func": "fa3_lab.api",
    "flash_attn_fp8_func": "fa3_lab.api",
    "steps": "fa3_lab.api",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fa3_lab' has no attribute {name!r}")
