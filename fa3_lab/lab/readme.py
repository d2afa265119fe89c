"""`python -m fa3_lab.lab.readme [--check]` — regenerate README.md's results table from recorded runs.

The table lives between ``<!-- results:begin -->`` and ``<!-- results:end -->``. One table per
recorded run (one GPU, one commit, one process — docs/design.md forbids comparing across runs): TFLOPs/s
of each implementation per (dtype, headdim, mask, seqlen), then our best step divided by each peer.
``--check`` changes nothing and exits 1 if README.md differs from what would be generated (a test
runs it, so the README never shows numbers that are not in ``fa3_lab/results/``).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from fa3_lab import _env
from fa3_lab.lab import results

BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"
README = _env.REPO_ROOT / "README.md"

NO_RESULTS = ("No GPU results are recorded yet: `fa3_lab/results/` holds no run. "
              "They appear here once a run on an H100 is recorded there.")


def _cells(run: results.Run) -> dict[tuple, dict[str, float]]:
    """(dtype index, headdim, causal, sq, sk, batch, nheads, nheads_kv) -> {impl: median TFLOPs/s}."""
    cells: dict[tuple, dict[str, list[float]]] = {}
    for row in run.rows:
        key = (results.DTYPES.index(row["dtype"]), row["headdim"], row["causal"], row["seqlen_q"],
               row["seqlen_k"], row["batch"], row["nheads"], row["nheads_kv"])
        cells.setdefault(key, {}).setdefault(row["impl"], []).append(float(row["tflops"]))
    return {key: {impl: statistics.median(v) for impl, v in by_impl.items()} for key, by_impl in cells.items()}


def _shape_cells(key) -> list[str]:
    dtype_i, headdim, causal, sq, sk, batch, nheads, nheads_kv = key
    heads = f"{nheads}" if nheads == nheads_kv else f"{nheads}/{nheads_kv}kv"
    return [results.DTYPES[dtype_i], str(headdim), "causal" if causal else "full",
            str(sq) if sq == sk else f"{sq}→{sk}", f"{batch}×{heads}"]


def _best_step(tf: dict[str, float]):
    ours = [(tf[s], s) for s in results.STEP_IMPLS if s in tf]
    return max(ours) if ours else (None, None)


def pivot(run: results.Run) -> tuple[list[str], list[list[str]]]:
    """One run's rows as a table: (header, rows of strings).

    Columns: dtype, headdim, mask, seqlen (``sq`` or ``sq→sk``), batch×heads (kv heads when
    GQA), TFLOPs/s of each impl present (in :data:`results.IMPLS` order; median of duplicate rows),
    ``best step`` (the fastest of ours), then ``best/<peer>`` for each peer present.
    Cells with no measurement are "—".
    """
    cells = _cells(run)
    present = {impl for by_impl in cells.values() for impl in by_impl}
    impls = [i for i in results.IMPLS if i in present]
    steps = [i for i in results.STEP_IMPLS if i in present]
    peers = [i for i in results.PEER_IMPLS if i in present]

    header = ["dtype", "headdim", "mask", "seqlen", "batch×heads"] + impls
    if steps:
        header += ["best step"] + [f"best/{p}" for p in peers]
    table = []
    for key in sorted(cells):
        tf = cells[key]
        line = _shape_cells(key) + [f"{tf[i]:.1f}" if i in tf else "—" for i in impls]
        if steps:
            best, best_step = _best_step(tf)
            if best is None:
                line += ["—"] * (1 + len(peers))
            else:
                line.append(f"{best_step} ({best:.1f})")
                line += [f"{best / tf[p]:.2f}×" if p in tf else "—" for p in peers]
        table.append(line)
    return header, table


#: Peers the compact view (the tour) shows: FA3, cuDNN, FlashAttention-2.
MAIN_PEERS = ("fa3", "cudnn", "sdpa_flash")


def compact(run: results.Run) -> tuple[list[str], list[list[str]]]:
    """A narrow view of one run for a terminal: the longest seqlen of each (dtype, headdim, mask).

    Columns: dtype, hdim, mask, seqlen, ours ("TFLOPs/s stepNN", our best step), then each of
    :data:`MAIN_PEERS` present as "TFLOPs/s best/peer×".
    """
    cells = _cells(run)
    longest: dict[tuple, tuple] = {}
    for key in cells:
        group = key[:3]
        if group not in longest or (key[3], key[4]) > (longest[group][3], longest[group][4]):
            longest[group] = key
    present = {impl for by_impl in cells.values() for impl in by_impl}
    peers = [p for p in MAIN_PEERS if p in present]
    header = ["dtype", "hdim", "mask", "seqlen", "ours"] + peers
    table = []
    for key in sorted(longest.values()):
        tf = cells[key]
        best, best_step = _best_step(tf)
        line = _shape_cells(key)[:4] + ["—" if best is None else f"{best:.0f} {best_step}"]
        for p in peers:
            if p not in tf:
                line.append("—")
            elif best is None:
                line.append(f"{tf[p]:.0f}")
            else:
                line.append(f"{tf[p]:.0f} {best / tf[p]:.2f}×")
        table.append(line)
    return header, table


def _run_line(run: results.Run) -> str:
    m = run.meta
    try:
        rel = run.path.resolve().relative_to(_env.REPO_ROOT)
    except ValueError:  # a results folder outside the repo (tests)
        rel = Path(run.path.parent.name, run.path.name)
    rounds = {len(r["ms_rounds"]) for r in run.rows if "ms_rounds" in r}
    timing = (f"median of {max(rounds)} rounds of do_bench in rotating order (`ms_rounds` in the JSON)" if rounds
              else "median of timed runs")
    return (f"Recorded on **{m['gpu']}** ({m['sm_count']} SMs), {m['date'][:10]}, commit `{m['commit']}`; "
            f"torch {m['torch']}, CUDA {m['cuda']}, cuDNN {m['cudnn']}; `{m['command'].strip()}` "
            f"(`{rel.as_posix()}`). TFLOPs/s, {timing}; best/peer = our fastest step "
            f"÷ that peer, same run, same inputs.")


def render(runs: list[results.Run]) -> str:
    """The markdown that goes between the markers (without them), ending in a newline."""
    if not runs:
        return NO_RESULTS + "\n"
    parts = []
    for run in runs:
        header, table = pivot(run)
        lines = [_run_line(run), "", "| " + " | ".join(header) + " |",
                 "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in table]
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def update(text: str, runs: list[results.Run]) -> str:
    """``text`` with the part between the markers replaced by :func:`render` of ``runs``.

    Raises:
        ValueError: the markers are missing, repeated or out of order.
    """
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"README: expected one {BEGIN} followed by one {END}")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{render(runs)}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fa3_lab.lab.readme",
                                     description="Regenerate README.md's results table from fa3_lab/results/.")
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is stale; change nothing")
    parser.add_argument("--readme", type=Path, default=README, help=argparse.SUPPRESS)
    parser.add_argument("--results", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        text = args.readme.read_text()
        new = update(text, results.load_all(args.results))
    except (OSError, ValueError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    if args.check:
        if new != text:
            print(f"{parser.prog}: {args.readme} results table is stale; run `python -m fa3_lab.lab.readme`",
                  file=sys.stderr)
            return 1
        print(f"{args.readme.name} results table is up to date")
        return 0
    if new != text:
        args.readme.write_text(new)
        print(f"updated {args.readme}")
    else:
        print(f"{args.readme.name} already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
