"""One id everywhere (docs/design.md): every file says what ``fa3_lab/registry.py`` says.

Kernel steps ↔ step files and their headers ↔ NumPy twins ↔ notebooks (chapters) ↔ README ↔ markers.
CPU only, no build: these read files.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fa3_lab import registry

ROOT = Path(__file__).resolve().parent.parent
STEP_IDS = {s.id for s in registry.STEPS}


def _numbers(text: str) -> set[int]:
    """Step ids named in ``text``: "02", "02–04" / "02-04" (a range), "02, 03 and 05"."""
    out: set[int] = set()
    for a, b in re.findall(r"\b(\d{2})(?:\s*[–-]\s*(\d{2}))?\b", text):
        out.update(range(int(a), int(b or a) + 1))
    return out


def _header(path: Path) -> str:
    """The opening comment block of a step file (up to the first #include)."""
    return path.read_text().split("#include", 1)[0]


def test_registry_is_well_formed():
    ids = [s.id for s in registry.STEPS]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), ids
    for s in registry.STEPS:
        assert s.name.startswith(f"{s.id:02d}_"), s
        assert s.series in ("fwd", "bwd"), s
        if s.parent is not None:
            parent = registry.step(s.parent)
            assert parent.id < s.id and parent.series == s.series, (s, parent)
        if s.twin:
            module = s.twin.split("::")[0]
            assert (ROOT / module).is_file(), f"step {s.id:02d}: twin {module} does not exist"
    assert registry.step(registry.DEFAULT_STEP).series == "fwd"
    assert registry.step(registry.FP8_STEP).dtypes == ("e4m3",)
    for c in registry.CHAPTERS:
        assert c.name.startswith(f"{c.id:02d}_") and set(c.steps) <= STEP_IDS, c


def test_every_step_file_is_in_the_registry_and_back():
    files = {p.relative_to(ROOT).as_posix() for p in (ROOT / "cuda" / "steps").rglob("*.cu")}
    registered = {s.path for s in registry.STEPS}
    assert files == registered, (f"in cuda/steps but not in the registry: {sorted(files - registered)}; "
                                 f"in the registry but missing: {sorted(registered - files)}")


@pytest.mark.parametrize("s", registry.STEPS, ids=lambda s: s.marker)
def test_step_header_agrees_with_the_registry(s):
    header = _header(ROOT / s.path)
    for other in registry.series(s.series):  # the series' table of contents
        assert other.name in header, f"{s.path}: the table of contents lacks {other.name}"
    if s.parent is not None:
        m = re.search(r"[Ss]tep (\d{2}) extends (\d{2})", header)
        assert m, f"{s.path}: no 'Step NN extends MM' line"
        assert (int(m.group(1)), int(m.group(2))) == (s.id, s.parent), f"{s.path}: {m.group(0)} vs registry"
    m = re.search(r"^//\s*Twin:\s*(.*)$", header, re.M)
    assert m, f"{s.path}: no 'Twin:' line"
    if s.twin:
        assert s.twin.split("::")[0] in m.group(1), f"{s.path}: Twin: {m.group(1)!r}, registry {s.twin}"
    else:
        assert m.group(1).lower().startswith("none"), f"{s.path}: Twin: {m.group(1)!r}, registry has none"


@pytest.mark.parametrize("module", sorted({s.twin.split("::")[0] for s in registry.STEPS if s.twin}))
def test_twin_docstring_names_its_steps(module):
    """Each twin's module docstring opens with "Twin of kernel step(s) NN…" naming exactly its steps."""
    text = (ROOT / module).read_text()
    first = text.split('"""')[1].splitlines()[0]
    m = re.match(r"Twin of kernel steps? ([^:(]*)", first)
    assert m, f"{module}: docstring should open with 'Twin of kernel step(s) …', got {first!r}"
    want = {s.id for s in registry.STEPS if s.twin and s.twin.split("::")[0] == module}
    named = _numbers(m.group(1))
    assert want <= named <= want | {s.id for s in registry.STEPS if s.twin is None}, \
        f"{module}: names steps {sorted(named)}, registry twins {sorted(want)}"


@pytest.mark.parametrize("c", registry.CHAPTERS, ids=lambda c: c.name)
def test_notebook_names_the_steps_it_covers(c):
    path = ROOT / "notebooks" / f"{c.name}.ipynb"
    assert path.is_file(), f"{path} is missing"
    cells = json.loads(path.read_text())["cells"]
    first = "".join(cells[0]["source"])
    m = re.search(r"Steps covered:\s*(.*)", first)
    assert m, f"{path.name}: the first cell has no 'Steps covered:' line"
    covered = _numbers(m.group(1))
    assert covered == set(c.steps), f"{path.name}: covers {sorted(covered)}, registry {list(c.steps)}"


def test_every_notebook_is_a_chapter():
    names = {p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")}
    assert names == {c.name for c in registry.CHAPTERS}


def test_readme_step_table_lists_every_step():
    readme = (ROOT / "README.md").read_text()
    missing = [s.path for s in registry.STEPS if (ROOT / s.path).is_file() and s.path not in readme]
    assert not missing, f"README: no row for {missing}"


def test_every_step_has_a_marker_and_selects_tests(pytestconfig):
    markers = "\n".join(pytestconfig.getini("markers"))
    for s in registry.STEPS:
        assert f"{s.marker}:" in markers, s.marker


def test_no_file_cites_a_design_document_that_is_not_in_the_repo():
    bad = []
    for p in ROOT.rglob("*"):
        rel = p.relative_to(ROOT)
        if not p.is_file() or rel.parts[0] in (".git", ".venv", ".dev", "build") or "archive" in rel.parts \
                or p.suffix not in (".py", ".md", ".ipynb", ".cu", ".h", ".cpp", ".toml", ".sh", ".cfg"):
            continue
        for m in re.finditer(r"([\w./-]*design\.md)", p.read_text(errors="replace"), re.I):
            target = m.group(1)
            if target not in ("docs/design.md", "design.md") and not (ROOT / target).is_file():
                bad.append(f"{rel}: {target}")
    assert not bad, bad
    assert (ROOT / "docs" / "design.md").is_file()
