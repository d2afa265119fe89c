"""Recorded GPU runs: the one JSON schema every benchmark writes and every table/plot reads.

docs/design.md, "Timing protocol"::

    {"meta": {"gpu", "sm_count", "torch", "cuda", "cudnn", "commit", "date", "command"},
     "rows": [{"impl", "dtype", "headdim", "causal", "batch", "seqlen_q", "seqlen_k",
               "nheads", "nheads_kv", "ms", "tflops"}, ...]}

Files live in ``fa3_lab/results/<gpu-slug>/<name>.json``; one file is one run (one GPU, one
commit, one process), so numbers inside a file may be compared and numbers across files may not.

**One current run per GPU.** A GPU folder holds the files of one commit only (the grid ``bench.json``,
``ablation.json``, ``bench_fp8.json``, whichever that run made; ``tests/test_newcomer.py``
fails otherwise). When a new run is recorded, the old files move out of the package to
``tools/experiments/results/<gpu-slug>/<commit>/`` (:data:`ARCHIVE_DIR`, beside the A/B runs of
``tools/experiments/``); :func:`find` falls back to the newest archived file of a name only when no
current run has one, and :meth:`Run.describe` then says "archived".
"""
from __future__ import annotations

import json
import os
import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from fa3_lab import _env, registry

#: Where runs are recorded (inside the package, so an installed copy still finds them).
RESULTS_DIR = _env.RESULTS_DIR

#: Our kernel steps (``fa3_lab/registry.py``) and the peers of docs/design.md "Numbers everyone uses".
STEP_IMPLS = tuple(s.marker for s in registry.STEPS)
#: A backward step run with ``deterministic=True`` (dQ added in a fixed order): impl ``stepNN_det``. It is a mode
#: of step NN, not a step: it is shown beside the step and is never "our fastest step" (not in :data:`STEP_IMPLS`).
DET_SUFFIX = "_det"
DET_IMPLS = tuple(f"{s.marker}{DET_SUFFIX}" for s in registry.STEPS if s.series == "bwd")
PEER_IMPLS = ("fa3", "cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math")
#: Every impl a row may name, in table/legend order: each step, its deterministic mode right after it, the peers.
IMPLS = tuple(i for s in STEP_IMPLS for i in (s, s + DET_SUFFIX) if i in STEP_IMPLS or i in DET_IMPLS) + PEER_IMPLS
DTYPES = ("fp16", "bf16", "e4m3")
#: A row's ``pass``: the forward, the backward alone (FLOPs 2.5 × the forward's: five GEMMs against two),
#: or both (3.5 ×). A row without ``pass`` is a forward row.
PASSES = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}

#: The paper's FlashAttention-3 backward (§4.1, Figure 6: H100 SXM5, FP16/BF16, headdim 128, no mask, the
#: backward alone), TFLOPs/s by seqlen: the reference line of :func:`fa3_lab.lab.plots.plot_backward`.
PAPER_FA3_BWD_HD128 = {512: 316, 1024: 424, 2048: 501, 4096: 542, 8192: 559, 16384: 561}

META_KEYS = ("gpu", "sm_count", "torch", "cuda", "cudnn", "commit", "date", "command")
ROW_KEYS = ("impl", "dtype", "headdim", "causal", "batch", "seqlen_q", "seqlen_k",
            "nheads", "nheads_kv", "ms", "tflops")

#: Folders of ``fa3_lab/results/`` that hold records of another kind (not timing runs), skipped by
#: :func:`load_all`: ``sass/`` (fa3_lab.lab.sass instruction counts), ``cpu/`` (NumPy-only measurements
#: such as reference.fp8's Table 3 errors), ``traces/`` (fa3_lab.lab.trace timelines) and ``table3/``
#: (fa3_lab.lab.table3, the kernels' Table 3 errors). Every other folder is a GPU and holds the
#: timing runs of one commit of the default build.
OTHER_RECORD_DIRS = ("sass", "cpu", "traces", "table3")

#: Older runs (``<gpu-slug>/<commit>/<name>.json``) and A/B builds (``<gpu-slug>/ab_*.json``), outside
#: the package: a clone of the repository has them, an installed wheel does not.
ARCHIVE_DIR = _env.REPO_ROOT / "tools" / "experiments" / "results"

#: How far a row's ``tflops`` may sit from ``flops(...) / ms`` (rounding when it was written).
TFLOPS_RTOL = 0.01

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")


class SchemaError(ValueError):
    """A results document does not follow the schema; the message names the key and the problem."""


@dataclass(frozen=True)
class Run:
    """One recorded run: the file it came from, its ``meta`` dict and its ``rows`` list."""

    path: Path
    meta: dict
    rows: list

    @property
    def gpu(self) -> str:
        return self.meta["gpu"]

    @property
    def archived(self) -> bool:
        """True for a run read from :data:`ARCHIVE_DIR` (not the current run of its GPU)."""
        return self.path is not None and Path(ARCHIVE_DIR).resolve() in Path(self.path).resolve().parents

    def describe(self) -> str:
        """One line: "recorded on <gpu> (<n> SMs), <YYYY-MM-DD>, commit <sha>" (+ ", archived run" when :attr:`archived`)."""
        return (f"recorded on {self.meta['gpu']} ({self.meta['sm_count']} SMs), "
                f"{self.meta['date'][:10]}, commit {self.meta['commit']}"
                + (" (an archived run: the current runs have no such file)" if self.archived else ""))


# ----------------------------------------------------------------------------------------- FLOPs

def _check_count(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        # numpy integers are fine too
        try:
            import numpy as np
        except ImportError:  # pragma: no cover
            np = None
        if np is None or not isinstance(value, np.integer):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return int(value)


def visible_pairs(seqlen_q: int, seqlen_k: int, causal: bool) -> int:
    """Number of (query, key) pairs one head computes: seqlen_q·seqlen_k, or the causal count.

    Causal masks are bottom-right aligned (row i sees keys j <= i + seqlen_k - seqlen_q), so row i
    sees max(0, i + seqlen_k - seqlen_q + 1) keys (never more than seqlen_k since i < seqlen_q):

    * seqlen_k >= seqlen_q: seqlen_q·(seqlen_k - seqlen_q + 1) + seqlen_q·(seqlen_q - 1)/2
    * seqlen_k <  seqlen_q: the top rows see nothing and the rest see 1..seqlen_k keys:
      seqlen_k·(seqlen_k + 1)/2

    Raises:
        TypeError / ValueError: seqlens that are not ints >= 1.
    """
    sq = _check_count("seqlen_q", seqlen_q)
    sk = _check_count("seqlen_k", seqlen_k)
    if not causal:
        return sq * sk
    if sk >= sq:
        return sq * (sk - sq + 1) + sq * (sq - 1) // 2
    return sk * (sk + 1) // 2


def flops(batch: int, nheads: int, seqlen_q: int, seqlen_k: int, headdim: int, causal: bool) -> int:
    """Forward FLOPs of attention: 4 · batch · nheads · (visible query-key pairs) · headdim.

    Two matmuls per visible pair (QKᵀ and PV), each headdim multiply-adds = 2·headdim FLOPs. Without
    a mask that is 4·b·h·sq·sk·d (docs/design.md, "Numbers everyone uses"); with the causal mask
    (bottom-right aligned) it uses the exact number of visible pairs (:func:`visible_pairs`), i.e.
    the exact average number of keys per query row, not "half". Softmax FLOPs are not counted (the
    convention of FlashAttention 1-3). Backward is 2.5× this.

    Returns:
        int, FLOPs (not FLOP/s).

    Raises:
        TypeError: a size that is not an int, or ``causal`` that is not a bool.
        ValueError: a size < 1.
    """
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    b = _check_count("batch", batch)
    h = _check_count("nheads", nheads)
    d = _check_count("headdim", headdim)
    return 4 * b * h * d * visible_pairs(seqlen_q, seqlen_k, causal)


def tflops(row: dict) -> float:
    """TFLOPs/s of a results row: :func:`flops` of its shape, times :data:`PASSES` of its ``pass``
    (backward 2.5 ×), divided by its ``ms``."""
    f = flops(row["batch"], row["nheads"], row["seqlen_q"], row["seqlen_k"], row["headdim"], row["causal"])
    return f * PASSES[row.get("pass", "fwd")] / (row["ms"] * 1e-3) / 1e12


def seqlen_label(n: int) -> str:
    """A seqlen as the figures and headers write it: 8192 -> "8k", 8448 -> "8448"."""
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def heads_label(nheads: int, nheads_kv: int) -> str:
    """Heads as the tables and headers write them: (16, 16) -> "16", (16, 2) -> "16/2kv"."""
    return f"{nheads}" if nheads == nheads_kv else f"{nheads}/{nheads_kv}kv"


def base_step(impl: str) -> str | None:
    """The step an impl times: ``"step13"`` and ``"step13_det"`` -> ``"step13"``; a peer (``"cudnn"``) -> None.

    Raises:
        ValueError: ``impl`` is not in :data:`IMPLS`.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {', '.join(IMPLS)}, got {impl!r}")
    if impl in PEER_IMPLS:
        return None
    return impl.removesuffix(DET_SUFFIX)


# ---------------------------------------------------------------------------------------- schema

def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_meta(meta) -> None:
    if not isinstance(meta, dict):
        raise SchemaError(f"meta: expected an object, got {type(meta).__name__}")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise SchemaError(f"meta: missing key(s) {', '.join(missing)} (expected {', '.join(META_KEYS)})")
    for key in ("gpu", "torch", "commit", "command"):
        if not isinstance(meta[key], str) or not meta[key]:
            raise SchemaError(f"meta.{key}: expected a non-empty string, got {meta[key]!r}")
    if not _is_int(meta["sm_count"]) or meta["sm_count"] < 1:
        raise SchemaError(f"meta.sm_count: expected an int >= 1, got {meta['sm_count']!r}")
    if meta["cuda"] is not None and not isinstance(meta["cuda"], str):
        raise SchemaError(f"meta.cuda: expected a version string or null, got {meta['cuda']!r}")
    if meta["cudnn"] is not None and not _is_int(meta["cudnn"]):
        raise SchemaError(f"meta.cudnn: expected an int (e.g. 91900) or null, got {meta['cudnn']!r}")
    if not isinstance(meta["date"], str) or not _DATE.match(meta["date"]):
        raise SchemaError(f"meta.date: expected ISO 8601 UTC like 2026-11-22T10:00:00Z, got {meta['date']!r}")


def _check_row(i: int, row) -> None:
    where = f"rows[{i}]"
    if not isinstance(row, dict):
        raise SchemaError(f"{where}: expected an object, got {type(row).__name__}")
    missing = [k for k in ROW_KEYS if k not in row]
    if missing:
        raise SchemaError(f"{where}: missing key(s) {', '.join(missing)} (expected {', '.join(ROW_KEYS)})")
    if row["impl"] not in IMPLS:
        raise SchemaError(f"{where}.impl: expected one of {', '.join(IMPLS)}, got {row['impl']!r}")
    if row["dtype"] not in DTYPES:
        raise SchemaError(f"{where}.dtype: expected one of {', '.join(DTYPES)}, got {row['dtype']!r}")
    if row.get("pass", "fwd") not in PASSES:
        raise SchemaError(f"{where}.pass: expected one of {', '.join(PASSES)}, got {row['pass']!r}")
    if not isinstance(row["causal"], bool):
        raise SchemaError(f"{where}.causal: expected true or false, got {row['causal']!r}")
    for key in ("headdim", "batch", "seqlen_q", "seqlen_k", "nheads", "nheads_kv"):
        if not _is_int(row[key]) or row[key] < 1:
            raise SchemaError(f"{where}.{key}: expected an int >= 1, got {row[key]!r}")
    if row["nheads"] % row["nheads_kv"]:
        raise SchemaError(f"{where}.nheads_kv: nheads ({row['nheads']}) must be a multiple of "
                          f"nheads_kv ({row['nheads_kv']})")
    for key in ("ms", "tflops"):
        if not _is_number(row[key]) or row[key] <= 0:
            raise SchemaError(f"{where}.{key}: expected a finite number > 0, got {row[key]!r}")
    expected = tflops(row)
    if abs(row["tflops"] - expected) > TFLOPS_RTOL * expected:
        raise SchemaError(f"{where}.tflops: {row['tflops']} does not match flops()/ms = {expected:.1f} "
                          f"(tolerance {TFLOPS_RTOL:.0%}); compute it with fa3_lab.lab.results.flops")


def validate(doc) -> dict:
    """Check a results document against the schema; return it unchanged.

    Checks: ``meta`` has every key of :data:`META_KEYS` with the right type (date ISO 8601 UTC with
    a trailing Z); ``rows`` is a non-empty list; each row has every key of :data:`ROW_KEYS`, ``impl``
    in :data:`IMPLS`, ``dtype`` in :data:`DTYPES`, positive int sizes with nheads % nheads_kv == 0,
    positive ``ms``, and ``tflops`` within 1% of :func:`flops` / ``ms``. Extra keys are allowed.

    Raises:
        SchemaError (a ValueError): the first problem, naming the key (``rows[3].impl: ...``).
    """
    if not isinstance(doc, dict):
        raise SchemaError(f"document: expected an object with 'meta' and 'rows', got {type(doc).__name__}")
    for key in ("meta", "rows"):
        if key not in doc:
            raise SchemaError(f"document: missing key {key!r} (expected 'meta' and 'rows')")
    _check_meta(doc["meta"])
    rows = doc["rows"]
    if not isinstance(rows, list) or not rows:
        raise SchemaError(f"rows: expected a non-empty list, got {rows!r:.60}")
    for i, row in enumerate(rows):
        _check_row(i, row)
    return doc


# ------------------------------------------------------------------------------------------- I/O

def gpu_slug(gpu: str) -> str:
    """Folder name for a GPU: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    if not slug:
        raise ValueError(f"gpu: expected a name with letters or digits, got {gpu!r}")
    return slug


def _gpu_facts() -> dict:
    """GPU name, SM count and CUDA/cuDNN versions of device 0 (needs a CUDA GPU)."""
    try:
        import torch
    except ImportError:
        torch = None
    if torch is None or not torch.cuda.is_available():
        raise RuntimeError(f"collect_meta: needs a CUDA GPU ({_env.why_no_sm90()})")
    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "sm_count": props.multi_processor_count, "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}


def collect_meta(command: str) -> dict:
    """The ``meta`` block for a run on this machine's GPU 0.

    Args:
        command: the command line that produced the run (e.g. "python -m fa3_lab bench").

    Returns:
        dict with ``gpu``, ``sm_count``, ``torch``, ``cuda``, ``cudnn`` (int), ``commit``
        (``git rev-parse --short HEAD``), ``date`` (now, ISO 8601 UTC, seconds) and ``command``
        (prefixed with ``FA3_LAB_DEFINES=…`` when that build variable is set).

    Raises:
        TypeError: ``command`` is not a non-empty string.
        RuntimeError: no CUDA GPU is visible to torch.
    """
    if not isinstance(command, str) or not command:
        raise TypeError(f"command: expected a non-empty string, got {command!r}")
    meta = _gpu_facts()
    meta["commit"] = _env.git_commit()
    meta["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    defines = os.environ.get("FA3_LAB_DEFINES", "").strip()  # an A/B build: part of what was run
    meta["command"] = f"FA3_LAB_DEFINES={defines!r} {command}" if defines else command
    return {k: meta[k] for k in META_KEYS}


def save(name: str, rows: list, meta: dict, root: Path | None = None) -> Path:
    """Validate and write one run to ``<root>/<gpu-slug>/<name>.json``; return the path.

    Args:
        name: file stem, letters/digits/``_.-`` (e.g. "bench_bf16").
        rows: list of row dicts (see :data:`ROW_KEYS`).
        meta: from :func:`collect_meta`.
        root: results folder, default ``fa3_lab/results``.

    Raises:
        ValueError: a bad ``name``; SchemaError for a document that fails :func:`validate`
        (nothing is written then).
    """
    if not isinstance(name, str) or not _NAME.match(name) or name.endswith(".json"):
        raise ValueError(f"name: expected letters, digits, '_', '.', '-' without .json, got {name!r}")
    doc = validate({"meta": meta, "rows": rows})
    slug = gpu_slug(meta["gpu"])
    if slug in OTHER_RECORD_DIRS:
        raise ValueError(f"meta.gpu: {meta['gpu']!r} maps to the reserved folder {slug}/")
    folder = Path(root if root is not None else RESULTS_DIR) / slug
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def load(path: Path) -> Run:
    """Read and validate one results file.

    Raises:
        SchemaError: the file is not valid JSON or fails :func:`validate` (the message names the file).
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
        validate(doc)
    except json.JSONDecodeError as e:
        raise SchemaError(f"{path}: not valid JSON ({e})") from None
    except SchemaError as e:
        raise SchemaError(f"{path}: {e}") from None
    return Run(path=path, meta=doc["meta"], rows=doc["rows"])


def load_all(root: Path | None = None) -> list[Run]:
    """Every recorded timing run under ``root`` (default ``fa3_lab/results``), oldest first.

    Reads ``<root>/<gpu-slug>/*.json``, skipping the folders named in :data:`OTHER_RECORD_DIRS`.
    Order: by date, then path, so the output is deterministic. An empty or missing folder gives [].

    Raises:
        SchemaError: a file that fails :func:`validate` (loud: a broken record is a bug).
    """
    root = Path(root if root is not None else RESULTS_DIR)
    if not root.is_dir():
        return []
    runs = [load(p) for p in sorted(root.glob("*/*.json")) if p.parent.name not in OTHER_RECORD_DIRS]
    return sorted(runs, key=lambda r: (r.meta["date"], str(r.path)))


def current_runs(root: Path | None = None) -> dict[str, list[Run]]:
    """The current run of each GPU: {gpu-slug: its files as Runs, oldest first}, newest GPU run first.

    Raises:
        SchemaError: a file fails :func:`validate`.
        ValueError: a GPU folder holds files of more than one commit (older runs belong in
            :data:`ARCHIVE_DIR`; the message names the files).
    """
    by_gpu: dict[str, list[Run]] = {}
    for run in load_all(root):
        by_gpu.setdefault(run.path.parent.name, []).append(run)
    for slug, runs in by_gpu.items():
        commits = sorted({r.meta["commit"] for r in runs})
        if len(commits) > 1:
            names = ", ".join(f"{r.path.name} ({r.meta['commit']})" for r in runs)
            raise ValueError(f"results/{slug}/: files of {len(commits)} commits ({names}); one current run per "
                             f"GPU: move the older files to tools/experiments/results/{slug}/<commit>/")
    return dict(sorted(by_gpu.items(), key=lambda kv: max(r.meta["date"] for r in kv[1]), reverse=True))


def find(name: str, root: Path | None = None, archive: Path | None = None) -> Path:
    """The file of the newest recorded run called ``<name>.json``.

    Looks in the current runs (``<root>/<gpu>/<name>.json``, root default ``fa3_lab/results``) and,
    only when none has that file, in the archive (``<archive>/<gpu>/<commit>/<name>.json``; default
    :data:`ARCHIVE_DIR` when ``root`` is the default, none otherwise). Newest by ``meta.date``.

    Raises:
        TypeError: ``name`` is not a str. FileNotFoundError: no such file (the message names the folders).
        SchemaError: a file of that name fails :func:`validate`.
    """
    if not isinstance(name, str):
        raise TypeError(f"name: expected a str like 'bench', got {type(name).__name__}")
    folder = Path(root if root is not None else RESULTS_DIR)
    if archive is None and root is None:
        archive = ARCHIVE_DIR
    for paths in ([p for p in folder.glob(f"*/{name}.json") if p.parent.name not in OTHER_RECORD_DIRS],
                  sorted(Path(archive).glob(f"*/*/{name}.json")) if archive is not None else []):
        if paths:
            return max(paths, key=lambda p: (load(p).meta["date"], str(p)))
    where = f"{folder}/<gpu>/" + (f" or {archive}/<gpu>/<commit>/" if archive is not None else "")
    raise FileNotFoundError(f"name: no recorded run {name}.json under {where}")
