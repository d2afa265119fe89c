"""`python -m fa3_lab student OUTDIR`: student copies of the notebooks and of the CUDA exercise.

Notebooks go through nbgrader's ``ClearSolutions`` (every ``### BEGIN SOLUTION`` … ``### END
SOLUTION`` region becomes ``# YOUR CODE HERE`` / ``raise NotImplementedError()``) and ``ClearOutput``
preprocessors — nothing else of nbgrader's course machinery is needed. The check cells stay: they call
``fa3_lab.lab.grading.check_*``, which fail with a message naming the function to write until it is right.

The CUDA exercise (``cuda/exercises/*.cu``) loses the lines between ``// ### BEGIN SOLUTION`` and
``// ### END SOLUTION``; in their place go ``// YOUR CODE HERE`` and the region's ``// stub:`` lines
(uncommented), which keep the file compiling and make an unfinished kernel fail its test clearly.
``exercise_binding.cpp`` is copied beside it.

Layout of OUTDIR::

    notebooks/NN_name.ipynb          one per notebook chosen
    cuda/exercises/ex01_….cu         the stripped exercise(s), plus exercise_binding.cpp
"""
from __future__ import annotations

import shutil
from pathlib import Path

from .._env import CUDA_DIR, REPO_ROOT
from .cli import UsageError

HELP = "write student copies: notebooks without solutions/outputs (nbgrader) and the CUDA exercise stub"

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
EXERCISES_DIR = CUDA_DIR / "exercises"
CUDA_BEGIN = "// ### BEGIN SOLUTION"
CUDA_END = "// ### END SOLUTION"
CUDA_STUB_PREFIX = "// stub:"
CUDA_STUB_MARK = "// YOUR CODE HERE"


def add_arguments(parser) -> None:
    parser.add_argument("outdir", metavar="OUTDIR", help="where to write the copies (must be empty or absent)")
    parser.add_argument("--notebooks", nargs="+", metavar="NB",
                        help="notebook ids (01), names (01_attention_and_online_softmax) or paths; default: all")
    parser.add_argument("--force", action="store_true", help="write into OUTDIR even if it is not empty")
    parser.add_argument("--no-cuda", action="store_true", help="leave out the CUDA exercise")


def all_notebooks() -> list[Path]:
    """The lab's notebooks, ``notebooks/0*.ipynb``, in order."""
    return sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))


def resolve_notebooks(names) -> list[Path]:
    """Paths of the notebooks named by id (``"01"``), stem, file name or path.

    Raises:
        UsageError: a name that matches no notebook (or more than one).
    """
    if not names:
        return all_notebooks()
    out = []
    for name in names:
        path = Path(name)
        if path.suffix == ".ipynb" and path.is_file():
            out.append(path)
            continue
        hits = [p for p in all_notebooks() if p.stem == name or p.name == name or p.stem.split("_")[0] == name]
        if len(hits) != 1:
            known = ", ".join(p.stem for p in all_notebooks())
            raise UsageError(f"--notebooks: no single notebook matches {name!r} (known: {known})")
        out.append(hits[0])
    return out


def student_notebook(nb):
    """A student copy of a notebook node: solutions replaced by nbgrader's stub, outputs cleared.

    Args:
        nb: an ``nbformat`` v4 NotebookNode (not modified).

    Returns:
        a new NotebookNode.

    Raises:
        ValueError: a solution region outside an nbgrader solution cell, or one left after clearing
            (an unmatched marker).
    """
    import copy

    from nbgrader.preprocessors import ClearOutput, ClearSolutions

    nb = copy.deepcopy(nb)
    try:
        # enforce_metadata: a solution region must sit in a cell nbgrader knows as a solution cell
        # (metadata "nbgrader": {"solution": true, "grade_id": ...}), so nbgrader autograde works too.
        nb, _ = ClearSolutions().preprocess(nb, {})
    except RuntimeError as err:
        raise ValueError(f"{err} (add nbgrader cell metadata to the exercise cells)") from None
    nb, _ = ClearOutput().preprocess(nb, {})
    for i, cell in enumerate(nb.cells):
        if "BEGIN SOLUTION" in cell.source or "END SOLUTION" in cell.source:
            raise ValueError(f"cell {i}: an unmatched solution marker is left after ClearSolutions")
    return nb


def strip_cuda_solution(text: str, name: str = "source") -> str:
    """A CUDA source with each ``// ### BEGIN SOLUTION`` … ``// ### END SOLUTION`` region replaced.

    The replacement, at the BEGIN line's indentation, is ``// YOUR CODE HERE`` followed by the code of
    the region's ``// stub: CODE`` lines.

    Raises:
        ValueError: no region, or an unmatched/nested marker (message names ``name`` and the line).
    """
    out, stub, begin_line, indent = [], [], None, ""
    for n, line in enumerate(text.splitlines(keepends=True), 1):
        stripped = line.strip()
        if stripped.startswith(CUDA_BEGIN):
            if begin_line is not None:
                raise ValueError(f"{name}:{n}: nested '{CUDA_BEGIN}' (the region opened at line {begin_line})")
            begin_line, indent, stub = n, line[: len(line) - len(line.lstrip())], []
        elif stripped.startswith(CUDA_END):
            if begin_line is None:
                raise ValueError(f"{name}:{n}: '{CUDA_END}' without a '{CUDA_BEGIN}'")
            out.append(f"{indent}{CUDA_STUB_MARK}\n")
            out += [f"{indent}{code}\n" for code in stub]
            begin_line = None
        elif begin_line is not None:
            if stripped.startswith(CUDA_STUB_PREFIX):
                stub.append(stripped[len(CUDA_STUB_PREFIX):].strip())
        else:
            out.append(line)
    if begin_line is not None:
        raise ValueError(f"{name}:{begin_line}: '{CUDA_BEGIN}' is never closed")
    if CUDA_STUB_MARK not in "".join(out):
        raise ValueError(f"{name}: no '{CUDA_BEGIN}' region found")
    return "".join(out)


def cuda_exercises() -> list[Path]:
    """The CUDA exercise sources, ``cuda/exercises/ex*.cu``."""
    return sorted(EXERCISES_DIR.glob("ex*.cu"))


def write_student_copies(outdir, notebooks=None, *, force: bool = False, cuda: bool = True) -> list[Path]:
    """Write the student copies into ``outdir``; returns the files written.

    Args:
        outdir: target folder; created if absent.
        notebooks: names for :func:`resolve_notebooks` (None: all).
        force: allow a non-empty ``outdir`` (files of the same name are overwritten).
        cuda: also write the stripped CUDA exercise(s) and the binding.

    Raises:
        UsageError: ``outdir`` is a file, or exists and is not empty without ``force``; an unknown notebook.
    """
    import nbformat

    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise UsageError(f"OUTDIR: {outdir} exists and is not a directory")
    if outdir.is_dir() and any(outdir.iterdir()) and not force:
        raise UsageError(f"OUTDIR: {outdir} exists and is not empty (use --force to write into it)")
    paths = resolve_notebooks(notebooks)
    written = []
    (outdir / "notebooks").mkdir(parents=True, exist_ok=True)
    for path in paths:
        nb = student_notebook(nbformat.read(path, as_version=4))
        target = outdir / "notebooks" / path.name
        nbformat.write(nb, target)
        written.append(target)
    if cuda:
        (outdir / "cuda" / "exercises").mkdir(parents=True, exist_ok=True)
        for src in cuda_exercises():
            target = outdir / "cuda" / "exercises" / src.name
            target.write_text(strip_cuda_solution(src.read_text(), src.name))
            written.append(target)
        binding = EXERCISES_DIR / "exercise_binding.cpp"
        shutil.copyfile(binding, outdir / "cuda" / "exercises" / binding.name)
        written.append(outdir / "cuda" / "exercises" / binding.name)
    return written


def run(args) -> int:
    written = write_student_copies(args.outdir, args.notebooks, force=args.force, cuda=not args.no_cuda)
    for path in written:
        print(path)
    print(f"{len(written)} files written to {args.outdir}; solutions and outputs removed. "
          f"Grade: run the check cells (fa3_lab.lab.grading), and on a GPU "
          f"FA3_EXERCISE=<copy>.cu pytest tests/test_grading.py -k cuda_exercise")
    return 0
