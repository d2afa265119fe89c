"""The "Measured" paragraph of every step header, generated from the current recorded run.

Each step file (``cuda/steps/NN_*.cu``, ``cuda/steps/bwd/NN_*.cu``) opens with a header whose paragraph
starting ``// Measured`` states the step's speed. That paragraph is not typed: :func:`render` writes it from
the current run of ``fa3_lab/results/<gpu>/`` (one GPU, one commit; :func:`fa3_lab.lab.results.current_runs`),
and ``python -m fa3_lab.lab.readme`` rewrites it with the README (``--check`` fails when a header drifts):

* 16-bit forward steps: the Table 2 shape (4, 8448, 16, 128), non-causal, bf16 and fp16, from ``ablation.json``,
  with the ratio to the parent step and, for the first step, to FA3 and cuDNN (same run);
* the FP8 step: the kernel alone at headdim 128 and 256, seqlen 16k, from ``bench_fp8.json``, against FA3's e4m3;
* backward steps: the backward alone (FLOPs 2.5 × forward), bf16, from ``ablation_backward.json`` when the run has
  it (:func:`_backward_ablation`: seqlen 8k at headdim 128, or at the step's own headdim when it changes only
  another (``StepInfo.headdims``), else the file's largest shape; non-causal and causal; the
  ratio to the parent step, to cuDNN and to FA2 of the same run; the step's deterministic mode when timed), else
  from ``bench_backward.json`` (the default step, headdim 128, seqlen 8k, against cuDNN's and FA2's backward).

A step the current run does not cover says so. The paragraph ends at the next line that starts another part of
the header (``Known limit``, ``Tried``, ``Twin:``, ``Correctness``, ``Resources``, the closing rule).
"""
from __future__ import annotations

import re
from pathlib import Path

from fa3_lab import _env, registry

from . import results

_NEXT = re.compile(r"^// (Known limit|Tried|Twin:|Correctness|Resources|This is |={10})")
WIDTH = 110


def _wrap(text: str) -> list[str]:
    """``text`` as ``// `` comment lines of at most :data:`WIDTH` characters."""
    lines, cur = [], "//"
    for word in text.split():
        if len(cur) + 1 + len(word) > WIDTH:
            lines.append(cur)
            cur = "//  "
        cur += " " + word
    lines.append(cur)
    return lines


def _rows(runs, name):
    for run in runs:
        if run.path.stem == name:
            return run
    return None


def _tf(run, pass_=None, **where):
    """TFLOPs/s of the first row of ``run`` matching ``where`` (and ``pass_``, a row without ``pass`` being "fwd"),
    or None."""
    if pass_ is not None:
        where["pass"] = pass_
    for r in run.rows:
        if all(r.get(k, "fwd" if k == "pass" else None) == v for k, v in where.items()):
            return r["tflops"]
    return None


def _source(run) -> str:
    m = run.meta
    return f"{m['gpu']}, commit {m['commit']}, {m['date'][:10]}; {run.path.relative_to(_env.REPO_ROOT).as_posix()}"


def measured(step: registry.StepInfo, runs: list) -> str:
    """The paragraph's text (one line, unwrapped) for ``step`` from one GPU's current ``runs``."""
    impl = step.marker
    if step.series == "bwd":
        abl = _rows(runs, "ablation_backward")
        text = _backward_ablation(step, abl) if abl is not None else None
        if text:
            return text
        run = _rows(runs, "bench_backward")
        if run is not None:
            parts = []
            for causal in (False, True):
                ours = _tf(run, impl=impl, dtype="bf16", headdim=128, causal=causal, seqlen_q=8192, **{"pass": "bwd"})
                if ours is None:
                    continue
                peers = [(p, _tf(run, impl=p, dtype="bf16", headdim=128, causal=causal, seqlen_q=8192, **{"pass": "bwd"}))
                         for p in ("cudnn", "sdpa_flash")]
                ratio = ", ".join(f"{ours / t:.2f}× {p}" for p, t in peers if t)
                parts.append(f"{'causal' if causal else 'non-causal'} {ours:.0f} TFLOPs/s" + (f" ({ratio})" if ratio else ""))
            if parts:
                return (f"Measured ({_source(run)}): the backward alone (FLOPs 2.5 × forward), bf16, headdim 128, "
                        f"seqlen 8k: " + "; ".join(parts) + ".")
    elif step.dtypes == ("e4m3",):
        run = _rows(runs, "bench_fp8")
        if run is not None:
            parts = []
            for d in (128, 256):
                ours = _tf(run, impl=impl, dtype="e4m3", headdim=d, seqlen_q=16384)
                fa3 = _tf(run, impl="fa3", dtype="e4m3", headdim=d, seqlen_q=16384)
                if ours is not None:
                    parts.append(f"headdim {d} {ours:.0f} TFLOPs/s" + (f" ({ours / fa3:.2f}× FA3 e4m3)" if fa3 else ""))
            if parts:
                return (f"Measured ({_source(run)}): the kernel alone, non-causal, seqlen 16k: " + "; ".join(parts) + ".")
    else:
        run = _rows(runs, "ablation")
        if run is not None:
            text = _forward(step, run)
            if text:
                return text
    return ("Measured: the current recorded run (fa3_lab/results/) has no row for this step; "
            "`python -m fa3_lab bench` records one.")


def _backward_ablation(step: registry.StepInfo, run) -> str | None:
    """A backward step from ``ablation_backward.json``: its bf16 "bwd" TFLOPs/s at seqlen 8k and headdim 128, or the
    step's own headdim when 128 is not among ``step.headdims`` (else the largest (seqlen, headdim) of its rows), non-causal then causal where recorded, each with its ratio to the parent
    step, cuDNN and FA2 at the same shape, and its deterministic mode (``stepNN_det``) when timed; None when the run
    has no bf16 "bwd" row of the step."""
    impl = step.marker
    mine = [r for r in run.rows if r["impl"] == impl and r["dtype"] == "bf16" and r.get("pass", "fwd") == "bwd"]
    if not mine:
        return None
    own = 128 if 128 in step.headdims else step.headdims[0]
    at = [r for r in mine if r["headdim"] == own and r["seqlen_q"] == 8192]
    if not at:  # the largest shape: longest seqlen, then widest headdim
        n, d = max((r["seqlen_q"], r["headdim"]) for r in mine)
        at = [r for r in mine if r["headdim"] == d and r["seqlen_q"] == n]
    r0 = at[0]
    parts = []
    for causal in (False, True):
        row = next((r for r in at if r["causal"] == causal), None)
        if row is None:
            continue
        shape = {k: row[k] for k in ("headdim", "causal", "batch", "seqlen_q", "seqlen_k", "nheads", "nheads_kv")}
        others = [(f"step {step.parent:02d}", registry.step(step.parent).marker)] if step.parent is not None else []
        others += [("cuDNN", "cudnn"), ("FA2", "sdpa_flash")]
        ratios = [f"{row['tflops'] / t:.2f}× {name}" for name, other in others
                  if (t := _tf(run, impl=other, dtype="bf16", pass_="bwd", **shape))]
        text = f"{'causal' if causal else 'non-causal'} {row['tflops']:.0f} TFLOPs/s" + (
            f" ({', '.join(ratios)})" if ratios else "")
        det = _tf(run, impl=impl + results.DET_SUFFIX, dtype="bf16", pass_="bwd", **shape)
        if det:
            pct = (det / row["tflops"] - 1) * 100
            text += f", deterministic {det:.0f} ({'−' if pct < 0 else '+'}{abs(pct):.1f} %)"
        parts.append(text)
    heads = results.heads_label(r0["nheads"], r0["nheads_kv"])
    return (f"Measured ({_source(run)}): the backward alone (FLOPs 2.5 × forward), bf16, headdim {r0['headdim']}, "
            f"seqlen {results.seqlen_label(r0['seqlen_q'])} (batch {r0['batch']}, {heads} heads): " + "; ".join(parts) + ".")


def _shape(r) -> str:
    return (f"({r['batch']}, {r['seqlen_q']}, {r['nheads']}, {r['headdim']}"
            + (", causal)" if r["causal"] else ")"))


def _forward(step: registry.StepInfo, run) -> str | None:
    """A 16-bit forward step: bf16 and fp16 at the Table 2 shape, the ratio to the parent there, and the shape of
    the run where the step gains most over its parent (bf16), from one ``ablation.json``."""
    impl = step.marker
    table2 = dict(headdim=128, causal=False, seqlen_q=8448, batch=4, nheads=16)
    got = {dt: _tf(run, impl=impl, dtype=dt, **table2) for dt in ("bf16", "fp16")}
    if all(v is None for v in got.values()):
        return None
    text = (f"Measured ({_source(run)}): Table 2 shape (4, 8448, 16, 128): "
            + ", ".join(f"{dt} {v:.0f}" for dt, v in got.items() if v is not None) + " TFLOPs/s")
    if step.parent is None:
        peers = [f"{name} {t:.0f}" for name, t in (("FA3", _tf(run, impl="fa3", dtype="bf16", **table2)),
                                                   ("cuDNN", _tf(run, impl="cudnn", dtype="bf16", **table2)))
                 if t is not None]
        return text + ("; bf16 peers in the same run: " + ", ".join(peers) if peers else "") + "."
    parent = registry.step(step.parent).marker
    pairs = []
    wide = _same_call(run, "ablation_steps")  # every step at more shapes, archived beside the current run
    for r in (wide or run).rows:
        if r["impl"] != impl or r["dtype"] != "bf16":
            continue
        p = _tf(wide or run, impl=parent, dtype="bf16", headdim=r["headdim"], causal=r["causal"], seqlen_q=r["seqlen_q"],
                batch=r["batch"], nheads=r["nheads"])
        if p:
            pairs.append((r["tflops"] / p, r, p))
    t2 = next((x for x in pairs if all(x[1][k] == v for k, v in table2.items())), None)
    if t2:
        text += f" ({t2[0]:.2f}× step {step.parent:02d})"
    if pairs:
        ratio, r, p = max(pairs, key=lambda x: x[0])
        if t2 is None or r is not t2[1]:
            text += (f"; largest gain over {step.parent:02d} in this run: {_shape(r)} bf16 "
                     f"{r['tflops']:.0f} vs {p:.0f} ({ratio:.2f}×)")
    if step.id == registry.DEFAULT_STEP:
        text += _against_base(run)
    return text + "."


def _same_call(run, name):
    """``tools/experiments/results/<gpu>/<name>.json`` when it has the run's commit, else None."""
    path = results.ARCHIVE_DIR / run.path.parent.name / f"{name}.json"
    if path.is_file():
        other = results.load(path)
        if other.meta["commit"] == run.meta["commit"]:
            return other
    return None


def _against_base(run) -> str:
    """The default step against a base commit's kernel in the same call (tools/experiments/results/<gpu>/grid_vs_*.json
    with the run's commit): median and range of new ÷ old over its grid."""
    import statistics

    folder = results.ARCHIVE_DIR / run.path.parent.name
    for path in sorted(folder.glob("grid_vs_*.json")):
        other = results.load(path)
        if other.meta["commit"] != run.meta["commit"]:
            continue
        key = lambda r: (r["dtype"], r["headdim"], r["causal"], r["seqlen_q"])  # noqa: E731
        old = {key(r): r["tflops"] for r in other.rows if r.get("build") not in (None, "new")}
        ratios = [r["tflops"] / old[key(r)] for r in other.rows if r.get("build") == "new" and key(r) in old]
        if ratios:
            base = next(r["build"] for r in other.rows if r.get("build") not in (None, "new"))
            return (f"; against {base}'s kernel in the same call over {len(ratios)} points of the paper grid "
                    f"(bf16 + fp16; {path.relative_to(_env.REPO_ROOT).as_posix()}): median "
                    f"{statistics.median(ratios):.3f}×, {min(ratios):.3f}–{max(ratios):.3f}×")
    return ""


def _current() -> list:
    by_gpu = results.current_runs()
    return next(iter(by_gpu.values())) if by_gpu else []


def rewrite(text: str, block: list[str], where: str) -> str:
    """``text`` with its ``// Measured`` paragraph replaced by ``block``.

    Raises:
        ValueError: the header has no ``// Measured`` paragraph.
    """
    lines = text.split("\n")
    try:
        start = next(i for i, ln in enumerate(lines) if ln.startswith("// Measured"))
    except StopIteration:
        raise ValueError(f"{where}: no '// Measured' paragraph in the header") from None
    end = start + 1
    while end < len(lines) and lines[end].startswith("//") and not _NEXT.match(lines[end]):
        end += 1
    return "\n".join(lines[:start] + block + lines[end:])


def update(check: bool = False) -> list[Path]:
    """Rewrite (or with ``check``, only compare) every present step's paragraph; returns the files that were
    (or would be) changed."""
    runs = _current()
    changed = []
    for step in registry.STEPS:
        path = _env.REPO_ROOT / step.path
        if not path.is_file():
            continue
        old = path.read_text()
        new = rewrite(old, _wrap(measured(step, runs)), step.path)
        if new != old:
            changed.append(path)
            if not check:
                path.write_text(new)
    return changed
