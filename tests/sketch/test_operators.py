"""Construction, structure, determinism, errors and the factory of panther.sketch operators."""

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import panther.sketch as ps
from panther.sketch import (
    SKETCH_KINDS,
    CountSketch,
    GaussianSketch,
    RademacherSketch,
    SJLTSketch,
    SketchOperator,
    SRHTSketch,
    apply_sketch,
    make_sketch,
)

CLASSES = {
    "gaussian": GaussianSketch,
    "rademacher": RademacherSketch,
    "srht": SRHTSketch,
    "sjlt": SJLTSketch,
    "countsketch": CountSketch,
}


def sylvester_hadamard(n):
    """H_1 = [1], H_2m = [[H, H], [H, -H]]: built independently of the library's bit formula."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


# -- construction and structure -------------------------------------------------------------------


def test_kinds_and_exports():
    assert set(SKETCH_KINDS) == set(CLASSES)
    for name in ps.__all__:
        assert hasattr(ps, name), name


@pytest.mark.parametrize("kind", SKETCH_KINDS)
def test_make_sketch_builds_the_kind(kind):
    op = make_sketch(kind, 4, 10, seed=3, dtype=torch.float64)
    assert type(op) is CLASSES[kind]
    assert isinstance(op, SketchOperator)
    assert op.kind == kind
    assert op.shape == torch.Size([4, 10])
    assert (op.sketch_dim, op.input_dim, op.seed) == (4, 10, 3)
    assert op.dtype == torch.float64 and op.device == torch.device("cpu")
    dense = op.to_dense()
    assert dense.shape == (4, 10) and dense.dtype == torch.float64
    assert repr(op).startswith(f"{type(op).__name__}(sketch_dim=4, input_dim=10")
    # case-insensitive
    assert torch.equal(make_sketch(kind.upper(), 4, 10, seed=3, dtype=torch.float64).to_dense(), dense)


@pytest.mark.parametrize("kind", SKETCH_KINDS)
def test_default_dtype_is_float32(kind):
    op = make_sketch(kind, 4, 10, seed=0)
    assert op.dtype == torch.float32 and op.to_dense().dtype == torch.float32


def test_rademacher_entries():
    d = RademacherSketch(8, 50, seed=1, dtype=torch.float64).to_dense()
    assert torch.equal(d.abs(), torch.full_like(d, 1 / math.sqrt(8)))
    assert 0.3 < (d > 0).double().mean() < 0.7


@pytest.mark.parametrize("nnz", [1, 3, 8])
def test_sjlt_structure(nnz):
    d = SJLTSketch(8, 200, nnz_per_column=nnz, seed=2, dtype=torch.float64).to_dense()
    assert torch.equal((d != 0).sum(0), torch.full((200,), nnz))
    nonzero = d[d != 0]
    assert torch.allclose(nonzero.abs(), torch.full_like(nonzero, 1 / math.sqrt(nnz)), rtol=0, atol=1e-15)


def test_sjlt_default_nnz():
    assert SJLTSketch(100, 10, seed=0).nnz_per_column == 8
    assert SJLTSketch(3, 10, seed=0).nnz_per_column == 3


def test_countsketch_structure():
    d = CountSketch(5, 300, seed=4, dtype=torch.float64).to_dense()
    assert torch.equal((d != 0).sum(0), torch.ones(300, dtype=torch.long))
    assert torch.equal(d.abs().sum(0), torch.ones(300, dtype=torch.float64))


@pytest.mark.parametrize(("kind", "nnz"), [("sjlt", 3), ("countsketch", 1)])
def test_sparse_rows_are_uniform_subsets(kind, nnz):
    # Each column's set of rows must be a uniform nnz-subset of range(k). Pearson chi-square over all
    # C(k, nnz) subsets, many columns, one fixed seed; critical values chi2.ppf(0.9999, df) from scipy:
    # df=55 -> 102.78, df=7 -> 29.88.
    k, n = 8, 30000
    kw = {"nnz_per_column": nnz} if kind == "sjlt" else {}
    op = make_sketch(kind, k, n, seed=11, **kw)
    subsets = {s: i for i, s in enumerate(itertools.combinations(range(k), nnz))}
    codes = torch.tensor([subsets[tuple(sorted(r))] for r in op.rows.tolist()])
    counts = torch.bincount(codes, minlength=len(subsets)).double()
    expected = n / len(subsets)
    stat = ((counts - expected) ** 2 / expected).sum().item()
    critical = {55: 102.78, 7: 29.88}[len(subsets) - 1]
    assert stat < critical, (stat, critical)


@pytest.mark.parametrize(("k", "n"), [(8, 16), (5, 12), (1, 1), (16, 9), (3, 100)])
def test_srht_matches_its_definition(k, n):
    op = SRHTSketch(k, n, seed=5, dtype=torch.float64)
    n_pad = 1 << (n - 1).bit_length()
    assert op.padded_dim == n_pad
    h = sylvester_hadamard(n_pad) / math.sqrt(n_pad)
    d = torch.diag(op.signs)
    p = torch.eye(n_pad, dtype=torch.float64)[op.rows]
    expected = (math.sqrt(n_pad / k) * p @ h @ d)[:, :n]  # S = sqrt(n'/k) P H D, padding columns dropped
    torch.testing.assert_close(op.to_dense(), expected, rtol=0, atol=1e-14)
    assert op.rows.unique().numel() == k and bool((op.rows >= 0).all()) and bool((op.rows < n_pad).all())
    assert bool((op.signs.abs() == 1).all())


# -- determinism and generators -------------------------------------------------------------------


@pytest.mark.parametrize("kind", SKETCH_KINDS)
def test_same_seed_same_operator(kind):
    a = make_sketch(kind, 6, 20, seed=1234)
    b = make_sketch(kind, 6, 20, seed=1234)
    x = torch.randn(3, 20)
    assert torch.equal(a.to_dense(), b.to_dense())
    assert torch.equal(a.apply(x), b.apply(x))


@pytest.mark.parametrize("kind", SKETCH_KINDS)
def test_same_generator_state_same_operator(kind):
    g1, g2 = torch.Generator().manual_seed(77), torch.Generator().manual_seed(77)
    a1, b1 = make_sketch(kind, 6, 20, generator=g1), make_sketch(kind, 6, 20, generator=g2)
    assert a1.seed is None
    assert torch.equal(a1.to_dense(), b1.to_dense())
    # the generator advances: the next draw is another operator, equal across the two generators
    a2, b2 = make_sketch(kind, 6, 20, generator=g1), make_sketch(kind, 6, 20, generator=g2)
    assert torch.equal(a2.to_dense(), b2.to_dense())
    assert not torch.equal(a1.to_dense(), a2.to_dense())
    # a seed is the same as a generator freshly seeded with it
    assert torch.equal(make_sketch(kind, 6, 20, seed=77).to_dense(), a1.to_dense())


@pytest.mark.parametrize("kind", SKETCH_KINDS)
def test_different_seeds_differ(kind):
    ops = [make_sketch(kind, 6, 20, seed=s).to_dense() for s in range(5)]
    for a, b in itertools.combinations(ops, 2):
        assert not torch.equal(a, b)


@pytest.mark.parametrize("kind", SKETCH_KINDS)
def test_fresh_seed_is_random_and_recorded(kind):
    a, b = make_sketch(kind, 6, 20), make_sketch(kind, 6, 20)
    assert isinstance(a.seed, int) and a.seed != b.seed
    assert not torch.equal(a.to_dense(), b.to_dense())
    assert torch.equal(make_sketch(kind, 6, 20, seed=a.seed).to_dense(), a.to_dense())


@pytest.mark.parametrize("kind", SKETCH_KINDS)
def test_global_rng_untouched(kind):
    state = torch.get_rng_state()
    make_sketch(kind, 6, 20)
    make_sketch(kind, 6, 20, seed=3)
    make_sketch(kind, 6, 20, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("kind", SKETCH_KINDS)
def test_same_seed_across_dtypes_and_to(kind):
    a32 = make_sketch(kind, 6, 20, seed=9, dtype=torch.float32)
    a64 = make_sketch(kind, 6, 20, seed=9, dtype=torch.float64)
    torch.testing.assert_close(a32.to_dense().double(), a64.to_dense(), rtol=1e-6, atol=1e-7)
    moved = a64.to(dtype=torch.float32)
    assert moved.dtype == torch.float32 and a64.dtype == torch.float64  # .to returns a copy
    torch.testing.assert_close(moved.to_dense(), a32.to_dense(), rtol=1e-6, atol=1e-7)
    assert moved.to(device="cpu").device == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", SKETCH_KINDS)
def test_same_seed_same_operator_on_cuda(kind):
    cpu = make_sketch(kind, 16, 100, seed=21, dtype=torch.float64)
    gpu = make_sketch(kind, 16, 100, seed=21, dtype=torch.float64, device="cuda")
    assert gpu.device.type == "cuda"
    assert torch.equal(gpu.to_dense().cpu(), cpu.to_dense())
    x = torch.randn(4, 100, 3, dtype=torch.float64)
    torch.testing.assert_close(gpu.apply(x.cuda(), dim=1).cpu(), cpu.apply(x, dim=1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cpu.to(device="cuda").apply(x.cuda(), dim=1).cpu(), cpu.apply(x, dim=1))


# -- errors ---------------------------------------------------------------------------------------

CONSTRUCTION_ERRORS = [
    # (callable, exception, words that must appear in the message)
    (lambda: GaussianSketch(0, 5), ValueError, ["sketch_dim", "0"]),
    (lambda: RademacherSketch(-3, 5), ValueError, ["sketch_dim", "-3"]),
    (lambda: SJLTSketch(2.5, 5), TypeError, ["sketch_dim", "2.5"]),
    (lambda: CountSketch(True, 5), TypeError, ["sketch_dim", "True"]),
    (lambda: SRHTSketch(4, 0), ValueError, ["input_dim", "0"]),
    (lambda: GaussianSketch(4, "5"), TypeError, ["input_dim", "'5'"]),
    (lambda: SRHTSketch(17, 12), ValueError, ["sketch_dim", "17", "16", "input_dim=12"]),
    (lambda: SRHTSketch(3, 1), ValueError, ["sketch_dim", "3"]),
    (lambda: SJLTSketch(8, 5, nnz_per_column=0), ValueError, ["nnz_per_column", "0"]),
    (lambda: SJLTSketch(8, 5, nnz_per_column=9), ValueError, ["nnz_per_column", "9", "sketch_dim=8"]),
    (lambda: SJLTSketch(8, 5, nnz_per_column=1.5), TypeError, ["nnz_per_column", "1.5"]),
    (lambda: GaussianSketch(4, 5, dtype=torch.int64), TypeError, ["dtype", "torch.int64", "floating"]),
    (lambda: SRHTSketch(4, 5, dtype=torch.bool), TypeError, ["dtype", "torch.bool"]),
    (lambda: SJLTSketch(4, 5, dtype="float32"), TypeError, ["dtype", "float32"]),
    (lambda: CountSketch(4, 5, seed=1, generator=torch.Generator()), ValueError, ["seed", "generator"]),
    (lambda: GaussianSketch(4, 5, seed="1"), TypeError, ["seed", "'1'"]),
    (lambda: GaussianSketch(4, 5, seed=2**64), ValueError, ["seed", str(2**64)]),
    (lambda: RademacherSketch(4, 5, generator=1), TypeError, ["generator", "int"]),
    (lambda: make_sketch("gauss", 4, 5), ValueError, ["kind", "'gauss'", *SKETCH_KINDS]),
    (lambda: make_sketch(None, 4, 5), TypeError, ["kind", "NoneType"]),
    (lambda: GaussianSketch(4, 5, seed=0).to(dtype=torch.int32), TypeError, ["dtype", "torch.int32"]),
    (lambda: ps.fwht(torch.zeros(3, 6)), ValueError, ["x", "6", "dim"]),
    (lambda: ps.fwht(torch.zeros(4, dtype=torch.long)), TypeError, ["x", "torch.int64"]),
    (lambda: ps.hadamard_matrix(6), ValueError, ["n", "6"]),
    (lambda: ps.hadamard_matrix(True), ValueError, ["n", "True"]),
    # sizes whose tensors cannot fit are refused before anything is allocated
    (lambda: SRHTSketch(4, 10**12), ValueError,
     ["SRHTSketch(sketch_dim=4, input_dim=1000000000000", "would need 22.0 TB", "8.8 TB for the int64 random signs",
      "of memory of cpu"]),
    (lambda: SRHTSketch(4, 10**12, device="meta"), ValueError, ["would need 22.0 TB", "of memory of cpu"]),
    (lambda: GaussianSketch(10**9, 10**4), ValueError, ["GaussianSketch(sketch_dim=1000000000", "would need 80.0 TB"]),
    (lambda: RademacherSketch(10**7, 10**7), ValueError, ["would need 1.2 PB", "800.0 TB for the torch.int64 draws"]),
    (lambda: SJLTSketch(8, 10**12, nnz_per_column=2), ValueError, ["nnz_per_column=2", "would need 40.0 TB"]),
    (lambda: CountSketch(8, 10**13), ValueError, ["CountSketch(sketch_dim=8, input_dim=10000000000000)", "for rows"]),
    (lambda: ps.hadamard_matrix(2**40), ValueError, ["hadamard_matrix(n=1099511627776) would need", "EB"]),
]


@pytest.mark.parametrize(("fn", "exc", "words"), CONSTRUCTION_ERRORS)
def test_construction_errors(fn, exc, words):
    with pytest.raises(exc) as info:
        fn()
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def _apply_errors(op):
    x = torch.randn(3, 10)
    return [
        (lambda: op.apply(torch.randn(3, 9)), ValueError, ["x", "input_dim=10", "9", "dim=1"]),
        (lambda: op.apply(x, dim=0), ValueError, ["x", "input_dim=10", "dim=0", "3"]),
        (lambda: op.apply(x, dim=2), IndexError, ["dim", "2"]),
        (lambda: op.apply(x, dim=-3), IndexError, ["dim", "-3"]),
        (lambda: op.apply(x, dim=1.0), TypeError, ["dim", "1.0"]),
        (lambda: op.apply(x, dim=True), TypeError, ["dim", "True", "bool"]),
        (lambda: op.apply(torch.ones(3, 10, dtype=torch.long)), TypeError, ["x", "torch.int64"]),
        (lambda: op.apply(x.double()), TypeError, ["x", "dtype", "torch.float64", "torch.float32"]),
        (lambda: op.apply(torch.tensor(1.0)), ValueError, ["x", "0-dimensional"]),
        (lambda: op.apply([1.0] * 10), TypeError, ["x", "list"]),
        (lambda: apply_sketch("srht", x), TypeError, ["op", "str"]),
    ]


@pytest.mark.parametrize("kind", SKETCH_KINDS)
def test_apply_errors(kind):
    op = make_sketch(kind, 4, 10, seed=0)
    for fn, exc, words in _apply_errors(op):
        with pytest.raises(exc) as info:
            fn()
        for word in words:
            assert word in str(info.value), (word, str(info.value))


def test_numpy_integer_sizes_are_accepted():
    import numpy as np

    for kind in SKETCH_KINDS:
        a, b = make_sketch(kind, np.int64(8), np.int32(20), seed=3), make_sketch(kind, 8, 20, seed=3)
        assert a.shape == (8, 20) and torch.equal(a.to_dense(), b.to_dense())
    assert torch.equal(ps.hadamard_matrix(np.int64(4)), ps.hadamard_matrix(4))


def test_matmul_with_non_tensor_is_not_supported():
    with pytest.raises(TypeError):
        GaussianSketch(2, 3, seed=0) @ [1.0, 2.0, 3.0]


# -- import cost ----------------------------------------------------------------------------------


def test_import_only_needs_torch():
    # Measures panther.sketch itself: the parent package `panther` is imported first.
    src = str(Path(ps.__file__).resolve().parents[2])
    code = (
        "import sys, torch, panther\n"
        "before = set(sys.modules)\n"
        "import panther.sketch\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "extra = sorted(new - set(sys.stdlib_module_names) - {'panther', 'torch'})\n"
        "print(extra)\n"
        "sys.exit(1 if extra else 0)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
