"""Shared settings of the panther.nn tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """Run each test on one intra-op thread, then restore the setting.

    The tensors here are tiny: threads buy nothing, and on a shared 2-core machine with a busy neighbour
    every multi-threaded BLAS call waits at OpenMP barriers (measured: 1 ms per small layer on one
    thread, 40-90 ms on two).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
