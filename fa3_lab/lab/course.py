"""`python -m fa3_lab course OUTDIR`: an nbgrader course kit, with hidden tests and a GPU grader.

Builds a real nbgrader course from every notebook that has exercises (nbgrader grade cells), in
nbgrader's own layout, then runs ``nbgrader generate_assignment`` on it::

    OUTDIR/
      nbgrader_config.py               course id and execution timeout; run nbgrader from OUTDIR
      gradebook.db                     assignments, grade cells, points and the hidden tests
      source/<NN_name>/<NN_name>.ipynb the instructor copy: solutions + autograder tests (points)
                                       + hidden tests (below)
      release/<NN_name>/<NN_name>.ipynb the student copy (generate_assignment: no solution, no
                                       hidden test, no output)
      release/cuda_ex01/               the CUDA exercise without its solution, its binding, README.md
      autograder/cuda_ex01/            never released: the solution and grading.json (shapes, seed,
                                       points of the GPU grading)
      submitted/                       nbgrader collect puts submissions in submitted/<student>/<assignment>/
      POINTS.md                        the points of every exercise

Hidden tests. Each autograder test cell of a source notebook calls the students' self-check
``grading.check_<name>(fn)``; the kit adds, between ``### BEGIN HIDDEN TESTS`` and ``### END HIDDEN
TESTS``, the same check on inputs the students never see (a seed drawn when the kit is built) run while
the lab's own answers to the exercise (:data:`UNAVAILABLE`, e.g. ``reference.fp8.quantize_per_block``
for ``block_scales``) are unavailable: their code is swapped for one that raises, for the duration of
each call of the student's function, however the function reaches them. The check comes from a fresh
copy of ``fa3_lab.lab.grading``, so a submission that replaced the self-check changes nothing. An answer
that calls the lab's reference passes the self-check and scores 0. ``generate_assignment`` stores the
hidden tests in the gradebook and removes them from the release; ``autograde`` puts them back; the
kit's ``nbgrader_config.py`` keeps them out of ``generate_feedback``'s pages.

The CUDA exercise has no notebook: ``python -m fa3_lab course grade-cuda OUTDIR`` builds and checks
every ``submitted/<student>/cuda_ex01/ex01_online_softmax.cu`` on an sm_90 GPU (each student in its
own process) against the hidden shapes of ``autograder/cuda_ex01/grading.json`` (1 point per shape), with
the reference functions of ``fa3/softmax.h`` poisoned (``#pragma GCC poison``) so that a copy calling
them does not compile, and writes ``cuda_ex01_grades.csv`` and ``.json`` in OUTDIR.
"""
from __future__ import annotations

import ast
import contextlib
import csv
import io
import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

from .cli import UsageError
from .student import check_outdir, require_nbgrader, staged

HELP = "build an nbgrader course kit (source, release, hidden tests, points); grade the CUDA exercise on a GPU"

COURSE_ID = "fa3-lab"
CUDA_ASSIGNMENT = "cuda_ex01"
CUDA_FILE = "ex01_online_softmax.cu"
#: Points of the CUDA exercise per hidden shape that matches the reference.
CUDA_POINTS_PER_SHAPE = 1
CUDA_HIDDEN_SHAPES = 5
#: The answers in ``fa3/softmax.h`` that a CUDA submission may not use (poisoned in the grading build).
CUDA_UNAVAILABLE = ("update", "update_lazy", "rescale_rows", "exp2_rows", "thread_row_max")

_ONLINE = ("reference.online_softmax.online_normalizer_update", "reference.online_softmax.online_softmax_stats",
           "reference.online_softmax.online_softmax", "reference.flash_forward.online_softmax_update",
           "reference.flash_forward.forward_tile_step")

#: check function -> the lab's own answers to its exercise, unavailable while the hidden test runs the
#: student's function. A check not named here still gets a hidden test (fresh inputs), with nothing made
#: unavailable. Building blocks the exercise asks for stay available (``results.flops`` in notebook 00,
#: ``online_softmax_update`` in 04's Algorithm 2, ``simulate`` in 08).
UNAVAILABLE: dict[str, tuple[str, ...]] = {
    "check_flash_intensity": ("reference.flash_forward.flash_forward_io",
                              "reference.flash_forward.standard_attention_io"),
    "check_exp_matmul_ratio": ("reference.pipeline_model.exp_to_matmul_ratio",),
    "check_online_update": _ONLINE,
    "check_merge": _ONLINE,
    "check_n_block_max_causal": ("reference.flash_forward.n_block_range", "reference.flash_forward.tile_visible",
                                 "reference._validate.causal_visible", "reference.flash_forward.flash_forward_io"),
    "check_tile_step": ("reference.flash_forward.forward_tile_step", "reference.flash_forward.online_softmax_update",
                        "reference.flash_forward.flash_attention_forward"),
    "check_ring_position": ("reference.fa3_pipeline.stage_phase",),
    "check_consumer_slot": ("reference.fa3_pipeline.stage_phase",),
    "check_softmax_vs_gemms": ("reference.pipeline_model.simulate",),
    "check_alg2_consumer": ("reference.flash_forward.forward_tile_step",
                            "reference.flash_forward.flash_attention_forward",
                            "reference.fa3_pipeline.pipelined_forward",
                            "reference.fa3_pipeline.warp_specialized_forward"),
    "check_block_scales": ("reference.fp8.quantize_per_block", "reference.fp8.fp8_attention_inputs",
                           "fa3_lab.fp8._quantize_per_block", "fa3_lab.fp8.quantize"),
    "check_fwht": ("reference.fp8.fwht", "reference.fp8.incoherent_transform", "fa3_lab.fp8._fwht"),
    "check_acc_index": ("fa3_lab.lab.grading.accumulator_layout",),
    "check_tflops_from_ms": ("fa3_lab.lab.results.flops", "fa3_lab.lab.results.visible_pairs",
                             "fa3_lab.lab.results.tflops", "reference.flash_forward.flash_forward_io"),
    "check_hgmma_per_group": ("fa3_lab.lab.sass.gemm_groups",),
    "check_classify_line": ("fa3_lab.lab.sass.classify",),
    "check_preprocess_d": ("reference.backward.preprocess", "reference.backward.flash_attention_backward"),
    "check_ds_tile": ("reference.backward.flash_attention_backward",),
}

HIDDEN_BEGIN = "### BEGIN HIDDEN TESTS"
HIDDEN_END = "### END HIDDEN TESTS"

_FRESH_GRADING = '''\
def _fa3_grading():
    import importlib.util

    spec = importlib.util.find_spec("fa3_lab.lab.grading")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
'''

# The helpers of a hidden test. Python functions only: each unavailable answer gets the code of
# _fa3_unavailable for the duration of one call of the student's function (however the function reaches
# it: a global, a module attribute, a default argument), then its own code back.
_HIDDEN_HELPERS = '''\

def _fa3_unavailable(*args, **kwargs):
    raise RuntimeError("unavailable while the autograder runs your function: it is the lab's own answer to this "
                       "exercise; write the computation yourself")


def _fa3_without(fn, names):
    import functools
    import importlib

    refs = [getattr(importlib.import_module(n.rpartition(".")[0]), n.rpartition(".")[2]) for n in names]

    @functools.wraps(fn)
    def graded(*args, **kwargs):
        codes = [ref.__code__ for ref in refs]
        for ref in refs:
            ref.__code__ = _fa3_unavailable.__code__
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            err.add_note("(hidden test: unavailable while your function ran: " + ", ".join(names) + ")")
            raise
        finally:
            for ref, code in zip(refs, codes):
                ref.__code__ = code

    return graded
'''


def add_arguments(parser) -> None:
    parser.usage = ("python -m fa3_lab course [-h] OUTDIR [--notebooks NB ...] [--seed N] [--no-cuda]\n"
                    "       python -m fa3_lab course grade-cuda COURSEDIR [--out PREFIX]")
    parser.add_argument("words", nargs="+", metavar="OUTDIR | grade-cuda COURSEDIR",
                        help="OUTDIR: where to build the kit (absent or empty); grade-cuda COURSEDIR: grade the "
                             "CUDA submissions of a kit on this (sm_90) machine")
    parser.add_argument("--notebooks", nargs="+", metavar="NB",
                        help="notebook ids (01), names or paths; default: every notebook with exercises")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the hidden inputs (default: a fresh random one; keep it secret)")
    parser.add_argument("--no-cuda", action="store_true", help="leave out the CUDA exercise")
    parser.add_argument("--out", metavar="PREFIX", help="grade-cuda: write PREFIX.csv and PREFIX.json "
                                                         "(default COURSEDIR/cuda_ex01_grades)")


# ------------------------------------------------------------------------------------ notebooks

def _is_grade_cell(cell) -> bool:
    md = cell.metadata.get("nbgrader", {})
    return cell.cell_type == "code" and bool(md.get("grade")) and not md.get("solution")


def exercise_notebooks(names=None) -> list[Path]:
    """The lab's notebooks that have exercises (an nbgrader grade cell), or the ones named."""
    import nbformat

    from .student import resolve_notebooks

    paths = resolve_notebooks(names)
    with_exercises = [p for p in paths if any(_is_grade_cell(c) for c in nbformat.read(p, as_version=4).cells)]
    if names and len(with_exercises) != len(paths):
        skipped = ", ".join(p.stem for p in paths if p not in with_exercises)
        raise UsageError(f"--notebooks: no exercises (nbgrader grade cells) in {skipped}")
    return with_exercises


def check_calls(source: str) -> list[ast.Call]:
    """The ``grading.check_*(...)`` calls of a cell, in order."""
    return [node for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "grading"
            and node.func.attr.startswith("check_")]


def hidden_test(call: ast.Call, seed: int) -> str:
    """Source of the hidden test for one self-check call: the check on fresh inputs, answers unavailable."""
    check = call.func.attr
    names = UNAVAILABLE.get(check, ())
    args = [ast.unparse(a) for a in call.args]
    if names:
        args = [f"_fa3_without({a}, {list(names)!r})" for a in args]
    args += [f"{k.arg}={ast.unparse(k.value)}" for k in call.keywords if k.arg != "seed"]
    args.append(f"seed={seed}")
    what = ("while the lab's own answers to this exercise are unavailable to the function graded." if names
            else "(nothing in the lab answers this exercise directly: nothing is made unavailable).")
    lines = [HIDDEN_BEGIN,
             "# Autograder only (not in the release): the same check on inputs the students never see (another",
             "# seed), from a fresh copy of the grading module (a submission that patched it changes nothing),",
             f"# {what}",
             _FRESH_GRADING]
    if names:
        lines += [_HIDDEN_HELPERS]
    lines += ["", f"_fa3_grading().{check}({', '.join(args)})", HIDDEN_END]
    return "\n".join(lines)


def grade_note(points, calls) -> str:
    """The comment that opens a graded cell (students see it): points, and what the hidden test withholds."""
    import textwrap

    names = [n for call in calls for n in UNAVAILABLE.get(call.func.attr, ())]
    text = (f"autograder test ({points} point{'s' if points != 1 else ''}): this check, and a hidden one on "
            f"inputs you do not see")
    text += (f", during which the lab's own answers are unavailable to your code: {', '.join(names)}." if names
             else ".")
    return "".join(f"# {line}\n" for line in textwrap.wrap(text, 105, break_on_hyphens=False))


def source_notebook(nb, rng):
    """The instructor copy of a notebook node: every self-check call also gets a hidden test.

    Returns:
        (new notebook, [(grade_id, check name, points)]).
    """
    import copy

    nb = copy.deepcopy(nb)
    graded = []
    for cell in nb.cells:
        if not _is_grade_cell(cell):
            continue
        md = cell.metadata["nbgrader"]
        calls = check_calls(cell.source)
        if HIDDEN_BEGIN in cell.source or not calls:
            graded.append((md["grade_id"], None, md.get("points", 0)))
            continue
        hidden = [hidden_test(call, int(rng.integers(10**5, 10**9))) for call in calls]
        cell.source = grade_note(md.get("points", 0), calls) + cell.source.rstrip() + "\n" + "\n".join(hidden)
        graded.append((md["grade_id"], ", ".join(c.func.attr for c in calls), md.get("points", 0)))
    return nb, graded


# ------------------------------------------------------------------------------------ building

NBGRADER_CONFIG = '''\
# nbgrader configuration of the fa3-lab course kit (made by `python -m fa3_lab course`).
# Run nbgrader from this folder: nbgrader generate_assignment / release_assignment / collect / autograde.
c = get_config()  # noqa: F821

c.CourseDirectory.course_id = "{course_id}"
# Each notebook executes in 5-20 s on a CPU; the hidden tests about double the check cells.
c.Execute.timeout = 600
# Feedback (nbgrader generate_feedback) shows the graded cells without the hidden tests' source (a failing
# hidden test still shows its error, which names the case and how to reproduce it).
c.GenerateFeedback.preprocessors = ["nbgrader.preprocessors.GetGrades", "nbgrader.preprocessors.ClearHiddenTests",
                                    "nbconvert.preprocessors.CSSHTMLHeaderPreprocessor"]
'''

CUDA_README = '''\
# CUDA exercise 01: the online softmax inside a TMA + WGMMA kernel

Write stage 3 of the main loop of `{file}` (the region marked `// YOUR CODE HERE`); its header says
what you have and what is required. Do not call `OnlineSoftmax::update` or `rescale_rows` (they are the
answer: the grader's build makes them unavailable, and a copy that calls them scores 0).

Check that it compiles (any machine with nvcc 12+, from the lab's repository root):

    nvcc -std=c++17 -gencode=arch=compute_90a,code=sm_90a -O3 -Icuda/include -cubin -o /tmp/x.cubin {file}

Check it on an H100/H200:

    python -c "from fa3_lab.lab import grading; grading.check_cuda_exercise(grading.build_exercise('{file}'))"

Submit `{file}` (only that file). It is graded on other shapes than the self-check's, 1 point each.
'''


def cuda_grading_config(rng) -> dict:
    """Hidden shapes of the CUDA grading: awkward sizes, GQA, causal and not, bf16 and fp16."""
    shapes = []
    for i in range(CUDA_HIDDEN_SHAPES):
        hkv = int(rng.choice([1, 2]))
        group = 4 if i == 0 else int(rng.choice([1, 2, 4]))            # the first one is GQA
        last = i == CUDA_HIDDEN_SHAPES - 1                                # the last one is decode-like
        seqlen_q = int(rng.integers(1, 17)) if last else int(rng.integers(1, 1100))
        shapes.append([int(rng.integers(1, 3)), seqlen_q, int(rng.integers(1, 1100)), hkv * group, hkv,
                       [64, 128, 256][i % 3], bool(i % 2), "fp16" if i in (1, 2) else "bf16"])
    return {"assignment": CUDA_ASSIGNMENT, "file": CUDA_FILE, "seed": int(rng.integers(10**5, 10**9)),
            "points_per_shape": CUDA_POINTS_PER_SHAPE,
            "shapes_fields": ["batch", "seqlen_q", "seqlen_k", "nheads", "nheads_kv", "headdim", "causal", "dtype"],
            "shapes": shapes, "unavailable": list(CUDA_UNAVAILABLE)}


def _config_json(config: dict) -> str:
    """grading.json with one line per shape (an instructor may edit the shapes, seed and points)."""
    head = json.dumps({k: v for k, v in config.items() if k != "shapes"}, indent=1)
    shapes = ",\n".join("  " + json.dumps(s) for s in config["shapes"])
    return head[:-2] + ',\n "shapes": [\n' + shapes + "\n ]\n}\n"


def _generate_assignments(root: Path, assignments: list[str]) -> None:
    """nbgrader generate_assignment for each assignment (fills gradebook.db and release/)."""
    from nbgrader.apps import NbGraderAPI
    from nbgrader.coursedir import CourseDirectory
    from traitlets.config import Config

    config = Config()
    config.CourseDirectory.root = str(root)
    config.CourseDirectory.course_id = COURSE_ID
    coursedir = CourseDirectory(config=config)
    api = NbGraderAPI(coursedir=coursedir, config=config)
    with _venv_on_path():
        for aid in assignments:
            result = api.generate_assignment(aid, force=True, create=True)
            if not result["success"]:
                raise RuntimeError(f"nbgrader generate_assignment {aid} failed:\n{result.get('log', '')}\n"
                                   f"{result.get('error', '')}")


@contextlib.contextmanager
def _venv_on_path():
    """nbgrader runs the ``alembic`` script by name: find it beside this Python even if the venv is not active."""
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), old])
    try:
        yield
    finally:
        os.environ["PATH"] = old


def build_course(outdir, notebooks=None, *, seed: int | None = None, cuda: bool = True) -> dict:
    """Build the course kit into ``outdir`` (absent or empty). Returns a summary (assignments, points).

    Raises:
        UsageError: nbgrader missing, ``outdir`` not empty, an unknown notebook.
        RuntimeError: nbgrader generate_assignment failed (nothing is left in ``outdir``).
    """
    import nbformat
    import numpy as np

    outdir = Path(outdir)
    check_outdir(outdir, hint=" (a kit holds the gradebook: build a new one elsewhere)")
    paths = exercise_notebooks(notebooks)
    require_nbgrader()
    rng = np.random.default_rng(secrets.randbits(64) if seed is None else seed)
    summary = {"assignments": {}, "cuda": None}
    with staged(outdir) as root:
        for path in paths:
            nb, graded = source_notebook(nbformat.read(path, as_version=4), rng)
            aid = path.stem
            (root / "source" / aid).mkdir(parents=True)
            nbformat.write(nb, root / "source" / aid / path.name)
            summary["assignments"][aid] = graded
        (root / "submitted").mkdir()
        (root / "nbgrader_config.py").write_text(NBGRADER_CONFIG.format(course_id=COURSE_ID))
        _generate_assignments(root, list(summary["assignments"]))
        if cuda:
            config = write_cuda_assignment(root, rng)
            summary["cuda"] = len(config["shapes"]) * config["points_per_shape"]
        (root / "POINTS.md").write_text(points_table(summary))
    return summary


def write_cuda_assignment(root: Path, rng) -> dict:
    """``release/cuda_ex01/`` (the stripped exercise, its binding, a README) and ``autograder/cuda_ex01/``
    (the solution, ``grading.json``) under a course folder; ``submitted/`` if absent. Returns the config."""
    from . import grading
    from .student import strip_cuda_solution

    root = Path(root)
    release, private = root / "release" / CUDA_ASSIGNMENT, root / "autograder" / CUDA_ASSIGNMENT
    release.mkdir(parents=True)
    private.mkdir(parents=True)
    (root / "submitted").mkdir(exist_ok=True)
    text = grading.CUDA_EXERCISE.read_text()
    (release / CUDA_FILE).write_text(strip_cuda_solution(text, CUDA_FILE))
    shutil.copyfile(grading.EXERCISE_BINDING, release / grading.EXERCISE_BINDING.name)
    (release / "README.md").write_text(CUDA_README.format(file=CUDA_FILE))
    (private / CUDA_FILE).write_text(text)
    config = cuda_grading_config(rng)
    (private / "grading.json").write_text(_config_json(config))
    return config


def points_table(summary: dict) -> str:
    lines = ["# Points", "", "| assignment | autograder test (grade_id) | checks | points |", "|---|---|---|---|"]
    total = 0
    for aid, graded in summary["assignments"].items():
        for grade_id, checks, points in graded:
            lines.append(f"| {aid} | {grade_id} | {checks or '—'} | {points} |")
            total += points
    if summary.get("cuda"):
        lines.append(f"| {CUDA_ASSIGNMENT} | (GPU: grade-cuda) | check_cuda_exercise, "
                     f"{summary['cuda'] // CUDA_POINTS_PER_SHAPE} hidden shapes | {summary['cuda']} |")
        total += summary["cuda"]
    lines += [f"| **total** | | | **{total}** |", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ the CUDA exercise

def score_submission(path, config: dict, *, build=None, check=None) -> dict:
    """Points of one CUDA submission: source checks, a build with the answers poisoned, each hidden shape.

    Args:
        path: the submitted ``.cu``.
        config: ``autograder/cuda_ex01/grading.json``.
        build: ``build(path) -> module`` (default: ``grading.build_exercise`` with :data:`CUDA_UNAVAILABLE`
            poisoned); check: ``check(module, shapes=[shape], dtype=..., seed=...)`` raising AssertionError
            on a mismatch (default ``grading.check_cuda_exercise``). Tests pass fakes.

    Returns:
        ``{"points", "max_points", "status", "shapes": [{"shape", "passed", "message"}]}``.
    """
    from . import grading

    unavailable = tuple(config.get("unavailable", CUDA_UNAVAILABLE))
    build = build or (lambda p: grading.build_exercise(p, unavailable=unavailable))
    check = check or grading.check_cuda_exercise
    per_shape = int(config["points_per_shape"])
    row = {"points": 0, "max_points": per_shape * len(config["shapes"]), "status": "", "shapes": []}
    problems = grading.exercise_source_problems(path)
    if problems:
        row["status"] = "; ".join(problems)
        return row
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            module = build(path)
    except Exception as err:  # noqa: BLE001 — any failure to build scores 0, with the reason
        text = str(err).splitlines()
        lines = [ln for ln in text if "error:" in ln] or [ln for ln in text if "error" in ln.lower()] or text or [""]
        row["status"] = f"does not build (a call of {', '.join(unavailable)} does not compile): {lines[0][:300]}"
        return row
    for shape in config["shapes"]:
        *dims, dtype = shape
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                check(module, shapes=[tuple(dims)], dtype=dtype, seed=int(config["seed"]))
            passed, message = True, ""
        except AssertionError as err:
            passed, message = False, str(err).splitlines()[0]
        except Exception as err:  # noqa: BLE001 — a crash scores 0 on this shape
            passed, message = False, f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
        row["shapes"].append({"shape": shape, "passed": passed, "message": message})
        row["points"] += per_shape * passed
    n_ok = sum(s["passed"] for s in row["shapes"])
    row["status"] = "ok" if n_ok == len(row["shapes"]) else (
        f"{n_ok}/{len(row['shapes'])} shapes; first failure: "
        + next(s["message"] for s in row["shapes"] if not s["passed"]))
    return row


def _score_in_subprocess(path: Path, config_path: Path, timeout: float = 1800) -> dict:
    """:func:`score_submission` in a fresh process (a kernel fault must not spoil the next student)."""
    code = ("import json, sys; from fa3_lab.lab import course; "
            "print('FA3_ROW ' + json.dumps(course.score_submission(sys.argv[1], json.load(open(sys.argv[2])))))")
    try:
        proc = subprocess.run([sys.executable, "-c", code, str(path), str(config_path)], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        config = json.loads(Path(config_path).read_text())
        return {"points": 0, "max_points": config["points_per_shape"] * len(config["shapes"]),
                "status": f"timed out after {timeout:.0f} s", "shapes": []}
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("FA3_ROW ")]
    if proc.returncode or not rows:
        config = json.loads(Path(config_path).read_text())
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"points": 0, "max_points": config["points_per_shape"] * len(config["shapes"]),
                "status": f"grader process failed (exit {proc.returncode}): {tail[:300]}", "shapes": []}
    return json.loads(rows[-1][len("FA3_ROW "):])


def grade_cuda(course_dir, *, score=None) -> list[dict]:
    """Grade every ``submitted/<student>/cuda_ex01/`` of a kit; one row per student, sorted by id.

    Args:
        score: ``score(path, config_path) -> row`` (default: :func:`score_submission` in a subprocess).

    Raises:
        UsageError: not a course kit (no ``autograder/cuda_ex01/grading.json``).
    """
    course_dir = Path(course_dir)
    config_path = course_dir / "autograder" / CUDA_ASSIGNMENT / "grading.json"
    if not config_path.is_file():
        raise UsageError(f"COURSEDIR: {config_path} not found (build the kit with: python -m fa3_lab course OUTDIR)")
    config = json.loads(config_path.read_text())
    score = score or _score_in_subprocess
    rows = []
    for folder in sorted((course_dir / "submitted").glob(f"*/{CUDA_ASSIGNMENT}")):
        student, path = folder.parent.name, folder / config["file"]
        if path.is_file():
            row = score(path, config_path)
        else:
            row = {"points": 0, "max_points": config["points_per_shape"] * len(config["shapes"]),
                   "status": f"no {config['file']} in the submission", "shapes": []}
        rows.append({"student": student, **row})
        print(f"{student:<20} {row['points']:>3} / {row['max_points']}  {row['status']}", flush=True)
    return rows


def write_grades(rows: list[dict], prefix: Path) -> tuple[Path, Path]:
    """``PREFIX.csv`` (student, points, max_points, status) and ``PREFIX.json`` (everything)."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = prefix.with_name(prefix.name + ".csv"), prefix.with_name(prefix.name + ".json")
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["student", "assignment", "points", "max_points", "status"])
        for r in rows:
            writer.writerow([r["student"], CUDA_ASSIGNMENT, r["points"], r["max_points"], r["status"]])
    json_path.write_text(json.dumps({"assignment": CUDA_ASSIGNMENT, "rows": rows}, indent=1) + "\n")
    return csv_path, json_path


# ------------------------------------------------------------------------------------ CLI

def run(args) -> int:
    words = args.words
    if words[0] == "grade-cuda":
        if len(words) != 2:
            raise UsageError("usage: python -m fa3_lab course grade-cuda COURSEDIR [--out PREFIX]")
        from .. import _env

        course_dir = Path(words[1])
        if not (course_dir / "autograder" / CUDA_ASSIGNMENT / "grading.json").is_file():
            raise UsageError(f"COURSEDIR: {course_dir} is not a course kit with the CUDA exercise (no "
                             f"autograder/{CUDA_ASSIGNMENT}/grading.json)")
        reason = _env.why_no_sm90()
        if reason:
            raise UsageError(f"grade-cuda needs an sm_90 GPU (H100/H200) to build and run the submissions: {reason}")
        rows = grade_cuda(course_dir)
        csv_path, json_path = write_grades(rows, Path(args.out) if args.out else course_dir / "cuda_ex01_grades")
        print(f"{len(rows)} submissions graded: {csv_path}, {json_path}")
        return 0
    if len(words) != 1:
        raise UsageError(f"expected one OUTDIR (or: grade-cuda COURSEDIR), got {' '.join(words)}")
    if args.out:
        raise UsageError("--out: only for grade-cuda")
    outdir = Path(words[0])
    print(f"building the course kit in {outdir} (nbgrader generate_assignment per notebook) …", flush=True)
    summary = build_course(outdir, args.notebooks, seed=args.seed, cuda=not args.no_cuda)
    print((outdir / "POINTS.md").read_text())
    print(f"{len(summary['assignments'])} assignments in {outdir}/source and {outdir}/release"
          + (f", plus {CUDA_ASSIGNMENT} (release/{CUDA_ASSIGNMENT}, graded on a GPU)" if summary["cuda"] else "")
          + f". Next: cd {outdir}; nbgrader release_assignment / collect / autograde ASSIGNMENT "
            f"(docs/teaching.md).")
    return 0
