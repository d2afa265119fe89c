"""`python -m fa3_lab info` — what this machine is, and which parts of the lab can run on it.

Three tiers, each with the reason when it cannot run:

* NumPy references (``reference/``): anywhere NumPy runs.
* SASS inspection (compile to a cubin, disassemble): needs ``nvcc`` >= 12.3 (compiles for sm_90a without a
  GPU) and ``nvdisasm`` (``pip install nvidia-cuda-nvdisasm``).
* Kernels: an sm_90 GPU (H100/H200) visible to torch, and ``nvcc`` >= 12.3 (the JIT build, wgmma and
  setmaxnreg in inline PTX).
"""
from __future__ import annotations

import json
import platform
import shutil
import subprocess

HELP = "show the machine (Python, NumPy, torch, CUDA, cuDNN, GPU, nvcc) and what can run here"

#: Oldest nvcc the kernels are built with (sm_90a, wgmma/setmaxnreg PTX, as FA3 requires).
MIN_NVCC = (12, 3)


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def _version_tuple(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    parts = []
    for piece in text.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts) or None


def _torch_facts() -> dict:
    facts = {"torch": None, "torch_cuda_build": None, "cuda_runtime": None, "cuda_driver": None,
             "cudnn": None, "gpu": None, "compute_capability": None, "sm_count": None}
    try:
        import torch
    except ImportError:
        return facts
    facts["torch"] = torch.__version__
    facts["torch_cuda_build"] = torch.version.cuda  # None for a CPU build
    if not torch.cuda.is_available():
        return facts
    props = torch.cuda.get_device_properties(0)
    facts["gpu"] = props.name
    facts["compute_capability"] = f"{props.major}.{props.minor}"
    facts["sm_count"] = props.multi_processor_count
    # torch ships its own CUDA runtime; the version it reports is the one loaded in this process.
    facts["cuda_runtime"] = torch.version.cuda
    facts["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    get_driver = getattr(torch._C, "_cuda_getDriverVersion", None)
    if get_driver is not None:
        v = int(get_driver())  # e.g. 12040 -> "12.4"
        facts["cuda_driver"] = f"{v // 1000}.{(v % 1000) // 10}"
    return facts


def _nvidia_smi_driver() -> str | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    line = out.stdout.strip().splitlines()
    return line[0].strip() if out.returncode == 0 and line else None


def _nvcc_reason(nvcc_path: str | None, nvcc_version: str | None) -> str:
    """Empty if nvcc is new enough, else why not."""
    need = ".".join(map(str, MIN_NVCC))
    if nvcc_path is None:
        return f"nvcc not found (need the CUDA toolkit {need}+ on PATH or in CUDA_HOME)"
    v = _version_tuple(nvcc_version)
    if v is None:
        return f"could not read the version of {nvcc_path}"
    if v < MIN_NVCC:
        return f"nvcc {nvcc_version} is older than {need} (sm_90a wgmma/setmaxnreg need {need}+)"
    return ""


def collect() -> dict:
    """Facts about this machine and what the lab can run on it.

    Returns:
        dict with string/int/None values: ``python``, ``platform``, ``numpy``, ``torch``,
        ``torch_cuda_build`` (CUDA version torch was built for; None for a CPU build),
        ``cuda_runtime``, ``cuda_driver`` (the CUDA version the driver supports),
        ``nvidia_driver`` (the driver release, from nvidia-smi), ``cudnn`` (int, e.g. 91900), ``gpu`` (name of device 0),
        ``compute_capability`` ("9.0"), ``sm_count``, ``nvcc``/``cuobjdump``/``nvdisasm`` (paths),
        ``nvcc_version``; and ``can_run``: ``{"references" | "sass" | "kernels": {"ok": bool,
        "why": str}}`` where ``why`` is empty when ``ok``. Everything that is absent is None.
    """
    import numpy as np

    from fa3_lab import _env

    facts = {"python": platform.python_version(), "platform": f"{platform.system()} {platform.machine()}",
             "numpy": np.__version__}
    facts.update(_torch_facts())
    facts["nvidia_driver"] = _nvidia_smi_driver() if facts["gpu"] is not None else None
    facts["nvcc"] = _env.nvcc()
    facts["nvcc_version"] = _env.nvcc_version()
    facts["cuobjdump"] = _env.cuobjdump()
    facts["nvdisasm"] = _env.nvdisasm()

    nvcc_why = _nvcc_reason(facts["nvcc"], facts["nvcc_version"])
    sass_why = "; ".join(w for w in (
        nvcc_why,
        "" if facts["nvdisasm"] else "nvdisasm not found (pip install nvidia-cuda-nvdisasm)",
    ) if w)
    kernel_why = "; ".join(w for w in (_env.why_no_sm90(), nvcc_why) if w)
    facts["can_run"] = {
        "references": {"ok": True, "why": ""},
        "sass": {"ok": not sass_why, "why": sass_why},
        "kernels": {"ok": not kernel_why, "why": kernel_why},
    }
    return facts


_LABELS = [
    ("python", "Python"), ("platform", "platform"), ("numpy", "NumPy"), ("torch", "torch"),
    ("torch_cuda_build", "torch built for CUDA"), ("cuda_runtime", "CUDA runtime"),
    ("cuda_driver", "CUDA driver API"), ("nvidia_driver", "NVIDIA driver"), ("cudnn", "cuDNN"), ("gpu", "GPU"),
    ("compute_capability", "compute capability"), ("sm_count", "SMs"), ("nvcc", "nvcc"),
    ("nvcc_version", "nvcc version"), ("cuobjdump", "cuobjdump"), ("nvdisasm", "nvdisasm"),
]

_TIERS = [
    ("references", "NumPy references"),
    ("sass", "SASS inspection"),
    ("kernels", "CUDA kernels (sm_90a)"),
]


def render(facts: dict, console) -> None:
    """Print ``facts`` (from :func:`collect`) as two rich tables on ``console``."""
    from rich.table import Table

    machine = Table(title="This machine", show_header=False, title_justify="left")
    machine.add_column("what", style="bold")
    machine.add_column("value", overflow="fold")
    for key, label in _LABELS:
        value = facts.get(key)
        machine.add_row(label, "—" if value is None else str(value))
    console.print(machine)

    tiers = Table(title="What can run here", title_justify="left")
    tiers.add_column("part")
    tiers.add_column("runs?")
    tiers.add_column("why not", overflow="fold")
    for key, label in _TIERS:
        tier = facts["can_run"][key]
        tiers.add_row(label, "[green]yes[/]" if tier["ok"] else "[red]no[/]", tier["why"])
    console.print(tiers)


def run(args) -> int:
    facts = collect()
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    from rich.console import Console

    render(facts, Console())
    return 0
