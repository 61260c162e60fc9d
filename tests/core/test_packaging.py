"""Every distribution builds a wheel; only panther-randnla-core ships panther/__init__.py; the namespace
imports from installed wheels; no requirement names a stranger's distribution; the extras of
panther-randnla-nn resolve, from a local wheelhouse and offline, to the right siblings and the right CuPy."""

import base64
import hashlib
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


def test_cuda_wheel_ships_its_kernel_sources(wheels):
    """NVRTC compiles the .cu files at run time: each one, and the shared headers, must be in the wheel."""
    _, files, _ = wheels["panther-randnla-cuda"]
    src = ROOT / "packages" / "panther-cuda" / "src"
    sources = [p.relative_to(src).as_posix() for p in (*src.rglob("*.cu"), *src.rglob("*.cuh"))]
    assert "panther_cuda/include/panther_cuda/common.cuh" in sources
    missing = [s for s in sources if s not in files]
    assert not missing, f"the panther-randnla-cuda wheel lacks {missing}"


# --- the extras, resolved offline against stub third-party wheels -----------------------------------------

# What the siblings require from the public index, as metadata-only wheels: the resolution is checked,
# nothing is downloaded and nothing importable is installed.
STUBS = {"torch": "2.13.0", "triton": "3.9.0", "numpy": "2.4.0", "cupy-cuda12x": "13.6.0", "cupy-cuda13x": "13.6.0"}


def _record_line(path: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}\n"


def stub_wheel(out: Path, name: str, version: str) -> Path:
    """A wheel that holds only the metadata of ``name`` ``version`` (the wheel format written by hand)."""
    dist = re.sub(r"[-_.]+", "_", name)
    info = f"{dist}-{version}.dist-info"
    files = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nSummary: metadata-only stub\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: panther-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(_record_line(p, t.encode()) for p, t in files.items()) + f"{info}/RECORD,,\n"
    path = out / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for p, t in {**files, f"{info}/RECORD": record}.items():
            z.writestr(p, t)
    return path


@pytest.fixture(scope="module")
def wheelhouse(wheels):
    """The folder of every Panther wheel, plus the stubs of the third-party requirements."""
    out = next(iter(wheels.values()))[0].parent
    for name, version in STUBS.items():
        stub_wheel(out, name, version)
    return out


def installed(target: Path) -> set:
    names = set()
    for meta in target.glob("*.dist-info/METADATA"):
        names.add(re.search(r"^Name: (.+)$", meta.read_text(), re.M).group(1).strip().lower().replace("_", "-"))
    return names


CORE = {"panther-randnla-nn", "panther-randnla-core", "torch"}
CUDA = {"panther-randnla-cuda", "numpy"}


@pytest.mark.parametrize(
    "extra, expected",
    [
        ("triton", CORE | {"panther-randnla-triton", "triton"}),
        ("cuda", CORE | CUDA | {"cupy-cuda12x"}),
        ("cuda13", CORE | CUDA | {"cupy-cuda13x"}),
        ("all", CORE | CUDA | {"panther-randnla-triton", "triton", "cupy-cuda12x"}),
    ],
)
def test_extras_resolve_to_the_siblings_and_one_cupy(wheelhouse, tmp_path, extra, expected):
    """pip resolves panther-randnla-nn[extra] from the wheelhouse alone (--no-index): exactly these
    distributions, the CuPy of the extra's CUDA major version and never both CuPy wheels."""
    target = tmp_path / "site"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheelhouse),
           "--only-binary", ":all:", "--no-cache-dir", "--disable-pip-version-check", "--target", str(target),
           f"panther-randnla-nn[{extra}]"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    got = installed(target)
    assert got == expected, f"[{extra}] installed {sorted(got)}, expected {sorted(expected)}"
    assert not {"cupy-cuda12x", "cupy-cuda13x"} <= got
