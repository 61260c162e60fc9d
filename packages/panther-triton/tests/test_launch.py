"""The eager launcher's cache (panther_triton._launch) against a stand-in for an autotuned kernel.

What it must get right without a GPU: a first launch per key goes through the kernel (and so through
Triton's autotuning and compilation), later ones straight to the compiled kernel with the constexprs
appended in signature order and the grid of the tuned config; anything Triton specialises on (int
values, dtypes, 16-byte alignment of tensors, constexprs) makes a new key. The GPU tests check the
real thing against the float64 reference (test_gpu.py::test_cached_launches_respecialise).
"""

import copy

import pytest
import torch

from panther_triton._launch import Launcher


class FakeConfig:
    kwargs = {"BT": 32}


class FakeCompiled:
    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        return lambda *args: self.log.append(("cached", grid, args))

    def run(self, *args):  # present on Triton's compiled kernels
        raise AssertionError("the launcher goes through compiled[grid]")


class FakeKernel:
    """Like triton.autotune(...)(jit_fn): [grid](*args, **kw) launches and returns the compiled kernel."""

    def __init__(self):
        self.fn = type("JIT", (), {"arg_names": ["x", "T", "K", "FLAG", "BT"]})()
        self.best_config = FakeConfig()
        self.log = []

    def __getitem__(self, grid):
        def launch(*args, **constexprs):
            self.log.append(("tuned", grid({**constexprs, **self.best_config.kwargs}), args))
            return FakeCompiled(self.log)

        return launch


def grid(meta):
    return (100 // meta["BT"], 2)


def make():
    kernel = FakeKernel()
    launcher = Launcher(kernel)
    launcher.fast = True  # as on a GPU (the interpreter launches plainly)
    return kernel, launcher


def test_second_launch_is_cached_with_constexprs_in_signature_order():
    kernel, launcher = make()
    x = torch.zeros(8)
    launcher[grid](x, 100, K=3, FLAG=True)
    launcher[grid](x, 100, K=3, FLAG=True)
    assert [e[0] for e in kernel.log] == ["tuned", "cached"]
    assert kernel.log[0][1] == (3, 2)
    _, g, args = kernel.log[1]
    assert g == (3, 2, 1)  # the grid function's (BT, 2) completed to three axes
    assert args[0] is x and args[1:] == (100, 3, True, 32)


def test_the_grid_is_recomputed_for_every_cached_launch():
    """A grid may depend on more than the arguments (e.g. a split count the caller chose): never cached."""
    kernel, launcher = make()
    x = torch.zeros(8)
    for splits in (1, 4, 2):
        launcher[lambda meta: (100 // meta["BT"], splits)](x, 100, K=3, FLAG=True)
    assert [e[0] for e in kernel.log] == ["tuned", "cached", "cached"]
    assert [e[1] for e in kernel.log] == [(3, 1), (3, 4, 1), (3, 2, 1)]


def test_everything_triton_specialises_on_makes_a_new_key():
    kernel, launcher = make()
    buf = torch.zeros(64)
    aligned, misaligned = buf[:8], buf[1:9]  # 4-byte offset: not 16-byte aligned
    calls = [
        ((aligned, 100), dict(K=3, FLAG=True)),
        ((aligned, 101), dict(K=3, FLAG=True)),  # another int value
        ((aligned, 100), dict(K=4, FLAG=True)),  # another constexpr
        ((aligned, 100), dict(K=3, FLAG=False)),
        ((misaligned, 100), dict(K=3, FLAG=True)),  # alignment
        ((aligned.double(), 100), dict(K=3, FLAG=True)),  # dtype
    ]
    for args, kw in calls:
        launcher[grid](*args, **kw)
    assert [e[0] for e in kernel.log] == ["tuned"] * len(calls)
    for args, kw in calls:
        launcher[grid](*args, **kw)
    assert [e[0] for e in kernel.log[len(calls):]] == ["cached"] * len(calls)


def test_without_the_fast_path_every_launch_goes_through_the_kernel():
    kernel, launcher = make()
    launcher.fast = False
    x = torch.zeros(8)
    for _ in range(3):
        launcher[grid](x, 100, K=3, FLAG=True)
    assert [e[0] for e in kernel.log] == ["tuned"] * 3


def test_a_launch_that_returns_no_compiled_kernel_is_not_cached():
    kernel, launcher = make()
    kernel.__class__ = type("NoReturn", (FakeKernel,), {
        "__getitem__": lambda self, g: (lambda *a, **kw: self.log.append(("tuned", None, a)))
    })
    x = torch.zeros(8)
    launcher[grid](x, 100, K=3, FLAG=True)
    launcher[grid](x, 100, K=3, FLAG=True)
    assert [e[0] for e in kernel.log] == ["tuned", "tuned"]


def test_a_compiled_kernel_that_refuses_the_arguments_turns_the_cache_off():
    kernel, launcher = make()

    def refuse(*args):
        raise TypeError("function takes exactly 9 arguments")

    x = torch.zeros(8)
    launcher[grid](x, 100, K=3, FLAG=True)
    key = next(iter(launcher.cache))
    compiled, tail, meta = launcher.cache[key]
    refusing = type("Refusing", (), {"__getitem__": lambda self, g: refuse})()
    launcher.cache[key] = (refusing, tail, meta)
    with pytest.warns(RuntimeWarning, match="cached launches"):
        launcher[grid](x, 100, K=3, FLAG=True)
    assert not launcher.fast and not launcher.cache
    launcher[grid](x, 100, K=3, FLAG=True)
    assert [e[0] for e in kernel.log] == ["tuned", "tuned", "tuned"]


def test_launch_as_looks_up_by_the_callers_key_and_keeps_the_grid():
    kernel, launcher = make()
    calls = []

    def counting_grid(meta):
        calls.append(meta["BT"])
        return grid(meta)

    x = torch.zeros(8)
    for _ in range(3):
        launcher.launch_as(("layout", 1), counting_grid, (x, 100), dict(K=3, FLAG=True))
    assert [e[0] for e in kernel.log] == ["tuned", "cached", "cached"]
    assert kernel.log[2][1] == (3, 2, 1) and kernel.log[2][2][1:] == (100, 3, True, 32)
    assert len(calls) == 2  # the tuned launch's own grid, then once for the caller's key; never again
    launcher.launch_as(("layout", 2), counting_grid, (x, 101), dict(K=3, FLAG=True))  # another key: tuned
    assert kernel.log[-1][0] == "tuned"


def test_launch_as_under_the_interpreter_checks_that_the_callers_key_implies_the_full_key(monkeypatch):
    import panther_triton._launch as launch_module

    kernel, launcher = make()
    launcher.fast = False
    monkeypatch.setattr(launch_module, "interpreting", lambda: True)
    buf = torch.zeros(64)
    launcher.launch_as("k", grid, (buf[:8], 100), dict(K=3, FLAG=True))
    launcher.launch_as("k", grid, (buf[4:12], 100), dict(K=3, FLAG=True))  # 16-byte offset: same full key
    with pytest.raises(AssertionError, match="misses an argument"):
        launcher.launch_as("k", grid, (buf[1:9], 100), dict(K=3, FLAG=True))  # alignment left out of "k"
    with pytest.raises(AssertionError, match="misses an argument"):
        launcher.launch_as("k", grid, (buf[:8], 101), dict(K=3, FLAG=True))
    assert [e[0] for e in kernel.log] == ["tuned", "tuned"]


def test_configs_are_pruned_by_dtype_precision_and_chunk(monkeypatch):
    """The matmul kernels' early_config_prune: 16-bit operands get the narrow-chunk candidates below the
    widest column chunk and the wide-chunk ones at it; float32 with TF32 gets the narrow-chunk and the
    float32-only candidates, and only the float32-only ones at the widest chunk; float32 without TF32 only
    the smallest float32-only one."""
    from panther_triton import _runtime

    monkeypatch.setattr(_runtime, "interpreting", lambda: False)  # the GPU lists, as on a GPU
    cands = _runtime.Candidates(
        gpu=[({"BT": 128, "BI": 64}, 8, 3), ({"BT": 64, "BI": 64}, 4, 4), ({"BT": 16, "BI": 16}, 2, 2)],
        gpu_wide=[({"BT": 64, "BI": 64}, 4, 4), ({"BT": 64, "BI": 64}, 8, 2)],
        gpu_float32=[({"BT": 64, "BI": 32}, 4, 1), ({"BT": 32, "BI": 32}, 4, 1)],
        interpreter={"BT": 32, "BI": 32},
    )
    configs = cands.configs
    assert [(c.kwargs["BT"], c.num_warps, c.num_stages) for c in configs] == [
        (128, 8, 3), (64, 4, 4), (16, 2, 2), (64, 8, 2), (64, 4, 1), (32, 4, 1)]  # a candidate in two lists: once
    narrow, wide, f32 = configs[:3], configs[1:2] + configs[3:4], configs[4:]
    prune = cands.prune_configs_by["early_config_prune"]
    x16, x32 = torch.zeros(2, dtype=torch.bfloat16), torch.zeros(2)
    assert prune(configs, {"x": x16, "T": 5}, PREC="tf32") == narrow
    assert prune(configs, {"x": x16, "PREC": "tf32"}, BLK=64) == narrow
    assert prune(configs, {"x": x16, "PREC": "tf32", "BLK": 128}) == wide
    assert prune(configs, {"x": x32, "PREC": "tf32"}) == narrow + f32
    assert prune(configs, {"x": x32, "PREC": "tf32"}, BLK=64) == narrow + f32
    assert prune(configs, {"x": x32, "PREC": "tf32"}, BLK=128) == f32
    # ieee: the smallest float32-only candidate, though a 16-bit one (BT=BI=16, 2 warps) is smaller still
    assert prune(configs, {"x": x32}, PREC="ieee") == [configs[5]]
    assert prune(configs, {"PREC": "ieee"}) == [configs[5]]  # ieee is float32 whatever the arguments
    assert prune(configs, {"T": 5}, PREC="tf32") == configs  # dtype unknown: every candidate
    # the lists are kept by value: copies of the configs (as Triton's caches make them) are pruned alike
    copied = [copy.deepcopy(c) for c in configs]
    assert prune(copied, {"x": x16}, PREC="tf32", BLK=128) == [copied[1], copied[3]]
    # a kernel without a wide-chunk list tunes its one 16-bit list at every chunk
    plain = _runtime.Candidates(gpu=[({"BT": 64}, 4, 3)], gpu_float32=[({"BT": 32}, 4, 1)], interpreter={"BT": 32})
    assert plain.prune(plain.configs, {"x": x16}, BLK=128) == plain.configs[:1]
    # under the interpreter: the one small config, whatever the operands
    monkeypatch.setattr(_runtime, "interpreting", lambda: True)
    one = _runtime.Candidates(gpu=[({"BT": 64}, 4, 3)], interpreter={"BT": 32})
    assert [c.kwargs for c in one.configs] == [{"BT": 32}]
    assert one.prune(one.configs, {"x": x32}, BLK=128) == one.configs


def test_host_caches_start_over_at_their_bound(monkeypatch):
    """Plans, launch recipes and compiled-kernel lookups share one bounded store: many distinct batch
    sizes start it over instead of growing it."""
    import panther_triton._runtime as runtime

    monkeypatch.setattr(runtime, "CACHE_ENTRIES", 3)
    cache = {}
    for i in range(3):
        assert runtime.remember(cache, i, str(i)) == str(i)
    assert cache == {0: "0", 1: "1", 2: "2"}
    runtime.remember(cache, 3, "3")
    assert cache == {3: "3"}
