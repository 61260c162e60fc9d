"""The `gpu` marker: skip without CUDA, fail under PANTHER_REQUIRE_GPU=1 (checked in a subprocess)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
@pytest.mark.parametrize("require,expect", [("0", "1 skipped"), ("1", "1 error")])
def test_gpu_marker_skips_or_fails_without_cuda(tmp_path, require, expect):
    (tmp_path / "test_probe.py").write_text("import pytest\n\n@pytest.mark.gpu\ndef test_probe():\n    pass\n")
    env = {**os.environ, "PANTHER_REQUIRE_GPU": require, "PYTHONPATH": str(ROOT)}
    # load the repository's conftest.py as a plugin, with the repository's pytest settings
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest", "-c", str(ROOT / "tox.ini"),
           str(tmp_path / "test_probe.py")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert expect in out.stdout, out.stdout + out.stderr
