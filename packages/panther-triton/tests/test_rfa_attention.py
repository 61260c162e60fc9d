"""Random-feature attention on the Triton kernels, against the torch backend's math in float64.

Under TRITON_INTERPRET=1 the causal chunk is CHUNK = 16 positions and the feature chunk FEATURES = 16
columns, so small lengths and feature counts reach the chunk boundaries. The drawn cases are the
conformance suite's (test_conformance.py); these are the edges.
"""

import math

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import panther
import panther_triton
from panther.backends.torch_backend.rfa_attention import _attention
from panther_triton._runtime import interpreting
from panther_triton.ops.rfa_attention.common import CHUNK, FEATURES, MAX_FEATURES, MAX_HEAD_DIM, SPLIT_ROWS
from triton_test_utils import DEVICE, needs_kernels

pytestmark = needs_kernels
COMPILE_BACKEND = "aot_eager" if interpreting() else "inductor"
TOL = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def make(B, H, T, S, D, Dv, m, dtype=torch.float32, per_head=False, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype).to(DEVICE)

    om = rnd(*((H, m, D) if per_head else (m, D)))
    return rnd(B, H, T, D, s=scale), rnd(B, H, S, D, s=scale), rnd(B, H, S, Dv), om


def err(got, ref):
    """Max error relative to the reference's largest element; NaN positions must agree."""
    assert torch.equal(got.isnan(), ref.isnan()), "NaN rows differ"
    got, ref = got.double().nan_to_num(0.0), ref.nan_to_num(0.0)
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item() if ref.numel() else 0.0


def check(q, k, v, om, causal, kernel, kpm=None, tol=None, grads=True):
    """Forward and the gradients of q, k, v, omega against the float64 torch math on the same inputs."""
    tol = tol or TOL[q.dtype]
    leaves = [t.detach().clone().requires_grad_(grads) for t in (q, k, v, om)]
    out = panther.ops.rfa_attention(*leaves, causal=causal, kernel=kernel, key_padding_mask=kpm, backend="triton")
    ref_leaves = [t.detach().double().requires_grad_(grads) for t in (q, k, v, om)]
    ref = _attention(*ref_leaves, causal, kernel, kpm)
    assert out.dtype == q.dtype and out.shape == ref.shape
    assert err(out, ref) <= tol, err(out, ref)
    if not grads or out.numel() == 0:
        return out
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = torch.autograd.grad(out, leaves, g.to(out.dtype))
    want = torch.autograd.grad(ref, ref_leaves, g)
    for name, a, b in zip("q k v omega".split(), got, want):
        assert a.shape == b.shape and a.dtype == q.dtype, name
        assert err(a, b) <= tol, (name, err(a, b))
    return out


@pytest.mark.parametrize("T", [CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 1])
@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_causal_chunk_boundaries(T, kernel):
    q, k, v, om = make(2, 2, T, T, 8, 5, 24, per_head=True, seed=T)
    check(q, k, v, om, True, kernel)


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
@pytest.mark.parametrize("Dv, m", [(5, 12), (100, 90)], ids=["one_chunk_segments", "two_chunk_segments"])
def test_causal_segments_start_from_the_earlier_keys(Dv, m, kernel):
    """Causal programs walk segments of the sequence from the state of the keys before them: several
    segments (of one chunk, or several), the first one's keys all padded in one sample, the largest key
    logits in a later segment in the other."""
    from panther_triton.ops.rfa_attention.forward import segments

    rows, _ = segments(1, 8, Dv, m)
    T = 3 * rows + 5
    q, k, v, om = make(2, 2, T, T, 8, Dv, m, per_head=True, seed=Dv)
    k[1, :, 2 * rows + 1] *= 4.0
    kpm = torch.zeros(2, T, dtype=torch.bool)
    kpm[0, : rows + 3] = True
    check(q, k, v, om, True, kernel, kpm.to(DEVICE))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_padded_and_fully_padded_samples(causal):
    T, S = 2 * CHUNK + 3, (2 * CHUNK + 3 if causal else CHUNK + 5)
    q, k, v, om = make(3, 2, T, S, 8, 6, 20, seed=1)
    kpm = torch.rand(3, S, generator=torch.Generator().manual_seed(2)) < 0.4
    kpm[1] = True  # every key padded: that sample's output and gradients are 0
    kpm[2, : CHUNK + 2] = True  # causal: the rows before the first kept key see nothing, across a chunk
    kpm[2, CHUNK + 2] = False
    out = check(q, k, v, om, causal, "softmax", kpm.to(DEVICE))
    assert out[1].abs().max() == 0
    if causal:
        assert out[2, :, : CHUNK + 2].abs().max() == 0 and out[2, :, CHUNK + 2 :].abs().amax(-1).min() > 0


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_non_causal_slices_combine(kernel):
    """Queries and keys past SPLIT_ROWS run in slices whose partial states are rescaled and summed; one
    slice of keys fully padded, and the largest key logits in the last slice."""
    T, S = 2 * SPLIT_ROWS + 3, 2 * SPLIT_ROWS + 7
    q, k, v, om = make(2, 1, T, S, 8, 5, 16, per_head=True, seed=8)
    k[:, :, -3:] *= 3.0
    kpm = torch.zeros(2, S, dtype=torch.bool)
    kpm[0, SPLIT_ROWS : 2 * SPLIT_ROWS] = True
    kpm[1, :SPLIT_ROWS] = True
    check(q, k, v, om, False, kernel, kpm.to(DEVICE))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize(
    "D, Dv, m",
    [(8, 6, FEATURES + 1), (24, 33, 3 * FEATURES - 5), (MAX_HEAD_DIM, MAX_HEAD_DIM, MAX_FEATURES), (65, 100, 200)],
    ids=lambda x: str(x),
)
def test_feature_chunks_and_wide_heads(D, Dv, m, dtype, causal):
    """m past one feature chunk (the softmax stabilisers span every chunk; per-chunk states in the
    programs' buffers) and head dims up to MAX_HEAD_DIM; padded keys, per-head omega."""
    T = CHUNK + 5
    S = T if causal else CHUNK - 3
    q, k, v, om = make(2, 2, T, S, D, Dv, m, dtype=dtype, per_head=True, seed=m)
    kpm = torch.rand(2, S, generator=torch.Generator().manual_seed(m)) < 0.3
    check(q, k, v, om, causal, "softmax" if m % 2 == 0 else "relu", kpm.to(DEVICE))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_largest_logits_in_a_later_feature_chunk(causal):
    """Rows along e0 have their largest logit (72) on a feature of the last chunk and the others in that
    row's first chunk near -40; rows along e1 the other way round. A stabiliser taken from one chunk
    instead of all leaves exp(114) to overflow; the float64 reference stays exact."""
    m, D, T = 3 * FEATURES, 8, 2 * CHUNK + 3
    g = torch.Generator().manual_seed(11)
    om = torch.randn(m, D, generator=g)
    om[0], om[-1] = 0.0, 0.0
    om[0, 1], om[-1, 0] = 12.0, 12.0
    rows = torch.zeros(2, 2, T, D)
    rows[..., 0::2, 0] = 12.0 * D**0.25  # x̂ = 12 e0: logit 144 - 72 on om[-1]
    rows[..., 1::2, 1] = 12.0 * D**0.25  # x̂ = 12 e1: on om[0]
    q = rows + 0.1 * torch.randn(rows.shape, generator=g)
    k = rows.flip(-2) + 0.1 * torch.randn(rows.shape, generator=g)
    v = torch.randn(2, 2, T, 5, generator=g)
    # forward only: each query sees only the keys along its own direction, so its gradient is ~0 (1e-18)
    check(*(t.to(DEVICE) for t in (q, k, v, om)), causal, "softmax", tol=1e-4, grads=False)


@pytest.mark.parametrize("m", [16, FEATURES + 5], ids=["one_chunk", "two_chunks"])
def test_empty_keys_and_queries(m):
    q, k, v, om = make(2, 2, 5, 0, 8, 3, m)
    out = check(q, k, v, om, False, "softmax")
    assert out.shape == (2, 2, 5, 3) and out.abs().max() == 0
    q, k, v, om = make(2, 2, 0, 7, 8, 3, m)
    assert check(q, k, v, om, False, "relu").shape == (2, 2, 0, 3)
    q, k, v, om = make(2, 2, 0, 0, 8, 3, m)
    assert check(q, k, v, om, True, "softmax").shape == (2, 2, 0, 3)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_strided_head_split_views(causal):
    """The layer's head split of (B, T, E) projections: q, k, v are non-contiguous views, read in place."""
    B, T, H, D = 2, CHUNK + 3, 3, 8
    g = torch.Generator().manual_seed(3)
    proj = torch.randn(B, T, 3 * H * D, generator=g).to(DEVICE)
    q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in proj.split(H * D, dim=-1))
    assert not q.is_contiguous()
    om = torch.randn(12, D, generator=g).to(DEVICE)
    check(q, k, v, om, causal, "softmax")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dtypes_non_square_and_per_head(causal, dtype):
    T, S = 2 * CHUNK + 5, (2 * CHUNK + 5 if causal else CHUNK - 3)
    q, k, v, om = make(2, 3, T, S, 20, 17, 40, dtype=dtype, per_head=True, seed=4)
    check(q, k, v, om, causal, "softmax")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_underflowed_softmax_rows_are_nan(causal):
    """Queries whose features lie on one direction and keys on the other: their normaliser, about
    exp(-250), underflows float32 and the row is NaN; the queries aligned with the keys stay exact."""
    T = CHUNK + 4
    q = torch.zeros(1, 1, T, 2, device=DEVICE)
    q[0, 0, 0::2, 0] = 300.0  # odd one out: along omega's first direction
    q[0, 0, 1::2, 1] = 300.0  # along the keys
    k = torch.zeros(1, 1, T, 2, device=DEVICE)
    k[..., 1] = 300.0
    v = torch.randn(1, 1, T, 3, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    om = torch.eye(2, device=DEVICE)
    out = panther.ops.rfa_attention(q, k, v, om, causal=causal, backend="triton")
    lost = torch.zeros(T, dtype=torch.bool)
    lost[0::2] = True
    assert torch.equal(out[0, 0].isnan().all(-1).cpu(), lost)
    assert torch.equal(out.isnan(), _attention(q, k, v, om, causal, "softmax", None).isnan())
    ref = _attention(q.double(), k.double(), v.double(), om.double(), causal, "softmax", None)
    assert err(out[..., 1::2, :], ref[..., 1::2, :]) <= 1e-5


def test_second_order_is_refused():
    q, k, v, om = make(1, 1, 6, 6, 4, 3, 16)
    q.requires_grad_()
    out = panther.ops.rfa_attention(q, k, v, om, causal=True, backend="triton")
    (g,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice|second-order"):
        g.sum().backward()


@pytest.mark.parametrize(
    "shape, reason",
    [
        (dict(D=MAX_HEAD_DIM + 1, Dv=4, m=16), f"head dimension {MAX_HEAD_DIM + 1}"),
        (dict(D=8, Dv=MAX_HEAD_DIM + 1, m=16), f"v has head dimension {MAX_HEAD_DIM + 1}"),
        (dict(D=8, Dv=4, m=MAX_FEATURES + 1), f"{MAX_FEATURES + 1} random features"),
    ],
)
def test_limits_are_refused_with_the_reason(shape, reason):
    q, k, v, om = make(1, 1, 3, 3, shape["D"], shape["Dv"], shape["m"])
    backend = panther.backends.load_backend("triton")
    reasons = backend.reasons_cannot_run("rfa_attention", q, k, v, om, False, "softmax", None)
    assert any(reason in r for r in reasons), reasons
    with pytest.raises(Exception, match=reason):
        panther.ops.rfa_attention(q, k, v, om, backend="triton")


def test_mask_dtype_is_accepted_and_float64_refused():
    q, k, v, om = make(1, 1, 3, 3, 8, 4, 16)
    backend = panther.backends.load_backend("triton")
    kpm = torch.zeros(1, 3, dtype=torch.bool, device=DEVICE)
    assert backend.reasons_cannot_run("rfa_attention", q, k, v, om, False, "softmax", kpm) == []
    reasons = backend.reasons_cannot_run("rfa_attention", q.double(), k.double(), v.double(), om.double(), False,
                                         "softmax", kpm)
    assert any("float64 is not supported" in r for r in reasons), reasons


class Attention(torch.nn.Module):
    """Projections, head split, random-feature attention, merge: the layer's shape of work."""

    def __init__(self, E=24, H=3, m=16, causal=False):
        super().__init__()
        self.H, self.causal = H, causal
        self.qkv = torch.nn.Linear(E, 3 * E)
        self.out = torch.nn.Linear(E, E)
        self.register_buffer("omega", torch.randn(m, E // H, generator=torch.Generator().manual_seed(7)))

    def forward(self, x, kpm=None):
        B, T, E = x.shape
        q, k, v = (t.view(B, T, self.H, E // self.H).transpose(1, 2) for t in self.qkv(x).split(E, dim=-1))
        o = panther.ops.rfa_attention(q, k, v, self.omega, causal=self.causal, key_padding_mask=kpm,
                                      backend="triton")
        return self.out(o.transpose(1, 2).reshape(B, T, E))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_compile_fullgraph_matches_eager(causal):
    torch._dynamo.reset()
    panther.backends.backend_infos()
    torch.manual_seed(0)
    model = Attention(causal=causal).to(DEVICE)
    x = torch.randn(2, CHUNK + 3, 24, device=DEVICE)
    kpm = torch.zeros(2, CHUNK + 3, dtype=torch.bool, device=DEVICE)
    kpm[1, -4:] = True
    explained = torch._dynamo.explain(model)(x, kpm)
    assert explained.graph_break_count == 0, explained.break_reasons
    counters.clear()
    compiled = torch.compile(model, fullgraph=True, backend=COMPILE_BACKEND)
    results = []
    for fn in (compiled, model):
        model.zero_grad()
        xi = x.clone().requires_grad_()
        y = fn(xi, kpm)
        y.square().sum().backward()
        results.append((y.detach(), [xi.grad] + [p.grad.clone() for p in model.parameters()]))
    assert sum(counters["graph_break"].values()) == 0
    (y_c, g_c), (y_e, g_e) = results
    assert err(y_c, y_e.double()) <= 1e-6
    for a, b in zip(g_c, g_e):
        assert err(a, b.double()) <= 1e-6


def test_op_registration_and_fake_outputs():
    q, k, v, om = make(2, 2, 7, 5, 8, 3, 16)
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = torch.ops.panther_triton.rfa_attention_fwd(q, k, v, om, None, False, False)
    with FakeTensorMode() as mode:
        fake = torch.ops.panther_triton.rfa_attention_fwd(*(mode.from_tensor(t) for t in (q, k, v, om)), None,
                                                          False, False)
    for r, f in zip(real, fake):
        assert (r.shape, r.stride(), r.dtype) == (f.shape, f.stride(), f.dtype)
    assert math.isfinite(real[0].sum().item())


def test_pipeline_stages_follow_dtype_and_shared_memory(monkeypatch):
    """num_stages of the kernels: 3 for 16-bit inputs where a block may take 200 KiB of shared memory
    (sm_90), one fewer for float32 and one fewer on smaller devices (sm_80's 163 KiB)."""
    from types import SimpleNamespace

    from panther_triton.ops.rfa_attention import common

    def on(size, optin):
        monkeypatch.setattr(common, "shared_memory_per_block", lambda device=None: optin)
        return SimpleNamespace(is_cuda=True, get_device=lambda: 0, element_size=lambda: size)

    assert [common.stages(on(s, 227 * 1024)) for s in (2, 4)] == [3, 2]
    assert [common.stages(on(s, 163 * 1024)) for s in (2, 4)] == [2, 1]
    assert common.stages(torch.zeros(1, dtype=torch.bfloat16)) == 3  # no device: the sm_90 figures (tools)
