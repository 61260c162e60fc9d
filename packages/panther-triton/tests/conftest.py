"""Test setup of panther-triton: where the kernels run, and the `gpu` marker.

Kernel tests run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set it before pytest
starts: Triton reads it when the kernels are defined) or on CUDA tensors without it. Tests marked
`gpu` need a CUDA GPU: they skip without one, and FAIL without one when PANTHER_REQUIRE_GPU=1 (the GPU
machine's runs, where a silently skipped GPU test would hide a missing or broken device).
"""

import os
import sys

# --import-mode=importlib puts no test folder on sys.path: make triton_test_utils importable.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from panther.testing.gpu_marks import pytest_configure, pytest_runtest_setup  # noqa: E402, F401
