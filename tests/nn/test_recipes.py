"""Sketched layers in the recipes models are trained with: autocast, mixed-precision parameters, torch.func,
the nn.Transformer drop-in, compile / export with masks, meta-device construction and channels_last."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import panther
from panther.nn import RandMultiHeadAttention, SKConv2d, SKLinear

pytestmark = pytest.mark.filterwarnings("ignore:.*holds 2\\*num_terms:UserWarning")


class Net(nn.Module):
    """nn.Linear -> SKLinear -> nn.Conv2d -> SKConv2d -> RandMultiHeadAttention, as a model mixes them."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(12, 16)
        self.sklin = SKLinear(16, 48, num_terms=1, low_rank=3, seed=0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.skconv = SKConv2d(8, 8, 3, padding=1, num_terms=1, low_rank=2, seed=1)
        self.attn = RandMultiHeadAttention(8, 2, sketch_dim=6, batch_first=True, seed=2)

    def forward(self, x):  # x: (N, 12)
        h = self.sklin(torch.relu(self.lin(x))).view(-1, 3, 4, 4)
        h = self.skconv(torch.relu(self.conv(h)))  # (N, 8, 4, 4)
        seq = h.flatten(2).transpose(1, 2)  # (N, 16, 8)
        return self.attn(seq, seq, seq, need_weights=False)[0]


def _grads(model, x, autocast=None):
    model.zero_grad()
    if autocast is None:
        out = model(x)
    else:
        with torch.autocast("cpu", dtype=autocast):
            out = model(x)
    out.float().square().mean().backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


# --- 1. autocast


def test_autocast_bf16_trains_like_float32():
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(4, 12)
    ref, g32 = _grads(model, x)
    out, g16 = _grads(model, x, torch.bfloat16)
    assert out.dtype == torch.bfloat16  # like nn.Linear / nn.Conv2d under autocast
    assert torch.allclose(out.float(), ref, rtol=0.05, atol=0.05 * ref.abs().max().item())
    for name, g in g16.items():
        assert g.dtype == torch.float32, name  # gradients flow back to the float32 parameters
        scale = g32[name].norm().item() + 1e-6
        assert (g - g32[name]).norm().item() <= 0.08 * scale, name
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.step()
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("layer", ["linear", "conv", "attention"])
def test_autocast_each_op_outputs_the_autocast_dtype(layer):
    if layer == "linear":
        m, x = SKLinear(10, 20, 1, 2, seed=0), torch.randn(3, 10)
        nn_out = nn.Linear(10, 20)
    elif layer == "conv":
        m, x = SKConv2d(3, 4, 3, num_terms=1, low_rank=2, seed=0), torch.randn(2, 3, 6, 6)
        nn_out = nn.Conv2d(3, 4, 3)
    else:
        m, x = RandMultiHeadAttention(8, 2, 4, seed=0), torch.randn(5, 2, 8)
        nn_out = nn.MultiheadAttention(8, 2)
    call = (lambda mod: mod(x, x, x)[0]) if layer == "attention" else (lambda mod: mod(x))
    ref = call(m)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = call(m), call(nn_out)
        out_bf16_in = call(m) if layer != "attention" else m(x.bfloat16(), x.bfloat16(), x.bfloat16())[0]
    assert out.dtype == expected.dtype == torch.bfloat16
    assert out_bf16_in.dtype == torch.bfloat16  # a bf16 activation (from an autocast layer before) is taken
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    out.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in m.parameters())


def test_float64_is_left_alone_under_autocast():
    m = SKLinear(10, 20, 1, 2, seed=0, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m(torch.randn(3, 10, dtype=torch.float64)).dtype == torch.float64


# --- 2. parameters cast by a mixed-precision wrapper


def _cast_params(model, dtype):
    for p in model.parameters():
        p.data = p.data.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_parameters_only_cast_buffers_follow(dtype):
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(4, 12)
    ref = model(x)
    _cast_params(model, dtype)  # what FSDP2's MixedPrecisionPolicy(param_dtype=...) does before forward
    assert model.sklin.U1s.dtype == torch.float32
    out = model(x.to(dtype))
    assert out.dtype == dtype
    out.float().sum().backward()
    assert model.sklin.S1s.grad.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)


def test_dtype_mismatch_outside_autocast_stays_an_error():
    lin, conv = SKLinear(10, 20, 1, 2, seed=0), SKConv2d(3, 4, 3, num_terms=1, low_rank=2, seed=0)
    attn = RandMultiHeadAttention(8, 2, 4, seed=0)
    with pytest.raises(TypeError, match=r"x has dtype torch.bfloat16 but S1s has dtype torch.float32"):
        lin(torch.randn(3, 10, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match=r"x has dtype torch.bfloat16 but S1s has dtype torch.float32"):
        conv(torch.randn(1, 3, 5, 5, dtype=torch.bfloat16))
    q = torch.randn(4, 1, 8, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"query has dtype torch.bfloat16 but the RandMultiHeadAttention"):
        attn(q, q, q)


def test_fsdp2_mixed_precision_single_process(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = Net()
        x = torch.randn(4, 12)
        ref = model(x)
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for m in (model.sklin, model.skconv, model.attn):
            fully_shard(m, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        out = model(x)
        assert out.dtype == torch.bfloat16
        out.float().square().mean().backward()
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)
    finally:
        dist.destroy_process_group()


# --- 3. torch.func


def _func_model():
    torch.manual_seed(0)
    return nn.ModuleDict(
        {
            "lin": SKLinear(6, 48, 1, 2, seed=0),
            "conv": SKConv2d(3, 4, 3, padding=1, num_terms=1, low_rank=2, seed=1),
            "attn": RandMultiHeadAttention(4, 2, 5, batch_first=True, seed=2),
        }
    ).double()


def _func_forward(model, x):
    h = model["conv"](model["lin"](x).view(-1, 3, 4, 4))  # (N, 4, 4, 4)
    seq = h.flatten(2).transpose(1, 2)  # (N, 16, 4)
    return model["attn"](seq, seq, seq, need_weights=False, is_causal=True)[0].square().mean()


def test_per_sample_gradients_with_vmap():
    from torch.func import functional_call, grad, vmap

    model = _func_model()
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    x = torch.randn(3, 6, dtype=torch.float64)

    wrapper = _Wrapper(model)

    def loss(p, xi):
        state = {f"m.{k}": v for k, v in {**p, **buffers}.items()}
        return functional_call(wrapper, state, (xi.unsqueeze(0),))

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for i in range(x.shape[0]):
        model.zero_grad()
        _func_forward(model, x[i : i + 1]).backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(per_sample[n][i], p.grad, rtol=1e-9, atol=1e-12)


class _Wrapper(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return _func_forward(self.m, x)


def test_jvp_matches_finite_differences_and_autograd():
    from torch.func import jvp

    model = _func_model()
    x = torch.randn(2, 6, dtype=torch.float64)
    t = torch.randn_like(x)
    f = lambda inp: _func_forward(model, inp)  # noqa: E731
    value, tangent = jvp(f, (x,), (t,))
    (g,) = torch.autograd.grad(f(x.requires_grad_()), x)
    torch.testing.assert_close(value, f(x).detach())
    torch.testing.assert_close(tangent, (g * t).sum(), rtol=1e-9, atol=1e-12)


def test_kernel_backend_under_torch_func_is_a_clear_error(monkeypatch):
    from torch.func import grad

    lin = SKLinear(6, 8, 1, 2, seed=0).double()
    x = torch.randn(2, 6, dtype=torch.float64)
    f = lambda inp: panther.ops.sketched_linear(  # noqa: E731
        inp, lin.S1s, lin.S2s, lin.U1s, lin.U2s, lin.bias, backend="triton"
    ).sum()
    message = r"'triton' cannot run sketched_linear under torch.func.*backend='torch'"
    with pytest.raises(panther.BackendError, match=message):
        grad(f)(x)


# --- 4. nn.Transformer drop-in


def _encoder_layer(E=16, heads=4, seed=0):
    layer = nn.TransformerEncoderLayer(E, heads, 32, dropout=0.0, batch_first=True)
    layer.self_attn = RandMultiHeadAttention(E, heads, 8, batch_first=True, seed=seed)
    return layer


def _sketched_only(fn):
    """``fn()`` with torch's fused inference paths impossible (the plain module path, for reference)."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            return fn()
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_encoder_layer_eval_runs_the_sketched_attention(context):
    torch.manual_seed(0)
    layer = _encoder_layer()
    x = torch.randn(3, 7, 16)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 5:] = True
    layer.train()
    layer(x, src_key_padding_mask=pad).square().mean().backward()
    assert layer.self_attn.in_proj_weight.grad is not None
    layer.eval()
    for kwargs in ({}, {"src_key_padding_mask": pad}):
        with context():
            out = layer(x, **kwargs)
        expected = _sketched_only(lambda: layer(x, **kwargs))
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        exact = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True).eval()
        exact.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "self_attn.omega"})
        with torch.no_grad():
            assert (exact(x, **kwargs) - out).abs().max() > 1e-3  # not the exact attention


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_encoder_stack_eval_runs_the_sketched_attention(context):
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(_encoder_layer(), 2, enable_nested_tensor=True).eval()
    x = torch.randn(3, 7, 16)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 5:] = True
    pad[2, 3:] = True
    with context():
        out = enc(x, src_key_padding_mask=pad)  # torch's nested-tensor path hands self_attn nested batches
    expected = _sketched_only(lambda: enc(x, src_key_padding_mask=pad))
    torch.testing.assert_close(out[~pad], expected[~pad], rtol=1e-6, atol=1e-6)
    mask = nn.Transformer.generate_square_subsequent_mask(7)
    with context():
        causal = enc(x, mask=mask)
    torch.testing.assert_close(causal, _sketched_only(lambda: enc(x, is_causal=True, mask=mask)))


def test_decoder_layer_drop_in_trains_and_evaluates():
    torch.manual_seed(0)
    dec = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    dec.self_attn = RandMultiHeadAttention(16, 4, 8, batch_first=True, seed=0)
    dec.multihead_attn = RandMultiHeadAttention(16, 4, 8, batch_first=True, seed=1)
    tgt, memory = torch.randn(2, 6, 16), torch.randn(2, 9, 16)
    mask = nn.Transformer.generate_square_subsequent_mask(6)
    dec(tgt, memory, tgt_mask=mask, tgt_is_causal=True).square().mean().backward()
    dec.eval()
    with torch.inference_mode():
        out = dec(tgt, memory, tgt_mask=mask)
    assert torch.isfinite(out).all()


# --- 5. torch.compile / torch.export with the masks nn.Transformer passes


class _Causal(nn.Module):
    def __init__(self, mask_kind):
        super().__init__()
        self.attn = RandMultiHeadAttention(16, 4, 8, batch_first=True, seed=0)
        self.mask_kind = mask_kind

    def forward(self, x, pad):
        T = x.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=x.device)
        if self.mask_kind == "bool":
            mask = mask == float("-inf")
        return self.attn(x, x, x, attn_mask=mask, key_padding_mask=pad, need_weights=False)[0]


def _float_pad(N, T, padded_from):
    pad = torch.zeros(N, T)
    pad[0, padded_from:] = float("-inf")  # additive float key_padding_mask, as torch accepts
    return pad


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_compile_fullgraph_with_causal_and_float_padding_masks(mask_kind):
    torch._dynamo.reset()
    model = _Causal(mask_kind)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)  # inductor: its lowering must take the checks
    for T in (5, 8):
        x, pad = torch.randn(2, T, 16), _float_pad(2, T, 3)
        torch.testing.assert_close(compiled(x, pad), model(x, pad))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_compile_fullgraph_transformer_encoder(mode):
    torch._dynamo.reset()
    torch.manual_seed(0)
    enc = getattr(nn.TransformerEncoder(_encoder_layer(), 2), mode)()
    x = torch.randn(2, 7, 16)
    mask = nn.Transformer.generate_square_subsequent_mask(7)
    pad = _float_pad(2, 7, 5)
    compiled = torch.compile(enc, fullgraph=True, backend="eager")
    # is_causal=True: without the hint, torch's own TransformerEncoder reads the mask's data to detect it
    out = compiled(x, mask=mask, is_causal=True, src_key_padding_mask=pad)
    torch.testing.assert_close(out, enc(x, mask=mask, is_causal=True, src_key_padding_mask=pad))


def test_compile_still_refuses_a_non_causal_mask():
    torch._dynamo.reset()
    attn = RandMultiHeadAttention(16, 4, 8, batch_first=True, seed=0)
    f = torch.compile(lambda x, m: attn(x, x, x, attn_mask=m)[0], fullgraph=True, backend="eager")
    x = torch.randn(2, 5, 16)
    with pytest.raises(RuntimeError, match="not the causal mask"):
        f(x, torch.zeros(5, 5, dtype=torch.bool))


def test_export_with_dynamic_sequence_length():
    model = _Causal("float").eval()
    T = torch.export.Dim("T", min=2, max=64)
    x, pad = torch.randn(2, 6, 16), _float_pad(2, 6, 4)
    ep = torch.export.export(model, (x, pad), dynamic_shapes=({1: T}, {1: T}))
    for n in (6, 11):
        x, pad = torch.randn(2, n, 16), _float_pad(2, n, 4)
        torch.testing.assert_close(ep.module()(x, pad), model(x, pad))


# --- 6. meta device, channels_last


def test_meta_device_construction_without_a_seed():
    torch.manual_seed(0)
    with torch.device("meta"):
        layers = [
            SKLinear(64, 64, 1, 4),
            SKConv2d(8, 8, 3, num_terms=1, low_rank=2),
            RandMultiHeadAttention(16, 4, 8),
        ]
    for layer in layers:
        assert all(t.is_meta for t in layer.state_dict().values())
    real = layers[0].to_empty(device="cpu")
    real.reset_parameters()
    assert torch.isfinite(real(torch.randn(2, 64))).all()


def test_channels_last_model_with_skconv2d():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), SKConv2d(8, 16, 3, num_terms=1, low_rank=4, seed=0), nn.ReLU())
    x = torch.randn(2, 3, 10, 10)
    ref = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model = model.to(memory_format=torch.channels_last)
    xc = x.to(memory_format=torch.channels_last)
    out = model[1](model[0](xc))
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(model(xc), ref, rtol=1e-5, atol=1e-5)
    assert model[1].S1s.shape == state["1.S1s"].shape
    model.load_state_dict(state)  # same state_dict
    model(xc).sum().backward()
    assert model[1].S1s.grad.shape == model[1].S1s.shape


# --- 8. the training recipes page


def test_training_page_examples_run():
    import doctest
    from pathlib import Path

    page = Path(__file__).resolve().parents[2] / "docs" / "guide" / "training.rst"
    torch._dynamo.reset()
    torch.manual_seed(0)
    result = doctest.testfile(
        str(page), module_relative=False, globs={"torch": torch, "pr": panther}, optionflags=doctest.ELLIPSIS
    )
    assert result.failed == 0 and result.attempted >= 10
