"""_nvrtc: argument packing, NVRTC options, compile errors and the launch path (CPU, through a fake CuPy),
and one real compile + launch on torch's stream, inside a CUDA graph too (gpu)."""

import sys
import threading
import types

import numpy as np
import pytest
import torch

from panther_cuda import _nvrtc
from panther_cuda._nvrtc import INCLUDE_DIR, Kernel, KernelCompileError, compile_options, f32, i32, i64


# --- argument packing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [3, 2**40, 1.5, True, "7", [1]])
def test_python_scalars_are_refused(value):
    """A Python int would silently become a 64-bit long long in CuPy: the width must be explicit."""
    with pytest.raises(TypeError, match=r"kernel argument .* of type .*NumPy scalar of the width.*\(i32, i64, f32\)"):
        _nvrtc._argument(value)


def test_arguments_pass_pointers_and_typed_scalars():
    t = torch.arange(6.0)
    assert _nvrtc._argument(t) == np.uint64(t.data_ptr()) and isinstance(_nvrtc._argument(t), np.uint64)
    assert _nvrtc._argument(None) == 0 and isinstance(_nvrtc._argument(None), np.uint64)
    assert isinstance(_nvrtc._argument(i32(5)), np.int32) and _nvrtc._argument(i32(5)) == 5
    assert isinstance(_nvrtc._argument(i64(2**40)), np.int64) and _nvrtc._argument(i64(2**40)) == 2**40
    assert isinstance(_nvrtc._argument(f32(0.25)), np.float32)


# --- options -----------------------------------------------------------------------------------------------


def test_compile_options(tmp_path):
    opts = compile_options()
    assert opts[: len(_nvrtc.BASE_OPTIONS)] == _nvrtc.BASE_OPTIONS and "-std=c++17" in opts
    assert f"-I{INCLUDE_DIR}" in opts and (INCLUDE_DIR / "panther_cuda" / "common.cuh").is_file()
    assert f"-DPANTHER_HEADERS_DIGEST=0x{_nvrtc.headers_digest()}ULL" in opts
    assert not any(o.startswith("-arch") for o in opts)  # CuPy targets the device's own architecture
    with_arch = compile_options("sm_90a", ("-DTILE=64",))
    assert with_arch[:-3] == opts and with_arch[-3:] == ("-arch=sm_90a", "-DPANTHER_REQUIRE_SM90A", "-DTILE=64")
    assert compile_options("sm_80")[-1] == "-arch=sm_80"  # no architecture-specific features to require
    beside = compile_options(source_dir=tmp_path)
    assert beside == (*_nvrtc.BASE_OPTIONS, f"-I{tmp_path}", *opts[len(_nvrtc.BASE_OPTIONS):])


def test_headers_digest_follows_every_header(monkeypatch, tmp_path):
    """An edited header changes the options, so CuPy's disk cache (keyed by source text and options)
    compiles afresh instead of loading a binary built from the old header."""
    (tmp_path / "include").mkdir()
    (tmp_path / "ops" / "op").mkdir(parents=True)
    (tmp_path / "include" / "a.cuh").write_text("#pragma once\n")
    (tmp_path / "ops" / "op" / "tile.cuh").write_text("// v1\n")
    monkeypatch.setattr(_nvrtc, "PACKAGE_DIR", tmp_path)
    first = _nvrtc.headers_digest()
    assert first == _nvrtc.headers_digest() and len(first) == 16
    (tmp_path / "ops" / "op" / "tile.cuh").write_text("// v2\n")
    second = _nvrtc.headers_digest()
    (tmp_path / "include" / "a.cuh").write_text("#pragma once // edited\n")
    assert len({first, second, _nvrtc.headers_digest()}) == 3


def test_cuda_include_dirs_are_existing_folders(monkeypatch, tmp_path):
    (tmp_path / "include").mkdir()
    monkeypatch.setenv("CUDA_PATH", str(tmp_path))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "missing"))
    found = _nvrtc.cuda_include_dirs()
    assert str(tmp_path / "include") in found and str(tmp_path / "missing" / "include") not in found
    assert len(found) == len(set(found))


# --- compile errors and the launch path, through a fake CuPy ----------------------------------------------


class FakeNVRTCError(Exception):
    def get_message(self):
        return "kernel.cu(3): error: identifier \"oops\" is undefined"


class FakeCupy(types.ModuleType):
    """What _nvrtc uses of CuPy (with ``from_external``, CuPy 14's Stream.from_external beside ExternalStream);
    RawModule records its arguments and fails when asked to."""

    def __init__(self, fail=False, from_external=False):
        super().__init__("cupy")
        self.fail, self.modules, self.launches, self.streams = fail, [], [], []
        fake = self

        class Device:
            def __init__(self, index):
                self.index = index

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        class ExternalStream:
            def __init__(self, ptr, device_id):
                self.ptr, self.device_id = ptr, device_id
                fake.streams.append(self)

        class RawModule:
            def __init__(self, code, options, name_expressions):
                fake.modules.append((code, options, name_expressions))

            def get_function(self, name):
                if fake.fail:
                    raise FakeNVRTCError("compile failed")
                raw = types.SimpleNamespace(max_dynamic_shared_size_bytes=0)
                raw.kernel = lambda grid, block, args, shared_mem, stream: fake.launches.append(
                    (grid, block, args, shared_mem, stream, raw.max_dynamic_shared_size_bytes))
                return raw

        class Stream:  # CuPy 14: streams of other libraries by the CUDA stream protocol
            @staticmethod
            def from_external(obj):
                version, ptr = obj.__cuda_stream__()
                wrapped = types.SimpleNamespace(ptr=ptr, version=version, device_id=None)
                fake.streams.append(wrapped)
                return wrapped

        self.RawModule = RawModule
        self.cuda = types.SimpleNamespace(Device=Device, ExternalStream=ExternalStream, get_cuda_path=lambda: None)
        if from_external:
            self.cuda.Stream = Stream


@pytest.fixture
def source(tmp_path, monkeypatch):
    monkeypatch.setattr(_nvrtc, "_include_options", None)  # computed under the fake, forgotten after the test
    path = tmp_path / "kernel.cu"
    path.write_text("template <typename T> __global__ void k(T* p) { oops; }\n")
    return path


def test_compile_error_names_kernel_source_options_and_log(monkeypatch, source):
    monkeypatch.setitem(sys.modules, "cupy", FakeCupy(fail=True))
    kernel = Kernel(str(source), "k<float>", arch="sm_80", options=("-DTILE=32",))
    with pytest.raises(KernelCompileError) as err:
        kernel.function(0)
    text = str(err.value)
    assert "CUDA kernel k<float>" in text and str(source) in text
    assert "-std=c++17" in text and "-arch=sm_80" in text and "-DTILE=32" in text and f"-I{INCLUDE_DIR}" in text
    assert 'identifier "oops" is undefined' in text
    assert isinstance(err.value, RuntimeError)


@pytest.mark.parametrize("from_external", [False, True], ids=["ExternalStream", "Stream.from_external"])
def test_launch_compiles_once_per_device_on_torchs_current_stream(monkeypatch, source, from_external):
    """Torch's current stream of the launch's device, wrapped once: by ``Stream.from_external`` where CuPy has it
    (ExternalStream is deprecated there), else by ``ExternalStream`` with its device."""
    cupy = FakeCupy(from_external=from_external)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setattr(_nvrtc, "_streams", _nvrtc.BoundedCache(64))
    device = {"index": 0}
    monkeypatch.setattr(torch.cuda, "current_device", lambda: device["index"])
    stream = lambda index=None: types.SimpleNamespace(cuda_stream=4096 + index)  # noqa: E731
    monkeypatch.setattr(torch.cuda, "current_stream", stream)
    kernel = Kernel(str(source), "k<float>")
    t = torch.zeros(4)
    kernel((3, 1, 1), (128, 1, 1), t, None, i32(7), shared_mem=1024)
    kernel([3, 1, 1], [128, 1, 1], t, None, i32(8), shared_mem=64 * 1024)
    assert len(cupy.modules) == 1  # compiled on the first launch only
    code, options, names = cupy.modules[0]
    assert code == source.read_text() and names == ("k<float>",)
    assert options == compile_options(source_dir=source.parent)  # quoted includes resolve beside the .cu
    (g1, b1, a1, s1, st1, opt1), (g2, b2, a2, s2, st2, opt2) = cupy.launches
    assert g1 == g2 == (3, 1, 1) and b1 == b2 == (128, 1, 1)
    assert a1 == (np.uint64(t.data_ptr()), np.uint64(0), np.int32(7)) and a2[2] == np.int32(8)
    assert (s1, opt1) == (1024, 0) and (s2, opt2) == (64 * 1024, 64 * 1024)  # opted into > 48 KiB
    device_id = lambda index: None if from_external else index  # noqa: E731
    assert st1 is st2 and (st1.ptr, st1.device_id) == (4096, device_id(0))  # torch's stream, wrapped once
    assert len(cupy.streams) == 1 and all(getattr(st, "version", 0) == 0 for st in cupy.streams)
    device["index"] = 1
    kernel((1,), (32,), t, None, i32(1))
    assert len(cupy.modules) == 2 and cupy.streams[-1].ptr == 4097 and cupy.streams[-1].device_id == device_id(1)


def test_context_made_current_once_per_thread_and_device(monkeypatch):
    """make_context_current calls cudaSetDevice for a device the first time a thread asks, not again."""
    cupy = FakeCupy()
    calls = []
    cupy.cuda.runtime = types.SimpleNamespace(setDevice=lambda index: calls.append((threading.get_ident(), index)))
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setattr(_nvrtc, "_thread", threading.local())
    for index in (0, 0, 1, 0):
        _nvrtc.make_context_current(index)
    other = threading.Thread(target=_nvrtc.make_context_current, args=(0,))
    other.start()
    other.join()
    main = threading.get_ident()
    assert [i for _, i in calls] == [0, 1, 0] and [t == main for t, _ in calls] == [True, True, False]


# --- on a GPU ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_context_current_in_a_fresh_thread():
    """A fresh thread has no current context until make_context_current (which the conv backward calls before its
    first cuBLAS call) makes the device's primary context current there."""
    import cupy

    got = {}

    def run():
        got["before"] = cupy.cuda.driver.ctxGetCurrent()
        _nvrtc.make_context_current(torch.cuda.current_device())
        got["after"] = cupy.cuda.driver.ctxGetCurrent()

    torch.zeros(1, device="cuda")  # this thread's context exists
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert got["before"] == 0 and got["after"] != 0 and got["after"] == cupy.cuda.driver.ctxGetCurrent()

AXPY = r"""
#include "panther_cuda/common.cuh"
template <typename T>
__global__ void axpy(const T* __restrict__ x, T* __restrict__ y, float a, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = panther::from_float<T>(a * panther::to_float(x[i]) + panther::to_float(y[i]));
}
"""


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, ctype", [(torch.float32, "float"), (torch.bfloat16, "__nv_bfloat16"),
                                          (torch.float16, "__half")])
def test_compile_and_launch_on_torchs_stream_and_in_a_graph(tmp_path, dtype, ctype):
    path = tmp_path / "axpy.cu"
    path.write_text(AXPY)
    kernel = Kernel(str(path), f"axpy<{ctype}>")
    n = 1000
    x = torch.randn(n, device="cuda", dtype=dtype)
    y = torch.randn(n, device="cuda", dtype=dtype)
    expected = (2.0 * x.float() + y.float()).to(dtype)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # launched on the stream current at the call
        kernel(((n + 127) // 128,), (128,), x, y, f32(2.0), i64(n))
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(y, expected)  # a fused multiply-add may round once where torch rounds twice
    y2 = torch.zeros_like(y)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kernel(((n + 127) // 128,), (128,), x, y2, f32(1.0), i64(n))
    y2.zero_()
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y2, (2.0 * x.float()).to(dtype), rtol=0, atol=0)
