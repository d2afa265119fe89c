"""`python -m fa3_lab course`: a real nbgrader course kit whose hidden tests the lab's own reference cannot pass.

Acceptance (issue 20): ``nbgrader generate_assignment`` + ``autograde`` on the kit: the solution copy
scores full marks, the blank copy 0, and a copy that answers each exercise by calling the lab's reference
scores 0 on those exercises. CI grades notebooks 02 and 05 (the issue's examples: ``n_block_range``,
``quantize_per_block``, ``fwht``); the ``slow`` test grades every notebook. Every reference-calling answer
is checked, in-process, to pass the students' public self-check (so a 0 comes from the hidden tests).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest

from fa3_lab.lab import cli, course, grading, student

# ------------------------------------------------------------------ answers that call the lab's reference
# (notebook id, grade_id of the solution cell) -> a whole solution cell that answers by calling the lab.

CHEATS = {
    ("00", "ex1_flash_intensity"): """
        from reference.flash_forward import flash_forward_io

        def flash_intensity(seqlen_q, seqlen_k, headdim, causal, element_bytes=2):
            io = flash_forward_io(1, seqlen_q, seqlen_k, 1, headdim, causal=causal, block_m=1, block_n=1)
            return float(io.flops / (element_bytes * headdim * 2 * (seqlen_q + seqlen_k)))
        """,
    ("00", "ex2_exp_matmul_ratio"): """
        from reference.pipeline_model import exp_to_matmul_ratio

        def exp_matmul_ratio(headdim, dtype):
            peaks = {"fp16": 989.4, "bf16": 989.4, "e4m3": 1978.9}
            if dtype not in peaks:
                raise ValueError(f"dtype: {dtype}")
            if headdim < 1:
                raise ValueError(f"headdim: {headdim}")
            return exp_to_matmul_ratio(headdim, matmul_tflops=peaks[dtype], exp_tflops=3.9)
        """,
    ("01", "ex1_online_update"): """
        from reference.online_softmax import online_normalizer_update

        def online_update(m_prev, l_prev, x_block):
            return online_normalizer_update(m_prev, l_prev, x_block)[:2]
        """,
    ("02", "ex1_n_block_max"): """
        from reference.flash_forward import n_block_range

        def n_block_max_causal(m_block, seqlen_q, seqlen_k, block_m, block_n):
            return n_block_range(m_block, seqlen_q, seqlen_k, block_m, block_n, True)[1]
        """,
    ("02", "ex2_tile_step"): """
        from reference.flash_forward import forward_tile_step

        def tile_step(q_i, k_j, v_j, m_i, l_i, acc_o, scale_log2, visible=None):
            return forward_tile_step(q_i, k_j, v_j, m_i, l_i, acc_o, scale_log2, visible)
        """,
    ("03", "ex1_ring_position"): """
        from reference.fa3_pipeline import stage_phase

        def ring_position(j, num_stages):
            if j < 0:
                raise ValueError(f"j: {j}")
            stage, phase = stage_phase(j, num_stages)
            return stage, phase, 1 - phase
        """,
    ("03", "ex2_consumer_slot"): """
        from reference.fa3_pipeline import stage_phase

        def may_read(full, j, num_stages):
            stage, phase = stage_phase(j, num_stages)
            return full[stage].try_wait(phase)

        def release(empty, j, num_stages):
            empty[stage_phase(j, num_stages)[0]].arrive()
        """,
    ("04", "ex1_softmax_vs_gemms"): """
        from reference.pipeline_model import simulate

        def softmax_vs_gemms(headdim, block_m=128, block_n=128):
            du = simulate("sequential", headdim, 512, block_m=block_m, block_n=block_n).durations_us
            gemms = du["gemm0"] + du["gemm1"]
            return du["exp"] / gemms, du["softmax"] / gemms
        """,
    ("04", "ex2_alg2_consumer"): """
        import numpy as np
        from reference.flash_forward import forward_tile_step

        def alg2_consumer(q_i, k_tiles, v_tiles, scale_log2, log):
            rows, d = q_i.shape
            m, l, acc = np.full(rows, -np.inf), np.zeros(rows), np.zeros((rows, d))
            for k_j, v_j in zip(k_tiles, v_tiles):
                m, l, acc = forward_tile_step(q_i, k_j, v_j, m, l, acc, scale_log2)
            log += ["S0", "softmax0"]
            for j in range(1, len(k_tiles)):
                log += [f"S{j}", f"PV{j - 1}", f"softmax{j}"]
            log.append(f"PV{len(k_tiles) - 1}")
            return acc, m, l
        """,
    ("05", "ex1_block_scales"): """
        from reference.fp8 import quantize_per_block

        def block_scales(x, block_size):
            return quantize_per_block(x, block_size)[1]
        """,
    ("05", "ex2_fwht"): """
        from reference.fp8 import fwht

        def my_fwht(x):
            return fwht(x)
        """,
    ("06", "ex1_acc_index"): """
        import numpy as np
        from fa3_lab.lab.grading import accumulator_layout

        def acc_index(t, e):
            thread, reg = accumulator_layout(256)
            rows, cols = np.indices(thread.shape)
            row_of, col_of = np.zeros((128, 128), int), np.zeros((128, 128), int)
            row_of[thread, reg], col_of[thread, reg] = rows, cols
            return row_of[t, e], col_of[t, e]
        """,
    ("06", "ex3_tflops"): """
        from fa3_lab.lab import results

        def tflops_from_ms(batch, nheads, seqlen_q, seqlen_k, headdim, causal, ms):
            return results.flops(batch, nheads, seqlen_q, seqlen_k, headdim, causal) / (ms * 1e-3) / 1e12
        """,
    ("07", "ex1_solution"): """
        from fa3_lab.lab import sass

        def hgmma_per_group(listing):
            return sass.gemm_groups(listing)
        """,
    ("07", "ex2_solution"): """
        from fa3_lab.lab import sass

        def classify_line(text):
            return sass.classify(text)
        """,
    ("09", "ex1_preprocess_d"): """
        import numpy as np
        from reference.backward import preprocess

        def preprocess_d(out, dout):
            b, s, h, d = out.shape
            return preprocess(out, dout, np.zeros((b, h, s)), s)[0]
        """,
}
# Exercises nothing in the lab answers directly: merge (01), smem_bytes (06), overlap_ceiling and
# step_gains (08). Their hidden tests still run on inputs the students never see.
NO_REFERENCE = {("01", "ex2_merge"), ("06", "ex2_smem_bytes"), ("08", "ex1_overlap_ceiling"),
                ("08", "ex2_step_gains"), ("09", "ex2_ds_tile")}

#: the checks each cheat must pass (public, unguarded) and fail (hidden, guarded).
CHEAT_CHECKS = {
    ("00", "ex1_flash_intensity"): ("check_flash_intensity", ["flash_intensity"]),
    ("00", "ex2_exp_matmul_ratio"): ("check_exp_matmul_ratio", ["exp_matmul_ratio"]),
    ("01", "ex1_online_update"): ("check_online_update", ["online_update"]),
    ("02", "ex1_n_block_max"): ("check_n_block_max_causal", ["n_block_max_causal"]),
    ("02", "ex2_tile_step"): ("check_tile_step", ["tile_step"]),
    ("03", "ex1_ring_position"): ("check_ring_position", ["ring_position"]),
    ("03", "ex2_consumer_slot"): ("check_consumer_slot", ["may_read", "release"]),
    ("04", "ex1_softmax_vs_gemms"): ("check_softmax_vs_gemms", ["softmax_vs_gemms"]),
    ("04", "ex2_alg2_consumer"): ("check_alg2_consumer", ["alg2_consumer"]),
    ("05", "ex1_block_scales"): ("check_block_scales", ["block_scales"]),
    ("05", "ex2_fwht"): ("check_fwht", ["my_fwht"]),
    ("06", "ex1_acc_index"): ("check_acc_index", ["acc_index"]),
    ("06", "ex3_tflops"): ("check_tflops_from_ms", ["tflops_from_ms"]),
    ("07", "ex1_solution"): ("check_hgmma_per_group", ["hgmma_per_group"]),
    ("07", "ex2_solution"): ("check_classify_line", ["classify_line"]),
    ("09", "ex1_preprocess_d"): ("check_preprocess_d", ["preprocess_d"]),
}


def _cheat(key) -> str:
    return textwrap.dedent(CHEATS[key]).strip() + "\n"


def _solution_cells(nb):
    return {c.metadata["nbgrader"]["grade_id"]: c for c in nb.cells
            if c.metadata.get("nbgrader", {}).get("solution") and c.cell_type == "code"}


def _without_markers(source: str) -> str:
    return "\n".join(ln for ln in source.splitlines()
                     if "### BEGIN SOLUTION" not in ln and "### END SOLUTION" not in ln)


# ------------------------------------------------------------------ the kit

@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    pytest.importorskip("nbgrader")
    out = tmp_path_factory.mktemp("kit") / "course"
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["course", str(out), "--seed", "20"]) == 0
    return out


def test_cheats_cover_every_exercise_the_lab_answers():
    import nbformat

    keys = set()
    for path in course.exercise_notebooks():
        for grade_id in _solution_cells(nbformat.read(path, as_version=4)):
            keys.add((path.name[:2], grade_id))
    assert set(CHEATS) | NO_REFERENCE >= keys, keys - set(CHEATS) - NO_REFERENCE   # a new exercise: add it
    assert set(CHEATS) == set(CHEAT_CHECKS)


@pytest.mark.parametrize("key", sorted(CHEATS), ids=lambda key: "-".join(key))
def test_a_reference_calling_answer_passes_the_self_check_and_fails_the_hidden_test(key):
    check_name, fn_names = CHEAT_CHECKS[key]
    ns: dict = {}
    exec(compile(_cheat(key), f"<cheat {key}>", "exec"), ns)
    fns = [ns[n] for n in fn_names]
    check = getattr(grading, check_name)
    with contextlib.redirect_stdout(io.StringIO()):
        check(*fns)                                                   # the students' self-check: passes
    call = course.check_calls(f"grading.{check_name}({', '.join(fn_names)})")[0]
    hidden = course.hidden_test(call, seed=12345)
    assert course.HIDDEN_BEGIN in hidden and course.HIDDEN_END in hidden and "seed=12345" in hidden
    # a submission that also replaced the self-check by a no-op: the hidden test uses a fresh copy
    ns.update(grading=types.SimpleNamespace(**{check_name: lambda *a, **k: None}))
    with pytest.raises(RuntimeError, match="autograder runs your function") as err:
        exec(compile(hidden, "<hidden test>", "exec"), ns)
    assert "hidden test: unavailable while your function ran" in "\n".join(getattr(err.value, "__notes__", []))
    # the guard puts the lab's functions back: the public check still passes afterwards
    with contextlib.redirect_stdout(io.StringIO()):
        check(*fns)


def test_hidden_test_of_an_exercise_the_lab_does_not_answer():
    import nbformat

    call = course.check_calls("grading.check_smem_bytes(smem_bytes)")[0]
    hidden = course.hidden_test(call, seed=99)
    assert "_fa3_without" not in hidden and "_fa3_grading().check_smem_bytes(smem_bytes, seed=99)" in hidden
    ns = {"smem_bytes": lambda d, bm, bn, st, elem_bytes=2: (0, True)}              # wrong
    with pytest.raises(AssertionError, match="check_smem_bytes: smem_bytes returned the wrong"):
        exec(compile(hidden, "<hidden test>", "exec"), ns)
    src, graded = course.source_notebook(nbformat.read(student.resolve_notebooks(["06"])[0], as_version=4),
                                         np.random.default_rng(0))
    assert [g[1] for g in graded] == ["check_acc_index", "check_smem_bytes", "check_tflops_from_ms"]
    cell = next(c for c in src.cells if "check_tflops_from_ms(" in c.source and course.HIDDEN_BEGIN in c.source)
    assert "rows=bench_run.rows, seed=" in cell.source                     # keyword arguments are kept


@pytest.mark.parametrize("check_name", sorted(course.UNAVAILABLE))
def test_unavailable_names_are_plain_functions(check_name):
    import importlib

    assert hasattr(grading, check_name)
    for name in course.UNAVAILABLE[check_name]:
        module, _, attr = name.rpartition(".")
        fn = getattr(importlib.import_module(module), attr)
        assert isinstance(fn, types.FunctionType) and fn.__closure__ is None, name


def test_kit_layout(kit):
    import nbformat

    names = [p.stem for p in course.exercise_notebooks()]
    assert len(names) >= 9
    assert sorted(p.name for p in (kit / "source").iterdir()) == names
    assert sorted(p.name for p in (kit / "release").iterdir()) == sorted(names + [course.CUDA_ASSIGNMENT])
    for name in ("nbgrader_config.py", "gradebook.db", "POINTS.md", "autograder/cuda_ex01/grading.json",
                 "autograder/cuda_ex01/ex01_online_softmax.cu", "release/cuda_ex01/ex01_online_softmax.cu",
                 "release/cuda_ex01/exercise_binding.cpp", "release/cuda_ex01/README.md"):
        assert (kit / name).is_file(), name
    assert (kit / "submitted").is_dir()
    assert not list(kit.parent.glob(".course.*")), "the staging folder is left behind"
    for aid in names:
        src = nbformat.read(kit / "source" / aid / f"{aid}.ipynb", as_version=4)
        rel = nbformat.read(kit / "release" / aid / f"{aid}.ipynb", as_version=4)
        src_text, rel_text = (("\n".join(c.source for c in nb.cells)) for nb in (src, rel))
        grade_cells = [c for c in src.cells if c.metadata.get("nbgrader", {}).get("grade")
                       and not c.metadata["nbgrader"].get("solution")]
        assert grade_cells and all(c.metadata["nbgrader"]["points"] > 0 for c in grade_cells)
        assert src_text.count(course.HIDDEN_BEGIN) == len(grade_cells), aid
        assert "BEGIN HIDDEN" not in rel_text and "_fa3_without" not in rel_text
        hidden_seeds = re.findall(r"seed=(\d+)\)\n### END HIDDEN TESTS", src_text)
        assert len(hidden_seeds) == len(grade_cells) and not any(f"seed={s}" in rel_text for s in hidden_seeds)
        assert "BEGIN SOLUTION" not in rel_text and rel_text.count("raise NotImplementedError()") >= 2
        assert all(not c.get("outputs") for c in rel.cells if c.cell_type == "code")
    # the CUDA exercise: stripped in the release, hidden shapes only in autograder/
    released = (kit / "release/cuda_ex01/ex01_online_softmax.cu").read_text()
    assert "exercise01_stub(o);" in released and "BEGIN SOLUTION" not in released
    config = json.loads((kit / "autograder/cuda_ex01/grading.json").read_text())
    assert len(config["shapes"]) == course.CUDA_HIDDEN_SHAPES and config["points_per_shape"] == 1
    assert {tuple(s[:7]) for s in config["shapes"]}.isdisjoint(grading.CUDA_EXERCISE_SHAPES)
    assert "grading.json" not in "".join(p.name for p in (kit / "release").rglob("*"))
    points = (kit / "POINTS.md").read_text()
    assert "| cuda_ex01 |" in points and "**total**" in points


def test_gradebook_holds_the_hidden_tests_and_points(kit):
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{kit / 'gradebook.db'}") as gb:
        assignment = gb.find_assignment("05_fp8_quantization")
        assert assignment.max_score == 2
        cell = gb.find_source_cell("ex1_check", "05_fp8_quantization", "05_fp8_quantization")
        assert course.HIDDEN_BEGIN in cell.source and "reference.fp8.quantize_per_block" in cell.source


def test_hidden_seeds_are_drawn_from_the_build_seed():
    import nbformat

    nb = nbformat.read(student.resolve_notebooks(["03"])[0], as_version=4)

    def hidden_seeds(seed):
        src, graded = course.source_notebook(nb, np.random.default_rng(seed))
        assert [g[1] for g in graded] == ["check_ring_position", "check_consumer_slot"]
        return [line for c in src.cells for line in c.source.splitlines()
                if line.startswith("_fa3_grading().check_") and "seed=" in line]

    a, b, c = hidden_seeds(1), hidden_seeds(1), hidden_seeds(2)
    assert len(a) == 2 and a == b and a != c
    assert nb.cells == nbformat.read(student.resolve_notebooks(["03"])[0], as_version=4).cells   # not modified


def test_cli_refuses_a_non_empty_outdir_and_leaves_nothing(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    assert cli.main(["course", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists and is not empty" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    assert cli.main(["course", str(tmp_path / "x"), "--notebooks", "99"]) == 2
    assert "--notebooks" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert cli.main(["course", "a", "b"]) == 2 and "expected one OUTDIR" in capsys.readouterr().err
    assert cli.main(["course", "grade-cuda"]) == 2 and "grade-cuda COURSEDIR" in capsys.readouterr().err
    assert cli.main(["course", "grade-cuda", str(tmp_path)]) == 2
    assert "not a course kit" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["student", "course"])
def test_without_nbgrader_one_line_names_the_extra_and_nothing_is_written(tmp_path, capsys, monkeypatch, command):
    monkeypatch.setitem(sys.modules, "nbgrader", None)              # import nbgrader -> ImportError
    out = tmp_path / "deep" / "out"
    assert cli.main([command, str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs nbgrader" in err and "pip install -e '.[lab]'" in err
    assert list(tmp_path.iterdir()) == []
    monkeypatch.delitem(sys.modules, "nbgrader")
    pytest.importorskip("nbgrader")
    with contextlib.redirect_stdout(io.StringIO()):                 # the retry works
        assert cli.main([command, str(out), "--notebooks", "03"] + (["--no-cuda"] if command == "course" else [])) == 0
    assert (out / ("notebooks" if command == "student" else "source")).is_dir()


def test_a_failed_build_leaves_nothing(tmp_path, monkeypatch):
    pytest.importorskip("nbgrader")

    def boom(*a, **k):
        raise RuntimeError("nbgrader generate_assignment failed")

    monkeypatch.setattr(course, "_generate_assignments", boom)
    with pytest.raises(RuntimeError, match="generate_assignment failed"):
        course.build_course(tmp_path / "a" / "kit", ["03"], seed=1)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ autograde (acceptance 2)

def _nbgrader(course_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    return subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=course_dir, env=env,
                          capture_output=True, text=True, timeout=1800)


def _submit(kit: Path, aid: str) -> None:
    """submitted/{solution,blank,reference}/<aid>/: made from the release copy as a student would."""
    import nbformat

    nb_id = aid[:2]
    name = f"{aid}.ipynb"
    release = nbformat.read(kit / "release" / aid / name, as_version=4)
    source = _solution_cells(nbformat.read(kit / "source" / aid / name, as_version=4))
    for student_id in ("solution", "blank", "reference"):
        nb = nbformat.from_dict(json.loads(nbformat.writes(release)))
        if student_id != "blank":
            for grade_id, cell in _solution_cells(nb).items():
                key = (nb_id, grade_id)
                cell.source = (_cheat(key) if student_id == "reference" and key in CHEATS
                               else _without_markers(source[grade_id].source))
        folder = kit / "submitted" / student_id / aid
        folder.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, folder / name)


def _scores(kit: Path, aid: str) -> dict:
    from nbgrader.api import Gradebook

    out = {}
    with Gradebook(f"sqlite:///{kit / 'gradebook.db'}") as gb:
        for student_id in ("solution", "blank", "reference"):
            nb = gb.find_submission_notebook(aid, aid, student_id)
            out[student_id] = {g.name: (g.score, g.max_score) for g in nb.grades}
    return out


def _autograde_and_assert(kit: Path, aids: list[str]) -> None:
    for aid in aids:
        _submit(kit, aid)
        proc = _nbgrader(kit, "autograde", aid, "--force")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        scores = _scores(kit, aid)
        nb_id = aid[:2]
        import nbformat

        src = nbformat.read(kit / "source" / aid / f"{aid}.ipynb", as_version=4)
        # grade cell -> the solution cell right before it (exercise N: exN_<name>, exN_check)
        solution_of = {}
        last = None
        for c in src.cells:
            md = c.metadata.get("nbgrader", {})
            if md.get("solution"):
                last = md["grade_id"]
            elif md.get("grade"):
                solution_of[md["grade_id"]] = last
        proc = _nbgrader(kit, "generate_feedback", aid, "--force")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        feedback = (kit / "feedback" / "reference" / aid / f"{aid}.html").read_text()
        assert "Score:" in feedback and "BEGIN HIDDEN TESTS" not in feedback and "def _fa3_without" not in feedback
        full = {g: m for g, (_, m) in scores["solution"].items()}
        assert all(m > 0 for m in full.values())
        assert {g: s for g, (s, _) in scores["solution"].items()} == full, (aid, scores["solution"])
        assert all(s == 0 for s, _ in scores["blank"].values()), (aid, scores["blank"])
        for grade_id, (score, max_score) in scores["reference"].items():
            cheated = (nb_id, solution_of[grade_id]) in CHEATS
            assert score == (0 if cheated else max_score), (aid, grade_id, cheated, score)


CI_ASSIGNMENTS = ["02_tiled_flash_attention", "05_fp8_quantization"]


def test_autograde_scores_solution_blank_and_reference_copies(kit):
    """Acceptance 2 on the issue's examples (notebooks 02 and 05): full / 0 / 0 on those exercises."""
    _autograde_and_assert(kit, CI_ASSIGNMENTS)


@pytest.mark.slow
def test_autograde_every_notebook(kit):
    """Acceptance 2 on every notebook with exercises."""
    _autograde_and_assert(kit, [p.stem for p in course.exercise_notebooks() if p.stem not in CI_ASSIGNMENTS])


# ------------------------------------------------------------------ the CUDA exercise's GPU grading


class _AttentionOnCpu:
    """Stands in for a built exercise: ``fwd`` computes attention with torch on the CPU."""

    def __init__(self, poison=False):
        self.poison = poison

    def fwd(self, q, k, v, causal, scale, out=None):
        from fa3_lab.torch_ref import attention_ref

        ref, lse = attention_ref(q, k, v, causal, scale)
        out.copy_(ref.to(q.dtype))
        if self.poison:
            out.fill_(float("nan"))
        return out, lse


def _cpu_check(module, **kwargs):
    return grading.check_cuda_exercise(module, device="cpu", **kwargs)


@pytest.fixture
def cuda_config():
    return course.cuda_grading_config(np.random.default_rng(3))


@pytest.fixture
def cuda_kit(tmp_path):
    """The CUDA part of a kit only (no nbgrader needed): release/, autograder/, submitted/."""
    root = tmp_path / "kit"
    course.write_cuda_assignment(root, np.random.default_rng(4))
    return root


def test_cuda_grading_config_shapes(cuda_config):
    assert len(cuda_config["shapes"]) == 5 and cuda_config["points_per_shape"] == 1
    for b, sq, sk, h, hkv, d, causal, dtype in cuda_config["shapes"]:
        assert h % hkv == 0 and d in (64, 128, 256) and dtype in ("bf16", "fp16") and sq >= 1 and sk >= 1
    assert {s[6] for s in cuda_config["shapes"]} == {True, False}
    assert {s[7] for s in cuda_config["shapes"]} == {"bf16", "fp16"}
    assert cuda_config["shapes"][0][3] > cuda_config["shapes"][0][4] and cuda_config["shapes"][-1][1] <= 16


def test_score_submission_full_marks_with_a_correct_module(tmp_path, cuda_config):
    path = tmp_path / "ex.cu"
    path.write_text(grading.CUDA_EXERCISE.read_text())
    row = course.score_submission(path, cuda_config, build=lambda p: _AttentionOnCpu(), check=_cpu_check)
    assert row["points"] == row["max_points"] == 5 and row["status"] == "ok"
    assert all(s["passed"] for s in row["shapes"])


def test_score_submission_zero_for_the_stub_and_for_reference_calls(tmp_path, cuda_config):
    built = []

    def build(p):
        built.append(p)
        return _AttentionOnCpu()

    stub = tmp_path / "stub.cu"
    stub.write_text(student.strip_cuda_solution(grading.CUDA_EXERCISE.read_text()))
    row = course.score_submission(stub, cuda_config, build=build, check=_cpu_check)
    assert row["points"] == 0 and "still calls the stub" in row["status"] and not built
    cheat = tmp_path / "cheat.cu"
    cheat.write_text(grading.CUDA_EXERCISE.read_text().replace(
        "    // ### BEGIN SOLUTION",
        "    float c[2]; softmax.update<kBlockN>(s, p.scale_log2, c);\n    // ### BEGIN SOLUTION"))
    row = course.score_submission(cheat, cuda_config, build=build, check=_cpu_check)
    assert row["points"] == 0 and "softmax.update" in row["status"] and not built
    # a NaN output (a kernel that never writes O) scores 0 on every shape, with check_cuda_exercise's reason
    ok = tmp_path / "ok.cu"
    ok.write_text(grading.CUDA_EXERCISE.read_text())
    row = course.score_submission(ok, cuda_config, build=lambda p: _AttentionOnCpu(poison=True), check=_cpu_check)
    assert row["points"] == 0 and "NaN everywhere" in row["status"] and len(row["shapes"]) == 5


def test_score_submission_zero_when_the_build_fails(tmp_path, cuda_config):
    path = tmp_path / "ex.cu"
    path.write_text(grading.CUDA_EXERCISE.read_text())

    def build(p):
        raise RuntimeError("Error building extension\nex.cu(160): error: attempt to use poisoned \"rescale_rows\"")

    row = course.score_submission(path, cuda_config, build=build, check=_cpu_check)
    assert row["points"] == 0 and "does not build" in row["status"] and "poisoned" in row["status"]


def test_score_submission_partial_points(tmp_path, cuda_config):
    path = tmp_path / "ex.cu"
    path.write_text(grading.CUDA_EXERCISE.read_text())

    def check(module, shapes, **kw):
        if shapes[0][6]:                                               # fails every causal shape
            raise AssertionError("check_cuda_exercise: out differs from attention_ref (causal)\n  more")
        return _cpu_check(module, shapes=shapes, **kw)

    row = course.score_submission(path, cuda_config, build=lambda p: _AttentionOnCpu(), check=check)
    n_causal = sum(s[6] for s in cuda_config["shapes"])
    assert row["points"] == 5 - n_causal and row["status"].startswith(f"{5 - n_causal}/5 shapes")
    assert "out differs from attention_ref (causal)" in row["status"]


def test_grade_cuda_writes_csv_and_json(cuda_kit, tmp_path):
    import csv

    kit = cuda_kit
    sub = kit / "submitted"
    (sub / "alice" / "cuda_ex01").mkdir(parents=True)
    (sub / "alice" / "cuda_ex01" / course.CUDA_FILE).write_text(grading.CUDA_EXERCISE.read_text())
    (sub / "bob" / "cuda_ex01").mkdir(parents=True)
    released = (kit / "release/cuda_ex01" / course.CUDA_FILE).read_text()          # the untouched stub
    (sub / "bob" / "cuda_ex01" / course.CUDA_FILE).write_text(released)
    (sub / "carol" / "cuda_ex01").mkdir(parents=True)                  # submitted nothing

    def score(path, config_path):
        config = json.loads(Path(config_path).read_text())
        return course.score_submission(path, config, build=lambda p: _AttentionOnCpu(), check=_cpu_check)

    with contextlib.redirect_stdout(io.StringIO()):
        rows = course.grade_cuda(kit, score=score)
    assert [(r["student"], r["points"]) for r in rows] == [("alice", 5), ("bob", 0), ("carol", 0)]
    csv_path, json_path = course.write_grades(rows, tmp_path / "grades" / "cuda")
    with open(csv_path) as f:
        table = list(csv.DictReader(f))
    assert [(r["student"], r["points"], r["max_points"]) for r in table] == \
        [("alice", "5", "5"), ("bob", "0", "5"), ("carol", "0", "5")]
    assert "no ex01_online_softmax.cu" in table[2]["status"]
    assert json.loads(json_path.read_text())["rows"][0]["shapes"][0]["passed"] is True


def test_grade_cuda_cli_needs_a_gpu(cuda_kit, capsys):
    from fa3_lab import _env

    kit = cuda_kit
    if not _env.why_no_sm90():
        pytest.skip("an sm_90 GPU is present: the GPU test below grades for real")
    assert cli.main(["course", "grade-cuda", str(kit)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs an sm_90 GPU" in err
    assert not (kit / "cuda_ex01_grades.csv").exists()


@pytest.mark.sass
def test_poisoned_header_rejects_the_reference_calls_and_accepts_the_solution(tmp_path):
    """nvcc (no GPU): the grading build's fa3/softmax.h makes update/rescale_rows a compile error."""
    from fa3_lab import _env

    include = grading.poisoned_include(tmp_path / "poisoned", course.CUDA_UNAVAILABLE)
    cheat = tmp_path / "cheat.cu"
    cheat.write_text(grading.CUDA_EXERCISE.read_text().replace(
        "    // ### BEGIN SOLUTION", "    { float c[2]; auto& sm = softmax; sm.update<kBlockN>(s, p.scale_log2, c); }\n"
                                    "    // ### BEGIN SOLUTION"))

    def nvcc(src):
        return subprocess.run([_env.nvcc(), "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-O0",
                               f"-I{include}", f"-I{grading.CUDA_DIR / 'include'}", "-E", "-o", os.devnull,
                               str(src)], capture_output=True, text=True)

    assert nvcc(grading.CUDA_EXERCISE).returncode == 0
    proc = nvcc(cheat)
    assert proc.returncode != 0 and 'poisoned "update"' in proc.stderr


@pytest.mark.gpu
@pytest.mark.slow
def test_grade_cuda_on_the_gpu(cuda_kit, capsys):
    """On an H100/H200: the solution scores 5, the stub 0, a copy calling softmax.update 0 (it does not build)."""
    kit = cuda_kit
    sub = kit / "submitted"
    text = grading.CUDA_EXERCISE.read_text()
    copies = {"gpu_solution": text, "gpu_stub": student.strip_cuda_solution(text),
              "gpu_reference": text.replace("    // ### BEGIN SOLUTION",
                                            "    // ### BEGIN SOLUTION\n    // stub: exercise01_stub(o);")}
    copies["gpu_reference"] = student.strip_cuda_solution(copies["gpu_reference"]).replace(
        "exercise01_stub(o);", "{ float c[2]; auto& sm = softmax; sm.update<kBlockN>(s, p.scale_log2, c); "
                               "for (int e = 0; e < kHeadDim / 2; ++e) o[e] *= c[(e % 4) >= 2]; }")
    for student_id, source in copies.items():
        (sub / student_id / "cuda_ex01").mkdir(parents=True, exist_ok=True)
        (sub / student_id / "cuda_ex01" / course.CUDA_FILE).write_text(source)
    assert cli.main(["course", "grade-cuda", str(kit)]) == 0
    print(capsys.readouterr().out)
    rows = {r["student"]: r for r in json.loads((kit / "cuda_ex01_grades.json").read_text())["rows"]}
    assert rows["gpu_solution"]["points"] == 5, rows["gpu_solution"]
    assert rows["gpu_stub"]["points"] == 0 and "stub" in rows["gpu_stub"]["status"]
    assert rows["gpu_reference"]["points"] == 0 and "does not build" in rows["gpu_reference"]["status"]
    assert 'poisoned "update"' in rows["gpu_reference"]["status"], rows["gpu_reference"]


def test_teaching_doc_shows_the_kits_points(kit):
    doc = (Path(__file__).resolve().parents[1] / "docs" / "teaching.md").read_text()
    rows = [ln for ln in (kit / "POINTS.md").read_text().splitlines() if ln.startswith("| ")]
    assert len(rows) >= 20
    for row in rows:
        assert row in doc, f"docs/teaching.md's points table lacks: {row}"
    for command in ("python -m fa3_lab course", "nbgrader autograde", "python -m fa3_lab course grade-cuda"):
        assert command in doc
