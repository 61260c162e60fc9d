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
    assert select("sketched_linear", *inputs).name == "triton"
    with panther.use_backend("auto"):
        y = panther.ops.sketched_linear(*inputs)
    assert y.device.type == "cuda" and y.dtype == torch.bfloat16
    # the fixed bids (auto's fallback when it does not measure) send float32 and 2Lk > 256 to torch, and
    # those inputs still run here when asked for; measured auto picks by timing instead (test_autotune_gpu.py)
    inputs32 = [t.float() if t is not None else None for t in inputs]
    wide = make_inputs(64, 96, 80, 3, 43, torch.bfloat16, device="cuda")
    with panther.backends.use_autotune(False):
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


def _attention_inputs(B, H, T, D, m, dtype, per_head, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=torch.float32).to(dtype)  # noqa: E731
    return rnd(B, H, T, D), rnd(B, H, T, D), rnd(B, H, T, D), rnd(*((H, m, D) if per_head else (m, D)))


def _attention_error(got, ref):
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


ATTN_TOL = {torch.float32: 2e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("T, D, m", [(4096, 64, 64), (16384, 32, 64), (65536, 64, 64), (2048, 64, 32)])
def test_attention_long_sequences(T, D, m, dtype, causal, fp32_precision):
    """Forward and gradients up to 64k tokens against the float64 torch math on the same rounded inputs."""
    from panther.backends.torch_backend.rfa_attention import _attention

    fp32_precision("highest")
    q, k, v, om = _attention_inputs(1, 2, T, D, m, dtype, per_head=True)
    kpm = torch.zeros(1, T, dtype=torch.bool, device="cuda")
    kpm[0, -T // 5:] = True
    leaves = [t.clone().requires_grad_() for t in (q, k, v, om)]
    out = panther.ops.rfa_attention(*leaves, causal=causal, key_padding_mask=kpm, backend="triton")
    refs = [t.double().requires_grad_() for t in (q, k, v, om)]
    ref = _attention(*refs, causal, "softmax", kpm)
    assert _attention_error(out, ref) <= ATTN_TOL[dtype]
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, leaves, g.to(dtype))
    want = torch.autograd.grad(ref, refs, g)
    for name, a, b in zip("q k v omega".split(), got, want):
        assert _attention_error(a, b) <= 2 * ATTN_TOL[dtype], name


def test_attention_layer_compiles_with_inductor_bf16():
    """RandMultiHeadAttention on the triton backend under torch.compile(fullgraph=True): no graph break."""
    from panther.nn import RandMultiHeadAttention

    torch._dynamo.reset()
    layer = RandMultiHeadAttention(256, 4, 64, batch_first=True, seed=0).cuda()
    x = torch.randn(2, 1000, 256, device="cuda")
    counters.clear()
    with panther.use_backend("triton"), torch.autocast("cuda", dtype=torch.bfloat16):
        compiled = torch.compile(lambda t: layer(t, t, t, need_weights=False)[0], fullgraph=True)
        y_c = compiled(x)
        y_e = layer(x, x, x, need_weights=False)[0]
    assert sum(counters["graph_break"].values()) == 0
    assert _attention_error(y_c, y_e.double()) <= ATTN_TOL[torch.bfloat16]


def test_attention_launches():
    """Forward: 1 kernel causal, 2 non-causal; backward: 2 kernels."""
    from torch.profiler import ProfilerActivity, profile

    ours = {"_kv_state_kernel", "_query_kernel", "_causal_kernel", "_query_grad_kernel", "_key_grad_kernel",
            "_causal_query_grad_kernel", "_causal_key_grad_kernel"}
    for causal, n_fwd in ((False, 2), (True, 1)):
        leaves = [t.requires_grad_() for t in _attention_inputs(2, 8, 4096, 64, 64, torch.bfloat16, False)]
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
