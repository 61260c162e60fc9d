"""benchmarks/autotune_check.py end to end on the CPU: every case kind of a preset runs through it, the layer
cases (whose inputs hold modules) included, and each comparison is recorded without an error."""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_the_check_runs_the_layer_and_op_cases_of_the_cpu_preset(tmp_path):
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "autotune_check.py"), "--preset", "cpu", "--modes", "fp32",
         "--filter", "rfa_attention_layer", "--filter", "sketched_linear T=128 1024->1024 L=1 k=64",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (out,) = tmp_path.glob("*_autotune*.json")
    results = json.loads(out.read_text())["results"]
    assert {(x["op"], x["pass"]) for x in results} == {
        (op, p) for op in ("rfa_attention_layer", "sketched_linear") for p in ("fwd", "fwd+bwd")
    }
    for x in results:
        assert "error" not in x and not x.get("errors"), x
        assert x["auto_backend"] == "torch" and x["backends_ms"]["torch"] > 0  # one backend on the CPU
