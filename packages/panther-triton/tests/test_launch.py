"""The shared launch path (panther_triton._launch) against a stand-in for an autotuned kernel, and the
shared-memory pruning of autotune candidates (panther_triton._runtime.Candidates).

What the launch path must get right without a GPU: a first eager launch per (kernel, layout) goes
through the kernel (and so through Triton's autotuning and compilation), later ones straight to the
compiled kernel with the constexprs appended in signature order and the grid of the tuned config; under
the interpreter a layout that leaves out something Triton specialises on is an error. The GPU tests
check the real thing against the float64 reference (test_gpu.py::test_cached_launches_respecialise).
"""

import pytest
import torch

import panther_triton._launch as launch_module
from panther_triton._launch import layout_key


class FakeConfig:
    kwargs = {"BT": 32}


class FakeCompiled:
    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        return lambda *args: self.log.append(("cached", grid, args))


class FakeKernel:
    """Like triton.autotune(...)(jit_fn): [grid](*args, **kw) launches and returns the compiled kernel."""

    def __init__(self):
        self.fn = type("JIT", (), {"arg_names": ["x", "T", "K", "FLAG", "BT"]})()
        self.best_config = FakeConfig()
        self.log = []

    def __getitem__(self, grid):
        def run(*args, **constexprs):
            self.log.append(("tuned", grid({**constexprs, **self.best_config.kwargs}), args))
            return FakeCompiled(self.log)

        return run


def grid(meta):
    return (100 // meta["BT"], 2)


@pytest.fixture
def on_gpu(monkeypatch):
    """The eager path as on a GPU (the interpreter launches plainly), with an empty cache."""
    monkeypatch.setattr(launch_module, "INTERPRETED", False)
    launch_module.use_cache(True)
    yield
    launch_module.use_cache(True)


def test_second_launch_is_cached_with_constexprs_in_signature_order(on_gpu):
    kernel, x = FakeKernel(), torch.zeros(4)
    layout = layout_key(x, 100)
    launch_module.launch(kernel, grid, (x, 100), dict(K=3, FLAG=True), layout)
    launch_module.launch(kernel, grid, (x, 100), dict(K=3, FLAG=True), layout)
    assert kernel.log[0] == ("tuned", (3, 2), (x, 100))
    assert kernel.log[1] == ("cached", (3, 2, 1), (x, 100, 3, True, 32))
    launch_module.launch(kernel, grid, (x, 101), dict(K=3, FLAG=True), layout_key(x, 101))  # new layout: tuned
    assert kernel.log[2][0] == "tuned"


def test_without_the_cache_every_launch_goes_through_the_kernel(on_gpu):
    kernel, x = FakeKernel(), torch.zeros(4)
    launch_module.use_cache(False)
    for _ in range(2):
        launch_module.launch(kernel, grid, (x, 100), dict(K=3, FLAG=True), layout_key(x))
    assert [e[0] for e in kernel.log] == ["tuned", "tuned"] and launch_module.cached_launches() == 0


def test_a_launch_that_returns_no_compiled_kernel_is_not_kept(on_gpu):
    kernel, x = FakeKernel(), torch.zeros(4)
    kernel.__getitem__ = None
    plain = type("K", (), {"fn": kernel.fn, "best_config": FakeConfig(),
                           "__getitem__": lambda self, g: (lambda *a, **k: kernel.log.append("plain"))})()
    for _ in range(2):
        launch_module.launch(plain, grid, (x, 100), dict(K=3, FLAG=True), layout_key(x))
    assert kernel.log == ["plain", "plain"] and launch_module.cached_launches() == 0


def test_inside_a_library_op_the_kernel_goes_through_the_traced_hook(monkeypatch):
    kernel, seen = FakeKernel(), []
    monkeypatch.setattr(launch_module, "traced", lambda k: seen.append(k) or k)
    launch_module.launch(kernel, grid, (torch.zeros(4), 100), dict(K=3, FLAG=True), None)
    assert seen == [kernel] and kernel.log[0][0] == "tuned"


def test_under_the_interpreter_a_layout_must_imply_every_specialisation(monkeypatch):
    monkeypatch.setattr(launch_module, "INTERPRETED", True)
    kernel, buf = FakeKernel(), torch.zeros(32)
    launch_module.launch(kernel, grid, (buf[:8], 100), dict(K=3, FLAG=True), "k")
    launch_module.launch(kernel, grid, (buf[4:12], 100), dict(K=3, FLAG=True), "k")  # 16-byte offset: same
    with pytest.raises(AssertionError, match="misses an argument"):
        launch_module.launch(kernel, grid, (buf[1:9], 100), dict(K=3, FLAG=True), "k")  # alignment left out
    with pytest.raises(AssertionError, match="misses an argument"):
        launch_module.launch(kernel, grid, (buf[:8], 101), dict(K=3, FLAG=True), "k")


def test_layout_key_tells_layouts_apart():
    x = torch.zeros(6, 4)
    assert layout_key(x, True) == layout_key(torch.ones(6, 4), True)
    assert layout_key(x, True) != layout_key(x.t(), True) != layout_key(x.half(), True)
    assert layout_key(x.view(-1)[1:].view(-1)[:20], 1) != layout_key(x.view(-1)[:20], 1)  # alignment
    assert layout_key(x, True) != layout_key(x, False)


# ------------------------------------------------------------------------------ candidate pruning


def _candidates(monkeypatch, limit):
    from panther_triton import _runtime

    monkeypatch.setattr(_runtime, "interpreting", lambda: False)  # the GPU list, as on a GPU
    monkeypatch.setattr(_runtime, "_device_limit", lambda tensor: limit)
    return _runtime.Candidates(
        gpu=[({"BT": 128, "BI": 64}, 8, 4), ({"BT": 64, "BI": 64}, 4, 2), ({"BT": 32, "BI": 32}, 4, 1)],
        shared=lambda m, blk, stages: stages * (m["BT"] * m["BI"] + m["BI"] * blk),
        interpreter={"BT": 16, "BI": 16},
    )


def test_shared_memory_estimate(monkeypatch):
    c = _candidates(monkeypatch, 1 << 30)
    big, mid, small = c.configs
    assert c.shared_memory(big, 128, 2) == 4 * (128 * 64 + 64 * 128) * 2  # stages x tiles x bytes
    assert c.shared_memory(small, 64, 4) == (32 * 32 + 32 * 64) * 4


def test_prune_keeps_what_fits_or_the_smallest(monkeypatch):
    x16, x32 = torch.zeros(2, dtype=torch.bfloat16), torch.zeros(2)
    c = _candidates(monkeypatch, 100 * 1024)
    big, mid, small = c.configs  # bf16 at BLK=128: 128 KiB, 48 KiB, 10 KiB
    assert c.prune(c.configs, {"x": x16, "BLK": 128, "PREC": "tf32"}) == [mid, small]
    assert c.prune(c.configs, {"x": x16, "BLK": 64, "PREC": "tf32"}) == [big, mid, small]
    # float32: twice the bytes, against half the limit (FLOAT32_MARGIN): 96 KiB, 20 KiB against 50 KiB
    assert c.prune(c.configs, {"x": x32, "BLK": 128, "PREC": "tf32"}) == [small]
    c_tiny = _candidates(monkeypatch, 1024)
    assert c_tiny.prune(c_tiny.configs, {"x": x16, "BLK": 128, "PREC": "tf32"}) == [c_tiny.configs[2]]
    # float32 on the CUDA cores: only the smallest, wherever the others fit
    assert c.prune(c.configs, {"x": x32, "BLK": 16, "PREC": "ieee"}) == [small]


def test_one_small_config_under_the_interpreter(monkeypatch):
    from panther_triton import _runtime

    monkeypatch.setattr(_runtime, "interpreting", lambda: True)
    one = _runtime.Candidates(gpu=[({"BT": 64}, 4, 3)], shared=lambda m, blk, stages: m["BT"], interpreter={"BT": 32})
    assert [(c.kwargs, c.num_stages) for c in one.configs] == [({"BT": 32}, 1)]
