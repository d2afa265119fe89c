"""`python -m fa3_lab student`: student copies hold no solution, no output, and their checks fail helpfully.

Writing copies needs nbgrader (the ``lab`` extra): those tests skip without it. Without nbgrader the
command says so in one line and writes nothing (tests/test_course.py checks that for both commands).
"""
from __future__ import annotations

import contextlib
import io

import nbformat
import pytest

from fa3_lab.lab import cli, grading, student

SOLUTION_MARKERS = ("BEGIN SOLUTION", "END SOLUTION")

# Lines that appear only inside the committed notebooks' solution regions (one or two per notebook).
SOLUTION_ONLY = {
    "00": ["nbytes = element_bytes * headdim * (2 * seqlen_q + 2 * seqlen_k)", "peaks = {"],
    "01": ["l_new = l_prev * np.exp(m_prev - ref)", "l = l_a * np.exp(m_a - ref) + l_b * np.exp(m_b - ref)"],
    "02": ["last_key = min(seqlen_k,", "max_scaled = np.where(m_new == -np.inf"],
    "03": ["return j % num_stages, phase, 1 - phase", "empty[j % num_stages].arrive()"],
    "04": ["t_fp32 = (4 * rows * block_n", "s_cur, p_cur = s_next, p_next"],
    "05": ["padded = np.zeros((batch, nblocks * block_size", "y[..., 0, :] + y[..., 1, :]"],
    "06": ["row = 16 * warp + lane // 4", "q_bytes = block_m * headdim * elem_bytes", "pairs = int(np.clip("],
    "07": ["groups, n = [], 0", "op = words[1] if words[0].startswith"],
    "08": ["gemms = du[\"gemm0\"] + du[\"gemm1\"]", "order = sorted(t)"],
}


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    pytest.importorskip("nbgrader")
    out = tmp_path_factory.mktemp("student") / "course"
    assert cli.main(["student", str(out)]) == 0
    return out


def _solution_lines(nb):
    """Non-trivial lines between the markers of a committed notebook that appear nowhere else in it."""
    inside_lines, outside = [], []
    for cell in nb.cells:
        inside = False
        for line in cell.source.splitlines():
            if "BEGIN SOLUTION" in line:
                inside = True
            elif "END SOLUTION" in line:
                inside = False
            elif inside:
                inside_lines.append(line.strip())
            else:
                outside.append(line)
    outside = "\n".join(outside)
    return [line for line in inside_lines if len(line) >= 12 and line not in outside]


def test_every_notebook_is_copied(copies):
    names = sorted(p.name for p in (copies / "notebooks").glob("*.ipynb"))
    assert names == [p.name for p in student.all_notebooks()] and len(names) >= 9


@pytest.mark.parametrize("nb_id", sorted(SOLUTION_ONLY))
def test_student_copy_has_no_solution_and_no_output(copies, nb_id):
    original = next(p for p in student.all_notebooks() if p.name.startswith(nb_id))
    committed = nbformat.read(original, as_version=4)
    copy = nbformat.read(copies / "notebooks" / original.name, as_version=4)
    text = "\n".join(c.source for c in copy.cells)
    for line in SOLUTION_ONLY[nb_id]:
        assert any(line in c.source for c in committed.cells), f"{nb_id}: '{line}' is not in the solution any more"
        assert line not in text, f"{nb_id}: solution line '{line}' left in the student copy"
    unique = _solution_lines(committed)
    assert len(unique) >= 3, unique
    for line in unique:
        assert line not in text, f"{nb_id}: solution line '{line}' left in the student copy"
    assert not any(m in text for m in SOLUTION_MARKERS)
    stubs = text.count("raise NotImplementedError()")
    assert stubs >= 2 and stubs == "\n".join(c.source for c in committed.cells).count("### BEGIN SOLUTION")
    assert text.count("grading.check_") >= 2                         # the check cells stay
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in copy.cells if c.cell_type == "code")
    # the story is untouched: every markdown cell is the committed one
    assert [c.source for c in copy.cells if c.cell_type == "markdown"] == \
        [c.source for c in committed.cells if c.cell_type == "markdown"]


def _run_cells(cells, namespace):
    """Run code cells in order (as Jupyter would, no kernel); return (index, exception) of the first error."""
    import matplotlib

    matplotlib.use("Agg")
    for i, cell in enumerate(cells):
        if cell.cell_type != "code" or "nbval-ignore-output" in cell.metadata.get("tags", []):
            continue
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                exec(compile(cell.source, f"<cell {i}>", "exec"), namespace)
        except Exception as err:  # noqa: BLE001 — the test inspects it
            return i, err
    return None, None


def test_student_check_cell_fails_with_the_stub_and_with_a_wrong_answer(copies):
    path = copies / "notebooks" / "01_attention_and_online_softmax.ipynb"
    nb = nbformat.read(path, as_version=4)
    index, err = _run_cells(nb.cells, {})
    assert isinstance(err, NotImplementedError), (index, err)
    assert "online_update is not written yet" in str(err) and "YOUR CODE HERE" in str(err)
    assert "grading.check_online_update" in nb.cells[index].source    # it is the check cell that says so
    # a student's wrong attempt: forgets to rescale the old sum
    solution = next(i for i, c in enumerate(nb.cells) if "def online_update" in c.source)
    nb.cells[solution].source = nb.cells[solution].source.replace(
        "raise NotImplementedError()",
        "m_new = np.maximum(m_prev, x_block.max(axis=-1))\n"
        "    ref = np.where(m_new == -np.inf, 0.0, m_new)\n"
        "    return m_new, l_prev + np.exp(x_block - ref[:, None]).sum(axis=-1)")
    index, err = _run_cells(nb.cells, {})
    assert isinstance(err, AssertionError), (index, err)
    msg = str(err)
    assert "check_online_update: online_update returned the wrong l_new" in msg
    assert "first mismatch at index" in msg and "max |error|" in msg and "mean |error|" in msg
    assert "reproduce: fa3_lab.lab.grading.check_online_update(online_update, seed=101)" in msg


def test_cuda_student_copy_has_no_solution(copies):
    copy = (copies / "cuda" / "exercises" / grading.CUDA_EXERCISE.name).read_text()
    solution = grading.CUDA_EXERCISE.read_text()
    region = solution.split("// ### BEGIN SOLUTION")[1].split("// ### END SOLUTION")[0]
    code = [ln.strip() for ln in region.splitlines() if len(ln.strip()) > 2 and not ln.strip().startswith(("//", "#pragma"))]
    assert len(code) >= 10
    for line in code:
        assert line not in copy, f"solution line left in the CUDA student copy: {line}"
    assert "// YOUR CODE HERE" in copy and "exercise01_stub(o);" in copy
    assert not any(m in copy for m in SOLUTION_MARKERS)
    # everything outside the region is the solution file's
    before, after = solution.split("    // ### BEGIN SOLUTION")[0], solution.split("// ### END SOLUTION\n")[1]
    assert copy.startswith(before) and copy.endswith(after)
    assert (copies / "cuda" / "exercises" / "exercise_binding.cpp").read_text() == \
        grading.EXERCISE_BINDING.read_text()


def test_strip_cuda_solution_rejects_broken_markers():
    with pytest.raises(ValueError, match="never closed"):
        student.strip_cuda_solution("a\n  // ### BEGIN SOLUTION\nb\n", "x.cu")
    with pytest.raises(ValueError, match="without"):
        student.strip_cuda_solution("a\n// ### END SOLUTION\n", "x.cu")
    with pytest.raises(ValueError, match="nested"):
        student.strip_cuda_solution("// ### BEGIN SOLUTION\n// ### BEGIN SOLUTION\n", "x.cu")
    with pytest.raises(ValueError, match="no .* region"):
        student.strip_cuda_solution("int x;\n", "x.cu")
    assert student.strip_cuda_solution("  // ### BEGIN SOLUTION\n  // stub: f();\n  g();\n  // ### END SOLUTION\n") \
        == "  // YOUR CODE HERE\n  f();\n"


def _main(argv, capsys):
    rc = cli.main(argv)
    return rc, capsys.readouterr()


def test_cli_refuses_a_non_empty_outdir(tmp_path, capsys):
    pytest.importorskip("nbgrader")
    (tmp_path / "keep.txt").write_text("x")
    rc, out = _main(["student", str(tmp_path)], capsys)
    assert rc == 2 and out.err.count("\n") == 1 and "exists and is not empty" in out.err and "--force" in out.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]          # nothing written
    rc, out = _main(["student", str(tmp_path / "keep.txt")], capsys)
    assert rc == 2 and "not a directory" in out.err
    rc, out = _main(["student", str(tmp_path), "--force", "--notebooks", "03", "--no-cuda"], capsys)
    assert rc == 0 and sorted(p.name for p in (tmp_path / "notebooks").iterdir()) == ["03_producer_consumer.ipynb"]
    assert not (tmp_path / "cuda").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "notebooks"]   # no staging folder left
    assert (tmp_path / "keep.txt").read_text() == "x"


def test_cli_unknown_notebook(tmp_path, capsys):
    pytest.importorskip("nbgrader")
    rc, out = _main(["student", str(tmp_path / "new"), "--notebooks", "99"], capsys)
    assert rc == 2 and "--notebooks" in out.err and "'99'" in out.err
    assert not (tmp_path / "new").exists()


def test_notebooks_by_name_and_path(tmp_path, capsys):
    pytest.importorskip("nbgrader")
    nb = student.all_notebooks()[5]
    rc, _ = _main(["student", str(tmp_path / "o"), "--notebooks", nb.stem, str(student.all_notebooks()[0])], capsys)
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "o" / "notebooks").iterdir()) == \
        sorted([nb.name, student.all_notebooks()[0].name])


def test_a_failure_midway_leaves_nothing_and_the_retry_works(tmp_path, monkeypatch, capsys):
    pytest.importorskip("nbgrader")
    calls = []

    def broken(text, name="source"):
        calls.append(name)
        raise ValueError(f"{name}:1: '// ### BEGIN SOLUTION' is never closed")

    monkeypatch.setattr(student, "strip_cuda_solution", broken)
    with pytest.raises(ValueError, match="never closed"):
        student.write_student_copies(tmp_path / "out", ["01"])
    assert calls and list(tmp_path.iterdir()) == []                  # notebooks were written, then removed
    monkeypatch.undo()
    rc, _ = _main(["student", str(tmp_path / "out"), "--notebooks", "01"], capsys)
    assert rc == 0 and (tmp_path / "out" / "cuda" / "exercises" / grading.CUDA_EXERCISE.name).is_file()
