"""Read the SASS of a kernel step and measure whether the softmax's exponentials overlap the GEMMs.

The paper's §3.2 (Algorithm 2) overlaps the softmax of one tile with the WGMMA of another *inside one
warpgroup*: the warpgroup issues a GEMM group, does softmax work (MUFU.EX2) while the tensor cores run,
and only then waits for the group. Whether that happens is decided by ptxas, not by the CUDA source,
so we check the machine code:

1. compile ``cuda/steps/NN_*.cu`` to a cubin (``nvcc -cubin``; no GPU needed), cached by source hash;
2. dump the SASS of one instantiation ``fwd_kernel<T, headdim, causal>`` (``cuobjdump -sass``);
3. find the loops (natural loops of the control-flow graph: a backward ``BRA`` whose target dominates
   it) and take the consumer main loop: the one with the most HGMMA/QGMMA (ties: the shortest body, i.e.
   the unmasked steady-state loop, not the masked one);
4. classify its instructions and walk it twice (the second pass is the steady state) counting the GEMM
   groups in flight: a group is committed by its last HGMMA (the one carrying ``gsb0``) and retired
   by ``WARPGROUP.DEPBAR.LE gsb0, N`` (at most N groups left in flight). A MUFU.EX2 issued while at
   least one group is in flight is *in flight*.

``overlap_fraction = ex2_in_flight / ex2_total`` over the loop body. Step 02 waits for every GEMM
before the softmax (fraction 0 by design); step 04 is meant to be well above it.

Public: :func:`analyze`, :func:`parse_sass`, :func:`classify`, :func:`main_loop`, :func:`overlap`,
:func:`gemm_groups`, :func:`render_html`, :func:`compile_step`, :func:`record`; CLI ``python -m fa3_lab sass --step 04``.
"""
from __future__ import annotations

import hashlib
import html
import json
import re
import subprocess
from pathlib import Path

HELP = "SASS of a kernel step: the consumer main loop, its HGMMA/DEPBAR/MUFU.EX2 and their overlap"

DTYPES = {"bf16": "__nv_bfloat16", "fp16": "__half", "e4m3": "__nv_fp8_e4m3"}
HEADDIMS = (64, 128, 256)

# category -> (label, colour) for the table and the HTML listing
CATEGORIES = {
    "gemm": ("GEMM issue (HGMMA/QGMMA)", "#1f77b4"),
    "fence": ("WARPGROUP.ARRIVE (wgmma.fence)", "#17becf"),
    "wait": ("WARPGROUP.DEPBAR (wgmma.wait_group)", "#d62728"),
    "exp": ("MUFU.EX2 (exp2)", "#2ca02c"),
    "max": ("FMNMX (row max)", "#bcbd22"),
    "ffma": ("FFMA", "#7f7f7f"),
    "barrier": ("BAR / SYNCS (named barriers, mbarriers)", "#9467bd"),
    "local": ("LDL / STL (local memory)", "#ff7f0e"),
    "branch": ("BRA", "#8c564b"),
    "other": ("other", "#444444"),
}

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_PRED = re.compile(r"^@!?U?P[T0-9]+\s+")
_DEPBAR = re.compile(r"WARPGROUP\.DEPBAR\.LE\s+gsb0\s*,\s*(0x[0-9a-f]+|\d+)")
_FUNC = re.compile(r"Function\s*:\s*(\S+)")
_KERNEL = re.compile(r"step(\d\d)10fwd_kernelI(?:\d+)(\w+?)Li(\d+)ELb([01])E")


# ----------------------------------------------------------------------------- parsing

def parse_sass(text: str) -> list[dict]:
    """Instructions of one function's SASS listing (``cuobjdump -sass`` or ``nvdisasm`` text).

    Returns a list of ``{"addr": int (byte offset), "text": str (without the trailing ';'),
    "op": str (opcode with modifiers, predicate removed), "pred": str ("" or e.g. "@!P0"),
    "category": str (see :func:`classify`)}`` in address order. Lines that are not instructions
    (headers, encodings) are skipped.
    """
    out = []
    for line in text.splitlines():
        m = _LINE.search(line)
        if not m:
            continue
        ins = m.group(2).strip()
        pm = _PRED.match(ins)
        pred = pm.group(0).strip() if pm else ""
        body = ins[pm.end():] if pm else ins
        out.append({"addr": int(m.group(1), 16), "text": ins, "op": body.split()[0] if body else "",
                    "pred": pred, "category": classify(ins)})
    return out


def classify(instruction: str) -> str:
    """Category of one SASS instruction (text, predicate allowed): one of :data:`CATEGORIES`' keys.

    ``gemm`` HGMMA/QGMMA (wgmma.mma_async), ``fence`` WARPGROUP.ARRIVE (wgmma.fence), ``wait``
    WARPGROUP.DEPBAR (wgmma.wait_group), ``exp`` MUFU.EX2, ``max`` FMNMX, ``ffma`` FFMA, ``barrier``
    BAR.* (``bar.sync``/``bar.arrive``, named barriers) and SYNCS.* (mbarrier ops), ``local`` LDL/STL,
    ``branch`` BRA, ``other`` the rest.
    """
    op = _PRED.sub("", instruction.strip()).split(" ")[0]
    if op.startswith(("HGMMA", "QGMMA")):
        return "gemm"
    if op.startswith("WARPGROUP.ARRIVE"):
        return "fence"
    if op.startswith("WARPGROUP.DEPBAR"):
        return "wait"
    if op.startswith("MUFU.EX2"):
        return "exp"
    if op.startswith("FMNMX"):
        return "max"
    if op.startswith("FFMA"):
        return "ffma"
    if op.startswith(("BAR.", "SYNCS.")) or op == "BAR":
        return "barrier"
    if op.startswith(("LDL", "STL")):
        return "local"
    if op.startswith("BRA"):
        return "branch"
    return "other"


def split_functions(text: str) -> dict[str, str]:
    """{mangled name: its SASS text} from a whole-cubin ``cuobjdump -sass`` dump."""
    funcs, name, buf = {}, None, []
    for line in text.splitlines():
        m = _FUNC.search(line)
        if m:
            if name:
                funcs[name] = "\n".join(buf)
            name, buf = m.group(1), []
        elif name:
            buf.append(line)
    if name:
        funcs[name] = "\n".join(buf)
    return funcs


def _target(ins: dict) -> int | None:
    if ins["op"].startswith("BRA"):
        m = re.findall(r"0x([0-9a-f]+)", ins["text"])
        if m:
            return int(m[-1], 16)
    return None


# ----------------------------------------------------------------------------- loops

def _blocks(instrs: list[dict]):
    """Basic blocks: list of (start index, end index exclusive) and successor lists."""
    index = {ins["addr"]: i for i, ins in enumerate(instrs)}
    leaders = {0}
    for i, ins in enumerate(instrs):
        t = _target(ins)
        ends = t is not None or ins["op"] in ("EXIT", "RET", "RET.ABS", "RET.REL") or ins["op"].startswith(("EXIT", "RET"))
        if t is not None and t in index:
            leaders.add(index[t])
        if ends and i + 1 < len(instrs):
            leaders.add(i + 1)
    starts = sorted(leaders)
    spans = [(s, (starts[k + 1] if k + 1 < len(starts) else len(instrs))) for k, s in enumerate(starts)]
    block_of = {s: k for k, (s, _) in enumerate(spans)}
    succs = []
    for k, (s, e) in enumerate(spans):
        last = instrs[e - 1]
        t = _target(last)
        out = []
        if t is not None and t in index and index[t] in block_of:
            out.append(block_of[index[t]])
        unconditional = last["pred"] in ("", "@PT") and (t is not None or last["op"].startswith(("EXIT", "RET")))
        if not unconditional and k + 1 < len(spans):
            out.append(k + 1)
        succs.append(out)
    return spans, succs


def _dominators(n: int, succs: list[list[int]]) -> list[set[int]]:
    preds = [[] for _ in range(n)]
    for u, vs in enumerate(succs):
        for v in vs:
            preds[v].append(u)
    reach, stack = {0}, [0]
    while stack:
        for v in succs[stack.pop()]:
            if v not in reach:
                reach.add(v)
                stack.append(v)
    dom = [set(reach) for _ in range(n)]
    dom[0] = {0}
    changed = True
    while changed:
        changed = False
        for v in sorted(reach - {0}):
            ps = [dom[p] for p in preds[v] if p in reach]
            new = set.intersection(*ps) | {v} if ps else {v}
            if new != dom[v]:
                dom[v], changed = new, True
    return dom


def find_loops(instrs: list[dict]) -> list[dict]:
    """Natural loops: for every backward branch whose target block dominates it, the listing from the
    target (loop header) to the branch (latch), in address order, restricted to the loop's blocks.

    Returns ``[{"header": addr, "latch": addr, "instructions": [...], "gemm": count}]``. Out-of-line
    retry stubs of mbarrier waits (placed after the function's main code) are loop blocks too but lie
    outside [header, latch]; they hold only SYNCS try-waits and are left out of the listing.
    """
    spans, succs = _blocks(instrs)
    dom = _dominators(len(spans), succs)
    preds = [[] for _ in spans]
    for u, vs in enumerate(succs):
        for v in vs:
            preds[v].append(u)
    loops = []
    for u, vs in enumerate(succs):
        for h in vs:
            if h not in dom[u] or spans[h][0] > spans[u][0]:
                continue
            body, stack = {h, u}, [u]
            while stack:
                x = stack.pop()
                if x == h:
                    continue
                for p in preds[x]:
                    if p not in body:
                        body.add(p)
                        stack.append(p)
            lo, hi = instrs[spans[h][0]]["addr"], instrs[spans[u][1] - 1]["addr"]
            listing = [instrs[i] for b in sorted(body) for i in range(*spans[b]) if lo <= instrs[i]["addr"] <= hi]
            loops.append({"header": lo, "latch": hi, "instructions": listing,
                          "gemm": sum(ins["category"] == "gemm" for ins in listing)})
    return loops


def main_loop(instrs: list[dict]) -> dict:
    """The consumer main loop: among the innermost loops that issue GEMMs (a persistent kernel wraps
    the K/V loop in a loop over work tiles, which is left out), the one with the most HGMMA/QGMMA; ties
    go to the shortest body (the unmasked steady-state loop rather than the masked one), then the
    later header.

    Raises:
        ValueError: the listing has no loop containing a GEMM.
    """
    loops = [lp for lp in find_loops(instrs) if lp["gemm"] > 0]
    if not loops:
        raise ValueError("SASS listing: no loop contains an HGMMA/QGMMA (expected the consumer main loop)")

    def encloses(outer, inner):
        return (outer is not inner and outer["header"] <= inner["header"] and inner["latch"] <= outer["latch"]
                and (outer["header"], outer["latch"]) != (inner["header"], inner["latch"]))

    innermost = [lp for lp in loops if not any(encloses(lp, other) for other in loops)]
    return min(innermost, key=lambda lp: (-lp["gemm"], len(lp["instructions"]), -lp["header"]))


# ----------------------------------------------------------------------------- overlap

def overlap(listing: list[dict]) -> dict:
    """Walk a loop body twice (the second pass is the steady state, with the groups left in flight at
    the back edge) and mark each MUFU.EX2 issued while a WGMMA group is in flight.

    A group is committed by an HGMMA/QGMMA carrying ``gsb0`` and retired by ``WARPGROUP.DEPBAR.LE gsb0,
    N`` (groups in flight ← min(groups in flight, N)). Returns ``{"ex2_total", "ex2_in_flight",
    "overlap_fraction" (0.0 when there is no EX2), "in_flight_addrs": [addr, ...],
    "groups_per_iteration": number of committed groups per pass, "max_in_flight"}``.
    """
    in_flight, hits, max_in_flight = 0, [], 0
    for pass_no in range(2):
        for ins in listing:
            cat = ins["category"]
            if cat == "gemm" and "gsb0" in ins["text"]:
                in_flight += 1
                max_in_flight = max(max_in_flight, in_flight)
            elif cat == "wait":
                m = _DEPBAR.search(ins["text"])
                if m:
                    in_flight = min(in_flight, int(m.group(1), 0))
            elif cat == "exp" and pass_no == 1 and in_flight > 0:
                hits.append(ins["addr"])
    total = sum(ins["category"] == "exp" for ins in listing)
    return {"ex2_total": total, "ex2_in_flight": len(hits),
            "overlap_fraction": round(len(hits) / total, 4) if total else 0.0, "in_flight_addrs": hits,
            "groups_per_iteration": sum(ins["category"] == "gemm" and "gsb0" in ins["text"] for ins in listing),
            "max_in_flight": max_in_flight}


def gemm_groups(listing: list[dict]) -> list[int]:
    """HGMMA/QGMMA issues per committed group, in order: a group ends with the issue carrying ``gsb0``.

    Each issue is one k-slice of 16 (bf16/fp16) or 32 (e4m3) along the contraction dimension, so a
    Q·Kᵀ group has headdim/16 issues and a P·V group kBlockN/16 (16-bit). Issues after the last
    ``gsb0`` of the listing (an unfinished group) are not counted.
    """
    out, n = [], 0
    for ins in listing:
        if ins["category"] == "gemm":
            n += 1
            if "gsb0" in ins["text"]:
                out.append(n)
                n = 0
    return out


def summarize(instrs: list[dict], loop: dict | None = None) -> dict:
    """Counts and overlap of a function's SASS (``instrs`` from :func:`parse_sass`) and its main loop."""
    loop = loop or main_loop(instrs)
    body = loop["instructions"]
    ov = overlap(body)
    counts = {c: sum(ins["category"] == c for ins in body) for c in CATEGORIES}
    setmax = []
    for ins in instrs:
        if ins["op"].startswith("USETMAXREG"):
            m = re.findall(r"0x([0-9a-f]+)", ins["text"])
            setmax.append({"op": ins["op"].split(".")[1] if "." in ins["op"] else ins["op"],
                           "registers": int(m[-1], 16) if m else None})
    return {
        "hgmma": sum(ins["op"].startswith("HGMMA") for ins in body),
        "qgmma": sum(ins["op"].startswith("QGMMA") for ins in body),
        "hgmma_kernel": sum(ins["op"].startswith("HGMMA") for ins in instrs),
        "qgmma_kernel": sum(ins["op"].startswith("QGMMA") for ins in instrs),
        **{k: ov[k] for k in ("ex2_total", "ex2_in_flight", "overlap_fraction", "groups_per_iteration")},
        "local_memory_ops": counts["local"],
        "local_memory_ops_kernel": sum(ins["category"] == "local" for ins in instrs),
        "usetmaxreg": setmax,
        "counts": counts,
        "loop": {"header": loop["header"], "latch": loop["latch"], "instructions": len(body)},
        "in_flight_addrs": ov["in_flight_addrs"],
        "listing": [{"addr": ins["addr"], "text": ins["text"], "category": ins["category"]} for ins in body],
    }


# ----------------------------------------------------------------------------- compile

def cache_root() -> Path:
    from .._build import cache_dir

    return cache_dir() / "sass"


def compile_source(source: Path, include_dir: Path | None = None) -> tuple[Path, str]:
    """Compile one .cu file to an sm_90a cubin with ``-Xptxas=-v``; cached by (source, headers, flags,
    nvcc version). Returns (cubin path, ptxas log).

    Raises:
        RuntimeError: nvcc is missing or the compile failed (log in the message).
    """
    from .. import _env
    from .._build import NVCC_FLAGS

    nvcc = _env.nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin): cannot compile to SASS")
    include_dir = include_dir or (_env.CUDA_DIR / "include")
    flags = [f for f in NVCC_FLAGS if not f.startswith("-Xptxas")] + ["-Xptxas=-v"]
    h = hashlib.sha256(" ".join(flags + [_env.nvcc_version() or "?"]).encode())
    h.update(source.read_bytes())
    for p in sorted(include_dir.rglob("*.h")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    out = cache_root() / f"{source.stem}-{h.hexdigest()[:16]}"
    cubin, log_path = out / "kernel.cubin", out / "ptxas.log"
    if cubin.exists() and log_path.exists():
        return cubin, log_path.read_text()
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"kernel.{id(out)}.tmp.cubin"
    proc = subprocess.run([nvcc, *flags, f"-I{include_dir}", "-cubin", "-o", str(tmp), str(source)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source.name}:\n{proc.stderr[-4000:]}")
    log_path.write_text(proc.stdout + proc.stderr)
    tmp.replace(cubin)
    return cubin, log_path.read_text()


def compile_step(step: int | str) -> tuple[Path, str]:
    """Cubin and ptxas log of ``cuda/steps/NN_*.cu`` (every instantiation in it).

    Raises:
        ValueError: no such step file.  RuntimeError: nvcc missing or failing.
    """
    from .._build import step_sources

    n = _step_number(step)
    sources = step_sources()
    if n not in sources:
        raise ValueError(f"step: expected one of {', '.join(f'{k:02d}' for k in sources)}, got {step!r}")
    return compile_source(sources[n])


def dump_sass(cubin: Path) -> dict[str, str]:
    """{mangled kernel name: SASS text} of every function in a cubin (``cuobjdump -sass``).

    Raises:
        RuntimeError: cuobjdump missing or failing.
    """
    from .. import _env

    exe = _env.cuobjdump()
    if exe is None:
        raise RuntimeError("cuobjdump not found (pip install nvidia-cuda-cuobjdump)")
    cached = cubin.with_suffix(".sass")
    if cached.exists() and cached.stat().st_mtime >= cubin.stat().st_mtime:
        return split_functions(cached.read_text())
    proc = subprocess.run([exe, "-sass", str(cubin)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"cuobjdump failed on {cubin}: {proc.stderr.strip()}")
    cached.write_text(proc.stdout)
    return split_functions(proc.stdout)


def _step_number(step) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, str)):
        raise TypeError(f"step: expected an int or a string like '04', got {type(step).__name__}")
    try:
        return int(step)
    except ValueError:
        raise ValueError(f"step: expected a step number like 4 or '04', got {step!r}") from None


def find_kernel(names, step: int, dtype: str, headdim: int, causal: bool) -> str:
    """The mangled name of ``fa3::stepNN::fwd_kernel<T, headdim, causal>`` among ``names``.

    Raises:
        ValueError: no such instantiation (lists the ones present).
    """
    want = (f"{step:02d}", DTYPES[dtype], str(headdim), "1" if causal else "0")
    present = []
    for name in names:
        m = _KERNEL.search(name)
        if m:
            present.append(m.groups())
            if m.groups() == want:
                return name
    have = ", ".join(f"step{s} {t} hd{d} causal={c}" for s, t, d, c in sorted(set(present))) or "none"
    raise ValueError(f"no kernel step{want[0]} {dtype} headdim={headdim} causal={causal}; present: {have}")


def analyze(step, dtype: str = "bf16", headdim: int = 128, causal: bool = False) -> dict:
    """Compile a kernel step, dump one instantiation's SASS, and measure its consumer main loop.

    Args:
        step: step number (int 1–5 or "01"…"05"): ``cuda/steps/NN_*.cu``.
        dtype: "bf16" | "fp16" (16-bit steps) | "e4m3" (step 05).
        headdim: 64, 128 or 256.
        causal: the causal instantiation.

    Returns a dict: ``hgmma``, ``qgmma`` (GEMM issues in the main loop; ``*_kernel`` in the whole
    kernel), ``ex2_total``, ``ex2_in_flight``, ``overlap_fraction`` (MUFU.EX2 issued while a WGMMA
    group is in flight / all MUFU.EX2 in the loop, paper §3.2), ``groups_per_iteration``,
    ``local_memory_ops`` (LDL/STL in the loop), ``usetmaxreg`` ([{op, registers}] — setmaxnreg, §3.1),
    ``registers``, ``spill_stores``, ``spill_loads``, ``spills`` (bytes, from ``ptxas -v``),
    ``counts`` (per category), ``loop`` (header/latch byte offsets, length), ``listing`` (the loop:
    [{addr, text, category}]), ``in_flight_addrs``, ``kernel`` (mangled name), ``step``, ``dtype``,
    ``headdim``, ``causal``, ``nvcc``.

    Raises:
        TypeError: step/dtype/headdim/causal of the wrong type.
        ValueError: unknown step, dtype or headdim, or no such instantiation.
        RuntimeError: nvcc/cuobjdump missing or failing.
    """
    from .. import _env

    n = _step_number(step)
    if not isinstance(dtype, str):
        raise TypeError(f"dtype: expected a str, got {type(dtype).__name__}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    if isinstance(headdim, bool) or not isinstance(headdim, int):
        raise TypeError(f"headdim: expected an int, got {type(headdim).__name__}")
    if headdim not in HEADDIMS:
        raise ValueError(f"headdim: expected one of {HEADDIMS}, got {headdim}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    cubin, log = compile_step(n)
    funcs = dump_sass(cubin)
    name = find_kernel(funcs, n, dtype, headdim, causal)
    instrs = parse_sass(funcs[name])
    result = summarize(instrs)
    from .._build import ptxas_report

    rep = next((r for r in ptxas_report(log) if r["kernel"] == name), {})
    result.update(
        registers=rep.get("registers"), spill_stores=rep.get("spill_stores"), spill_loads=rep.get("spill_loads"),
        spills=(rep.get("spill_stores") or 0) + (rep.get("spill_loads") or 0),
        kernel=name, step=n, dtype=dtype, headdim=headdim, causal=causal, nvcc=_env.nvcc_version())
    return result


def ptxas_spills(step) -> list[dict]:
    """ptxas -v rows ({kernel, registers, spill_stores, spill_loads, stack}) of every instantiation of a step."""
    from .._build import ptxas_report

    return ptxas_report(compile_step(step)[1])


RECORDED = "results/sass/bf16_hd128.json"


def record(path: Path | None = None, steps=(2, 3, 4)) -> Path:
    """Write the analyses of ``steps`` (bf16, headdim 128 under "steps" and 256 under "hd256",
    non-causal) and of the overlap probe
    (tests/data/overlap_probe.cu) to a JSON file (default ``fa3_lab/results/sass/bf16_hd128.json``),
    so notebooks can show listings without a compiler. Returns the path."""
    import datetime

    from .. import _env

    path = Path(path) if path else Path(__file__).resolve().parent / RECORDED
    data = {"meta": {"nvcc": _env.nvcc_version(), "commit": _env.git_commit(),
                     "date": datetime.date.today().isoformat(),
                     "command": "python -c 'from fa3_lab import sass; sass.record()'"},
            "steps": {f"{s:02d}": analyze(s) for s in steps},
            # headdim 256 (kBlockN = 80): the one instantiation where ptxas keeps some EX2 under P·V
            "hd256": {f"{s:02d}": analyze(s, headdim=256) for s in steps}}
    probe = _env.REPO_ROOT / "tests" / "data" / "overlap_probe.cu"
    if probe.exists():
        cubin, _ = compile_source(probe)
        funcs = dump_sass(cubin)
        (name,) = [n for n in funcs if "overlap_kernel" in n]
        data["probe"] = {**summarize(parse_sass(funcs[name])), "kernel": name}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=0) + "\n")
    return path


def load_recorded(path: Path | None = None) -> dict:
    """The JSON written by :func:`record` (``{"meta", "steps": {"02": analysis, …}, "probe"}``)."""
    path = Path(path) if path else Path(__file__).resolve().parent / RECORDED
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------- HTML

def render_html(result: dict, title: str | None = None) -> str:
    """A self-contained HTML page: the main loop listing, one line per instruction, coloured by category
    (GEMM issue, waits, exp, barriers, local memory …), the in-flight MUFU.EX2 highlighted, and the
    GEMM groups in flight at each line."""
    hits = set(result.get("in_flight_addrs", []))
    title = title or (f"step{result.get('step', 0):02d} {result.get('dtype', '')} headdim={result.get('headdim', '')}"
                      f" causal={result.get('causal', '')}: consumer main loop")
    rows, in_flight = [], 0
    # the in-flight column shows the steady state: start from the count left at the back edge
    for ins in result["listing"]:
        if ins["category"] == "gemm" and "gsb0" in ins["text"]:
            in_flight += 1
        elif ins["category"] == "wait":
            m = _DEPBAR.search(ins["text"])
            if m:
                in_flight = min(in_flight, int(m.group(1), 0))
    for ins in result["listing"]:
        cat = ins["category"]
        if cat == "gemm" and "gsb0" in ins["text"]:
            in_flight += 1
        elif cat == "wait":
            m = _DEPBAR.search(ins["text"])
            if m:
                in_flight = min(in_flight, int(m.group(1), 0))
        colour = CATEGORIES[cat][1]
        cls = "hit" if ins["addr"] in hits else ""
        rows.append(f'<tr class="{cls}"><td class="a">{ins["addr"]:04x}</td><td>{in_flight}</td>'
                    f'<td style="color:{colour}">{html.escape(ins["text"])}</td><td>{cat}</td></tr>')
    legend = " ".join(f'<span style="color:{c}">&#9632; {html.escape(lab)}</span>' for lab, c in CATEGORIES.values())
    summary = (f"HGMMA {result['hgmma']}, QGMMA {result['qgmma']}, MUFU.EX2 {result['ex2_total']}, "
               f"in flight {result['ex2_in_flight']} (overlap fraction {result['overlap_fraction']:.2f}), "
               f"LDL/STL {result['local_memory_ops']}")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif}} table{{font-family:monospace;border-collapse:collapse}}
td{{padding:0 .6em}} td.a{{color:#999}} tr.hit{{background:#c7f5c7;font-weight:bold}}</style></head><body>
<h2>{html.escape(title)}</h2><p>{html.escape(summary)}</p><p>{legend}<br><span style="background:#c7f5c7">
MUFU.EX2 issued while a WGMMA group is in flight</span>; column 2: groups in flight (steady state)</p>
<table><tr><th>offset</th><th>in flight</th><th>instruction</th><th>category</th></tr>
{chr(10).join(rows)}</table></body></html>
"""


# ----------------------------------------------------------------------------- CLI

def add_arguments(parser) -> None:
    parser.add_argument("--step", default="04", help="kernel step number (cuda/steps/NN_*.cu), default 04")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="element type (default bf16)")
    parser.add_argument("--headdim", type=int, default=128, choices=list(HEADDIMS), help="default 128")
    parser.add_argument("--causal", action="store_true", help="the causal instantiation")
    parser.add_argument("--json", action="store_true", help="print the result as JSON (listing included)")
    parser.add_argument("--html", metavar="PATH", help="write the colour-coded main loop listing here")


def run(args) -> int:
    from .. import _env
    from .cli import UsageError

    if _env.nvcc() is None:
        raise UsageError("nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin); the sass command compiles the kernels")
    try:
        res = analyze(args.step, args.dtype, args.headdim, args.causal)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    except RuntimeError as e:
        raise UsageError(str(e).splitlines()[0]) from None
    if args.html:
        Path(args.html).write_text(render_html(res))
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"step{res['step']:02d} {res['dtype']} headdim={res['headdim']} causal={res['causal']} "
                    f"(nvcc {res['nvcc']}): consumer main loop {res['loop']['header']:#x}–{res['loop']['latch']:#x}")
    t.add_column("what")
    t.add_column("value", justify="right")
    for k, v in [("HGMMA issues", res["hgmma"]), ("QGMMA issues", res["qgmma"]),
                 ("GEMM groups / iteration", res["groups_per_iteration"]),
                 ("WARPGROUP.ARRIVE", res["counts"]["fence"]), ("WARPGROUP.DEPBAR", res["counts"]["wait"]),
                 ("MUFU.EX2", res["ex2_total"]), ("MUFU.EX2 with a GEMM in flight", res["ex2_in_flight"]),
                 ("overlap fraction", f"{res['overlap_fraction']:.2f}"), ("FMNMX", res["counts"]["max"]),
                 ("FFMA", res["counts"]["ffma"]), ("BAR / SYNCS", res["counts"]["barrier"]),
                 ("LDL / STL (loop)", res["local_memory_ops"]),
                 ("USETMAXREG", ", ".join(f"{u['op']} {u['registers']}" for u in res["usetmaxreg"]) or "none"),
                 ("registers (ptxas)", res["registers"]), ("spill bytes (ptxas)", res["spills"])]:
        t.add_row(k, str(v))
    Console().print(t)
    if args.html:
        print(f"wrote {args.html}")
    return 0
