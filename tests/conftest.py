"""Shared pytest setup: markers `gpu` and `sass` skip with a reason where the machine cannot run them;
markers `stepNN` (one per kernel step of ``fa3_lab/registry.py``) select a step's kernel tests and its
NumPy twin's tests, so ``pytest -m step04`` runs exactly step 04's."""
from __future__ import annotations

import inspect

import pytest

from fa3_lab import _env, registry


def pytest_configure(config):
    for s in registry.STEPS:
        config.addinivalue_line("markers", f"{s.marker}: kernel step {s.id:02d} ({s.name}) and its twin's tests")


def _twin_functions() -> dict[str, list]:
    """{twin function name: [steps]} from the registry (``reference/x.py::fn``)."""
    out: dict[str, list] = {}
    for s in registry.STEPS:
        if s.twin and "::" in s.twin:
            out.setdefault(s.twin.split("::")[1], []).append(s)
    return out


def _step_markers(item, twins) -> set[str]:
    """A kernel test's ``step`` parameter, or a reference test that calls a step's twin function."""
    marks = set()
    params = getattr(getattr(item, "callspec", None), "params", {})
    step = params.get("step")
    if isinstance(step, int) and not isinstance(step, bool):
        marks.add(f"step{step:02d}")
    explicit = any(m.name.startswith("step") for m in item.iter_markers())
    if item.path.name.startswith("test_reference_") and not explicit:
        try:
            src = inspect.getsource(item.function)
        except (OSError, TypeError):
            src = ""
        for fn, steps in twins.items():
            if fn in src:
                marks.update(s.marker for s in steps)
    return marks


def pytest_collection_modifyitems(config, items):
    twins = _twin_functions()
    for item in items:
        for marker in sorted(_step_markers(item, twins) - {m.name for m in item.iter_markers()}):
            item.add_marker(getattr(pytest.mark, marker))
    gpu_reason = _env.why_no_sm90()
    sass_missing = [t for t, f in (("nvcc", _env.nvcc), ("cuobjdump", _env.cuobjdump),
                                   ("nvdisasm", _env.nvdisasm)) if f() is None]
    for item in items:
        if "gpu" in item.keywords and gpu_reason:
            item.add_marker(pytest.mark.skip(reason=f"needs an sm_90 GPU: {gpu_reason}"))
        if "sass" in item.keywords and sass_missing:
            item.add_marker(pytest.mark.skip(
                reason=f"needs {', '.join(sass_missing)} (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)"))


@pytest.fixture
def rng(request):
    """A seeded generator per test (seed from the test's name, so reruns reproduce)."""
    import zlib

    import numpy as np

    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
