"""Each layer against a float64 reference built from the layer's own tensors with explicit per-term loops.

The references below use neither panther.ops nor the backends: only the math of DESIGN.md, one term (or
one batch element and head) at a time. Forward outputs and the gradients of every parameter and of the
input are compared, on ragged sizes (not multiples of 16), batch 1 and 3-D inputs.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from panther.nn import RandMultiHeadAttention, SKConv2d, SKLinear

pytestmark = pytest.mark.filterwarnings("ignore:.*not fewer than the:UserWarning")

# float64 layers agree with the float64 reference to rounding; float32 layers to float32 accuracy.
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-4, atol=2e-5)}


def leaf64(t):
    return None if t is None else t.detach().double().requires_grad_(t.requires_grad)


# --- references ---------------------------------------------------------------------------------------------


def reference_linear(x, S1s, S2s, U1s, U2s, bias):
    """y = 1/(2L) Σ_i [(x S1_i) U1_i + (x U2_i) S2_i] + b, term by term."""
    L = S1s.shape[0]
    y = torch.zeros(*x.shape[:-1], S2s.shape[-1], dtype=x.dtype)
    for i in range(L):
        y = y + (x @ S1s[i]) @ U1s[i] + (x @ U2s[i]) @ S2s[i]
    y = y / (2 * L)
    return y if bias is None else y + bias


def reference_conv(x, S1s, U1s, bias, stride, padding, dilation):
    """y = 1/(2L) Σ_i U1_iᵀ conv(x, S1_i) + b, term by term (F.conv2d resolves 'same' itself)."""
    terms = S1s.shape[0]
    y = 0
    for i in range(terms):
        z = F.conv2d(x, S1s[i], None, stride, padding, dilation)  # (N, k, H', W')
        y = y + torch.einsum("nkhw,ko->nohw", z, U1s[i])
    y = y / terms
    return y if bias is None else y + bias.view(-1, 1, 1)


def feature_map(x, omega, kernel):
    """φ(x) = exp(ω x̂ − |x̂|²/2)/√m (softmax) or relu(ω x̂)/√m, x̂ = x / d^{1/4}; x (T, d), ω (m, d)."""
    d, m = x.shape[-1], omega.shape[0]
    xs = x / d**0.25
    proj = xs @ omega.t()
    if kernel == "relu":
        return torch.relu(proj) / math.sqrt(m)
    return torch.exp(proj - (xs * xs).sum(-1, keepdim=True) / 2) / math.sqrt(m)


def reference_attention(p, query, key, value, key_padding_mask, causal, batch_first, kernel):
    """Sequence-first or batch-first (N, L, E) inputs; p: float64 leaves of the layer's tensors.

    Per batch element and head: A = φ(q) φ(k)ᵀ with ignored keys' columns and (causal) the upper triangle
    zeroed, normalised by its row sums; out = A v. No stabiliser: float64 and inputs of moderate size.
    Returns (output, per-head weights (N, H, L, S)).
    """
    if not batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    N, L, E = query.shape
    S = key.shape[1]
    H, m, D = p["omega"].shape
    W = p["in_proj_weight"]
    b = p["in_proj_bias"]
    outs, weights = [], []
    for n in range(N):
        q_all = query[n] @ W[:E].t() + b[:E]
        k_all = key[n] @ W[E:2 * E].t() + b[E:2 * E]
        v_all = value[n] @ W[2 * E:].t() + b[2 * E:]
        heads, head_w = [], []
        for h in range(H):
            cols = slice(h * D, (h + 1) * D)
            omega = p["omega"][h]
            A = feature_map(q_all[:, cols], omega, kernel) @ feature_map(k_all[:, cols], omega, kernel).t()
            if key_padding_mask is not None:
                A = A * (~key_padding_mask[n]).to(A.dtype)
            if causal:
                A = A * torch.ones(L, S, dtype=torch.bool).tril().to(A.dtype)
            # A row with no admissible key (relu features can all vanish) is 0, as the op clamps the denominator.
            A = A / A.sum(-1, keepdim=True).clamp_min(1e-6 if kernel == "relu" else torch.finfo(A.dtype).tiny)
            heads.append(A @ v_all[:, cols])
            head_w.append(A)
        outs.append(torch.cat(heads, dim=-1) @ p["out_proj.weight"].t() + p["out_proj.bias"])
        weights.append(torch.stack(head_w))
    out = torch.stack(outs)
    return (out if batch_first else out.transpose(0, 1)), torch.stack(weights)


# --- SKLinear -----------------------------------------------------------------------------------------------

LINEAR_CASES = [
    # (in, out, L, k, input shape)
    (13, 7, 3, 5, (1, 13)),
    (37, 50, 2, 3, (3, 5, 37)),
    (50, 37, 1, 1, (37, 50)),
    (19, 23, 4, 2, (19,)),
    (1, 1, 1, 1, (4, 1)),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("I,O,L,k,shape", LINEAR_CASES)
def test_sklinear_matches_reference(I, O, L, k, shape, bias, dtype):
    layer = SKLinear(I, O, L, k, bias=bias, dtype=dtype, seed=I * O + L)
    with torch.no_grad():  # a "trained" state: S1s and S2s no longer derived from one weight
        layer.S1s.add_(0.1 * torch.randn_like(layer.S1s))
        layer.S2s.add_(0.1 * torch.randn_like(layer.S2s))
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)

    x64 = leaf64(x)
    S1, S2, b = leaf64(layer.S1s), leaf64(layer.S2s), leaf64(layer.bias)
    U1, U2 = layer.U1s.double(), layer.U2s.double()
    ref = reference_linear(x64, S1, S2, U1, U2, b)
    ref.backward(g.double())

    assert y.shape == ref.shape and y.dtype == dtype
    torch.testing.assert_close(y.double(), ref.detach(), **TOL[dtype])
    torch.testing.assert_close(x.grad.double(), x64.grad, **TOL[dtype])
    torch.testing.assert_close(layer.S1s.grad.double(), S1.grad, **TOL[dtype])
    torch.testing.assert_close(layer.S2s.grad.double(), S2.grad, **TOL[dtype])
    if bias:
        torch.testing.assert_close(layer.bias.grad.double(), b.grad, **TOL[dtype])


# --- SKConv2d -----------------------------------------------------------------------------------------------

CONV_CASES = [
    # (C, O, kernel, stride, padding, dilation, L, k, input shape)
    (3, 5, 3, 1, 1, 1, 1, 2, (1, 3, 9, 7)),
    (3, 5, (3, 2), (2, 1), (1, 0), (1, 2), 2, 3, (2, 3, 11, 10)),
    (4, 6, 2, 1, "same", 1, 1, 3, (3, 4, 7, 5)),
    (4, 6, (4, 3), 1, "same", (2, 1), 2, 1, (4, 9, 8)),  # unbatched
    (2, 3, 3, 2, "valid", 1, 3, 2, (1, 2, 13, 9)),
    (5, 17, 1, 1, 0, 1, 1, 5, (2, 5, 3, 3)),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("C,O,kernel,stride,padding,dilation,L,k,shape", CONV_CASES)
def test_skconv2d_matches_reference(C, O, kernel, stride, padding, dilation, L, k, shape, bias, dtype):
    layer = SKConv2d(C, O, kernel, stride, padding, dilation, bias, num_terms=L, low_rank=k, dtype=dtype, seed=C * O)
    with torch.no_grad():
        layer.S1s.add_(0.1 * torch.randn_like(layer.S1s))
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)

    x64, S1, b = leaf64(x), leaf64(layer.S1s), leaf64(layer.bias)
    batched = x64 if x64.dim() == 4 else x64.unsqueeze(0)
    ref = reference_conv(batched, S1, layer.U1s.double(), b, layer.stride, padding, layer.dilation)
    ref = ref if x64.dim() == 4 else ref.squeeze(0)
    ref.backward(g.double())

    assert y.shape == ref.shape and y.dtype == dtype
    torch.testing.assert_close(y.double(), ref.detach(), **TOL[dtype])
    torch.testing.assert_close(x.grad.double(), x64.grad, **TOL[dtype])
    torch.testing.assert_close(layer.S1s.grad.double(), S1.grad, **TOL[dtype])
    if bias:
        torch.testing.assert_close(layer.bias.grad.double(), b.grad, **TOL[dtype])


# --- RandMultiHeadAttention ---------------------------------------------------------------------------------

ATTENTION_CASES = [
    # (E, H, m, N, L, S, batch_first, causal, padded, kernel)
    (12, 3, 7, 1, 5, 9, False, False, False, "softmax"),
    (12, 3, 7, 2, 6, 6, True, True, False, "softmax"),
    (20, 4, 13, 3, 7, 11, True, False, True, "softmax"),
    (20, 2, 5, 2, 9, 9, False, True, True, "softmax"),
    (12, 2, 9, 2, 6, 6, True, True, True, "relu"),
    (12, 1, 3, 1, 4, 5, False, False, True, "relu"),
]


@pytest.mark.parametrize("E,H,m,N,L,S,batch_first,causal,padded,kernel", ATTENTION_CASES)
def test_attention_matches_exact_random_feature_attention(E, H, m, N, L, S, batch_first, causal, padded, kernel):
    attn = RandMultiHeadAttention(E, H, m, batch_first=batch_first, kernel=kernel, dtype=torch.float64, seed=E + m)
    with torch.no_grad():
        attn.in_proj_bias.uniform_(-0.3, 0.3)
        attn.out_proj.bias.uniform_(-0.3, 0.3)
    shape = (lambda T: (N, T, E)) if batch_first else (lambda T: (T, N, E))
    query = (0.7 * torch.randn(shape(L), dtype=torch.float64)).requires_grad_()
    key = (0.7 * torch.randn(shape(S), dtype=torch.float64)).requires_grad_()
    value = torch.randn(shape(S), dtype=torch.float64, requires_grad=True)
    kpm = None
    if padded:
        kpm = torch.zeros(N, S, dtype=torch.bool)
        kpm[0, -2:] = True  # the last keys of the first sequence are padding
        if N > 1:
            kpm[-1, 1] = True
    out, w = attn(query, key, value, key_padding_mask=kpm, is_causal=causal, materialize_weights=True,
                  average_attn_weights=False)
    g = torch.randn_like(out)
    out.backward(g)

    params = {name: leaf64(t) for name, t in attn.named_parameters()}
    params["omega"] = attn.omega.double()
    inputs = [leaf64(t) for t in (query, key, value)]
    ref, ref_w = reference_attention(params, *inputs, kpm, causal, batch_first, kernel)
    ref.backward(g)

    tol = dict(rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out, ref.detach(), **tol)
    torch.testing.assert_close(w, ref_w.detach(), **tol)
    for t, r in zip((query, key, value), inputs):
        torch.testing.assert_close(t.grad, r.grad, **tol)
    for name, p in attn.named_parameters():
        torch.testing.assert_close(p.grad, params[name].grad, **tol, msg=lambda m: f"{name}: {m}")


def test_attention_float32_matches_float64_reference():
    attn = RandMultiHeadAttention(24, 4, 11, seed=0).eval()
    x = 0.7 * torch.randn(13, 2, 24)
    kpm = torch.zeros(2, 13, dtype=torch.bool)
    kpm[1, 9:] = True
    out, w = attn(x, x, x, key_padding_mask=kpm, is_causal=True, materialize_weights=True, average_attn_weights=False)
    params = {name: t.detach().double() for name, t in attn.named_parameters()}
    params["omega"] = attn.omega.double()
    x64 = x.double()
    ref, ref_w = reference_attention(params, x64, x64, x64, kpm, True, False, "softmax")
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.double(), ref_w, rtol=1e-4, atol=1e-5)
