"""GPU tests are marked `gpu` (one CUDA device) or `multigpu` (at least two): they skip on a machine with
fewer, and fail instead when PANTHER_REQUIRE_GPU=1 (panther.testing.gpu_marks)."""

from panther.testing.gpu_marks import pytest_configure, pytest_runtest_setup  # noqa: F401
