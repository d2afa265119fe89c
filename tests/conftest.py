"""Shared pytest setup: markers `gpu` and `sass` skip with a reason where the machine cannot run them."""
from __future__ import annotations

import pytest

from fa3_lab import _env, registry


def pytest_configure(config):
    """One marker per kernel step, from the registry: ``pytest -m step04`` runs step 04's tests and its twin's."""
    for s in registry.STEPS:
        config.addinivalue_line("markers", f"{s.marker}: tests of kernel step {s.id:02d} ({s.name}) and its twin")


def pytest_collection_modifyitems(config, items):
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
