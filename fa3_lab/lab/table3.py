"""`python -m fa3_lab table3` — paper Table 3 (numerical error with outliers) measured on the kernels.

The experiment of paper §4.3, Table 3, run on our GPU kernels instead of the NumPy emulation:

* inputs: Q, K, V ~ N(0,1) + N(0,100)·Bernoulli(0.001) (``reference.fp8.table3_inputs``, drawn
  with NumPy from ``seed`` and rounded to float16, so every method starts from the same numbers),
  non-causal, nheads_kv = nheads, softmax scale 1/√headdim;
* shape and seed: those of the recorded NumPy run ``fa3_lab/results/cpu/table3_numpy.json``
  (``python -m reference.fp8``), so each kernel number can be set beside its emulation;
* reference: exact attention in **float64, computed with torch on the GPU** (:func:`reference_fp64`,
  the math of ``reference.attention.standard_attention``), and RMSE = sqrt(mean((out − ref)²)) in
  float64 (``reference.fp8.rmse``'s metric) over the whole (batch, seqlen, nheads, headdim) output;
* methods (:data:`METHODS`): our 16-bit kernel (``fa3_lab.flash_attn_func``, default step) in fp16
  and in bf16, and the FP8 kernel (step 05, ``fa3_lab.flash_attn_fp8_func``) with block
  quantization and incoherent processing, without each, and without both (one scale per tensor,
  no rotation: the same kernel as the others, unlike the paper's baseline, which is standard
  attention with an FP16 softmax — ``reference.fp8.baseline_fp8_attention``).

Each row is printed beside the NumPy emulation's number from the recorded run (same shape and seed
only; otherwise "—") and the paper's (H100, their baseline code). ``--emulate`` also runs the NumPy
emulation of exactly each kernel configuration on the same inputs (on the CPU, about a minute at
seqlen 8192).

The record is written to ``fa3_lab/results/experiments/<gpu-slug>/table3.json`` — ``experiments/``
is one of :data:`fa3_lab.lab.results.OTHER_RECORD_DIRS`, and the file is two folders deep, so neither
:func:`fa3_lab.lab.results.load_all` nor :func:`fa3_lab.lab.plots.latest_run` (both read
``results/<gpu>/*.json`` as timing runs) ever reads it. Its ``meta`` has every key of
:data:`fa3_lab.lab.results.META_KEYS` (gpu, sm_count, torch, cuda, cudnn, commit, date, command) plus
the experiment's (shape, seed, inputs, reference, the NumPy record it is compared with); its rows
follow ``cpu/table3_numpy.json`` (``impl``, ``rmse``, ``paper_rmse``) plus ``numpy_rmse``,
``emulation_rmse``, ``method``, ``dtype``, ``block_quant``, ``incoherent``. :func:`latest` loads the
newest one for the notebooks.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

from .. import _env
from .results import _is_number  # the schema's number rule (finite int or float, not bool)
from .cli import UsageError

HELP = "paper Table 3 on the kernels: RMSE of FP8 step 05 and the 16-bit kernel vs float64, beside NumPy and the paper"

#: Where the NumPy emulation's Table 3 is recorded (``python -m reference.fp8``).
NUMPY_RECORD = _env.RESULTS_DIR / "cpu" / "table3_numpy.json"
#: The folder of ``fa3_lab/results`` (one of OTHER_RECORD_DIRS) that holds ``<gpu-slug>/table3.json``.
RECORD_DIR = "experiments"
RECORD_NAME = "table3.json"
#: The float64 reference costs O(seqlen²) per head; past this the run is more waiting than teaching.
MAX_SEQLEN = 65536
#: Query rows per float64 block of the reference: (2048, seqlen_k) float64 scores = 128 MiB at 8k.
REF_CHUNK = 2048

INPUTS = "N(0,1) + N(0,100)*Bernoulli(0.001), rounded to float16 (reference.fp8.table3_inputs)"
REFERENCE = "exact attention in torch float64 on the GPU (fa3_lab.lab.table3.reference_fp64)"


class Method(NamedTuple):
    """One row of the GPU Table 3: what runs, and which row of the paper / NumPy record it sits beside."""

    impl: str              # row name; for the FP8 rows the key of reference.fp8.PAPER_TABLE3
    dtype: str             # "fp16", "bf16" (16-bit kernel) or "e4m3" (step 05)
    block_quant: bool | None
    incoherent: bool | None
    paper_key: str | None  # key of PAPER_TABLE3 / of the NumPy record's rows, None if the paper has none
    method: str


#: The rows, in the paper's order (16-bit first, then FP8 baseline, FA3 FP8 and its two ablations).
METHODS = (
    Method("flash_fp16", "fp16", None, None, "flash_fp16",
           "16-bit kernel (flash_attn_func, default step), fp16 in and out"),
    Method("flash_bf16", "bf16", None, None, None,
           "16-bit kernel, bf16 (inputs rounded fp16 -> bf16 first; the paper has no bf16 row)"),
    Method("baseline_fp8", "e4m3", False, False, "baseline_fp8",
           "step 05, one scale per tensor, no rotation (paper/NumPy baseline: standard attention, FP16 softmax)"),
    Method("fa3_fp8", "e4m3", True, True, "fa3_fp8",
           "step 05, block quantization + incoherent processing"),
    Method("fa3_fp8_no_block_quant", "e4m3", False, True, "fa3_fp8_no_block_quant",
           "step 05, one scale per tensor + incoherent processing"),
    Method("fa3_fp8_no_incoherent", "e4m3", True, False, "fa3_fp8_no_incoherent",
           "step 05, block quantization, no rotation"),
)
IMPLS = tuple(m.impl for m in METHODS)
_BY_IMPL = {m.impl: m for m in METHODS}
SHAPE_KEYS = ("batch", "seqlen", "nheads", "headdim")
#: Keys of a record's meta beyond fa3_lab.lab.results.META_KEYS.
EXTRA_META_KEYS = ("shape", "seed", "causal", "inputs", "reference", "numpy_record")


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------

def check_seqlen(seqlen) -> int:
    """An int 1 ≤ seqlen ≤ :data:`MAX_SEQLEN` (any length: the kernels mask a partial last tile).

    Raises:
        TypeError: not an int. ValueError: out of range.
    """
    if isinstance(seqlen, bool) or not isinstance(seqlen, int):
        raise TypeError(f"seqlen: expected an int, got {type(seqlen).__name__}")
    if not 1 <= seqlen <= MAX_SEQLEN:
        raise ValueError(f"seqlen: expected 1 <= seqlen <= {MAX_SEQLEN} (the float64 reference is "
                         f"O(seqlen^2)), got {seqlen}")
    return seqlen


def check_seed(seed) -> int:
    """A non-negative int (the seed of ``reference.fp8.table3_inputs``).

    Raises:
        TypeError: not an int. ValueError: negative.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed}")
    return seed


def check_out(path) -> Path:
    """A ``.json`` path where the loaders of timing runs will not find it.

    ``fa3_lab/results/<folder>/<name>.json`` with ``<folder>`` not in OTHER_RECORD_DIRS is where
    :func:`fa3_lab.lab.results.load_all` reads timing runs (and fails on anything else), so a Table 3
    record may not go there.

    Raises:
        ValueError: not ending in .json, or inside a GPU timing folder of fa3_lab/results.
    """
    from .results import OTHER_RECORD_DIRS, RESULTS_DIR

    p = Path(path)
    if p.suffix != ".json":
        raise ValueError(f"out: expected a path ending in .json, got {str(path)!r}")
    resolved = p.resolve()
    results_dir = Path(RESULTS_DIR).resolve()
    if resolved.parent.parent == results_dir and resolved.parent.name not in OTHER_RECORD_DIRS:
        raise ValueError(f"out: {str(path)!r} is in a GPU timing folder that fa3_lab.lab.results.load_all reads "
                         f"as benchmark runs; use fa3_lab/results/{RECORD_DIR}/<gpu>/ (the default)")
    if resolved.parent == results_dir:
        raise ValueError(f"out: {str(path)!r} is directly in fa3_lab/results/; use "
                         f"fa3_lab/results/{RECORD_DIR}/<gpu>/ (the default)")
    return p


# --------------------------------------------------------------------------------------------
# The NumPy record
# --------------------------------------------------------------------------------------------

def load_numpy(path=None) -> dict:
    """The recorded NumPy Table 3, ``fa3_lab/results/cpu/table3_numpy.json`` (or ``path``).

    Returns:
        The document: ``meta`` (with ``shape`` {batch, seqlen, nheads, headdim}, ``seed``, ``date``,
        ``command``) and ``rows`` [{impl, rmse, paper_rmse}].

    Raises:
        FileNotFoundError: no such file. ValueError: not JSON, or missing meta.shape / meta.seed /
        rows with impl and rmse (the message names the file).
    """
    p = Path(path) if path is not None else NUMPY_RECORD
    try:
        doc = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None
    meta = doc.get("meta") if isinstance(doc, dict) else None
    if not isinstance(meta, dict) or not isinstance(meta.get("shape"), dict) or "seed" not in meta:
        raise ValueError(f"{p}: expected meta with 'shape' and 'seed' (written by python -m reference.fp8)")
    if any(not isinstance(meta["shape"].get(k), int) for k in SHAPE_KEYS):
        raise ValueError(f"{p}: meta.shape: expected ints {', '.join(SHAPE_KEYS)}, got {meta['shape']}")
    rows = doc.get("rows")
    if not isinstance(rows, list) or not rows or any(not isinstance(r, dict) or "impl" not in r or "rmse" not in r
                                                     for r in rows):
        raise ValueError(f"{p}: expected a non-empty list of rows with 'impl' and 'rmse'")
    return doc


def default_shape(numpy_doc: dict) -> tuple[dict, int]:
    """(shape dict {batch, seqlen, nheads, headdim}, seed) of a NumPy record (see :func:`load_numpy`)."""
    return {k: int(numpy_doc["meta"]["shape"][k]) for k in SHAPE_KEYS}, int(numpy_doc["meta"]["seed"])


# --------------------------------------------------------------------------------------------
# The measurement (GPU)
# --------------------------------------------------------------------------------------------

def reference_fp64(q, k, v, softmax_scale=None, chunk=REF_CHUNK):
    """Exact attention softmax(α·QKᵀ)·V in torch float64, non-causal, on the tensors' device.

    Computed wherever ``q`` lives — in :func:`measure` on the GPU (cuBLAS DGEMM), in the tests on
    the CPU, where it equals ``reference.attention.standard_attention`` (float64) to rounding.
    Query rows are taken ``chunk`` at a time so the float64 scores of one head never exceed
    (chunk, seqlen_k).

    Args:
        q: (batch, seqlen_q, nheads, headdim) floating torch tensor (any float dtype; used as float64).
        k, v: (batch, seqlen_k, nheads_kv, headdim), same device; nheads % nheads_kv == 0.
        softmax_scale: α, default 1/√headdim.
        chunk: query rows per block, an int >= 1.

    Returns:
        (batch, seqlen_q, nheads, headdim) float64 tensor on q's device.

    Raises:
        TypeError: not tensors, or a non-int chunk. ValueError: shapes that do not fit, chunk < 1.
    """
    import torch

    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating torch.Tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected 4 dims (batch, seqlen, nheads, headdim), got shape {tuple(t.shape)}")
    if tuple(k.shape) != tuple(v.shape) or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k, v: expected (batch {q.shape[0]}, seqlen_k, nheads_kv, headdim {q.shape[3]}) alike, "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"k: nheads ({q.shape[2]}) must be a multiple of nheads_kv ({k.shape[2]})")
    if isinstance(chunk, bool) or not isinstance(chunk, int):
        raise TypeError(f"chunk: expected an int, got {type(chunk).__name__}")
    if chunk < 1:
        raise ValueError(f"chunk: expected an int >= 1, got {chunk}")
    alpha = 1.0 / math.sqrt(q.shape[3]) if softmax_scale is None else float(softmax_scale)
    group = q.shape[2] // k.shape[2]
    qh = q.double().permute(0, 2, 1, 3)                                       # (b, h, sq, d)
    kh = k.double().permute(0, 2, 1, 3).repeat_interleave(group, dim=1)       # (b, h, sk, d)
    vh = v.double().permute(0, 2, 1, 3).repeat_interleave(group, dim=1)
    out = torch.empty_like(qh)
    for r0 in range(0, qh.shape[2], chunk):
        s = alpha * (qh[:, :, r0:r0 + chunk] @ kh.transpose(-1, -2))          # (b, h, chunk, sk) fp64
        out[:, :, r0:r0 + chunk] = torch.softmax(s, dim=-1) @ vh
    return out.permute(0, 2, 1, 3).contiguous()


def rmse(out, ref) -> float:
    """sqrt(mean((out − ref)²)) in float64 over every element (Table 3's metric, as ``reference.fp8.rmse``).

    Args:
        out, ref: torch tensors of the same shape (any float dtype, same device).

    Raises:
        ValueError: different shapes.
    """
    if tuple(out.shape) != tuple(ref.shape):
        raise ValueError(f"out: expected the shape of ref {tuple(ref.shape)}, got {tuple(out.shape)}")
    d = out.double() - ref.double()
    return float((d * d).mean().sqrt())


def _run_kernel(m: Method, q16, k16, v16):
    import torch

    import fa3_lab

    if m.dtype == "e4m3":
        return fa3_lab.flash_attn_fp8_func(q16, k16, v16, block_quant=m.block_quant, incoherent=m.incoherent)
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16}[m.dtype]
    return fa3_lab.flash_attn_func(q16.to(dt), k16.to(dt), v16.to(dt))


def _emulate(m: Method, q, k, v):
    """NumPy emulation of exactly this configuration (out float64 array), or None if there is none."""
    from reference import fp8 as R

    if m.dtype == "e4m3":
        return R.fp8_attention(q, k, v, block_quant=m.block_quant, incoherent=m.incoherent)[0]
    if m.dtype == "fp16":
        return R.flash_fp16_attention(q, k, v)[0]
    return None


def measure(batch, seqlen, nheads, headdim, seed=0, *, emulate=False, methods=METHODS, progress=None) -> list:
    """Run Table 3 on this machine's sm_90 GPU; one dict per method.

    Inputs from ``reference.fp8.table3_inputs(batch, seqlen, nheads, headdim, seed)`` (float16
    values) copied to the GPU as float16; reference :func:`reference_fp64` on the GPU; RMSE by
    :func:`rmse` over the full output.

    Args:
        batch, seqlen, nheads, headdim: positive ints; headdim in (64, 128, 256);
            seqlen as :func:`check_seqlen`.
        seed: non-negative int, the inputs' seed (the Hadamard signs use step 05's default, 0, as
            ``fa3_lab.flash_attn_fp8_func`` does).
        emulate: also run the NumPy emulation of each configuration on the CPU, same inputs, and
            store its RMSE against the same reference as ``emulation_rmse`` (None for bf16, which
            has no emulation); otherwise ``emulation_rmse`` is None.
        methods: a subset of :data:`METHODS`.
        progress: None or a callable taking one str (a line per method).

    Returns:
        [{"impl", "method", "dtype", "block_quant", "incoherent", "rmse", "emulation_rmse"}], rmse
        as Python floats (dimensionless, the output's own units).

    Raises:
        RuntimeError: no sm_90 GPU (nothing is run). TypeError / ValueError: bad sizes or seed,
        or an unknown method.
    """
    from reference import fp8 as R

    check_seqlen(seqlen)
    check_seed(seed)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"methods: expected entries of fa3_lab.lab.table3.METHODS, got {m!r}")
    reason = _env.why_no_sm90()
    if reason:
        raise RuntimeError(f"table3.measure needs an sm_90 GPU (H100/H200): {reason}")
    import torch

    q, k, v = R.table3_inputs(batch, seqlen, nheads, headdim, seed)           # float64 holding fp16 values
    q16, k16, v16 = (torch.from_numpy(x).to("cuda", torch.float16) for x in (q, k, v))
    ref = reference_fp64(q16, k16, v16)                                       # float64, on the GPU
    ref_np = ref.cpu().numpy() if emulate else None
    rows = []
    for m in methods:
        out = _run_kernel(m, q16, k16, v16)
        torch.cuda.synchronize()
        err = rmse(out, ref)
        emul = None
        if emulate:
            e = _emulate(m, q, k, v)
            emul = None if e is None else R.rmse(e, ref_np)
        rows.append({"impl": m.impl, "method": m.method, "dtype": m.dtype, "block_quant": m.block_quant,
                     "incoherent": m.incoherent, "rmse": err, "emulation_rmse": emul})
        if progress is not None:
            progress(f"{m.impl}: rmse {err:.3e}" + (f", emulation {emul:.3e}" if emul is not None else ""))
    return rows


def build_record(rows, meta, shape, seed, numpy_doc=None, numpy_path=None) -> dict:
    """The JSON document of one GPU Table 3 run: ``meta`` + rows with the NumPy and paper numbers added.

    Args:
        rows: from :func:`measure`.
        meta: from :func:`fa3_lab.lab.results.collect_meta` (gpu, sm_count, torch, cuda, cudnn,
            commit, date, command).
        shape: {batch, seqlen, nheads, headdim}; seed: the inputs' seed.
        numpy_doc: the NumPy record (:func:`load_numpy`) or None. Its numbers are copied into
            ``numpy_rmse`` only when its shape and seed are this run's (same inputs); else None.
        numpy_path: where numpy_doc came from (recorded in meta.numpy_record).

    Returns:
        {"meta": {...META_KEYS, shape, seed, causal, inputs, reference, numpy_record}, "rows": [...]}
        — passes :func:`validate`.

    Raises:
        ValueError: the result fails :func:`validate`.
    """
    from reference.fp8 import PAPER_TABLE3

    same = False
    numpy_rmse = {}
    nrec = None
    if numpy_doc is not None:
        nshape, nseed = default_shape(numpy_doc)
        same = nshape == dict(shape) and nseed == seed and not numpy_doc["meta"].get("causal", False)
        numpy_rmse = {r["impl"]: r["rmse"] for r in numpy_doc["rows"]}
        p = Path(numpy_path) if numpy_path is not None else NUMPY_RECORD
        try:
            p = p.resolve().relative_to(_env.REPO_ROOT)
        except ValueError:
            pass
        nrec = {"path": str(p), "date": numpy_doc["meta"].get("date"), "command": numpy_doc["meta"].get("command"),
                "shape": nshape, "seed": nseed, "same_inputs": same}
    out_rows = []
    for r in rows:
        m = _BY_IMPL[r["impl"]]
        row = dict(r)
        row["numpy_rmse"] = numpy_rmse.get(m.paper_key) if (same and m.paper_key) else None
        row["paper_rmse"] = PAPER_TABLE3.get(m.paper_key) if m.paper_key else None
        row["paper_key"] = m.paper_key
        out_rows.append(row)
    full_meta = dict(meta)
    full_meta.update({"shape": {k: int(shape[k]) for k in SHAPE_KEYS}, "seed": int(seed), "causal": False,
                      "inputs": INPUTS, "reference": REFERENCE, "numpy_record": nrec})
    return validate({"meta": full_meta, "rows": out_rows})


def validate(doc) -> dict:
    """Check a GPU Table 3 document; return it unchanged.

    meta: every key of :data:`fa3_lab.lab.results.META_KEYS` with its types (as a timing run's meta), plus
    :data:`EXTRA_META_KEYS` (shape with positive ints, seed >= 0, numpy_record an object or null).
    rows: a non-empty list, impl in :data:`IMPLS` without repeats, ``rmse`` finite > 0,
    ``numpy_rmse`` / ``emulation_rmse`` / ``paper_rmse`` finite >= 0 or null.

    Raises:
        ValueError (fa3_lab.lab.results.SchemaError): the first problem, naming the key.
    """
    from .results import SchemaError, _check_meta

    if not isinstance(doc, dict) or "meta" not in doc or "rows" not in doc:
        raise SchemaError("document: expected an object with 'meta' and 'rows'")
    meta = doc["meta"]
    _check_meta(meta)
    missing = [k for k in EXTRA_META_KEYS if k not in meta]
    if missing:
        raise SchemaError(f"meta: missing key(s) {', '.join(missing)} (a Table 3 record also needs "
                          f"{', '.join(EXTRA_META_KEYS)})")
    shape = meta["shape"]
    if not isinstance(shape, dict) or any(isinstance(shape.get(k), bool) or not isinstance(shape.get(k), int)
                                          or shape[k] < 1 for k in SHAPE_KEYS):
        raise SchemaError(f"meta.shape: expected positive ints {', '.join(SHAPE_KEYS)}, got {shape!r}")
    if isinstance(meta["seed"], bool) or not isinstance(meta["seed"], int) or meta["seed"] < 0:
        raise SchemaError(f"meta.seed: expected an int >= 0, got {meta['seed']!r}")
    if meta["numpy_record"] is not None and not isinstance(meta["numpy_record"], dict):
        raise SchemaError(f"meta.numpy_record: expected an object or null, got {meta['numpy_record']!r}")
    rows = doc["rows"]
    if not isinstance(rows, list) or not rows:
        raise SchemaError(f"rows: expected a non-empty list, got {rows!r:.60}")
    seen = set()
    for i, r in enumerate(rows):
        where = f"rows[{i}]"
        if not isinstance(r, dict):
            raise SchemaError(f"{where}: expected an object, got {type(r).__name__}")
        if r.get("impl") not in IMPLS:
            raise SchemaError(f"{where}.impl: expected one of {', '.join(IMPLS)}, got {r.get('impl')!r}")
        if r["impl"] in seen:
            raise SchemaError(f"{where}.impl: {r['impl']} appears twice")
        seen.add(r["impl"])
        if not _is_number(r.get("rmse")) or r["rmse"] <= 0:
            raise SchemaError(f"{where}.rmse: expected a finite number > 0, got {r.get('rmse')!r}")
        for key in ("numpy_rmse", "emulation_rmse", "paper_rmse"):
            if r.get(key) is not None and (not _is_number(r[key]) or r[key] < 0):
                raise SchemaError(f"{where}.{key}: expected a finite number >= 0 or null, got {r[key]!r}")
    return doc


# --------------------------------------------------------------------------------------------
# Records: where, save, load
# --------------------------------------------------------------------------------------------

def default_path(gpu: str, root=None) -> Path:
    """``<root>/experiments/<gpu-slug>/table3.json`` (root default ``fa3_lab/results``)."""
    from .results import RESULTS_DIR, gpu_slug

    return Path(root if root is not None else RESULTS_DIR) / RECORD_DIR / gpu_slug(gpu) / RECORD_NAME


def save(doc: dict, path=None) -> Path:
    """Validate ``doc`` and write it (default :func:`default_path` of its GPU); return the path.

    Raises:
        ValueError / SchemaError: :func:`validate` or :func:`check_out` fails (nothing is written).
    """
    validate(doc)
    p = check_out(path) if path is not None else default_path(doc["meta"]["gpu"])
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(doc, indent=1) + "\n")
    return p


def load(path):
    """Read and validate one GPU Table 3 record.

    Returns:
        :class:`fa3_lab.lab.results.Run` (``path``, ``meta``, ``rows``; ``describe()`` gives "recorded on
        <gpu> (<n> SMs), <date>, commit <sha>").

    Raises:
        SchemaError (a ValueError): not JSON, or :func:`validate` fails (the message names the file).
    """
    from .results import Run, SchemaError

    p = Path(path)
    try:
        doc = validate(json.loads(p.read_text()))
    except json.JSONDecodeError as e:
        raise SchemaError(f"{p}: not valid JSON ({e})") from None
    except SchemaError as e:
        raise SchemaError(f"{p}: {e}") from None
    return Run(path=p, meta=doc["meta"], rows=doc["rows"])


def latest(root=None):
    """The newest recorded GPU Table 3 (``<root>/experiments/*/table3.json``, by meta.date, then path).

    Args:
        root: the results folder, default ``fa3_lab/results``.

    Returns:
        :class:`fa3_lab.lab.results.Run`.

    Raises:
        FileNotFoundError: none recorded (the message names the pattern and the command to record one).
        SchemaError: a record fails :func:`validate`.
    """
    from .results import RESULTS_DIR

    folder = Path(root if root is not None else RESULTS_DIR) / RECORD_DIR
    paths = sorted(folder.glob(f"*/{RECORD_NAME}"))
    if not paths:
        shown = folder.resolve()
        if shown.is_relative_to(_env.REPO_ROOT):
            shown = shown.relative_to(_env.REPO_ROOT)
        raise FileNotFoundError(f"no GPU Table 3 recorded under {shown}/<gpu>/{RECORD_NAME} "
                                f"(python -m fa3_lab table3 on an H100/H200 records one)")
    return max((load(p) for p in paths), key=lambda r: (r.meta["date"], str(r.path)))


# --------------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------------

def _fmt(x, spec) -> str:
    return "—" if x is None else format(x, spec)


def format_table(record) -> str:
    """The GPU Table 3 as text: one line per row, kernel | emulation (live) | NumPy record | paper.

    Args:
        record: a :class:`fa3_lab.lab.results.Run` (from :func:`load` / :func:`latest`) or a document
            {"meta", "rows"} (from :func:`build_record`).

    Returns:
        str, several lines: a title with the GPU, date, commit and shape, the table, then notes on
        the rows that are not the paper's method.
    """
    meta = record.meta if hasattr(record, "meta") else record["meta"]
    rows = record.rows if hasattr(record, "rows") else record["rows"]
    sh = meta["shape"]
    lines = [f"Table 3 on {meta['gpu']} ({meta['sm_count']} SMs), {meta['date'][:10]}, commit {meta['commit']}: "
             f"RMSE vs float64",
             f"(batch, seqlen, nheads, headdim) = ({sh['batch']}, {sh['seqlen']}, {sh['nheads']}, {sh['headdim']}), "
             f"seed {meta['seed']}, non-causal; reference: {meta['reference']}"]
    has_emul = any(r.get("emulation_rmse") is not None for r in rows)
    head = f"{'method':<24}{'kernel':>10}" + (f"{'emulation':>11}" if has_emul else "") + f"{'NumPy rec.':>12}{'paper':>9}"
    lines += [head, "-" * len(head)]
    for r in rows:
        line = f"{r['impl']:<24}{r['rmse']:>10.2e}"
        if has_emul:
            line += f"{_fmt(r.get('emulation_rmse'), '.2e'):>11}"
        line += f"{_fmt(r.get('numpy_rmse'), '.2e'):>12}{_fmt(r.get('paper_rmse'), '.1e'):>9}"
        lines.append(line)
    nrec = meta.get("numpy_record")
    if nrec is None:
        lines.append("NumPy rec.: no NumPy record was available")
    else:
        same = "same inputs" if nrec.get("same_inputs") else (
            f"NOT the same inputs (recorded at {nrec.get('shape')}, seed {nrec.get('seed')}): column left empty")
        lines.append(f"NumPy rec.: {nrec['path']}, {str(nrec.get('date'))[:10]}, {same}")
    if has_emul:
        lines.append("emulation: reference.fp8 emulation of exactly each kernel configuration, same inputs, "
                     "this run")
    names = {r["impl"] for r in rows}
    if "baseline_fp8" in names:
        lines.append("baseline_fp8: kernel row = step 05 with one scale per tensor and no rotation; NumPy/paper "
                     "row = standard attention, per-tensor e4m3, FP16 softmax")
    if "flash_bf16" in names:
        lines.append("flash_bf16: Q, K, V rounded fp16 -> bf16 before the kernel, so input rounding is counted")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def add_arguments(p) -> None:
    p.add_argument("--seqlen", type=int, default=None,
                   help="seqlen (default: that of fa3_lab/results/cpu/table3_numpy.json, so the NumPy column applies)")
    p.add_argument("--seed", type=int, default=None, help="seed of the inputs (default: the NumPy record's)")
    p.add_argument("--emulate", action="store_true",
                   help="also run the NumPy emulation of each kernel configuration on the same inputs (CPU, ~1 min at 8k)")
    p.add_argument("--out", default=None,
                   help="output JSON (default fa3_lab/results/experiments/<gpu>/table3.json)")
    p.add_argument("--no-save", action="store_true", help="print only, write no JSON")


def command_line(seqlen: int, seed: int, emulate: bool, out=None, no_save=False) -> str:
    """The command that reproduces a run, written into meta.command."""
    cmd = f"python -m fa3_lab table3 --seqlen {seqlen} --seed {seed}" + (" --emulate" if emulate else "")
    if out is not None:
        cmd += f" --out {out}"
    return cmd + (" --no-save" if no_save else "")


def run(args) -> int:
    try:
        seqlen = None if args.seqlen is None else check_seqlen(args.seqlen)
        seed = None if args.seed is None else check_seed(args.seed)
        if args.out is not None:
            check_out(args.out)
    except (TypeError, ValueError) as e:  # "seqlen: expected …" -> "--seqlen: expected …"
        raise UsageError(f"--{e}") from None
    reason = _env.why_no_sm90()
    if reason:
        print(f"table3 needs an sm_90 GPU: {reason}.")
        try:
            rec = latest()
        except FileNotFoundError as e:
            print(str(e))
        else:
            print(f"Showing the run {rec.describe()} ({rec.path.name} in {rec.path.parent.name}/):")
            print(format_table(rec))
        return 1
    try:
        numpy_doc = load_numpy()
    except (FileNotFoundError, ValueError) as e:
        print(f"table3: cannot read the NumPy record ({e}); record it with python -m reference.fp8")
        return 1
    shape, numpy_seed = default_shape(numpy_doc)
    if seqlen is not None:
        shape["seqlen"] = seqlen
    seed = numpy_seed if seed is None else seed
    from . import results

    print(f"Table 3 on {_env.sm90_gpu()}: shape {shape}, seed {seed}" + (", with the NumPy emulation" if args.emulate else ""))
    rows = measure(**shape, seed=seed, emulate=args.emulate, progress=lambda s: print("  " + s))
    meta = results.collect_meta(command_line(shape["seqlen"], seed, args.emulate, args.out, args.no_save))
    doc = build_record(rows, meta, shape, seed, numpy_doc, NUMPY_RECORD)
    print(format_table(doc))
    if not args.no_save:
        print(f"saved {save(doc, args.out)}")
    return 0
