"""The `multigpu` marker: skip with fewer than two GPUs, fail under PANTHER_REQUIRE_GPU=1 (in a subprocess)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="checks the behaviour with fewer than two GPUs")
@pytest.mark.parametrize("require,expect", [("0", "1 skipped"), ("1", "1 error")])
def test_multigpu_marker_skips_or_fails_with_fewer_than_two(tmp_path, require, expect):
    (tmp_path / "test_probe.py").write_text("import pytest\n\n@pytest.mark.multigpu\ndef test_probe():\n    pass\n")
    env = {**os.environ, "PANTHER_REQUIRE_GPU": require, "PYTHONPATH": str(ROOT)}
    # load the repository's conftest.py as a plugin, with the repository's pytest settings (strict about markers)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
           "-c", str(ROOT / "tox.ini"), "--strict-markers", str(tmp_path / "test_probe.py")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert expect in out.stdout, out.stdout + out.stderr
    if require == "1":
        assert "needs at least two CUDA GPUs" in out.stdout, out.stdout
