"""Where a kernel's warps wait, per SASS instruction, from Nsight Compute's warp-state sampling.

Reads the per-instruction table that ``ncu --import REPORT --page source --csv --print-source sass`` prints (one
kernel; the report needs the SourceCounters section, e.g. ``--set full``) and prints the samples per stall reason
and the instructions with the most samples. ``--trim OUT.csv`` keeps the sampled rows (address, SASS, samples, the
stall reasons) — the part worth committing beside a run; this script reads a trimmed file as well.

    python tools/experiments/ncu_stalls.py tools/experiments/results/nvidia-h200/66926e1/ncu26_stalls.csv --top 20

Samples are taken at a fixed interval on every resident warp (producer, dQ writer and consumers alike), so a
count is time spent at that instruction summed over warps; a stall is charged to the instruction waiting to issue.
Used for step 27 (docs/performance.md, row 27).
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

SAMPLES = "Warp Stall Sampling (All Samples)"


def read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """(stall reason columns, rows) of an ncu source-page CSV or of a file written by ``--trim``.

    Raises:
        ValueError: ``path`` has no "Address", "Source" and sample columns (not a source page of one kernel).
    """
    lines = path.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.lstrip('"').startswith("Address")), None)
    if start is None:
        raise ValueError(f"{path}: no header row starting with \"Address\" (expected the output of ncu --page "
                         f"source --csv --print-source sass, one kernel)")
    rows = list(csv.DictReader(lines[start:]))
    if not rows or SAMPLES not in rows[0] or "Source" not in rows[0]:
        raise ValueError(f"{path}: no {SAMPLES!r} column (profile with the SourceCounters section)")
    reasons = [k for k in rows[0] if k.startswith("stall_") and "Not Issued" not in k]
    return reasons, rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", type=Path, help="ncu --page source --csv --print-source sass output (or a --trim file)")
    ap.add_argument("--top", type=int, default=20, help="instructions to list (default 20)")
    ap.add_argument("--trim", type=Path, default=None, help="write the sampled rows to this CSV")
    args = ap.parse_args(argv)
    reasons, rows = read(args.csv)
    n = lambda r, k: int(r.get(k) or 0)  # noqa: E731
    total = sum(n(r, SAMPLES) for r in rows)
    print(f"{args.csv.name}: {total} samples over {len(rows)} instructions")
    by_reason = sorted(((sum(n(r, k) for r in rows), k) for k in reasons), reverse=True)
    for count, k in by_reason[:10]:
        print(f"  {k[6:]:<18} {count:8d} {100 * count / max(total, 1):5.1f} %")
    print(f"top {args.top} instructions (address, samples, share, SASS, main reasons):")
    for r in sorted(rows, key=lambda r: -n(r, SAMPLES))[:args.top]:
        top = sorted(((n(r, k), k[6:]) for k in reasons), reverse=True)[:2]
        why = ", ".join(f"{k} {c}" for c, k in top if c)
        print(f"  {r['Address'][-5:]} {n(r, SAMPLES):7d} {100 * n(r, SAMPLES) / max(total, 1):5.1f} %  "
              f"{r['Source'].strip()[:64]:<64} {why}")
    if args.trim is not None:
        keep = [r for r in rows if n(r, SAMPLES) > 0]
        cols = ["Address", "Source", SAMPLES] + [k for k in reasons if any(n(r, k) for r in keep)]
        with args.trim.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            w.writerows({**r, "Source": r["Source"].strip()} for r in keep)
        print(f"wrote {args.trim} ({len(keep)} sampled instructions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
