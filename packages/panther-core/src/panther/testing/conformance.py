"""Backend conformance suite: every op of a backend against the float64 naive reference.

A backend package runs it from one of its test modules::

    from panther.testing import make_conformance_suite
    TestTritonConformance = make_conformance_suite("triton", ops=("sketched_linear",),
                                                   dtypes=(torch.float32, torch.float16), device="cpu")

Each test draws shapes with hypothesis (ragged sizes, one row, 3-D inputs are always among the examples),
draws fresh random inputs, runs the op on the backend in the given dtype, and compares the output and the
gradients of every differentiable input with the float64 naive reference of :mod:`panther.testing.naive`.
Example budget: ``max_examples`` per test (default 25, or the environment variable
``PANTHER_CONFORMANCE_EXAMPLES``), no deadline.

Tolerance (:func:`assert_close_to_reference`): the largest of SLACK times the error of the naive math run
in the same dtype (what plain PyTorch achieves), a per-dtype fraction of max|ref|, and, for the ops that
are sums of products (linear, conv), a few unit roundoffs of the largest root-sum-square of the terms
behind one element, which is what rounding costs where terms cancel.
"""

from __future__ import annotations

import math
import os
from typing import Dict, Iterable, Optional, Sequence

import torch

from panther.testing import naive

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
):
    """max|got - ref| <= max(SLACK · baseline_error, TOLERANCES[dtype] · max|ref|,
    ROUNDINGS · UNIT_ROUNDOFF[dtype] · magnitude).

    ``ref`` is the float64 result on the unrounded inputs; ``baseline_error`` is the error of the naive math
    computed in ``dtype`` itself (rounded inputs, low-precision products), i.e. what plain PyTorch achieves.
    ``magnitude`` is the largest root-sum-square of the terms behind one element, sqrt(Σ term²) (for ops
    that are sums of products: the math run on squared inputs): where terms cancel, max|ref| understates
    what rounding them costs, and one draw of the naive math's error can be lucky. ``unit_roundoff`` replaces
    UNIT_ROUNDOFF[dtype] (e.g. TF32_UNIT_ROUNDOFF for float32 on a GPU).
    """
    assert got is not None, f"{name}: backend returned no gradient"
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(got.detach()).all(), f"{name}: non-finite values"
    err = max_error(got, ref)
    if not math.isfinite(baseline_error):  # the naive math overflowed in this dtype: no baseline
        baseline_error = 0.0
    scale = max(ref.detach().abs().max().item() if ref.numel() else 0.0, 0.05)  # inputs are O(1)
    unit = UNIT_ROUNDOFF[dtype] if unit_roundoff is None else unit_roundoff
    bound = max(SLACK * baseline_error, TOLERANCES[dtype] * scale, ROUNDINGS * unit * magnitude)
    assert err <= bound, (
        f"{name} ({dtype}): max abs error {err:.3e} > {bound:.3e} "
        f"(naive math in {dtype}: {baseline_error:.3e}, max|ref| {scale:.3e}, rss of terms {magnitude:.3e})"
    )


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(gen, *shape, scale=1.0):
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


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


def _compare(
    op, inputs64: Dict[str, torch.Tensor], kwargs, reference, backend, dtype, device, grad_names,
    multilinear: Optional[Dict[str, float]] = None,
):
    """Run ``op`` on ``backend`` in ``dtype``; compare output and grads with the float64 reference.

    ``multilinear``: given for ops whose every output and gradient element is a sum of terms, each a
    product of input (and output gradient) elements times a constant: the reference run on squared
    inputs then gives each element's sum of squared terms, provided the constant is squared too. The dict
    says which input carries it into every term it scales ({"U1s": 1/(2L), ...}); the reference applies
    it once, the squared run multiplies that input by it once more.
    """
    import panther.ops

    inputs64 = {n: t for n, t in inputs64.items() if t is not None}
    fn = getattr(panther.ops, op)
    ref_out = reference(**inputs64, **kwargs)
    g = _randn(_generator(1234), *ref_out.shape)
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
    if multilinear is not None:
        squares = {n: t * t * multilinear.get(n, 1.0) if t.is_floating_point() else t for n, t in inputs64.items()}
        sq_out, sq_grads = _run(reference, squares, kwargs, grad_names, g * g, "cpu", torch.float64)
        mag_out, mag_grads = _largest(sq_out) ** 0.5, [_largest(t) ** 0.5 for t in sq_grads]
    else:
        mag_out, mag_grads = 0.0, [0.0] * len(grad_names)
    unit = TF32_UNIT_ROUNDOFF if (dtype == torch.float32 and torch.device(device).type == "cuda") else None
    assert_close_to_reference(f"{op} output", out, ref_out, dtype, base_out, mag_out, unit)
    for n, gg, rg, base, mag in zip(grad_names, got_grads, ref_grads, base_grads, mag_grads):
        assert_close_to_reference(f"{op} d{n}", gg, rg, dtype, base, mag, unit)


def _largest(t: torch.Tensor) -> float:
    return t.detach().abs().max().item() if t.numel() else 0.0


def _linear_case(seed, lead, I, O, L, k, bias):
    gen = _generator(seed)
    x = _randn(gen, *lead, I)
    inputs = dict(
        x=x,
        S1s=_randn(gen, L, I, k, scale=I**-0.5),
        S2s=_randn(gen, L, k, O, scale=k**-0.5),
        U1s=_randn(gen, L, k, O, scale=k**-0.5),
        U2s=_randn(gen, L, I, k, scale=I**-0.5),
        bias=_randn(gen, O) if bias else None,
    )
    return inputs


def make_conformance_suite(
    backend: str,
    ops: Sequence[str] = ("sketched_linear", "sketched_conv2d", "rfa_attention"),
    dtypes: Iterable[torch.dtype] = (torch.float64, torch.float32),
    device: str = "cpu",
    max_dim: int = 256,
    max_examples: Optional[int] = None,
):
    """A pytest test class checking ``backend``'s ``ops`` against the float64 naive references.

    Args:
        backend: registry name of the backend under test.
        ops: which ops the backend implements.
        dtypes: dtypes to test in (the reference is always float64).
        device: device of the inputs given to the backend.
        max_dim: largest feature/sequence size drawn (keep <= 256 under the Triton interpreter).
        max_examples: hypothesis examples per test (default: env PANTHER_CONFORMANCE_EXAMPLES or 25).
    """
    import pytest
    from hypothesis import HealthCheck, assume, example, given, settings
    from hypothesis import strategies as st

    budget = max_examples or int(os.environ.get("PANTHER_CONFORMANCE_EXAMPLES", "25"))
    conf = settings(
        max_examples=budget, deadline=None, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    dtypes = tuple(dtypes)
    dims = st.integers(1, max_dim)
    seeds = st.integers(0, 2**31 - 1)
    lead_shapes = st.sampled_from([(1,), (7,), (33,), (2, 5), (3, 1, 4), ()])

    class Suite:
        pass

    Suite.__name__ = Suite.__qualname__ = f"Conformance_{backend}"
    Suite.backend = backend

    if "sketched_linear" in ops:

        @pytest.mark.parametrize("dtype", dtypes, ids=str)
        @conf
        @given(seed=seeds, lead=lead_shapes, I=dims, O=dims, L=st.integers(1, 4), k=st.integers(1, 40), bias=st.booleans())
        @example(seed=0, lead=(1,), I=17, O=9, L=1, k=3, bias=True)  # one row, ragged
        @example(seed=1, lead=(2, 3), I=min(130, max_dim), O=min(70, max_dim), L=2, k=5, bias=False)  # 3-D input
        @example(seed=51, lead=(1,), I=1, O=51, L=3, k=1, bias=False)  # dx of terms that cancel (|dx| << Σ|terms|)
        def test_sketched_linear(self, dtype, seed, lead, I, O, L, k, bias):
            inputs = _linear_case(seed, lead, I, O, L, k, bias)
            grads = ["x", "S1s", "S2s"] + (["bias"] if bias else [])
            scale = {"U1s": 1 / (2 * L), "U2s": 1 / (2 * L)}  # every term has one of them: y = Σ .../(2L) + b
            _compare("sketched_linear", inputs, {}, naive.sketched_linear, backend, dtype, device, grads, scale)

        def test_sketched_linear_errors(self):
            import panther.ops

            inputs = _linear_case(0, (4,), 12, 10, 2, 3, True)
            inputs = {n: t.to(device=device, dtype=dtypes[0]) for n, t in inputs.items()}
            bad_x = torch.zeros(4, 13, device=device, dtype=dtypes[0])
            with pytest.raises(ValueError, match="in_features=12"):
                panther.ops.sketched_linear(**{**inputs, "x": bad_x}, backend=backend)
            other = torch.float64 if dtypes[0] != torch.float64 else torch.float32
            with pytest.raises(TypeError, match="S1s has dtype"):
                panther.ops.sketched_linear(**{**inputs, "S1s": inputs["S1s"].to(other)}, backend=backend)
            with pytest.raises(ValueError, match="bias must have shape"):
                panther.ops.sketched_linear(**{**inputs, "bias": inputs["bias"][:-1]}, backend=backend)
            with pytest.raises(ValueError, match="U2s must have shape"):
                panther.ops.sketched_linear(**{**inputs, "U2s": inputs["U2s"][:, :-1]}, backend=backend)

        Suite.test_sketched_linear = test_sketched_linear
        Suite.test_sketched_linear_errors = test_sketched_linear_errors

    if "sketched_conv2d" in ops:
        small = st.integers(1, 9)

        @pytest.mark.parametrize("dtype", dtypes, ids=str)
        @conf
        @given(
            seed=seeds, N=st.integers(1, 3), C=small, O=st.integers(1, 13), HW=st.tuples(st.integers(5, 17), st.integers(5, 17)),
            ks=st.tuples(st.integers(1, 4), st.integers(1, 4)), stride=st.sampled_from([1, 2, (1, 2)]),
            padding=st.sampled_from([0, 1, (2, 0), "valid", "same"]), dilation=st.sampled_from([1, 2, (2, 1)]),
            terms=st.integers(1, 3), k=st.integers(1, 6), bias=st.booleans(),
        )
        @example(seed=0, N=1, C=3, O=5, HW=(7, 9), ks=(2, 3), stride=1, padding="same", dilation=1, terms=1, k=2, bias=True)
        def test_sketched_conv2d(self, dtype, seed, N, C, O, HW, ks, stride, padding, dilation, terms, k, bias):
            if padding == "same" and stride != 1:
                stride = 1
            d2 = (dilation, dilation) if isinstance(dilation, int) else dilation
            p2 = {"valid": (0, 0), "same": (ks[0], ks[1])}.get(padding, padding)
            p2 = (p2, p2) if isinstance(p2, int) else p2
            assume(all(HW[a] + 2 * p2[a] >= d2[a] * (ks[a] - 1) + 1 for a in (0, 1)))  # the kernel fits
            gen = _generator(seed)
            fan_in = C * ks[0] * ks[1]
            inputs = dict(
                x=_randn(gen, N, C, *HW),
                S1s=_randn(gen, 2 * terms, k, C, *ks, scale=fan_in**-0.5),
                U1s=_randn(gen, 2 * terms, k, O, scale=k**-0.5),
                bias=_randn(gen, O) if bias else None,
            )
            kwargs = dict(stride=stride, padding=padding, dilation=dilation)
            grads = ["x", "S1s"] + (["bias"] if bias else [])
            scale = {"U1s": 1 / (2 * terms)}  # y = Σ_i U1_iᵀ conv(x, S1_i) / (2 terms) + b
            _compare("sketched_conv2d", inputs, kwargs, naive.sketched_conv2d, backend, dtype, device, grads, scale)

        def test_sketched_conv2d_errors(self):
            import panther.ops

            x = torch.zeros(1, 3, 8, 8, device=device, dtype=dtypes[0])
            S = torch.zeros(2, 2, 3, 3, 3, device=device, dtype=dtypes[0])
            U = torch.zeros(2, 2, 4, device=device, dtype=dtypes[0])
            with pytest.raises(ValueError, match="padding"):
                panther.ops.sketched_conv2d(x, S, U, padding="full", backend=backend)
            with pytest.raises(ValueError, match="stride"):
                panther.ops.sketched_conv2d(x, S, U, stride=0, backend=backend)
            with pytest.raises(ValueError, match="in_channels=3"):
                panther.ops.sketched_conv2d(x[:, :2], S, U, backend=backend)
            with pytest.raises(ValueError, match="padding='same'"):
                panther.ops.sketched_conv2d(x, S, U, stride=2, padding="same", backend=backend)

        Suite.test_sketched_conv2d = test_sketched_conv2d
        Suite.test_sketched_conv2d_errors = test_sketched_conv2d_errors

    if "rfa_attention" in ops:

        @pytest.mark.parametrize("dtype", dtypes, ids=str)
        @conf
        @given(
            seed=seeds, B=st.integers(1, 3), H=st.integers(1, 3), T=st.integers(1, max_dim), D=st.integers(1, 40),
            m=st.integers(1, 48), causal=st.booleans(), kernel=st.sampled_from(["softmax", "relu"]),
            per_head=st.booleans(), masked=st.booleans(),
        )
        @example(seed=0, B=1, H=2, T=min(200, max_dim), D=16, m=24, causal=True, kernel="softmax", per_head=True, masked=True)
        # a query row that sees no key (normaliser 0) next to ordinary rows: the chunked prefix sums must not
        # cancel the large gradient of that row against the others
        @example(seed=18572, B=2, H=2, T=min(209, max_dim), D=35, m=13, causal=True, kernel="relu", per_head=False, masked=False)
        def test_rfa_attention(self, dtype, seed, B, H, T, D, m, causal, kernel, per_head, masked):
            # relu features with few directions leave rows with a near-zero normaliser: ill-conditioned, skip
            assume(kernel == "softmax" or (m >= 8 and D >= 4))
            gen = _generator(seed)
            S = T if causal else max(1, (T * 3) // 4 + 1)
            omega = _randn(gen, *((H, m, D) if per_head else (m, D)))
            kpm = None
            if masked:
                kpm = torch.rand(B, S, generator=gen) < 0.3
                kpm[:, 0] = False  # every query keeps at least one key
            inputs = dict(q=_randn(gen, B, H, T, D), k=_randn(gen, B, H, S, D), v=_randn(gen, B, H, S, D + 1), omega=omega)
            kwargs = dict(causal=causal, kernel=kernel, key_padding_mask=kpm)
            # relu is not differentiable at 0: rounding q, k moves features across it, so the gradients of
            # q and k are compared in float64 only
            grads = ["q", "k", "v"] if kernel == "softmax" or dtype == torch.float64 else ["v"]
            _compare("rfa_attention", inputs, kwargs, naive.rfa_attention, backend, dtype, device, grads)

        def test_rfa_attention_errors(self):
            import panther.ops

            q = torch.zeros(2, 2, 5, 4, device=device, dtype=dtypes[0])
            om = torch.zeros(8, 4, device=device, dtype=dtypes[0])
            with pytest.raises(ValueError, match="key_padding_mask"):
                panther.ops.rfa_attention(q, q, q, om, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool), backend=backend)
            with pytest.raises(ValueError, match="omega"):
                panther.ops.rfa_attention(q, q, q, om[:, :3], backend=backend)
            with pytest.raises(ValueError, match="kernel"):
                panther.ops.rfa_attention(q, q, q, om, kernel="cosine", backend=backend)
            with pytest.raises(ValueError, match="causal"):
                panther.ops.rfa_attention(q, q[:, :, :3], q[:, :, :3], om, causal=True, backend=backend)

        Suite.test_rfa_attention = test_rfa_attention
        Suite.test_rfa_attention_errors = test_rfa_attention_errors

    return Suite
