"""Every ``.cu`` file of the package compiles with nvcc for sm_80 and sm_90a, and with NVRTC (the compiler
that builds the kernels at run time, with the options the package passes it) for compute_80 and
compute_90a; no GPU needed.

The kernels are templates, compiled at run time by NVRTC for the instances the host code names, so a
file compiled as it is would instantiate nothing. Convention: every ``.cu`` file ends with a block

    #ifdef PANTHER_NVCC_CHECK
    template __global__ void panther::sketched_linear_fwd<float, 128, 64>(const float* __restrict__, ...);
    template __global__ void panther::sketched_linear_fwd<__nv_bfloat16, 128, 64>(...);
    #endif  // PANTHER_NVCC_CHECK

with explicit instantiations of the kernel templates, at least one per template and variant the host
code launches (each dtype, each tile / flag combination), so that both compilers, given the macro,
compile what NVRTC will compile at run time (a local macro may spell the long parameter lists once).
The package never defines the macro, so the block costs nothing at run time. A file without the block,
or whose block instantiates no kernel, fails here.

nvcc is looked up on PATH, then under CUDA_HOME / CUDA_PATH and /usr/local/cuda; libnvrtc on the
library path, under those folders' lib64, and in the NVRTC wheels (tox env `cuda` installs CUDA 13.0's, the
oldest of its major, and CUDA 12's); every NVRTC version found compiles every file, since an older one
refuses code a newer one takes (NVRTC 12.9 and 13.0 reject a generic lambda in device code that 13.5 and nvcc
accept). The options are the package's alone: CuPy adds --device-as-default-execution-space at run time (with
it those NVRTCs take the lambda), and the sources do not rely on it. Without the compilers the tests skip,
unless PANTHER_REQUIRE_NVCC=1 (CI sets it), which makes a missing compiler a failure.
"""

import ctypes
import ctypes.util
import glob
import os
import re
import shutil
import site
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional

import pytest

PACKAGE = Path(__file__).resolve().parents[1]
SOURCES = PACKAGE / "src" / "panther_cuda"
INCLUDE = SOURCES / "include"
GUARD = "PANTHER_NVCC_CHECK"
ARCHS = ("sm_80", "sm_90a")
# Host-only headers: NVRTC has no C or C++ standard library (use long long, unsigned, the CUDA headers).
HOST_HEADERS = re.compile(r"^\s*#\s*include\s*<(c?std\w*(\.h)?|stdio\.h|stdlib\.h|cstdio|cstdlib|cassert|assert\.h|"
                          r"iostream|vector|string|algorithm|cmath|math\.h|type_traits|limits)>", re.M)
BLOCK = re.compile(rf"#\s*if(?:def\s+{GUARD}|\s+defined\s*\(?\s*{GUARD}\s*\)?)\b(?P<body>.*)#\s*endif[^\n]*\s*\Z", re.S)


def cu_files() -> List[Path]:
    return sorted(SOURCES.rglob("*.cu"))


def op_folders() -> List[Path]:
    return sorted(p.parent for p in (SOURCES / "ops").glob("*/op.py"))


def find_nvcc() -> Optional[str]:
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.access(os.path.join(root, "bin", "nvcc"), os.X_OK):
            return os.path.join(root, "bin", "nvcc")
    return None


def find_nvrtcs() -> List[str]:
    """Every NVRTC library found, one per version: the library path's, then those under CUDA_HOME / CUDA_PATH
    and /usr/local/cuda, then the wheels' (``nvidia-cuda-nvrtc`` for CUDA 13, ``nvidia-cuda-nvrtc-cu12``
    for CUDA 12). Each version compiles the sources: an older NVRTC refuses what a newer one takes."""
    found = [ctypes.util.find_library("nvrtc")]
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    patterns = [os.path.join(r, "lib64", "libnvrtc.so*") for r in roots if r]
    wheels = [*site.getsitepackages(), site.getusersitepackages(), *sys.path]
    patterns += [os.path.join(d, "nvidia", "*", "lib", "libnvrtc.so*") for d in wheels if d]
    for pattern in patterns:
        found += sorted(p for p in glob.glob(pattern) if "builtins" not in p and ".alt." not in p)
    by_version: Dict[str, str] = {}
    for path in found:
        if path is not None:
            try:
                by_version.setdefault(nvrtc_version(load_nvrtc(path)), path)
            except OSError:  # a broken or foreign library: not a compiler to test with
                continue
    return [by_version[v] for v in sorted(by_version, key=lambda v: tuple(map(int, v.split("."))))]


def load_nvrtc(path: str):
    """The NVRTC library at ``path``. It opens its builtins library by name when it compiles: the one beside
    it is loaded first, so that the name resolves to it without the folder on the library path."""
    folder = os.path.dirname(path)
    builtins = sorted(p for p in glob.glob(os.path.join(folder, "libnvrtc-builtins.so*")) if ".alt." not in p)
    if folder and builtins:
        ctypes.CDLL(builtins[0])
    lib = ctypes.CDLL(path)
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    return lib


def nvrtc_version(lib) -> str:
    major, minor = ctypes.c_int(), ctypes.c_int()
    assert lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)) == 0
    return f"{major.value}.{minor.value}"


def _missing(what: str):
    if os.environ.get("PANTHER_REQUIRE_NVCC", "").strip().lower() in ("1", "true", "yes", "on"):
        pytest.fail(f"PANTHER_REQUIRE_NVCC=1 but {what}")
    pytest.skip(f"{what} (PANTHER_REQUIRE_NVCC=1 makes this a failure)")


@pytest.fixture(scope="module")
def nvcc() -> str:
    path = find_nvcc()
    if path is None:
        _missing("nvcc is not on PATH nor under CUDA_HOME, CUDA_PATH or /usr/local/cuda")
    return path


NVRTCS = find_nvrtcs()


@pytest.fixture(scope="module", params=NVRTCS or [None],
                ids=lambda path: "nvrtc-" + nvrtc_version(load_nvrtc(path)) if path else "no-nvrtc")
def nvrtc(request):
    """Each NVRTC found (the tests run once per version)."""
    if request.param is None:
        _missing("libnvrtc is not on the library path, under CUDA_HOME, CUDA_PATH or /usr/local/cuda, nor in an "
                 "installed nvidia-cuda-nvrtc wheel")
    return load_nvrtc(request.param)


def convention_problems(path: Path) -> List[str]:
    """What the file's text breaks of the convention (empty: nothing)."""
    text = path.read_text()
    problems = [f"includes the host-only header <{m.group(1)}>, which NVRTC cannot compile"
                for m in HOST_HEADERS.finditer(text)]
    block = BLOCK.search(text)
    if block is None:
        problems.append(f"does not end with an `#ifdef {GUARD}` ... `#endif` block of explicit instantiations")
    elif not re.search(r"\btemplate\b", block.group("body")):
        problems.append(f"its `#ifdef {GUARD}` block instantiates nothing (no `template ...;` line)")
    return problems


def nvcc_command(nvcc: str, path: Path, out: Path) -> List[str]:
    gencode = [a for arch in ARCHS for a in ("-gencode", f"arch=compute_{arch[3:]},code={arch}")]
    # --threads 0: one compiler thread per architecture, as many as the machine has cores
    return [nvcc, "-std=c++17", f"-I{INCLUDE}", *gencode, "--threads", "0", f"-D{GUARD}", "--resource-usage",
            "-c", str(path), "-o", str(out)]


def compile_entries(nvcc: str, path: Path, out: Path) -> Dict[str, List[str]]:
    """Compile ``path`` with the guard defined; the kernel entry functions compiled per architecture."""
    cmd = nvcc_command(nvcc, path, out)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 0, f"{path.name} does not compile:\n$ {' '.join(cmd)}\n{log}"
    entries = {arch: [] for arch in ARCHS}
    for name, arch in re.findall(r"Compiling entry function '(\S+)' for '(\w+)'", log):
        entries.setdefault(arch, []).append(name)
    return entries


def nvrtc_ptx(lib, path: Path, options) -> str:
    """``path`` compiled by NVRTC with ``options`` (the guard among them): its PTX."""
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), path.read_bytes(), path.name.encode(), 0, None, None) == 0
    try:
        argv = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
        status = lib.nvrtcCompileProgram(prog, len(options), argv)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        assert status == 0, (
            f"{path.name} does not compile with NVRTC ({lib.nvrtcGetErrorString(status).decode()}), "
            f"options {' '.join(options)}:\n{log.value.decode(errors='replace')}"
        )
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        ptx = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetPTX(prog, ptx)
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return ptx.value.decode(errors="replace")


def nvrtc_entries(lib, path: Path) -> Dict[str, List[str]]:
    """Compile ``path`` with NVRTC as the package does at run time (its options, the guard defined), to
    PTX for each architecture, one thread each (NVRTC compiles distinct programs concurrently); the kernel
    entry functions per architecture."""
    from panther_cuda._nvrtc import compile_options

    def entries(arch):
        ptx = nvrtc_ptx(lib, path, compile_options("compute_" + arch[3:], (f"-D{GUARD}",), path.parent))
        return re.findall(r"\.entry\s+(\w+)\s*\(", ptx)

    with ThreadPoolExecutor(len(ARCHS)) as pool:
        return dict(zip(ARCHS, pool.map(entries, ARCHS)))


NO_BLOCK = f"(no {GUARD} block at its end, or an empty one?)"


def relative(path: Path) -> str:
    return str(path.relative_to(SOURCES))


@pytest.mark.parametrize("op_folder", op_folders(), ids=lambda p: p.name)
def test_every_op_folder_has_kernels(op_folder):
    assert list(op_folder.glob("*.cu")), f"ops/{op_folder.name} has op.py but no .cu kernels"


@pytest.mark.parametrize("path", cu_files(), ids=relative)
def test_source_follows_the_convention(path):
    assert convention_problems(path) == [], f"{relative(path)}: " + "; ".join(convention_problems(path))


@pytest.mark.parametrize("path", cu_files(), ids=relative)
def test_source_compiles_for_sm80_and_sm90a(nvcc, path, tmp_path):
    entries = compile_entries(nvcc, path, tmp_path / "kernel.o")
    for arch in ARCHS:
        assert entries[arch], f"{relative(path)}: nvcc compiled no kernel for {arch} {NO_BLOCK}"


@pytest.mark.parametrize("path", cu_files(), ids=relative)
def test_source_compiles_with_nvrtc(nvrtc, path):
    entries = nvrtc_entries(nvrtc, path)
    for arch in ARCHS:
        assert entries[arch], f"{relative(path)}: NVRTC compiled no kernel for {arch} {NO_BLOCK}"


# --- the check itself, on files written here ---------------------------------------------------------------

KERNEL = """#include "panther_cuda/common.cuh"
namespace panther {
template <typename T, int N>
__global__ void scale(const T* __restrict__ x, float* __restrict__ y, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = to_float(x[i]) * N;
}
template <typename T>
__global__ void mma_tile(const T* __restrict__ a, const T* __restrict__ b, float* __restrict__ d) {
    const int lane = threadIdx.x & 31;
    unsigned fa[4], fb[2];
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    load_a<T>(fa, [&](int r, int c) { return a[r * Mma<T>::K + c]; }, lane);
    load_b<T>(fb, [&](int r, int c) { return b[r * 8 + c]; }, lane);
    Mma<T>::run(acc, fa, fb);
    for (int i = 0; i < 4; ++i) d[acc_row(lane, i) * 8 + acc_col(lane, i)] = acc[i];
}
}  // namespace panther
"""
INSTANTIATIONS = """
#ifdef PANTHER_NVCC_CHECK
template __global__ void panther::scale<float, 2>(const float* __restrict__, float* __restrict__, long long);
template __global__ void panther::mma_tile<float>(const float* __restrict__, const float* __restrict__,
                                                  float* __restrict__);
template __global__ void panther::mma_tile<__half>(const __half* __restrict__, const __half* __restrict__,
                                                   float* __restrict__);
template __global__ void panther::mma_tile<__nv_bfloat16>(const __nv_bfloat16* __restrict__,
                                                          const __nv_bfloat16* __restrict__, float* __restrict__);
#endif  // PANTHER_NVCC_CHECK
"""


def test_convention_is_enforced(tmp_path):
    good = tmp_path / "good.cu"
    good.write_text(KERNEL + INSTANTIATIONS)
    assert convention_problems(good) == []
    missing = tmp_path / "missing.cu"
    missing.write_text(KERNEL)
    assert any("does not end with" in p for p in convention_problems(missing))
    empty = tmp_path / "empty.cu"
    empty.write_text(KERNEL + f"#ifdef {GUARD}\n#endif\n")
    assert any("instantiates nothing" in p for p in convention_problems(empty))
    not_last = tmp_path / "not_last.cu"
    not_last.write_text(INSTANTIATIONS + KERNEL)
    assert any("does not end with" in p for p in convention_problems(not_last))
    host = tmp_path / "host.cu"
    host.write_text("#include <cstdint>\n" + KERNEL + INSTANTIATIONS)
    assert any("<cstdint>" in p for p in convention_problems(host))


def test_common_header_compiles_and_instantiations_reach_nvcc(nvcc, tmp_path):
    """The shared header's MMA of every dtype compiles for both targets; without the guard nothing does."""
    path = tmp_path / "probe.cu"
    path.write_text(KERNEL + INSTANTIATIONS)
    entries = compile_entries(nvcc, path, tmp_path / "probe.o")
    for arch in ARCHS:
        assert len(entries[arch]) == 4, entries
    bare = tmp_path / "bare.cu"
    bare.write_text(KERNEL)
    assert compile_entries(nvcc, bare, tmp_path / "bare.o") == {arch: [] for arch in ARCHS}


def test_nvrtc_check_compiles_what_the_runtime_would(nvrtc, tmp_path):
    """NVRTC takes the shared header and a header beside the .cu (through the source folder's -I), and
    refuses what nvcc would let pass: a host-only header."""
    (tmp_path / "tile.cuh").write_text("#pragma once\nnamespace panther { constexpr int TILE = 2; }\n")
    probe = tmp_path / "probe.cu"
    probe.write_text('#include "tile.cuh"\n' + KERNEL + INSTANTIATIONS)
    entries = nvrtc_entries(nvrtc, probe)
    assert all(len(entries[arch]) == 4 for arch in ARCHS), entries
    host = tmp_path / "host.cu"
    host.write_text("#include <cstdio>\n" + KERNEL + INSTANTIATIONS)
    with pytest.raises(AssertionError, match=r"(?s)does not compile with NVRTC.*cstdio"):
        nvrtc_entries(nvrtc, host)


def quoted_includes(path: Path) -> set:
    """The files ``path`` includes with quotes from its own folder, transitively."""
    found, todo = set(), [path]
    while todo:
        for name in re.findall(r'^\s*#\s*include\s*"([^"]+)"', todo.pop().read_text(), re.M):
            header = path.parent / name
            if header.exists() and name not in found:
                found.add(name)
                todo.append(header)
    return found


@pytest.mark.parametrize("path", [p for p in cu_files() if "wgmma.cuh" in quoted_includes(p)], ids=relative)
def test_sm90a_sources_compile_to_wgmma_under_cupys_arch(nvrtc, path):
    """CuPy appends the device's own -arch (compute_90 / sm_90 on an H100 or H200) after the package's
    -arch=sm_90a: the kernels must still get sm_90a's features (wgmma in the PTX), never their trap; with
    another architecture winning, PANTHER_REQUIRE_SM90A makes the compile fail instead."""
    from panther_cuda._nvrtc import compile_options

    options = (*compile_options("compute_90a", (f"-D{GUARD}",), path.parent), "-arch=compute_90")
    assert "-DPANTHER_REQUIRE_SM90A" in options
    assert "wgmma.mma_async" in nvrtc_ptx(nvrtc, path, options)
    with pytest.raises(AssertionError, match="without sm_90a features"):
        nvrtc_ptx(nvrtc, path, (*compile_options("compute_90a", (f"-D{GUARD}",), path.parent), "-arch=compute_100"))
