"""rfa_attention numerics: causality of the stabilisers, queries that see no key, empty sequences, scales,
the relu kernel's normaliser, higher-order gradients and hostile arguments, against the independent float64
formula of :mod:`panther.testing.naive` (the quadratic form φ(Q)φ(K)ᵀ). The property-based comparison over
drawn cases is tests/stress/test_stress.py.
"""

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import panther.ops
from panther.testing import naive

F64 = torch.float64
GRADS = ("q", "k", "v", "omega")


def rand(gen, *shape, scale=1.0):
    return torch.randn(*shape, generator=gen, dtype=F64) * scale


def inputs(seed, B=2, H=2, T=6, S=None, D=4, Dv=3, m=8, per_head=False, scale=1.0, v_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    S = T if S is None else S
    return dict(
        q=rand(gen, B, H, T, D, scale=scale),
        k=rand(gen, B, H, S, D, scale=scale),
        v=rand(gen, B, H, S, Dv, scale=v_scale),
        omega=rand(gen, *((H, m, D) if per_head else (m, D))),
    )


def run(fn, x, g=None, **kw):
    """Output and gradients of every input of ``fn`` (float64), for the output gradient ``g``."""
    xs = {n: t.detach().clone().requires_grad_() for n, t in x.items()}
    out = fn(**xs, **kw)
    g = output_grad(out) if g is None else g
    grads = torch.autograd.grad(out, [xs[n] for n in GRADS], g, allow_unused=True)
    return out, [torch.zeros_like(xs[n]) if d is None else d for n, d in zip(GRADS, grads)]


def output_grad(out):
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)


def largest(t):
    return t.detach().abs().max().item() if t.numel() else 0.0


def rel_error(got, ref, floor=0.0):
    """max|got - ref| relative to max(max|ref|, floor); ``floor`` is the size rounding is measured against
    where the exact value is 0 (e.g. a gradient that vanishes because a row sees one key)."""
    err = (got - ref).abs().max().item() if ref.numel() else 0.0
    scale = max(largest(ref), floor)
    return err / scale if scale > 0 else err


def errors(x, out, grads, ref, ref_grads, kernel):
    """Relative errors of the output and of each gradient, each floored at 1e-6 of its natural size (out ~ v,
    dv ~ g; softmax: dq ~ g v (|omega| + |q|), domega ~ g v (|q| + |k|); relu, invariant to scaling q, k
    or omega: dq ~ g v / |q|), so that a gradient that is exactly 0 (one key, m = 1) is not divided by its
    rounding noise."""
    g, v, q, k, om = (largest(t) for t in (output_grad(out), x["v"], x["q"], x["k"], x["omega"]))
    tiny = 1e-300
    if kernel == "softmax":
        natural = {"dq": g * v * (om + q), "dk": g * v * (om + k), "domega": g * v * (q + k)}
    else:
        natural = {"dq": g * v / max(q, tiny), "dk": g * v / max(k, tiny), "domega": g * v / max(om, tiny)}
    natural.update(output=v, dv=g)
    errs = {"output": rel_error(out, ref, 1e-6 * natural["output"])}
    for n, d, r in zip(GRADS, grads, ref_grads):
        errs["d" + n] = rel_error(d, r, 1e-6 * natural["d" + n])
    return errs


def assert_matches_naive(x, rtol=1e-9, **kw):
    out, grads = run(panther.ops.rfa_attention, x, **kw)
    ref, ref_grads = run(naive.rfa_attention, x, **kw)
    assert torch.isfinite(out).all() and all(torch.isfinite(d).all() for d in grads)
    bad = {n: e for n, e in errors(x, out, grads, ref, ref_grads, kw.get("kernel", "softmax")).items() if not e <= rtol}
    assert not bad, bad
    return out, grads


# --- causality: nothing at t depends on keys after t, forward or backward


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_future_key_cannot_underflow_past_keys_issue_repro(kernel):
    """T=6, D=4, omega[0] = (40, 0, 0, 0): a key k[5] = omega[0]·D^(1/4) has logits far above the others."""
    x = inputs(0, B=1, H=1, T=6, D=4, m=4)
    x["omega"][0] = torch.tensor([40.0, 0, 0, 0], dtype=F64)
    adversary = {**x, "k": x["k"].clone()}
    adversary["k"][0, 0, 5] = x["omega"][0] * 4**0.25
    out, grads = assert_matches_naive(x, causal=True, kernel=kernel)
    out2, grads2 = assert_matches_naive(adversary, causal=True, kernel=kernel)
    torch.testing.assert_close(out2[..., :5, :], out[..., :5, :], rtol=1e-12, atol=1e-14)
    g = torch.zeros_like(out)
    g[..., :5, :] = torch.randn(g[..., :5, :].shape, dtype=F64)
    _, early = run(panther.ops.rfa_attention, x, g, causal=True, kernel=kernel)
    _, early2 = run(panther.ops.rfa_attention, adversary, g, causal=True, kernel=kernel)
    for n, a, b in zip(GRADS, early, early2):
        if n in ("k", "v"):  # the gradient of the changed key itself is 0 for outputs before it
            a, b = a[..., :5, :], b[..., :5, :]
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14, msg=n)


@pytest.mark.parametrize("T, t0", [(300, 10), (300, 140), (300, 250), (129, 128)])
def test_future_keys_across_chunks_do_not_reach_the_past(T, t0):
    """Keys after t0 (in the same chunk, a later chunk, or the last one) made huge leave outputs and gradients
    at t < t0 unchanged, and both runs match the quadratic float64 formula."""
    x = inputs(1, B=2, H=2, T=T, D=8, m=16, per_head=True)
    kpm = torch.rand(2, T, generator=torch.Generator().manual_seed(3)) < 0.2
    x["omega"][:, 0] = 40 * x["omega"][:, 0] / x["omega"][:, 0].norm(dim=-1, keepdim=True)
    adversary = {**x, "k": x["k"].clone()}
    # k̂ = omega_0 maximises the logit omega_0·k̂ - |k̂|²/2: 800, far above the others
    adversary["k"][..., t0:, :] = (x["omega"][:, 0] * 8**0.25)[None, :, None, :]
    out, _ = assert_matches_naive(x, causal=True, key_padding_mask=kpm)
    out2, _ = assert_matches_naive(adversary, causal=True, key_padding_mask=kpm)
    torch.testing.assert_close(out2[..., :t0, :], out[..., :t0, :], rtol=1e-12, atol=1e-14)
    g = torch.zeros_like(out)
    g[..., :t0, :] = 1.0
    _, a = run(panther.ops.rfa_attention, x, g, causal=True, key_padding_mask=kpm)
    _, b = run(panther.ops.rfa_attention, adversary, g, causal=True, key_padding_mask=kpm)
    for n, ga, gb in zip(GRADS, a, b):
        if n in ("k", "v"):
            ga, gb = ga[..., :t0, :], gb[..., :t0, :]
        torch.testing.assert_close(gb, ga, rtol=1e-12, atol=1e-14, msg=n)


# --- queries that see no key


def test_fully_padded_sample_issue_repro_has_zero_output_and_gradients():
    one = torch.ones(1, 1, 1, 1, dtype=F64)
    x = dict(q=one, k=one, v=one, omega=torch.ones(1, 1, dtype=F64))
    out, grads = run(panther.ops.rfa_attention, x, g=torch.ones(1, 1, 1, 1, dtype=F64),
                     key_padding_mask=torch.tensor([[True]]))
    assert torch.equal(out, torch.zeros_like(out))
    for d in grads:
        assert torch.equal(d, torch.zeros_like(d))


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
@pytest.mark.parametrize("causal", [False, True])
def test_fully_padded_sample_leaves_the_others_alone(kernel, causal):
    x = inputs(2, B=3, H=2, T=7, m=12)
    kpm = torch.zeros(3, 7, dtype=torch.bool)
    kpm[1] = True
    kpm[2, :3] = True  # causal: rows 0-2 of sample 2 see no key
    out, grads = assert_matches_naive(x, causal=causal, kernel=kernel, key_padding_mask=kpm)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    if causal:
        assert torch.equal(out[2, :, :3], torch.zeros_like(out[2, :, :3]))
    for n, d in zip(("q", "k", "v"), grads[:3]):
        assert torch.equal(d[1], torch.zeros_like(d[1])), n
    # the other samples get what they get alone
    alone = {n: (t[[0, 2]] if n != "omega" else t) for n, t in x.items()}
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=F64)
    g0 = g[[0, 2]]
    _, grads_full = run(panther.ops.rfa_attention, x, g=g, causal=causal, kernel=kernel, key_padding_mask=kpm)
    out0, grads0 = run(panther.ops.rfa_attention, alone, g=g0, causal=causal, kernel=kernel,
                       key_padding_mask=kpm[[0, 2]])
    torch.testing.assert_close(out[[0, 2]], out0)
    for n, a, b in zip(GRADS, grads_full, grads0):
        torch.testing.assert_close(a if n == "omega" else a[[0, 2]], b, msg=n)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T, S", [(0, 5), (4, 0), (0, 0)])
def test_empty_sequences(T, S, causal):
    if causal and T != S:
        pytest.skip("causal needs T == S")
    x = inputs(3, T=T, S=S)
    out, grads = run(panther.ops.rfa_attention, x, causal=causal)
    assert out.shape == (2, 2, T, 3) and torch.equal(out, torch.zeros_like(out))
    for n, d in zip(GRADS, grads):
        assert d.shape == x[n].shape and torch.equal(d, torch.zeros_like(d)), n
    ref = naive.rfa_attention(**x, causal=causal)
    assert torch.equal(ref, out)


# --- scales and the relu kernel's normaliser


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "kernel, scale, v_scale",
    [
        ("softmax", 1e-3, 1e-3),
        ("softmax", 1e-3, 1e3),
        ("softmax", 10.0, 1e3),  # logits of size |x|^2/sqrt(D) ~ 300: within float64's exponent range
        ("relu", 1e-3, 1e-3),
        ("relu", 1e3, 1e3),
        ("relu", 1e3, 1e-3),
    ],
)
def test_tiny_and_huge_scales_match_the_formula(kernel, scale, v_scale, causal):
    x = inputs(4, B=2, H=2, T=150, S=150 if causal else 90, D=8, m=32, scale=scale, v_scale=v_scale)
    kpm = torch.rand(2, 150 if causal else 90, generator=torch.Generator().manual_seed(5)) < 0.25
    assert_matches_naive(x, rtol=1e-8, causal=causal, kernel=kernel, key_padding_mask=kpm)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_softmax_underflow_is_nan_not_a_silent_zero(causal, dtype):
    """q, k of norm ~1e3: logits ~1e6 overflow the separable stabilisers of most rows; those rows are NaN
    (never a wrong number), the others match the formula, and the gradients of the others stay finite."""
    x = inputs(13, B=2, H=2, T=40, D=8, m=16, scale=1e3)
    kpm = torch.zeros(2, 40, dtype=torch.bool)
    kpm[1] = True  # a fully padded sample is still 0
    xs = {n: t.to(dtype).requires_grad_() for n, t in x.items()}
    out = panther.ops.rfa_attention(**xs, causal=causal, key_padding_mask=kpm)
    ref = naive.rfa_attention(**x, causal=causal, key_padding_mask=kpm)
    lost = out.isnan().any(-1)
    assert lost.any() and (~lost[0]).any()  # some rows underflow, some do not
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    ok = ~lost
    torch.testing.assert_close(out.double()[ok], ref[ok], rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    (out[ok] * 1.0).sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in xs.values())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_relu_is_invariant_to_scaling_q_and_k(causal, dtype):
    tiny = torch.full((1, 1, 1, 1), 5e-4, dtype=dtype)
    one = torch.ones(1, 1, dtype=dtype)
    out = panther.ops.rfa_attention(tiny, tiny, torch.ones_like(tiny), one, causal, "relu")
    assert out.item() == pytest.approx(1.0, rel=1e-6)  # exact: one key, weight 1
    x = {n: t.to(dtype) for n, t in inputs(6, T=40, D=8, m=16).items()}
    ref = panther.ops.rfa_attention(**x, causal=causal, kernel="relu")
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for s in (1e-3, 1e3):
        got = panther.ops.rfa_attention(x["q"] * s, x["k"] * s, x["v"], x["omega"], causal, "relu")
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("causal", [False, True])
def test_relu_zero_normaliser_is_zero_with_finite_gradients(causal):
    """All features 0 (0/0): output 0, zero gradients; other queries are exact."""
    x = inputs(8, B=1, H=1, T=4, D=2, m=2)
    x["omega"] = torch.eye(2, dtype=F64)
    x["q"][0, 0] = torch.tensor([[-1.0, -0.5], [2.0, 0.3], [-3.0, -0.1], [1.0, 1.5]], dtype=F64)  # 0, 2: no feature
    x["k"][0, 0] = torch.tensor([[1.0, 0.2], [-1.0, 0.7], [2.0, -0.4], [0.5, 0.5]], dtype=F64)
    out, grads = assert_matches_naive(x, causal=causal, kernel="relu")
    assert torch.equal(out[..., [0, 2], :], torch.zeros_like(out[..., [0, 2], :]))
    assert torch.equal(grads[0][..., [0, 2], :], torch.zeros_like(grads[0][..., [0, 2], :]))
    # every key's feature 0: every row is 0/0
    x["k"] = -x["k"].abs()
    out, grads = run(panther.ops.rfa_attention, x, causal=causal, kernel="relu")
    assert torch.equal(out, torch.zeros_like(out)) and all(torch.equal(d, torch.zeros_like(d)) for d in grads)


# --- higher-order gradients


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_gradgradcheck(kernel, causal, masked):
    x = inputs(9, B=2, H=2, T=5, D=3, Dv=2, m=4, per_head=True)
    kpm = None
    if masked:
        kpm = torch.zeros(2, 5, dtype=torch.bool)
        kpm[0, 1] = True
        kpm[1] = True
    xs = [x[n].requires_grad_() for n in GRADS]

    def f(q, k, v, omega):
        return panther.ops.rfa_attention(q, k, v, omega, causal, kernel, kpm)

    assert gradcheck(f, xs)
    assert gradgradcheck(f, xs)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_gradient_penalty_matches_finite_differences(kernel, causal):
    """penalty(omega, v) = |d/dq Σ out·g|² (an input-Jacobian regulariser); its gradient via create_graph
    against central differences."""
    x = inputs(10, B=1, H=2, T=6, D=3, m=5)
    g = torch.randn(1, 2, 6, 3, generator=torch.Generator().manual_seed(11), dtype=F64)

    def penalty(omega, v, create_graph):
        q = x["q"].clone().requires_grad_()
        out = panther.ops.rfa_attention(q, x["k"], v, omega, causal, kernel)
        (dq,) = torch.autograd.grad((out * g).sum(), q, create_graph=create_graph)
        return (dq * dq).sum()

    omega, v = x["omega"].clone().requires_grad_(), x["v"].clone().requires_grad_()
    d_omega, d_v = torch.autograd.grad(penalty(omega, v, True), (omega, v))
    for got, t in ((d_omega, x["omega"]), (d_v, x["v"])):
        fd = torch.zeros_like(t)
        h = 1e-6
        for i in range(t.numel()):
            e = torch.zeros_like(t).view(-1)
            e[i] = h
            e = e.view_as(t)
            args = (x["omega"] + e, x["v"]) if t is x["omega"] else (x["omega"], x["v"] + e)
            args_m = (x["omega"] - e, x["v"]) if t is x["omega"] else (x["omega"], x["v"] - e)
            fd.view(-1)[i] = (penalty(*args, False) - penalty(*args_m, False)) / (2 * h)
        torch.testing.assert_close(got, fd, rtol=1e-5, atol=1e-7 * fd.abs().max().item())


# --- hostile arguments


def _q(*shape):
    return torch.zeros(*shape, dtype=F64)


@pytest.mark.parametrize(
    "call, exc, pattern",
    [
        (lambda: panther.ops.rfa_attention(_q(1, 1, 3, 0), _q(1, 1, 3, 0), _q(1, 1, 3, 2), _q(4, 0)), ValueError,
         r"q must have a head dimension D >= 1 \(its last dimension\), got shape \(1, 1, 3, 0\)"),
        (lambda: panther.ops.rfa_attention(_q(1, 1, 3, 4), _q(1, 1, 3, 4), _q(1, 1, 3, 2), _q(0, 4)), ValueError,
         r"omega must hold at least one random feature \(m >= 1\), got shape \(0, 4\)"),
        (lambda: panther.ops.rfa_attention(_q(1, 2, 3, 4), _q(1, 2, 3, 4), _q(1, 2, 3, 2), _q(2, 0, 4)), ValueError,
         r"omega must hold at least one random feature \(m >= 1\), got shape \(2, 0, 4\)"),
        (lambda: panther.ops.rfa_attention(_q(1, 1, 3, 4), _q(1, 1, 3, 4), _q(1, 1, 3, 2), _q(4, 4), causal="yes"),
         TypeError, r"causal must be a bool, got 'yes' \(str\)"),
        (lambda: panther.ops.rfa_attention(_q(1, 1, 3, 4), _q(1, 1, 3, 4), _q(1, 1, 3, 2), _q(4, 4), kernel=["relu"]),
         ValueError, r"kernel must be one of \('softmax', 'relu'\), got \['relu'\]"),
        (lambda: panther.ops.rfa_attention(_q(1, 1, 3, 4), _q(1, 1, 3, 4), _q(1, 1, 3, 2),
                                           torch.zeros(4, 4, dtype=torch.long)),
         TypeError, r"omega must be a floating-point tensor, got dtype torch.int64"),
        (lambda: panther.ops.rfa_attention(_q(1, 1, 3, 4), _q(1, 1, 2, 4), _q(1, 1, 2, 2), _q(4, 4), causal=True),
         ValueError, r"causal attention needs as many queries as keys, got T=3 queries and S=2 keys"),
        (lambda: panther.ops.rfa_features(_q(1, 1, 3, 4), _q(1, 1, 3, 5), _q(4, 4)), ValueError,
         r"k must have shape \(B=1, H=1, S, D=4\)"),
        (lambda: panther.ops.rfa_attention_weights(_q(1, 1, 3, 4), _q(1, 1, 3, 4), _q(0, 4)), ValueError,
         r"omega must hold at least one random feature"),
    ],
    ids=["D=0", "m=0", "m=0 per head", "causal str", "kernel list", "omega int", "causal T!=S", "features k",
         "weights m=0"],
)
def test_bad_arguments(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


# --- the exposed feature maps are the op's


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
@pytest.mark.parametrize("causal", [False, True])
def test_features_and_weights_give_the_op(kernel, causal):
    x = inputs(12, T=9, D=4, m=6, per_head=True)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[0, :2] = True
    kpm[1] = True
    qf, kf, M = panther.ops.rfa_features(x["q"], x["k"], x["omega"], causal, kernel, kpm)
    assert qf.shape == (2, 2, 9, 6) and kf.shape == (2, 2, 9, 6)
    assert (M is not None) == (kernel == "softmax")
    assert torch.equal(kf[1], torch.zeros_like(kf[1]))
    w = panther.ops.rfa_attention_weights(x["q"], x["k"], x["omega"], causal, kernel, kpm)
    torch.testing.assert_close(w, naive.attention_weights(x["q"], x["k"], x["omega"], causal, kernel, kpm))
    torch.testing.assert_close(w @ x["v"], panther.ops.rfa_attention(**x, causal=causal, kernel=kernel,
                                                                     key_padding_mask=kpm))


def test_numpy_integers_are_sizes_and_bools_are_not():
    from panther.nn import RandMultiHeadAttention

    attn = RandMultiHeadAttention(np.int64(16), np.int32(2), np.int64(8), kdim=np.int16(6), seed=0)
    assert attn.embed_dim == 16 and type(attn.embed_dim) is int and attn.omega.shape == (2, 8, 8)
    with pytest.raises(TypeError, match=r"sketch_dim must be an int, got True \(bool\)"):
        RandMultiHeadAttention(16, 2, True)
    out = attn(torch.randn(3, 1, 16), torch.randn(4, 1, 6), torch.randn(4, 1, 16))[0]
    assert out.shape == (3, 1, 16) and torch.isfinite(out).all()
