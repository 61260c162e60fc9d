"""GPU tests are marked `gpu`: they skip without CUDA, and fail instead when PANTHER_REQUIRE_GPU=1."""

import os

import pytest


def _gpu_missing() -> bool:
    import torch

    return not torch.cuda.is_available()


def pytest_runtest_setup(item):
    if "gpu" not in item.keywords or not _gpu_missing():
        return
    if os.environ.get("PANTHER_REQUIRE_GPU") == "1":
        pytest.fail("PANTHER_REQUIRE_GPU=1 but torch finds no CUDA device", pytrace=False)
    pytest.skip("needs a CUDA GPU (PANTHER_REQUIRE_GPU=1 makes this a failure)")
