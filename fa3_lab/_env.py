"""What this machine can do: GPU, nvcc, cuobjdump/nvdisasm. Used by `info`, the tests and `sass`."""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = REPO_ROOT / "cuda"
RESULTS_DIR = Path(__file__).resolve().parent / "results"


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require(module: str, extra: str, what: str):
    """Import ``module`` for ``what``, or say which extra of the lab installs it.

    Call it before anything is written, so that a retry after the install finds nothing left behind.

    Returns:
        the imported module.

    Raises:
        MissingExtra (an ImportError): "<what> needs <module>, which the `<extra>` extra installs:
        pip install -e ".[<extra>]" (in a clone) or pip install "fa3-lab[<extra>]"".
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtra(f"{what} needs {module}, which the `{extra}` extra installs: "
                           f'pip install -e ".[{extra}]" (in a clone of the lab) or pip install "fa3-lab[{extra}]"') from e


@functools.lru_cache(None)
def sm90_gpu() -> str | None:
    """Name of the first CUDA device if it is compute capability 9.0 (Hopper), else None."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    if torch.cuda.get_device_capability(0) != (9, 0):
        return None
    return torch.cuda.get_device_name(0)


def why_no_sm90() -> str:
    """One line saying why the GPU parts cannot run here (empty if they can)."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return f"no CUDA GPU visible to torch {torch.__version__}"
    cap = torch.cuda.get_device_capability(0)
    if cap != (9, 0):
        return f"{torch.cuda.get_device_name(0)} is sm_{cap[0]}{cap[1]}; the kernels need sm_90 (H100/H200)"
    return ""


def _which_tool(name: str) -> str | None:
    path = shutil.which(name)
    if path:
        return path
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / name).exists():
            return str(Path(root) / "bin" / name)
    # PyPI packages nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm put them under nvidia/cu*/bin
    try:
        import nvidia  # namespace package
        for base in nvidia.__path__:
            for cand in sorted(Path(base).glob(f"cu*/bin/{name}")) + sorted(Path(base).glob(f"*/bin/{name}")):
                if cand.exists():
                    return str(cand)
    except ImportError:
        pass
    return None


@functools.lru_cache(None)
def nvcc() -> str | None:
    return _which_tool("nvcc")


@functools.lru_cache(None)
def cuobjdump() -> str | None:
    return _which_tool("cuobjdump")


@functools.lru_cache(None)
def nvdisasm() -> str | None:
    return _which_tool("nvdisasm")


@functools.lru_cache(None)
def nvcc_version() -> str | None:
    exe = nvcc()
    if not exe:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if "release" in line:
            return line.split("release", 1)[1].split(",")[0].strip()
    return None


@functools.lru_cache(None)
def git_commit() -> str:
    """Short commit of the checkout; $FA3_LAB_COMMIT wins (a copy of the tree without .git, e.g. on
    a lent GPU machine, is told the commit it was copied from)."""
    if os.environ.get("FA3_LAB_COMMIT"):
        return os.environ["FA3_LAB_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return "unknown"
