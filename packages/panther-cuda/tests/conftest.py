"""Test setup of panther-cuda: the `gpu` marker.

Tests marked `gpu` run the kernels on a CUDA GPU: they skip without one, and FAIL without one when
PANTHER_REQUIRE_GPU=1 (the GPU machine's runs, where a silently skipped GPU test would hide a missing or
broken device). Everything else runs on any machine: backend reasons, argument packing, compile options,
and the nvcc check of every ``.cu`` file (test_sources.py; nvcc missing skips it unless
PANTHER_REQUIRE_NVCC=1, which CI sets).
"""

import os
import sys

# --import-mode=importlib puts no test folder on sys.path: make helper modules beside the tests importable.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from panther.testing.gpu_marks import pytest_configure, pytest_runtest_setup  # noqa: E402, F401
