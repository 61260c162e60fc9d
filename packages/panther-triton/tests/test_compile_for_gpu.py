"""The GPU code paths that can be checked on any machine, GPU or not (tools/compile_check.py).

* The interpreter runs kernel bodies as Python, so code that Triton's compiler rejects (a name bound
  to tiles of two shapes in the branches of a runtime `if`, a dot too small) or that cannot fit in
  shared memory passes there and fails only on the GPU: every kernel variant is compiled to SASS for
  sm_90 through Triton's bundled ptxas, checking shared memory, spills and (full run) wgmma use.
* On a GPU the ops are triton_ops, which the interpreter cannot trace: they are traced here as
  torch.compile's AOTAutograd does, on fake CUDA tensors, checking that they decompose into their
  kernels, that torch clones no input and never one tensor twice, and that torch finds the kernels.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "compile_check.py"


def _has_nvidia_backend() -> bool:
    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        return False
    return (Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


def _run_tool(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, str(TOOL), *args], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert " 0 problems" in out.stdout
    return out.stdout


@pytest.mark.skipif(not _has_nvidia_backend(), reason="triton without its NVIDIA backend (ptxas)")
def test_kernels_compile_for_sm90():
    _run_tool("--quick")


@pytest.mark.skipif(not _has_nvidia_backend(), reason="triton without its NVIDIA backend")
def test_triton_ops_trace_into_their_kernels():
    out = _run_tool("--trace")
    assert out.count("kernel launches") == 3
