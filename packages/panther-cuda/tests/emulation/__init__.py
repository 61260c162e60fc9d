"""The CUDA kernels compiled for the host and run on the CPU: cuda_emulation.h emulates the CUDA features the
kernels use, harness.h is what every op's harness shares, and :func:`build_harness` compiles an op's harness
(``tests/<op>_emulation/harness.cpp``, which includes the op's ``.cu`` files) against common.cuh rewritten for
the host by :func:`emulated_common`."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
COMMON = Path(__import__("panther_cuda").__file__).resolve().parent / "include" / "panther_cuda" / "common.cuh"

EMULATED_MMA = """template <> struct Mma<bf16> { static constexpr int K = 16;
  static void run(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) { emu_mma<bf16, 16>(d, a, b); } };
template <> struct Mma<f16> { static constexpr int K = 16;
  static void run(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) { emu_mma<f16, 16>(d, a, b); } };
template <> struct Mma<float> { static constexpr int K = 8;
  static void run(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) { emu_mma<float, 8>(d, a, b); } };

"""


def emulated_common(text: str) -> str:
    """common.cuh for the host: the emulation's types, and its tf32 conversion and mma in place of the
    inline assembly; the fragment loaders and every other line as they are (cp.async and ldmatrix are
    compiled out by PANTHER_PTX_EMULATED, which cuda_emulation.h defines)."""
    text = text.replace("#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n", '#include "cuda_emulation.h"\n')
    text, n = re.subn(r"__device__ __forceinline__ unsigned to_tf32\(float v\) \{.*?\n\}\n",
                      "__device__ __forceinline__ unsigned to_tf32(float v) { return emu_to_tf32(v); }\n", text, flags=re.S)
    start, end = text.index("template <> struct Mma<bf16>"), text.index("// Fragments from tiles")
    text = text[:start] + EMULATED_MMA + text[end:]
    text = re.sub(r"#ifndef PANTHER_PTX_EMULATED\n.*?#endif  // PANTHER_PTX_EMULATED\n", "", text, flags=re.S)
    assert n == 1 and "asm" not in text, "common.cuh changed shape: update emulated_common()"
    return text


def build_harness(folder: Path, harness: Path, op_dir: Path) -> Path:
    """``harness`` compiled for the host in ``folder``, with ``op_dir`` (the op's .cu files) on the include
    path; skips without a C++20 compiler with _Float16 and <barrier>, fails when the kernels do not compile."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    probe = folder / "probe.cpp"
    probe.write_text("#include <barrier>\nint main() { _Float16 h = 1; std::barrier<> b(1); return (int)(float)h - 1; }\n")
    if subprocess.run([cxx, "-std=c++20", "-pthread", str(probe), "-o", str(folder / "probe")], capture_output=True).returncode:
        pytest.skip(f"{cxx} lacks C++20 <barrier> or _Float16")
    (folder / "panther_cuda").mkdir(exist_ok=True)
    (folder / "panther_cuda" / "common.cuh").write_text(emulated_common(COMMON.read_text()))
    exe = folder / "harness"
    cmd = [cxx, "-std=c++20", "-O1", "-pthread", "-Wno-unknown-pragmas", f"-I{folder}", f"-I{HERE}", f"-I{op_dir}",
           str(harness), "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"the kernels do not compile for the host:\n{r.stderr[-6000:]}"
    return exe
