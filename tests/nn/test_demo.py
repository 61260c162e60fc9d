"""demo/train_digits.py: runs end to end with few epochs and writes its table, JSON and plot."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo():
    for dependency in ("sklearn", "matplotlib", "tqdm"):  # the demo's own requirements (tox installs them)
        pytest.importorskip(dependency)
    spec = importlib.util.spec_from_file_location("train_digits", ROOT / "demo" / "train_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_runs_and_writes_results(demo, tmp_path, capsys):
    out = tmp_path / "out"
    status = demo.main(["--epochs", "3", "--out", str(out), "--backend", "torch"])
    printed = capsys.readouterr().out

    report = json.loads((out / "results.json").read_text())
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "table.txt").read_text().strip() in printed
    assert [r["model"] for r in report["rows"]] == ["dense MLP", "sketched MLP", "dense CNN", "sketched CNN"]
    for row in report["rows"]:
        assert row["parameters"] > 0 and 0 <= row["test_accuracy"] <= 1 and row["seconds_per_epoch"] > 0
        assert row["parameter_bytes"] == 4 * row["parameters"]
        assert row["backend"] == ("torch" if row["model"].startswith("sketched") else "- (torch.nn)")
        assert len(report["curves"][row["model"]]) == 3
        assert row["model"] in printed
    sketched = report["rows"][1]
    assert sketched["buffer_bytes"] > 0 and report["rows"][0]["buffer_bytes"] == 0
    assert sketched["parameters"] <= 0.3 * report["rows"][0]["parameters"]
    assert [c["name"] for c in report["checks"]] == ["accuracy", "parameters"]
    for check in report["checks"]:
        assert f"{'PASS' if check['passed'] else 'FAIL'}: {check['text']}" in printed
    assert status == (0 if report["passed"] else 1)
    assert report["config"]["epochs"] == 3 and report["config"]["backend"] == "torch"


def test_demo_refuses_an_unknown_backend(demo, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--epochs", "1", "--out", str(tmp_path / "x"), "--backend", "nope"])
    assert exit_info.value.code == 2
    assert "Panther backend 'nope' (--backend) is not installed" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def convert_demo(demo):
    spec = importlib.util.spec_from_file_location("convert_digits", ROOT / "demo" / "convert_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_convert_demo_runs_and_writes_results(convert_demo, tmp_path, capsys):
    out = tmp_path / "out"
    status = convert_demo.main(
        ["--epochs", "2", "--finetune-epochs", "1", "--budget", "0.3", "--out", str(out), "--backend", "torch"]
    )
    printed = capsys.readouterr().out
    assert status == 0
    report = json.loads((out / "convert_results.json").read_text())
    assert (out / "convert_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "convert_table.txt").read_text().strip() in printed
    rows = report["rows"]
    assert [(r["model"], r["init"]) for r in rows] == [
        (m, i) for m in ("MLP", "CNN") for i in ("dense", "unbiased", "optimal", "calibrated")
    ]
    for r in rows:
        assert 0 <= r["accuracy_converted"] <= 1
        if r["init"] == "dense":
            assert r["parameter_fraction"] == 1.0 and r["accuracy_finetuned"] is None
        else:
            assert r["parameter_fraction"] <= 0.3 and 0 <= r["accuracy_finetuned"] <= 1
            assert len(report["curves"][r["model"]][r["init"]]) == 2  # after conversion, then one epoch
    assert "Linear -> SKLinear" in report["reports"]["MLP calibrated"] and "calibrated" in printed
    assert report["config"]["finetune_epochs"] == 1


def test_convert_demo_refuses_a_bad_budget(convert_demo, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        convert_demo.main(["--budget", "1.5", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert "--budget must be a fraction in (0, 1), got 1.5" in capsys.readouterr().err
