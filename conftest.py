"""GPU tests are marked `gpu` (one CUDA device) or `multigpu` (at least two): they skip on a machine with
fewer, and fail instead when PANTHER_REQUIRE_GPU=1."""

import os

import pytest


def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pytest_runtest_setup(item):
    if "multigpu" in item.keywords:
        need, what = 2, "at least two CUDA GPUs"
    elif "gpu" in item.keywords:
        need, what = 1, "a CUDA GPU"
    else:
        return
    found = _gpus()
    if found >= need:
        return
    if os.environ.get("PANTHER_REQUIRE_GPU") == "1":
        pytest.fail(f"PANTHER_REQUIRE_GPU=1 but torch finds {found} CUDA device(s), the test needs {what}",
                    pytrace=False)
    pytest.skip(f"needs {what}, torch finds {found} (PANTHER_REQUIRE_GPU=1 makes this a failure)")
