"""GPU tests (marker `gpu`): real sizes in every dtype, TF32 on and off, Inductor, auto selection.

Skipped without CUDA; with PANTHER_REQUIRE_GPU=1 they fail instead (conftest.py). The kernel tests in
the other files also run on the GPU when TRITON_INTERPRET is unset (ragged shapes, every plan).
"""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import panther
import panther.backends.torch_backend  # noqa: F401  (the float64 reference of test_tf32_is_really_used_when_allowed)
import panther_triton
from panther.backends import backend_infos, load_backend, select
from triton_test_utils import TOL, TOL_TF32, make_inputs, rel_err, run_and_compare

pytestmark = pytest.mark.gpu

# T = 4096 rows, I = O = 8192 features, L k = 64 as one term or as 8 terms (the spec's (8, 8) end):
# the largest shape.
BIG = [(4096, 8192, 8192, L, 64 // L) for L in (1, 8)]
TRAINED = (0, 1, 2, 5)


@pytest.fixture
def fp32_precision():
    prev = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(prev)


def test_priority_and_auto_selection_on_cuda():
    be = {i.name: i.backend for i in backend_infos()}["triton"]
    assert be.unavailable_reason() is None
    assert be.priority == 10 > load_backend("torch").priority
    inputs = make_inputs(64, 96, 80, 2, 8, torch.bfloat16, device="cuda")
    with panther.use_backend("auto"):
        y = panther.ops.sketched_linear(*inputs)
    assert y.device.type == "cuda" and y.dtype == torch.bfloat16
    # the fixed bids (auto's fallback when it does not measure) take triton for 16-bit inputs and send
    # float32 and 2Lk > 256 to torch, and those inputs still run here when asked for; measured auto picks by
    # timing instead (test_autotune_gpu.py)
    inputs32 = [t.float() if t is not None else None for t in inputs]
    wide = make_inputs(64, 96, 80, 3, 43, torch.bfloat16, device="cuda")
    with panther.backends.use_autotune(False):
        assert select("sketched_linear", *inputs).name == "triton"
        for args in (inputs32, wide):
            assert select("sketched_linear", *args).name == "torch"
            assert select("sketched_linear", *args, backend="triton").name == "triton"


@pytest.mark.parametrize("shape", BIG, ids=lambda s: f"L{s[3]}_k{s[4]}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_large_16bit(shape, dtype):
    run_and_compare(panther_triton.sketched_linear, make_inputs(*shape, dtype, device="cuda"), TRAINED, TOL[dtype])


@pytest.mark.parametrize("shape", BIG[:2], ids=lambda s: f"L{s[3]}_k{s[4]}")
@pytest.mark.parametrize("tf32", [True, False], ids=["tf32", "ieee"])
def test_large_float32(shape, tf32, fp32_precision):
    fp32_precision("high" if tf32 else "highest")
    inputs = make_inputs(*shape, torch.float32, device="cuda")
    run_and_compare(panther_triton.sketched_linear, inputs, TRAINED, TOL_TF32 if tf32 else TOL[torch.float32])


@pytest.mark.parametrize("shape", [(300, 1000, 700, 2, 64), (300, 1000, 700, 3, 50)], ids=["Lk128", "Lk150"])
@pytest.mark.parametrize("tf32", [True, False], ids=["tf32", "ieee"])
def test_float32_at_the_widest_column_chunk(shape, tf32, fp32_precision):
    """float32 tiles at BLK = 128 need the float32-only autotune candidates: the 16-bit ones run out of
    shared memory there (the dH kernel's smallest asked for 240 KiB of the H200's 227)."""
    fp32_precision("high" if tf32 else "highest")
    inputs = make_inputs(*shape, torch.float32, device="cuda")
    run_and_compare(panther_triton.sketched_linear, inputs, range(6), TOL_TF32 if tf32 else TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cached_launches_respecialise(dtype):
    """Eager launches come from panther_triton._launch's kept compiled launches after the first: a batch size, a
    misaligned input (Triton specialises pointers on 16-byte alignment) or a strided input seen after
    an aligned contiguous one must each get their own kernel, and every result stays exact."""
    tol = TOL[dtype]  # float32 at torch's default precision: TF32 off
    base = make_inputs(300, 1000, 700, 2, 24, dtype, device="cuda")
    buf = torch.randn(301 * 1000 + 8, device="cuda", dtype=dtype)
    xs = {
        "aligned": base[0],
        "again": base[0].clone(),
        "rows 37": base[0][:37],
        "misaligned": buf[1:1 + 300 * 1000].view(300, 1000),  # 2- or 4-byte offset
        "strided": torch.randn(300, 2000, device="cuda", dtype=dtype)[:, ::2],
    }
    for name, x in xs.items():
        for _ in range(2):  # the second call is a cached launch
            run_and_compare(panther_triton.sketched_linear, (x, *base[1:]), TRAINED, tol)
    # and the cache is really in use (this Triton's launches return compiled kernels it can call)
    from panther_triton._launch import cached_launches

    assert cached_launches() > 0


def test_tf32_is_really_used_when_allowed(fp32_precision):
    """Same inputs: the TF32 result carries TF32-sized error, the IEEE one float32-sized error."""
    inputs = make_inputs(512, 2048, 1024, 1, 64, torch.float32, device="cuda")
    errs = {}
    for mode in ("high", "highest"):
        fp32_precision(mode)
        y = panther_triton.sketched_linear(*inputs)
        y_ref = panther.backends.torch_backend.sketched_linear(*(t.double() for t in inputs))
        errs[mode] = rel_err(y, y_ref)
    assert errs["highest"] <= TOL[torch.float32]
    assert errs["high"] > 10 * errs["highest"]


@pytest.mark.parametrize("shape", [(128, 1024, 1024, 1, 64), (4096, 2048, 2048, 2, 32), (300, 1000, 3000, 3, 50)],
                         ids=["T128", "T4096", "R300"])
def test_matches_the_torch_backend_on_cuda(shape):
    """Triton and the reference backend on the same bf16 CUDA tensors agree to bf16 accuracy."""
    inputs = make_inputs(*shape, torch.bfloat16, device="cuda")
    y_t = panther.ops.sketched_linear(*inputs, backend="triton")
    y_r = panther.ops.sketched_linear(*inputs, backend="torch")
    assert rel_err(y_t, y_r.double()) <= 2 * TOL[torch.bfloat16]


def test_inductor_fullgraph_zero_breaks_bf16():
    from test_compile import SketchedMLP

    torch._dynamo.reset()
    panther.backends.backend_infos()
    model = SketchedMLP((1024, 2048, 512), L=2, k=32, dtype=torch.bfloat16).cuda()
    x = make_inputs(512, 1024, 1, 1, 1, torch.bfloat16, device="cuda", lead=(2,))[0]
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    counters.clear()
    compiled = torch.compile(model, fullgraph=True)
    xc = x.clone().requires_grad_()
    y_c = compiled(xc)
    y_c.float().square().sum().backward()
    g_c = [xc.grad] + [p.grad.clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = None
    xe = x.clone().requires_grad_()
    y_e = model(xe)
    y_e.float().square().sum().backward()
    g_e = [xe.grad] + [p.grad for p in model.parameters()]
    assert sum(counters["graph_break"].values()) == 0
    assert rel_err(y_c, y_e.double()) <= TOL[torch.bfloat16]
    for a, b in zip(g_c, g_e):
        assert rel_err(a, b.double()) <= TOL[torch.bfloat16]


def test_launches_on_the_device():
    """Forward: 1-2 kernels; backward: at most 3 (profiler count of our kernels)."""
    from torch.profiler import ProfilerActivity, profile

    OURS = {"_sketch_in_kernel", "_sketch_out_kernel", "_grad_from_g_kernel", "_grad_from_x_kernel",
            "_sum_partials_kernel"}

    for shape in [(4096, 8192, 8192, 1, 64), (128, 1024, 1024, 2, 32), (4096, 1024, 1024, 1, 64)]:
        leaves = [t.requires_grad_(i in TRAINED) for i, t in enumerate(make_inputs(*shape, torch.bfloat16, device="cuda"))]
        y = panther_triton.sketched_linear(*leaves)  # warm-up: autotuning launches many times
        y.backward(torch.ones_like(y))
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            y = panther_triton.sketched_linear(*leaves)
            torch.cuda.synchronize()
        fwd = [e.name for e in prof.events() if e.name in OURS]
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            y.backward(torch.ones_like(y))
            torch.cuda.synchronize()
        bwd = [e.name for e in prof.events() if e.name in OURS]
        assert 1 <= len(fwd) <= 2, fwd
        assert 2 <= len(bwd) <= 3, bwd


# --- random-feature attention (rfa_attention) on the GPU
# The kernel tests of test_rfa_attention.py also run here (small ragged shapes, every feature-chunk and
# head-dim edge, fp32/fp16); this section adds real sizes, bfloat16, long sequences and Inductor. It
# keeps to about a minute of GPU time (most of it compiling the kernel variants once).


def _attention_inputs(B, H, T, D, Dv, m, dtype, per_head, S=None, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=torch.float32).to(dtype)  # noqa: E731
    S = T if S is None else S
    return rnd(B, H, T, D), rnd(B, H, S, D), rnd(B, H, S, Dv), rnd(*((H, m, D) if per_head else (m, D)))


def _padding(B, S, seed=0):
    """About a fifth of each sample's keys padded at random, and the second sample's last third."""
    kpm = torch.rand(B, S, generator=torch.Generator(device="cuda").manual_seed(seed), device="cuda") < 0.2
    if B > 1:
        kpm[1, -S // 3:] = True
    return kpm


def _attention_error(got, ref):
    assert torch.isfinite(got).all(), "non-finite values"
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def _forward_and_grads(q, k, v, om, causal, kpm, backend, g=None, dtype=None):
    """Output and the gradients of q, k, v, omega (as given, or cast to dtype first) under backend."""
    leaves = [(t if dtype is None else t.to(dtype)).detach().clone().requires_grad_() for t in (q, k, v, om)]
    if backend == "float64":
        from panther.backends.torch_backend.rfa_attention import _attention

        out = _attention(*leaves, causal, "softmax", kpm)
    else:
        out = panther.ops.rfa_attention(*leaves, causal=causal, key_padding_mask=kpm, backend=backend)
    g = torch.randn(out.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1)) if g is None else g
    grads = torch.autograd.grad(out, leaves, g.to(out.dtype))
    return out.detach(), grads, g


# Max-normalised error against float64 math on the same rounded inputs: the output rounding (u/2 of the
# dtype) plus TF32 products of the features for 16-bit inputs (relative 2^-11 each, their logits of order
# 10 at most here); the gradients sum such terms over rows with random signs, so their relative error
# stays of the same order.
ATTN_TOL = {torch.float32: 2e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}

# (B, H, T, S, D, Dv, m, per_head): a layer's head size; T != S; wide heads with every feature chunk
MODERATE = {
    "D64_m64": (2, 4, 1500, 1500, 64, 64, 64, False),
    "D48_Dv80_m100_TneS": (2, 3, 1100, 700, 48, 80, 100, True),
    "D128_m256": (1, 2, 900, 900, 128, 128, 256, True),
}
MODERATE_CASES = [(name, torch.bfloat16) for name in MODERATE] + [("D48_Dv80_m100_TneS", torch.float16),
                                                                   ("D128_m256", torch.float32)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape, dtype", MODERATE_CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_attention_against_float64(shape, dtype, causal, fp32_precision):
    """Forward and the gradients of q, k, v, omega against the float64 torch math, padded keys."""
    fp32_precision("highest")  # float32 inputs: IEEE products (16-bit inputs use TF32 regardless)
    B, H, T, S, D, Dv, m, per_head = MODERATE[shape]
    if causal:
        S = T
    q, k, v, om = _attention_inputs(B, H, T, D, Dv, m, dtype, per_head, S=S)
    kpm = _padding(B, S)
    out, grads, g = _forward_and_grads(q, k, v, om, causal, kpm, "triton")
    ref, ref_grads, _ = _forward_and_grads(q, k, v, om, causal, kpm, "float64", g=g.double(), dtype=torch.float64)
    assert out.dtype == dtype and _attention_error(out, ref) <= ATTN_TOL[dtype]
    errs = {name: _attention_error(a, b) for name, a, b in zip("q k v omega".split(), grads, ref_grads)}
    assert all(e <= 2 * ATTN_TOL[dtype] for e in errs.values()), errs


# float32 inputs with TF32 products: the feature products' error of the 16-bit cases (float16's bound, whose
# output rounding is below TF32's)
ATTN_TOL_TF32 = 1e-2


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", ["D64_m64", "D128_m256"])
def test_attention_float32_tf32_against_float64(shape, causal, fp32_precision):
    """float32 at matmul precision "high" (TF32 products on the kernels' widest float32 tiles; the causal
    backward at D = 64 is the kernel nearest the shared-memory limit), forward and gradients."""
    fp32_precision("high")
    B, H, T, S, D, Dv, m, per_head = MODERATE[shape]
    q, k, v, om = _attention_inputs(B, H, T, D, Dv, m, torch.float32, per_head, S=T)
    kpm = _padding(B, T)
    out, grads, g = _forward_and_grads(q, k, v, om, causal, kpm, "triton")
    ref, ref_grads, _ = _forward_and_grads(q, k, v, om, causal, kpm, "float64", g=g.double(), dtype=torch.float64)
    assert _attention_error(out, ref) <= ATTN_TOL_TF32
    errs = {name: _attention_error(a, b) for name, a, b in zip("q k v omega".split(), grads, ref_grads)}
    assert all(e <= 2 * ATTN_TOL_TF32 for e in errs.values()), errs


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("T, D, m", [(16384, 128, 256), (65536, 64, 64)], ids=["16k_D128_m256", "64k_D64_m64"])
def test_attention_long_sequences_bf16(T, D, m, causal, fp32_precision):
    """bfloat16 up to 64k tokens against the torch backend in float32 on the same rounded inputs.

    Tolerance: the larger of the bf16 bound of the moderate sizes and twice the torch backend's own error
    when it runs on the bf16 tensors, both measured against the float32 run; so the bound follows
    whatever a longer sequence makes harder for either implementation, and stays at bf16 rounding
    where nothing does."""
    fp32_precision("highest")
    q, k, v, om = _attention_inputs(1, 2, T, D, D, m, torch.bfloat16, per_head=True)
    kpm = _padding(1, T)
    ref, ref_grads, g = _forward_and_grads(q, k, v, om, causal, kpm, "torch", dtype=torch.float32)
    ours, our_grads, _ = _forward_and_grads(q, k, v, om, causal, kpm, "triton", g=g)
    torch_bf16, torch_grads, _ = _forward_and_grads(q, k, v, om, causal, kpm, "torch", g=g)
    for name, a, b, c in zip(["out"] + "dq dk dv domega".split(), (ours, *our_grads), (ref, *ref_grads),
                             (torch_bf16, *torch_grads)):
        tol = max((1 if name == "out" else 2) * ATTN_TOL[torch.bfloat16], 2 * _attention_error(c, b))
        assert _attention_error(a, b) <= tol, (name, _attention_error(a, b), tol)


@pytest.mark.parametrize("E, H, m, causal", [(512, 8, 64, False), (512, 4, 256, True)],
                         ids=["D64_m64_full_padded", "D128_m256_causal"])
def test_attention_layer_compiles_with_inductor(E, H, m, causal):
    """RandMultiHeadAttention on the triton backend under torch.compile(fullgraph=True), bfloat16: no
    graph break, and output and gradients (input, projections) equal to eager."""
    from panther.nn import RandMultiHeadAttention

    torch._dynamo.reset()
    layer = RandMultiHeadAttention(E, H, m, batch_first=True, seed=0, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(2, 1000, E, device="cuda", dtype=torch.bfloat16)
    kpm = _padding(2, 1000)

    def step(t):
        return layer(t, t, t, key_padding_mask=None if causal else kpm, need_weights=False, is_causal=causal)[0]

    with panther.use_backend("triton"):
        explained = torch._dynamo.explain(step)(x)
        assert explained.graph_break_count == 0, explained.break_reasons
        counters.clear()
        results = []
        for fn in (torch.compile(step, fullgraph=True), step):
            layer.zero_grad()
            xi = x.clone().requires_grad_()
            y = fn(xi)
            y.float().square().sum().backward()
            results.append((y.detach(), [xi.grad] + [p.grad.clone() for p in layer.parameters()]))
    assert sum(counters["graph_break"].values()) == 0
    (y_c, g_c), (y_e, g_e) = results
    assert _attention_error(y_c, y_e) <= ATTN_TOL[torch.bfloat16]
    for a, b in zip(g_c, g_e):
        assert _attention_error(a, b) <= 2 * ATTN_TOL[torch.bfloat16]


def test_attention_launches():
    """Forward: 2 kernels (causal: the segments' starting states, then the segments); backward: 2."""
    from torch.profiler import ProfilerActivity, profile

    ours = {"_kv_state_kernel", "_query_kernel", "_causal_kernel", "_query_grad_kernel", "_key_grad_kernel",
            "_causal_query_grad_kernel", "_causal_key_grad_kernel"}
    for causal, n_fwd in ((False, 2), (True, 2)):
        leaves = [t.requires_grad_() for t in _attention_inputs(2, 8, 4096, 64, 64, 64, torch.bfloat16, False)]
        out = panther.ops.rfa_attention(*leaves, causal=causal, backend="triton")
        out.sum().backward()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            out = panther.ops.rfa_attention(*leaves, causal=causal, backend="triton")
            torch.cuda.synchronize()
        assert len([e.name for e in prof.events() if e.name in ours]) == n_fwd
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            out.sum().backward()
            torch.cuda.synchronize()
        assert len([e.name for e in prof.events() if e.name in ours]) == 2
