"""The ``gpu`` and ``multigpu`` pytest markers of every Panther test suite, as pytest hooks.

A test marked ``gpu`` needs one CUDA device, ``multigpu`` at least two: it skips on a machine with fewer,
and fails instead when ``PANTHER_REQUIRE_GPU=1`` (the GPU machine's runs, where a silently skipped test
would hide a missing or broken device). A ``conftest.py`` takes the hooks with::

    from panther.testing.gpu_marks import pytest_configure, pytest_runtest_setup  # noqa: F401
"""

from __future__ import annotations

import pytest

from panther.backends.toolkit import env_flag

MARKERS = (
    "gpu: needs a CUDA GPU (skipped without one; fails instead when PANTHER_REQUIRE_GPU=1)",
    "multigpu: needs at least two CUDA GPUs (skipped with fewer; fails instead when PANTHER_REQUIRE_GPU=1)",
)


def pytest_configure(config):
    for line in MARKERS:
        config.addinivalue_line("markers", line)


def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pytest_runtest_setup(item):
    if item.get_closest_marker("multigpu") is not None:
        need, what = 2, "at least two CUDA GPUs"
    elif item.get_closest_marker("gpu") is not None:
        need, what = 1, "a CUDA GPU"
    else:
        return
    found = _gpus()
    if found >= need:
        return
    if env_flag("PANTHER_REQUIRE_GPU"):
        pytest.fail(f"PANTHER_REQUIRE_GPU=1 but torch finds {found} CUDA device(s), the test needs {what}",
                    pytrace=False)
    pytest.skip(f"needs {what}, torch finds {found} (PANTHER_REQUIRE_GPU=1 makes this a failure)")
