"""Build and load the CUDA kernels with torch's cpp_extension (JIT on first use, cached by source hash).

The extension holds every step in ``cuda/steps/NN_*.cu`` and ``cuda/steps/bwd/NN_*.cu`` (``$FA3_LAB_STEPS``,
e.g. ``4,11``, builds only those) plus ``cuda/binding.cpp``, ``cuda/binding_bwd.cpp`` and
``cuda/fp8_quantize.cu`` (the fused quantization of step 05's inputs, built whatever steps exist). The build
directory is ``$FA3_LAB_CACHE`` (default ``~/.cache/fa3_lab``) / ``<name>-<hash of all sources>``, so
editing any kernel source rebuilds, and an unchanged tree loads in a second.

Flags (docs/design.md, kernel conventions): ``-gencode=arch=compute_90a,code=sm_90a -O3 -lineinfo
-Xptxas=--warn-on-spills``. ``traced=True`` adds ``-DFA3_TRACE`` (the timeline build); ``$FA3_LAB_DEFINES`` adds
more ``-D`` flags (tile-size A/B builds), part of the cache key.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import sys
from pathlib import Path

from ._env import CUDA_DIR

QUANTIZE_SOURCE = CUDA_DIR / "fp8_quantize.cu"  # not a step: fa3_lab.fp8.quantize_for_kernel's kernel
BWD_BINDING_SOURCE = CUDA_DIR / "binding_bwd.cpp"  # the backward's entry (binding.cpp registers it as `bwd`)

NVCC_FLAGS = [
    "-std=c++17",
    "-gencode=arch=compute_90a,code=sm_90a",
    "-O3",
    "-lineinfo",
    "-Xptxas=--warn-on-spills",
    "--expt-relaxed-constexpr",
]


@functools.lru_cache(None)
def _step_files() -> tuple:
    return tuple((int(path.name[:2]), path) for path in sorted((CUDA_DIR / "steps").glob("[0-9][0-9]_*.cu")))


def _only_steps() -> set | None:
    """``$FA3_LAB_STEPS`` ("4,11"): build only these steps (a quick device build for one test); unset: all."""
    raw = os.environ.get("FA3_LAB_STEPS", "").strip()
    if not raw:
        return None
    try:
        return {int(x) for x in raw.split(",") if x.strip()}
    except ValueError:
        raise ValueError(f"FA3_LAB_STEPS: expected comma-separated step ids like '4,11', got {raw!r}") from None


def step_sources() -> dict[int, Path]:
    """{step number: path} of the forward step files present in cuda/steps/ (scanned once per process: every
    flash_attn_func call asks, through fa3_lab.steps()), restricted by ``$FA3_LAB_STEPS`` when set."""
    only = _only_steps()
    return {n: p for n, p in _step_files() if only is None or n in only}


@functools.lru_cache(None)
def _bwd_step_files() -> tuple:
    return tuple((int(path.name[:2]), path) for path in sorted((CUDA_DIR / "steps" / "bwd").glob("[0-9][0-9]_*.cu")))


def bwd_step_sources() -> dict[int, Path]:
    """{step number: path} of the backward step files in cuda/steps/bwd/ (same ``$FA3_LAB_STEPS`` filter)."""
    only = _only_steps()
    return {n: p for n, p in _bwd_step_files() if only is None or n in only}


def source_hash(extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for path in sorted(CUDA_DIR.rglob("*")):
        if path.suffix in (".cu", ".cuh", ".h", ".cpp") and path.is_file():
            h.update(str(path.relative_to(CUDA_DIR)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    return Path(os.environ.get("FA3_LAB_CACHE", Path.home() / ".cache" / "fa3_lab"))


@functools.lru_cache(None)
def load(traced: bool = False):
    """Compile (first use) and import the extension; returns the module with ``fwd``, ``quantize_fp8``
    (and ``fwd_fp8`` when step 05 is present).

    Raises:
        RuntimeError: no sm_90 GPU, or the compiler failed (its log is in the exception).
    """
    from . import _env

    reason = _env.why_no_sm90()
    if reason:
        raise RuntimeError(f"fa3_lab kernels need an sm_90 GPU (H100/H200): {reason}")
    import torch.utils.cpp_extension as cpp_ext

    steps = step_sources()
    bwd_steps = bwd_step_sources()
    extra = os.environ.get("FA3_LAB_DEFINES", "").split()  # e.g. "-DFA3_BLOCK_N_HD128=128" (A/B builds)
    if any(not d.startswith("-D") for d in extra):
        raise ValueError(f"FA3_LAB_DEFINES: expected -DNAME[=VALUE] flags, got {extra}")
    defines = [f"-DFA3_HAS_STEP{n:02d}" for n in (*steps, *bwd_steps)] + (["-DFA3_TRACE"] if traced else []) + extra
    name = "fa3_lab_ext_trace" if traced else "fa3_lab_ext"
    digest = source_hash(" ".join(defines))
    build_dir = cache_dir() / f"{name}-{digest}"
    build_dir.mkdir(parents=True, exist_ok=True)
    if not any(build_dir.glob("*.so")):
        print(f"fa3_lab: compiling the CUDA kernels (steps {', '.join(f'{n:02d}' for n in (*steps, *bwd_steps))}) for sm_90a "
              f"into {build_dir} — first use only, a few minutes…", file=sys.stderr, flush=True)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    os.environ.setdefault("MAX_JOBS", str(max(1, os.cpu_count() or 1)))
    return cpp_ext.load(
        name=f"{name}_{digest}",
        sources=[str(CUDA_DIR / "binding.cpp"), str(BWD_BINDING_SOURCE)] + [str(p) for p in steps.values()]
        + [str(p) for p in bwd_steps.values()] + [str(QUANTIZE_SOURCE)],
        extra_include_paths=[str(CUDA_DIR / "include")],
        extra_cflags=["-O3", "-std=c++17"] + defines,
        extra_cuda_cflags=NVCC_FLAGS + defines,
        build_directory=str(build_dir),
        verbose=bool(os.environ.get("FA3_LAB_VERBOSE_BUILD")),
    )


def ptxas_report(log: str) -> list[dict]:
    """Parse ``ptxas -v`` output into [{kernel, registers, spill_stores, spill_loads, stack}]."""
    rows, cur = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            cur = {"kernel": m.group(1)}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
    return rows
