"""Every distribution builds a wheel; only panther-randnla-core ships panther/__init__.py; the namespace
imports from installed wheels; no requirement names a stranger's distribution."""

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = sorted(p for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").exists())
# On the public index these names belong to unrelated projects (DESIGN.md).
FOREIGN = {"panther", "panther-core", "panther-ml", "panther-nn"}


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheels")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out)]
    subprocess.run(cmd + [str(p) for p in PACKAGES], check=True, capture_output=True)
    found = {}
    for whl in out.glob("*.whl"):
        with zipfile.ZipFile(whl) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            name = re.search(r"^Name: (.+)$", z.read(meta).decode(), re.M).group(1).strip()
            found[name] = (whl, z.namelist(), z.read(meta).decode())
    return found


def test_every_package_builds_a_wheel(wheels):
    assert {"panther-randnla-core", "panther-randnla-nn"} <= set(wheels)
    assert len(wheels) == len(PACKAGES)


def test_only_core_ships_the_namespace_init(wheels):
    for name, (_, files, _) in wheels.items():
        has_init = "panther/__init__.py" in files
        assert has_init == (name == "panther-randnla-core"), f"{name}: panther/__init__.py present={has_init}"


def test_no_requirement_names_a_foreign_distribution(wheels):
    for name, (_, _, meta) in wheels.items():
        for req in re.findall(r"^Requires-Dist: ([A-Za-z0-9_.\-]+)", meta, re.M):
            assert req.lower().replace("_", "-") not in FOREIGN, f"{name} requires {req}"
    tox = (ROOT / "tox.ini").read_text()
    for bare in FOREIGN:
        assert not re.search(rf"^\s*{re.escape(bare)}\s*([=<>!~\[]|$)", tox, re.M), f"tox.ini names {bare}"


def test_namespace_imports_from_wheels(wheels, tmp_path):
    target = tmp_path / "site"
    paths = [str(wheels[n][0]) for n in ("panther-randnla-core", "panther-randnla-nn")]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), *paths], check=True)
    code = "import panther, panther.nn; print(panther.__file__); print(panther.nn.__file__)"
    # -S drops site-packages' editable finders so the wheel copies are what imports
    env = {"PYTHONPATH": f"{target}:{':'.join(p for p in sys.path if 'site-packages' in p)}"}
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    core_file, nn_file = out.stdout.split()
    assert core_file.startswith(str(target)) and nn_file.startswith(str(target)), out.stdout
