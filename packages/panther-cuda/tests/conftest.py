"""Test setup of panther-cuda: the `gpu` marker.

Tests marked `gpu` run the kernels on a CUDA GPU: they skip without one, and FAIL without one when
PANTHER_REQUIRE_GPU=1 (the GPU machine's runs, where a silently skipped GPU test would hide a missing or
broken device). Everything else runs on any machine: backend reasons, argument packing, compile options,
and the nvcc check of every ``.cu`` file (test_sources.py; nvcc missing skips it unless
PANTHER_REQUIRE_NVCC=1, which CI sets).
"""

import os
import sys

import pytest
import torch

# --import-mode=importlib puts no test folder on sys.path: make helper modules beside the tests importable.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _require_gpu() -> bool:
    return os.environ.get("PANTHER_REQUIRE_GPU", "").strip().lower() in ("1", "true", "yes", "on")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "gpu: needs a CUDA GPU; skipped without one unless PANTHER_REQUIRE_GPU=1 (then it fails)"
    )


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available() and not _require_gpu():
        pytest.skip("needs a CUDA GPU (set PANTHER_REQUIRE_GPU=1 to make this a failure)")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.fail("PANTHER_REQUIRE_GPU=1 but no CUDA GPU is visible (torch.cuda.is_available() is False)")
