"""Backend conformance suite: every op of a backend against the float64 naive reference.

A backend package runs it from one of its test modules::

    from panther.testing import make_conformance_suite
    TestTritonConformance = make_conformance_suite("triton", ops=("sketched_linear",),
                                                   dtypes=(torch.float32, torch.float16), device="cpu")

The suite is a table with one :class:`OpSpec` per op (the rows live in :mod:`panther.testing.specs`, one
module per op). A row says how to test its op: the hypothesis strategies of the op's parameters and its
explicit regression examples, the generator of float64 inputs from a seed and those parameters, the
float64 reference of :mod:`panther.testing.naive`, which inputs get gradients, the tolerance model, which
sizes a backend may cap (:class:`Limits`), and named special cases. For each op it is asked for, the suite
makes two tests:

* ``test_<op>[dtype]`` draws parameters with hypothesis (the explicit examples always among them), builds
  fresh random inputs, runs the op on the backend in the given dtype, and compares the output and the
  gradients with the float64 reference (:func:`check_case`). Budget: ``max_examples`` per test (default
  25, or the environment variable ``PANTHER_CONFORMANCE_EXAMPLES``), no deadline.
* ``test_<op>_case[id-dtype]``, one per named special case of the row (only for rows that have some).

Tolerance (:class:`Tolerance`, :func:`assert_close_to_reference`): the largest of SLACK times the error of
the naive math run in the same dtype (what plain PyTorch achieves), a per-dtype fraction of max|ref|, and,
for the ops that are sums of products (linear, conv), a few unit roundoffs of the largest root-sum-square
of the terms behind one element, which is what rounding costs where terms cancel.

float32 on a GPU: by default torch's settings stay as they are and TF32 rounding is admitted. A backend
with an exact float32 path and a TF32 one tests each in its own suite, ``float32_precision="highest"``
and ``"high"``: every test then runs under that ``torch.set_float32_matmul_precision`` (cuDNN's TF32
switch set to match), and ``"highest"`` is judged with float32's unit roundoff.

Argument checking is not part of the suite: ``panther.ops`` checks arguments before any backend runs, so
those tests live with the ops (tests/core/test_op_errors.py).

Writing a backend
-----------------
1. Subclass :class:`panther.Backend`; implement any of the ops with the positional signatures of
   :data:`panther.backends.OPS` and say in ``reasons_cannot_run`` which inputs it refuses.
2. Register the class under the entry-point group ``panther.backends`` in the distribution's metadata::

       [project.entry-points."panther.backends"]
       mybackend = "my_package:MyBackend"

3. From a test module, run the suite on the ops it implements, in the dtypes and on the device it runs::

       TestMyBackend = make_conformance_suite("mybackend", ops=("sketched_linear",),
                                              dtypes=(torch.float32,), device="cuda")

   ``max_dim`` caps the sizes drawn (e.g. under a slow interpreter). tests/plugins/reference64 is a complete
   example: a backend that computes every op with the float64 references.

Adding an op: write its naive reference, then one module under :mod:`panther.testing.specs` that builds
its :class:`OpSpec` and calls :func:`register_spec` (imported by ``specs/__init__.py``); every backend that
lists the op in ``ops`` is then tested on it. A special case of an existing op is one :class:`NamedCase`
in its row's ``cases``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

# Floor of the tolerance on max|out - ref| relative to max|ref|, per dtype (fp32 admits TF32 inputs).
TOLERANCES: Dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 2e-3,
    torch.float16: 4e-3,
    torch.bfloat16: 2e-2,
}
# A backend may be this many times less accurate than the naive math evaluated in the same dtype.
SLACK = 4.0
# Unit roundoff of each dtype, and how many of them (times the root-sum-square of the terms behind one
# element: the typical size of accumulated rounding errors) an op may be off by. Float32 products on a GPU
# may run in TF32 (10 stored mantissa bits): there the float32 entry is TF32_UNIT_ROUNDOFF.
TF32_UNIT_ROUNDOFF = 2.0**-11
UNIT_ROUNDOFF: Dict[torch.dtype, float] = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}
ROUNDINGS = 4.0


# --- the table's row types ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One call of an op: the float64 inputs by argument name (cast to the dtype under test; ``None``: an
    optional input left out) and the keyword arguments passed as they are (flags, sizes, bool masks;
    tensors among them are moved to the device)."""

    inputs: Mapping[str, Optional[torch.Tensor]]
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # size of the smallest inputs: the tolerance treats results below 0.05 · size as that small (the drawn
    # inputs are O(1); a case of tiny inputs says so, or its results would be checked far too loosely)
    size: float = 1.0


@dataclasses.dataclass(frozen=True)
class NamedCase:
    """An explicit case a row carries beside its drawn ones, tested as ``test_<op>_case[id-dtype]``.

    ``build`` returns the :class:`Case`; ``dtypes``, if given, are the only dtypes of the suite it runs in
    (e.g. a huge input scale that float16 cannot represent).
    """

    id: str
    build: Callable[[], Case]
    dtypes: Optional[Tuple[torch.dtype, ...]] = None


@dataclasses.dataclass(frozen=True)
class Limits:
    """What a backend under test declares it does not cover; each row reads the limits that apply to it.

    ``max_dim``: the largest feature/sequence size drawn (e.g. 256 under the Triton interpreter, where
    large cases are slow). Rows document which of their sizes it caps.
    """

    max_dim: int = 256


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """max|got - ref| <= max(slack · baseline, floor[dtype] · max|ref|, roundings · u · rss of terms).

    ``baseline`` is the error of the naive math run in the dtype under test; ``u`` the dtype's unit
    roundoff (TF32's for float32 on a GPU). ``term_scales`` is given for ops whose every output and
    gradient element is a sum of terms, each a product of input (and output-gradient) elements times a
    constant: the reference run on squared inputs then gives each element's sum of squared terms, provided
    the constant is squared too. It maps the float64 inputs of a case to the constant each input carries
    into every term it scales ({"U1s": 1/(2L), ...}): the reference applies it once, the squared run
    multiplies that input by it once more. ``None``: no root-sum-square term.
    """

    slack: float = SLACK
    floor: Mapping[torch.dtype, float] = dataclasses.field(default_factory=lambda: TOLERANCES)
    roundings: float = ROUNDINGS
    term_scales: Optional[Callable[[Mapping[str, torch.Tensor]], Dict[str, float]]] = None


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """One row of the suite: how to test the op ``panther.ops.<op>``.

    Attributes:
        op: name of the op in :mod:`panther.ops` and of the backend method.
        params: ``params(limits)`` -> hypothesis strategies of the op's parameters, by name.
        examples: ``examples(limits)`` -> explicit parameter dicts (``seed`` included) always tested:
            regressions and the shapes that must never be left to chance.
        make_case: ``make_case(seed, **params)`` -> the :class:`Case`, or ``None`` to reject the draw.
        reference: the float64 reference, called with the case's inputs and kwargs as keywords.
        grads: the inputs whose gradients are compared (those a case leaves out are skipped).
        float64_only_grads: ``float64_only_grads(kwargs)`` -> those of ``grads`` compared in float64 only
            (where the op has kinks that rounding the inputs moves them across).
        tolerance: the :class:`Tolerance` model of the op.
        cases: named special cases (:class:`NamedCase`), tested besides the drawn ones.
    """

    op: str
    params: Callable[[Limits], Dict[str, Any]]
    examples: Callable[[Limits], Sequence[Dict[str, Any]]]
    make_case: Callable[..., Optional[Case]]
    reference: Callable[..., torch.Tensor]
    grads: Tuple[str, ...]
    float64_only_grads: Callable[[Mapping[str, Any]], Tuple[str, ...]] = lambda kwargs: ()
    tolerance: Tolerance = Tolerance()
    cases: Tuple[NamedCase, ...] = ()

    def grad_names(self, case: Case, dtype: torch.dtype) -> List[str]:
        """The inputs of ``case`` whose gradients are compared in ``dtype``."""
        rough = () if dtype == torch.float64 else self.float64_only_grads(case.kwargs)
        return [n for n in self.grads if case.inputs.get(n) is not None and n not in rough]


SPECS: Dict[str, OpSpec] = {}  # the table, by op name; filled by panther.testing.specs


def register_spec(spec: OpSpec) -> OpSpec:
    """Add a row to the table (an op may have one row)."""
    if spec.op in SPECS:
        raise ValueError(f"the conformance suite already has a spec for {spec.op!r}")
    SPECS[spec.op] = spec
    return spec


# --- comparison --------------------------------------------------------------------------------------------


def max_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    got = got.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    return (got - ref).abs().max().item() if ref.numel() else 0.0


def assert_close_to_reference(
    name: str,
    got,
    ref: torch.Tensor,
    dtype: torch.dtype,
    baseline_error: float = 0.0,
    magnitude: float = 0.0,
    unit_roundoff: Optional[float] = None,
    tolerance: Tolerance = Tolerance(),
    size: float = 1.0,
):
    """max|got - ref| <= max(slack · baseline_error, floor[dtype] · max|ref|,
    roundings · UNIT_ROUNDOFF[dtype] · magnitude), with the constants of ``tolerance`` (by default SLACK,
    TOLERANCES and ROUNDINGS).

    ``ref`` is the float64 result on the unrounded inputs; ``baseline_error`` is the error of the naive math
    computed in ``dtype`` itself (rounded inputs, low-precision products), i.e. what plain PyTorch achieves.
    ``magnitude`` is the largest root-sum-square of the terms behind one element, sqrt(Σ term²) (for ops
    that are sums of products: the math run on squared inputs): where terms cancel, max|ref| understates
    what rounding them costs, and one draw of the naive math's error can be lucky. ``unit_roundoff`` replaces
    UNIT_ROUNDOFF[dtype] (e.g. TF32_UNIT_ROUNDOFF for float32 on a GPU). ``size``: the size of the inputs
    (:attr:`Case.size`); max|ref| counts as at least 0.05 · size.
    """
    assert got is not None, f"{name}: backend returned no gradient"
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(got.detach()).all(), f"{name}: non-finite values"
    err = max_error(got, ref)
    if not math.isfinite(baseline_error):  # the naive math overflowed in this dtype: no baseline
        baseline_error = 0.0
    scale = max(_largest(ref), 0.05 * size)
    unit = UNIT_ROUNDOFF[dtype] if unit_roundoff is None else unit_roundoff
    t = tolerance
    bound = max(t.slack * baseline_error, t.floor[dtype] * scale, t.roundings * unit * magnitude)
    assert err <= bound, (
        f"{name} ({dtype}): max abs error {err:.3e} > {bound:.3e} "
        f"(naive math in {dtype}: {baseline_error:.3e}, max|ref| {scale:.3e}, rss of terms {magnitude:.3e})"
    )


def _largest(t: torch.Tensor) -> float:
    return t.detach().abs().max().item() if t.numel() else 0.0


def _run(fn, inputs, kwargs, grad_names, g, device, dtype):
    """Output and grads of ``fn`` on ``inputs`` cast to ``dtype`` on ``device``."""
    xs = {
        n: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype).requires_grad_(n in grad_names)
        for n, t in inputs.items()
    }
    kw = {n: (t.to(device) if isinstance(t, torch.Tensor) else t) for n, t in kwargs.items()}
    out = fn(**xs, **kw)
    grads = torch.autograd.grad(out, [xs[n] for n in grad_names], g.to(device=device, dtype=dtype))
    return out, grads


FLOAT32_PRECISIONS = ("highest", "high", "medium")  # the values of torch.set_float32_matmul_precision


def _check_precision(precision: Optional[str]) -> None:
    if precision is not None and precision not in FLOAT32_PRECISIONS:
        raise ValueError(f"float32_precision must be one of {FLOAT32_PRECISIONS} or None, got {precision!r}")


@contextlib.contextmanager
def using_float32_precision(precision: Optional[str]):
    """Run the block under ``torch.set_float32_matmul_precision(precision)``, with cuDNN's TF32 switch
    matching it (``"highest"``: exact float32 products; ``"high"`` / ``"medium"``: TF32 allowed in
    matmuls and convolutions); both restored afterwards. ``None``: leave torch's settings as they are."""
    _check_precision(precision)
    if precision is None:
        yield
        return
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision(precision)
    torch.backends.cudnn.allow_tf32 = precision != "highest"
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


def check_case(
    spec: OpSpec, case: Case, backend: str, dtype: torch.dtype, device: str = "cpu",
    float32_precision: Optional[str] = None,
) -> None:
    """Run ``spec.op`` on ``backend`` in ``dtype`` on ``device``; assert that its output and the gradients
    of ``spec.grad_names`` are close to the float64 reference (:class:`Tolerance`).

    ``float32_precision``: run the backend and the naive baseline under this float32 matmul precision
    (:func:`using_float32_precision`). On a GPU, float32 is then judged with float32's unit roundoff for
    ``"highest"`` and TF32's otherwise; ``None`` keeps torch's settings and admits TF32 on a GPU.
    """
    with using_float32_precision(float32_precision):
        _check_case(spec, case, backend, dtype, device, float32_precision)


def _check_case(spec, case, backend, dtype, device, precision):
    import panther.ops

    op, reference, tol = spec.op, spec.reference, spec.tolerance
    grad_names = spec.grad_names(case, dtype)
    inputs64 = {n: t for n, t in case.inputs.items() if t is not None}
    kwargs = dict(case.kwargs)
    fn = getattr(panther.ops, op)
    g = torch.randn(*reference(**inputs64, **kwargs).shape, generator=generator(1234), dtype=torch.float64)
    ref_out, ref_grads = _run(reference, inputs64, kwargs, grad_names, g, "cpu", torch.float64)
    out, got_grads = _run(lambda **a: fn(**a, backend=backend), inputs64, kwargs, grad_names, g, device, dtype)
    assert out.dtype == dtype, f"{op}: output dtype {out.dtype} != input dtype {dtype}"
    assert out.device.type == torch.device(device).type, f"{op}: output on {out.device}, inputs on {device}"
    if dtype == torch.float64:
        base_out, base_grads = 0.0, [0.0] * len(grad_names)
    else:
        lp_out, lp_grads = _run(reference, inputs64, kwargs, grad_names, g, device, dtype)
        base_out = max_error(lp_out, ref_out)
        base_grads = [max_error(a, b) for a, b in zip(lp_grads, ref_grads)]
    if tol.term_scales is not None:
        scales = tol.term_scales(inputs64)
        squares = {n: t * t * scales.get(n, 1.0) if t.is_floating_point() else t for n, t in inputs64.items()}
        sq_out, sq_grads = _run(reference, squares, kwargs, grad_names, g * g, "cpu", torch.float64)
        mag_out, mag_grads = _largest(sq_out) ** 0.5, [_largest(t) ** 0.5 for t in sq_grads]
    else:
        mag_out, mag_grads = 0.0, [0.0] * len(grad_names)
    tf32 = precision != "highest"  # None: whatever torch's settings allow, TF32 included
    unit = TF32_UNIT_ROUNDOFF if (dtype == torch.float32 and torch.device(device).type == "cuda" and tf32) else None
    assert_close_to_reference(f"{op} output", out, ref_out, dtype, base_out, mag_out, unit, tol, case.size)
    for n, gg, rg, base, mag in zip(grad_names, got_grads, ref_grads, base_grads, mag_grads):
        assert_close_to_reference(f"{op} d{n}", gg, rg, dtype, base, mag, unit, tol, case.size)


# --- input helpers for the rows ----------------------------------------------------------------------------


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(gen: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    """float64 N(0, scale²) from ``gen`` (on the CPU: the same draws on every machine)."""
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


# --- the suite ---------------------------------------------------------------------------------------------


def make_conformance_suite(
    backend: str,
    ops: Sequence[str] = ("sketched_linear", "sketched_conv2d", "rfa_attention"),
    dtypes: Iterable[torch.dtype] = (torch.float64, torch.float32),
    device: str = "cpu",
    max_dim: int = 256,
    max_examples: Optional[int] = None,
    float32_precision: Optional[str] = None,
):
    """A pytest test class checking ``backend``'s ``ops`` against the float64 naive references.

    Args:
        backend: registry name of the backend under test.
        ops: which ops the backend implements (each must have a row in :data:`SPECS`).
        dtypes: dtypes to test in (the reference is always float64).
        device: device of the inputs given to the backend.
        max_dim: largest feature/sequence size drawn (keep <= 256 under the Triton interpreter).
        max_examples: hypothesis examples per test (default: env PANTHER_CONFORMANCE_EXAMPLES or 25).
        float32_precision: ``torch.set_float32_matmul_precision`` value every test runs under (cuDNN's
            TF32 switch set to match): ``"highest"`` tests a backend's exact float32 path, ``"high"`` its
            TF32 path; ``None`` (default) leaves torch's settings alone. Make one suite per precision to
            test both paths.
    """
    _check_precision(float32_precision)  # an unknown value fails here, not in every test
    from hypothesis import HealthCheck, settings

    unknown = [op for op in ops if op not in SPECS]
    if unknown:
        raise ValueError(f"ops {unknown} have no conformance spec; known ops: {sorted(SPECS)}")
    budget = max_examples or int(os.environ.get("PANTHER_CONFORMANCE_EXAMPLES", "25"))
    conf = settings(
        max_examples=budget, deadline=None, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    dtypes, limits = tuple(dtypes), Limits(max_dim=max_dim)

    suite = type(f"Conformance_{backend}", (), {"backend": backend})
    for op in ops:
        spec = SPECS[op]
        setattr(suite, f"test_{op}", _drawn_test(spec, backend, dtypes, device, limits, conf, float32_precision))
        if spec.cases:
            setattr(suite, f"test_{op}_case", _named_test(spec, backend, dtypes, device, float32_precision))
    return suite


def _drawn_test(spec: OpSpec, backend, dtypes, device, limits: Limits, conf, precision=None):
    """``test_<op>[dtype]``: hypothesis draws the row's parameters (its examples first)."""
    import pytest
    from hypothesis import assume, example, given
    from hypothesis import strategies as st

    def test(self, dtype, seed, **params):
        case = spec.make_case(seed, **params)
        assume(case is not None)
        check_case(spec, case, backend, dtype, device, precision)

    test.__name__ = f"test_{spec.op}"
    for params in spec.examples(limits):
        test = example(**params)(test)
    test = given(seed=st.integers(0, 2**31 - 1), **spec.params(limits))(test)
    return pytest.mark.parametrize("dtype", dtypes, ids=str)(conf(test))


def _named_test(spec: OpSpec, backend, dtypes, device, precision=None):
    """``test_<op>_case[id-dtype]``: the row's named special cases."""
    import pytest

    runs = [
        pytest.param(c, dtype, id=f"{c.id}-{dtype}")
        for c in spec.cases for dtype in dtypes if c.dtypes is None or dtype in c.dtypes
    ]

    @pytest.mark.parametrize("named, dtype", runs)
    def test(self, named, dtype):
        check_case(spec, named.build(), backend, dtype, device, precision)

    test.__name__ = f"test_{spec.op}_case"
    return test
