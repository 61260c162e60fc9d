"""Property-based stress comparison of every op with its independent float64 formula.

One hypothesis test per op runs the op on the ``torch`` backend and the formula of
:mod:`panther.testing.naive` (for attention the explicit quadratic form φ(Q)φ(K)ᵀ with its masks) on the
same drawn inputs, and compares the output and the gradients:

* ``sketched_linear``, ``sketched_conv2d``: the shapes of the op's conformance row (ragged features,
  leading shapes, bias or not; stride, padding, dilation for conv), with the input x scaled by 1e-3..1e3.
* ``rfa_attention``: batch, heads, query and key lengths from 0, masks (none, random, a fully padded sample,
  leading keys), causal or not, both kernels, q and k scaled by 1e-3..10 (softmax: the documented exact
  range) or 1e-9..1e3 (relu, scale-invariant), v by 1e-3..1e3.

Environment:

* ``PANTHER_STRESS_EXAMPLES``: drawn cases per op (default 20, the CI budget).
* ``PANTHER_STRESS_DTYPE``: ``float64`` (default; errors must stay within 1e-8 relative) or ``float32``
  (each case must pass the conformance suite's tolerance model, :func:`panther.testing.check_case`, which
  compares the relu kernel's dq, dk and no domega in float64 only: rounding moves q, k across its kinks).
* ``PANTHER_STRESS_SEED``: hypothesis seed (default 20261204), so that a run can be repeated.
* ``PANTHER_STRESS_SUMMARY``: a file that receives, as JSON, the number of cases and the worst relative
  error of each op's output and gradients (attention: per kernel) with the case that produced it
  (rewritten after every case).
"""

import json
import os

import torch
from hypothesis import HealthCheck, assume, given, seed, settings
from hypothesis import strategies as st

import panther.ops
from panther.testing import SPECS, Case, Limits, check_case, naive

EXAMPLES = int(os.environ.get("PANTHER_STRESS_EXAMPLES", "20"))
DTYPE = getattr(torch, os.environ.get("PANTHER_STRESS_DTYPE", "float64"))
SEED = int(os.environ.get("PANTHER_STRESS_SEED", "20261204"))
F64 = torch.float64
# float64: the op and the formula are two evaluations of the same math; they may differ by rounding only
RTOL64 = 1e-8
# A quantity's relative error is floored at this fraction of its natural size (where its exact value is 0,
# e.g. dk with one visible key, both evaluations give rounding noise of that size)
FLOOR = {torch.float64: 1e-6, torch.float32: 1e-3}[DTYPE]

STRESS = settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))


# --- the shared summary --------------------------------------------------------------------------------------

_summary = {}


def record(op, errs, case):
    """Count the case of ``op`` and keep the worst relative error of each quantity; write the summary."""
    entry = _summary.setdefault(op, {"cases": 0, "worst": {}})
    entry["cases"] += 1
    for name, err in errs.items():
        if err >= entry["worst"].get(name, {"max_rel_error": -1.0})["max_rel_error"]:
            entry["worst"][name] = {"max_rel_error": err, "case": case}
    path = os.environ.get("PANTHER_STRESS_SUMMARY")
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"examples_per_op": EXAMPLES, "dtype": str(DTYPE), "hypothesis_seed": SEED,
                       "torch": torch.__version__, "ops": _summary}, f, indent=1, sort_keys=True, default=str)


def largest(t):
    return t.detach().abs().max().item() if t.numel() else 0.0


def rel_error(got, ref, floor=0.0):
    """max|got - ref| relative to max(max|ref|, floor); ``floor`` is the size rounding is measured against
    where the exact value is 0 (e.g. a gradient that vanishes because a row sees one key)."""
    err = (got.detach().double() - ref).abs().max().item() if ref.numel() else 0.0
    scale = max(largest(ref), floor)
    return err / scale if scale > 0 else err


def run(fn, inputs, grad_names, g=None, dtype=F64, **kw):
    """Output and gradients of ``grad_names`` of ``fn`` on ``inputs`` cast to ``dtype``, for the output
    gradient ``g`` (default: a fixed standard normal one)."""
    xs = {n: t.detach().to(dtype).requires_grad_(n in grad_names) for n, t in inputs.items() if t is not None}
    out = fn(**xs, **kw)
    if g is None:
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=F64)
    grads = torch.autograd.grad(out, [xs[n] for n in grad_names], g.to(dtype), allow_unused=True)
    return out, [torch.zeros_like(xs[n]) if d is None else d for n, d in zip(grad_names, grads)]


def compare(op, inputs, kwargs, grad_names, floors, case, loose=(), label=None):
    """Op (torch backend, in DTYPE) against the float64 formula: record the relative errors; in float64
    assert them <= RTOL64 (1e-5 for the gradients in ``loose``), in float32 assert the suite's tolerance
    model. ``floors``: the natural size of each quantity, FLOOR of which floors its relative error;
    ``label``: the summary's entry (default: the op)."""
    fn = getattr(panther.ops, op)
    grad_names = [n for n in grad_names if inputs.get(n) is not None]
    ref, ref_grads = run(getattr(naive, op), inputs, grad_names, **kwargs)
    out, grads = run(lambda **a: fn(**a, backend="torch"), inputs, grad_names, dtype=DTYPE, **kwargs)
    assert torch.isfinite(out).all() and all(torch.isfinite(d).all() for d in grads), case
    errs = {"output": rel_error(out, ref, FLOOR * floors.get("output", 0.0))}
    for n, d, r in zip(grad_names, grads, ref_grads):
        errs["d" + n] = rel_error(d, r, FLOOR * floors.get("d" + n, 0.0))
    record(label or op, errs, case)
    if DTYPE == F64:
        bad = {n: e for n, e in errs.items() if not e <= (1e-5 if n in loose else RTOL64)}
        assert not bad, (bad, case)
    else:
        check_case(SPECS[op], Case(inputs, kwargs), "torch", DTYPE)


def scaled(draw_log_scale):
    return st.floats(*draw_log_scale, allow_nan=False)


# --- sketched_linear ------------------------------------------------------------------------------------------


@seed(SEED)
@STRESS
@given(seed=st.integers(0, 2**31 - 1), log_scale=scaled((-3, 3)), **SPECS["sketched_linear"].params(Limits()))
def test_sketched_linear(seed, log_scale, **params):
    spec = SPECS["sketched_linear"]
    case = spec.make_case(seed, **params)
    inputs = dict(case.inputs, x=case.inputs["x"] * 10**log_scale)
    compare("sketched_linear", inputs, dict(case.kwargs), spec.grads, {},
            dict(seed=seed, scale=10**log_scale, **params))


# --- sketched_conv2d ------------------------------------------------------------------------------------------


@seed(SEED)
@STRESS
@given(seed=st.integers(0, 2**31 - 1), log_scale=scaled((-3, 3)), **SPECS["sketched_conv2d"].params(Limits()))
def test_sketched_conv2d(seed, log_scale, **params):
    spec = SPECS["sketched_conv2d"]
    case = spec.make_case(seed, **params)
    assume(case is not None)
    inputs = dict(case.inputs, x=case.inputs["x"] * 10**log_scale)
    compare("sketched_conv2d", inputs, dict(case.kwargs), spec.grads, {},
            dict(seed=seed, scale=10**log_scale, **params))


# --- rfa_attention --------------------------------------------------------------------------------------------


def attention_floors(inputs, kernel):
    """The natural size of each quantity (out ~ v, dv ~ g; softmax: dq ~ g v (|omega| + |q|), domega ~
    g v (|q| + |k|); relu, invariant to scaling q, k or omega: dq ~ g v / |q|), so that a gradient that is
    exactly 0 (one key, m = 1) is not divided by its rounding noise."""
    v, q, k, om = (largest(inputs[n]) for n in ("v", "q", "k", "omega"))
    g, tiny = 4.0, 1e-300  # |g| of the standard normal output gradient
    if kernel == "softmax":
        floors = {"dq": g * v * (om + q), "dk": g * v * (om + k), "domega": g * v * (q + k)}
    else:
        floors = {"dq": g * v / max(q, tiny), "dk": g * v / max(k, tiny), "domega": g * v / max(om, tiny)}
    return dict(floors, output=v, dv=g)


@seed(SEED)
@STRESS
@given(
    seed=st.integers(0, 2**31 - 1),
    B=st.integers(1, 3), H=st.integers(1, 3), T=st.integers(0, 160), S=st.integers(0, 48),
    D=st.integers(1, 12), Dv=st.integers(1, 5), m=st.integers(1, 24),
    causal=st.booleans(), kernel=st.sampled_from(["softmax", "relu"]), per_head=st.booleans(),
    mask=st.sampled_from(["none", "random", "padded sample", "leading keys"]),
    log_scale=scaled((-3, 1)), log_v_scale=scaled((-3, 3)),
)
def test_rfa_attention(seed, B, H, T, S, D, Dv, m, causal, kernel, per_head, mask, log_scale, log_v_scale):
    if causal:
        S = T
    if kernel == "relu":  # scale-invariant in q, k: any scale works
        log_scale = 3 * log_scale
    gen = torch.Generator().manual_seed(seed)
    scale, v_scale = 10**log_scale, 10**log_v_scale
    inputs = dict(
        q=torch.randn(B, H, T, D, generator=gen, dtype=F64) * scale,
        k=torch.randn(B, H, S, D, generator=gen, dtype=F64) * scale,
        v=torch.randn(B, H, S, Dv, generator=gen, dtype=F64) * v_scale,
        omega=torch.randn(*((H, m, D) if per_head else (m, D)), generator=gen, dtype=F64),
    )
    kpm = None
    if mask == "random":
        kpm = torch.rand(B, S, generator=gen) < 0.3
    elif mask == "padded sample":
        kpm = torch.rand(B, S, generator=gen) < 0.3
        kpm[0] = True
    elif mask == "leading keys":
        kpm = torch.arange(S).expand(B, S) < torch.randint(0, S + 1, (B, 1), generator=gen)
    case = dict(seed=seed, B=B, H=H, T=T, S=S, D=D, Dv=Dv, m=m, causal=causal, kernel=kernel, per_head=per_head,
                mask=mask, scale=scale, v_scale=v_scale)
    # relu: a query whose normaliser is near 0 amplifies rounding in the gradients of q, k and omega by
    # 1/normaliser (the two evaluations round differently), so those get a looser bound
    loose = ("dq", "dk", "domega") if kernel == "relu" else ()
    compare("rfa_attention", inputs, dict(causal=causal, kernel=kernel, key_padding_mask=kpm),
            ("q", "k", "v", "omega"), attention_floors(inputs, kernel), case, loose, f"rfa_attention {kernel}")
