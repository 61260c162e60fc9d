"""RandMultiHeadAttention: the nn.MultiheadAttention interface, random features, masks, dropout, conversion."""

import copy
import math

import pytest
import torch

from panther.nn import RandMultiHeadAttention


def causal_bool(n):
    return torch.ones(n, n, dtype=torch.bool).triu(1)


def test_parameters_buffers_and_repr():
    attn = RandMultiHeadAttention(24, 3, 10, seed=0)
    names = ["in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"]
    assert [n for n, _ in attn.named_parameters()] == names
    assert [n for n, _ in attn.named_buffers()] == ["omega"]
    assert attn.in_proj_weight.shape == (72, 24) and attn.omega.shape == (3, 10, 8) and attn.head_dim == 8
    assert "omega" in attn.state_dict()
    assert isinstance(attn.out_proj, torch.nn.Linear)
    assert "embed_dim=24, num_heads=3, sketch_dim=10, kernel='softmax', batch_first=False" in repr(attn)
    mha = torch.nn.MultiheadAttention(24, 3)
    # same state_dict keys as nn.MultiheadAttention, plus omega
    assert set(attn.state_dict()) == set(mha.state_dict()) | {"omega"}


def test_separate_projections_when_kdim_vdim_differ():
    attn = RandMultiHeadAttention(16, 2, 8, kdim=5, vdim=7, bias=False, seed=0)
    assert attn.in_proj_weight is None and attn.in_proj_bias is None and attn.out_proj.bias is None
    assert attn.q_proj_weight.shape == (16, 16)
    assert attn.k_proj_weight.shape == (16, 5) and attn.v_proj_weight.shape == (16, 7)
    assert "kdim=5, vdim=7" in repr(attn) and "bias=False" in repr(attn)
    q, k, v = torch.randn(4, 2, 16), torch.randn(6, 2, 5), torch.randn(6, 2, 7)
    out, w = attn(q, k, v)
    assert out.shape == (4, 2, 16) and w is None


def test_init_like_multihead_attention():
    attn = RandMultiHeadAttention(32, 4, 8, seed=0)
    bound = math.sqrt(6 / (32 + 96))  # xavier_uniform on (3E, E)
    assert attn.in_proj_weight.abs().max() <= bound and attn.in_proj_weight.abs().max() > 0.9 * bound
    assert torch.equal(attn.in_proj_bias, torch.zeros(96)) and torch.equal(attn.out_proj.bias, torch.zeros(32))
    assert attn.out_proj.weight.abs().max() <= 1 / math.sqrt(32)
    state = torch.get_rng_state()
    RandMultiHeadAttention(32, 4, 8, seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # out_proj is not drawn from the global RNG either


def test_random_features_are_orthogonal_blocks_with_chi_norms():
    attn = RandMultiHeadAttention(16, 2, 20, dtype=torch.float64, seed=0)  # head_dim 8: blocks of 8, 8, 4 rows
    for h in range(2):
        omega = attn.omega[h]
        for start in (0, 8, 16):
            block = omega[start:start + 8]
            unit = block / block.norm(dim=-1, keepdim=True)
            gram = unit @ unit.t()
            torch.testing.assert_close(gram, torch.eye(len(block), dtype=torch.float64), atol=1e-12, rtol=0)
        norms = omega.norm(dim=-1)
        assert not torch.allclose(norms, norms[0].expand_as(norms))  # rescaled, not unit rows
    # marginally N(0, I): over many features, mean 0 and covariance I
    big = RandMultiHeadAttention(8, 1, 20000, dtype=torch.float64, seed=1).omega[0]
    torch.testing.assert_close(big.mean(0), torch.zeros(8, dtype=torch.float64), atol=0.04, rtol=0)
    torch.testing.assert_close(big.t() @ big / len(big), torch.eye(8, dtype=torch.float64), atol=0.06, rtol=0)


def test_redraw_features_uses_the_layer_generator():
    a, b = RandMultiHeadAttention(16, 2, 8, seed=3), RandMultiHeadAttention(16, 2, 8, seed=3)
    assert torch.equal(a.omega, b.omega)
    old = a.omega.clone()
    state = torch.get_rng_state()
    a.redraw_features()
    b.redraw_features()
    assert not torch.equal(a.omega, old) and torch.equal(a.omega, b.omega)
    assert torch.equal(torch.get_rng_state(), state)


def test_state_dict_round_trip_weights_only(tmp_path):
    attn = RandMultiHeadAttention(16, 2, 8, seed=0)
    torch.save(attn.state_dict(), tmp_path / "a.pt")
    fresh = RandMultiHeadAttention(16, 2, 8, seed=1)
    fresh.load_state_dict(torch.load(tmp_path / "a.pt", weights_only=True))
    x = torch.randn(5, 2, 16)
    assert torch.equal(fresh(x, x, x)[0], attn(x, x, x)[0])


@pytest.mark.parametrize("batch_first", [False, True])
def test_layouts_and_unbatched(batch_first):
    attn = RandMultiHeadAttention(16, 4, 8, batch_first=batch_first, seed=0).eval()
    q = torch.randn(3, 5, 16)  # batch_first: (N=3, L=5); else (L=3, N=5)
    kv = torch.randn(3, 7, 16) if batch_first else torch.randn(6, 5, 16)
    out, _ = attn(q, kv, kv)
    assert out.shape == q.shape
    # batch element 1 alone, unbatched, gives the same result
    q1 = q[1] if batch_first else q[:, 1]
    kv1 = kv[1] if batch_first else kv[:, 1]
    out1, _ = attn(q1, kv1, kv1)
    torch.testing.assert_close(out1, out[1] if batch_first else out[:, 1], rtol=1e-5, atol=1e-6)


def test_batch_first_matches_sequence_first():
    a = RandMultiHeadAttention(16, 2, 8, seed=0).eval()
    b = RandMultiHeadAttention(16, 2, 8, batch_first=True, seed=0).eval()
    x = torch.randn(6, 3, 16)
    xb = x.transpose(0, 1)
    torch.testing.assert_close(b(xb, xb, xb)[0].transpose(0, 1), a(x, x, x)[0])


def test_causal_mask_forms_are_equivalent():
    attn = RandMultiHeadAttention(16, 2, 8, seed=0).eval()
    x = torch.randn(7, 2, 16)
    by_flag = attn(x, x, x, is_causal=True)[0]
    by_bool = attn(x, x, x, attn_mask=causal_bool(7))[0]
    by_float = attn(x, x, x, attn_mask=torch.nn.Transformer.generate_square_subsequent_mask(7))[0]
    by_3d = attn(x, x, x, attn_mask=causal_bool(7).expand(2 * 2, 7, 7))[0]
    both = attn(x, x, x, attn_mask=causal_bool(7), is_causal=True)[0]
    for other in (by_bool, by_float, by_3d, both):
        torch.testing.assert_close(other, by_flag)
    assert not torch.allclose(by_flag, attn(x, x, x)[0])
    # causal: the output at t does not depend on inputs after t
    y = x.clone()
    y[4:] = torch.randn(3, 2, 16)
    torch.testing.assert_close(attn(y, y, y, is_causal=True)[0][:4], by_flag[:4])


def test_key_padding_mask_bool_and_float():
    attn = RandMultiHeadAttention(16, 2, 8, batch_first=True, seed=0).eval()
    x = torch.randn(2, 6, 16)
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[0, 4:] = True
    kpm[1, 0] = True
    out = attn(x, x, x, key_padding_mask=kpm)[0]
    fmask = torch.zeros(2, 6).masked_fill(kpm, float("-inf"))
    torch.testing.assert_close(attn(x, x, x, key_padding_mask=fmask)[0], out)
    # ignored keys do not matter
    y = x.clone()
    y[0, 4:] = torch.randn(2, 16)
    torch.testing.assert_close(attn(x, y, y, key_padding_mask=kpm)[0][0], out[0])
    # ... and equal dropping them
    torch.testing.assert_close(attn(x[:1], x[:1, :4], x[:1, :4])[0], out[:1])
    # unbatched (S,) mask
    torch.testing.assert_close(attn(x[0], x[0], x[0], key_padding_mask=kpm[0])[0], out[0])


def test_weights_none_unless_materialized():
    attn = RandMultiHeadAttention(16, 2, 8, seed=0).eval()
    x = torch.randn(5, 3, 16)
    assert attn(x, x, x)[1] is None
    assert attn(x, x, x, need_weights=True)[1] is None
    assert attn(x, x, x, need_weights=False, materialize_weights=True)[1] is None
    out, w = attn(x, x, x, materialize_weights=True)
    assert w.shape == (3, 5, 5)
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 5))
    _, wh = attn(x, x, x, materialize_weights=True, average_attn_weights=False, is_causal=True)
    assert wh.shape == (3, 2, 5, 5) and torch.all(wh.triu(1) == 0)
    _, wu = attn(x[:, 0], x[:, 0], x[:, 0], materialize_weights=True, average_attn_weights=False)
    assert wu.shape == (2, 5, 5)
    # the output does not depend on asking for weights
    torch.testing.assert_close(out, attn(x, x, x)[0])


def test_dropout_drops_whole_keys_in_training_only():
    """In training each output equals the eval attention weights applied to v with some keys' rows zeroed
    (and the rest scaled by 1/(1-p)): whole keys dropped, the normaliser unchanged."""
    import itertools

    p = 0.5
    attn = RandMultiHeadAttention(8, 1, 16, dropout=p, dtype=torch.float64, seed=0)
    with torch.no_grad():
        attn.in_proj_bias.uniform_(-0.5, 0.5)
    x = torch.randn(4, 1, 8, dtype=torch.float64)  # S = 4 keys, one head: 16 possible key masks
    attn.eval()
    eval_out, A = attn(x, x, x, materialize_weights=True, average_attn_weights=False)
    assert torch.equal(attn(x, x, x)[0], eval_out)  # eval: no dropout, deterministic
    v = torch.nn.functional.linear(x[:, 0], attn.in_proj_weight[16:], attn.in_proj_bias[16:])  # (S, E)
    candidates = []
    for keep in itertools.product((0.0, 1.0), repeat=4):
        m = torch.tensor(keep, dtype=torch.float64).unsqueeze(-1) / (1 - p)
        candidates.append(attn.out_proj(A[0, 0] @ (v * m)))
    attn.train()
    seen = set()
    with torch.no_grad():
        for _ in range(12):
            out = attn(x, x, x)[0][:, 0]
            match = [i for i, c in enumerate(candidates) if torch.allclose(out, c, rtol=0, atol=1e-10)]
            assert len(match) == 1
            seen.add(match[0])
    assert len(seen) > 1  # the masks are random
    # dropout = 1 drops every key: only the output bias remains
    attn1 = RandMultiHeadAttention(16, 2, 8, dropout=1.0, seed=0)
    with torch.no_grad():
        attn1.out_proj.bias.uniform_()
    y = torch.randn(5, 2, 16)
    torch.testing.assert_close(attn1(y, y, y)[0], attn1.out_proj.bias.expand(5, 2, 16))


def test_dropout_is_unbiased_over_masks():
    """E over the key masks of the dropped-out output is the eval output (mask scaled by 1/(1-p))."""
    attn = RandMultiHeadAttention(8, 1, 16, dropout=0.3, dtype=torch.float64, seed=0)
    x = torch.randn(4, 1, 8, dtype=torch.float64)
    with torch.no_grad():
        ref = attn.eval()(x, x, x)[0]
        attn.train()
        torch.manual_seed(0)
        mean = torch.stack([attn(x, x, x)[0] for _ in range(3000)]).mean(0)
    torch.testing.assert_close(mean, ref, atol=0.03 * ref.abs().max().item(), rtol=0)


def test_from_multihead_attention_copies_everything():
    mha = torch.nn.MultiheadAttention(16, 4, dropout=0.2, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        mha.in_proj_bias.uniform_()
        mha.out_proj.bias.uniform_()
    mha.eval()
    rand = RandMultiHeadAttention.from_multihead_attention(mha, sketch_dim=12, seed=0)
    assert rand.batch_first and rand.dropout == 0.2 and not rand.training and rand.kernel == "softmax"
    assert rand.in_proj_weight.dtype == torch.float64 and rand.omega.shape == (4, 12, 4)
    for name, t in mha.state_dict().items():
        assert torch.equal(rand.state_dict()[name], t), name
        assert rand.state_dict()[name].data_ptr() != t.data_ptr()
    sep = torch.nn.MultiheadAttention(16, 2, kdim=6, vdim=5, bias=False)
    rsep = RandMultiHeadAttention.from_multihead_attention(sep, 8, kernel="relu", seed=0)
    assert rsep.in_proj_bias is None and rsep.kernel == "relu"
    for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"):
        assert torch.equal(rsep.state_dict()[name], sep.state_dict()[name])


def test_approximates_softmax_attention_as_sketch_dim_grows():
    """The random-feature kernel is unbiased for exp(q.k/sqrt(d)): the error to exact attention falls ~ 1/sqrt(m)."""
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True, dtype=torch.float64)
    x = 0.5 * torch.randn(2, 12, 16, dtype=torch.float64)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(12, dtype=torch.float64)
    errors = {}
    for causal in (False, True):
        ref = mha(x, x, x, need_weights=False, attn_mask=mask if causal else None, is_causal=causal)[0]
        for m in (8, 2048):
            errs = []
            for seed in range(4):
                rand = RandMultiHeadAttention.from_multihead_attention(mha, m, seed=seed)
                out = rand(x, x, x, is_causal=causal)[0]
                errs.append(((out - ref).norm() / ref.norm()).item())
            errors[causal, m] = sum(errs) / len(errs)
    for causal in (False, True):
        assert errors[causal, 2048] < 0.05, errors
        assert errors[causal, 2048] < errors[causal, 8] / 4, errors


def test_relu_kernel_runs():
    attn = RandMultiHeadAttention(16, 2, 8, kernel="relu", seed=0)
    x = torch.randn(5, 2, 16)
    out, w = attn(x, x, x, materialize_weights=True)
    assert out.shape == (5, 2, 16) and torch.all(w >= 0)


def test_deepcopy_and_gradients():
    attn = RandMultiHeadAttention(16, 2, 8, seed=0)
    clone = copy.deepcopy(attn)
    x = torch.randn(5, 2, 16, requires_grad=True)
    out = clone(x, x, x)[0]
    out.sum().backward()
    assert all(p.grad is not None for p in clone.parameters()) and x.grad is not None
    assert not clone.omega.requires_grad


def test_meta_device_then_materialise():
    attn = RandMultiHeadAttention(16, 2, 8, device="meta", seed=0)
    x = torch.empty(5, 2, 16, device="meta")
    assert attn(x, x, x)[0].shape == (5, 2, 16)
    attn.to_empty(device="cpu")
    attn.reset_parameters()
    real = RandMultiHeadAttention(16, 2, 8, seed=0)
    for name, t in real.state_dict().items():
        assert torch.equal(attn.state_dict()[name], t), name


def test_fully_padded_sample_has_zero_attention_and_finite_gradients():
    """Issue repro: batch of 2, sample 1 fully padded, loss on sample 0 only: every gradient finite and equal
    to sample 0's alone; sample 1's attention is 0, so its output is out_proj.bias."""
    attn = RandMultiHeadAttention(8, 2, 16, seed=0)
    with torch.no_grad():
        attn.out_proj.bias.uniform_(-1, 1)
    x = torch.randn(5, 2, 8)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[1] = True
    out, _ = attn(x, x, x, key_padding_mask=kpm)
    torch.testing.assert_close(out[:, 1], attn.out_proj.bias.expand(5, 8))
    out[:, 0].sum().backward()
    grads = {n: p.grad.clone() for n, p in attn.named_parameters()}
    assert all(torch.isfinite(g).all() for g in grads.values())
    attn.zero_grad()
    attn(x[:, :1], x[:, :1], x[:, :1])[0].sum().backward()
    for n, p in attn.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, msg=n)
    # the whole batch's loss too: sample 1 contributes only through out_proj.bias
    attn.zero_grad()
    attn(x, x, x, key_padding_mask=kpm)[0].sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in attn.parameters())
    _, w = attn(x, x, x, key_padding_mask=kpm, materialize_weights=True)
    assert torch.equal(w[1], torch.zeros_like(w[1])) and torch.allclose(w[0].sum(-1), torch.ones(5))


@pytest.mark.parametrize("is_causal", [False, True])
def test_empty_sequences(is_causal):
    """S = 0: every query sees no key, the attention is 0 and the output out_proj.bias (as SDPA gives 0);
    L = 0: an empty output, like torch.nn.MultiheadAttention."""
    attn = RandMultiHeadAttention(8, 2, 4, batch_first=True, seed=0)
    with torch.no_grad():
        attn.out_proj.bias.uniform_(-1, 1)
    x = torch.randn(3, 4, 8, requires_grad=True)
    empty = torch.randn(3, 0, 8, requires_grad=True)
    if not is_causal:
        out, _ = attn(x, empty, empty)
        torch.testing.assert_close(out, attn.out_proj.bias.expand(3, 4, 8))
        out.sum().backward()
        assert torch.equal(x.grad, torch.zeros_like(x.grad))
        assert torch.equal(attn.in_proj_weight.grad, torch.zeros_like(attn.in_proj_weight))
    out, w = attn(empty, x if not is_causal else empty, x if not is_causal else empty, is_causal=is_causal,
                  materialize_weights=True)
    assert out.shape == (3, 0, 8) and w.shape == (3, 0, 4 if not is_causal else 0)


def test_causal_rows_before_the_first_key_are_zero():
    attn = RandMultiHeadAttention(8, 2, 8, batch_first=True, dtype=torch.float64, seed=0)
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[0, :2] = True
    out, w = attn(x, x, x, key_padding_mask=kpm, is_causal=True, materialize_weights=True)
    torch.testing.assert_close(out[0, :2], attn.out_proj.bias.expand(2, 8))
    assert torch.equal(w[0, :2], torch.zeros(2, 6, dtype=torch.float64))
    torch.testing.assert_close(w[0, 2:].sum(-1), torch.ones(4, dtype=torch.float64))


def test_gradient_penalty_through_the_layer():
    """create_graph=True through the layer: d/dW |d loss/d x|^2 against central differences."""
    attn = RandMultiHeadAttention(4, 1, 6, dtype=torch.float64, seed=0)
    x = torch.randn(3, 1, 4, dtype=torch.float64)

    def penalty(create_graph):
        with torch.enable_grad():
            xr = x.clone().requires_grad_()
            out = attn(xr, xr, xr, is_causal=True)[0]
            (dx,) = torch.autograd.grad(out.pow(2).sum(), xr, create_graph=create_graph)
            return dx.pow(2).sum()

    (got,) = torch.autograd.grad(penalty(True), attn.in_proj_weight)
    fd = torch.zeros_like(got)
    with torch.no_grad():
        for i in range(got.numel()):
            w = attn.in_proj_weight.view(-1)
            w[i] += 1e-6
            up = penalty(False)
            w[i] -= 2e-6
            down = penalty(False)
            w[i] += 1e-6
            fd.view(-1)[i] = (up - down) / 2e-6
    torch.testing.assert_close(got, fd, rtol=1e-5, atol=1e-7 * fd.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64, "float32"])
def test_dtype_must_be_floating(dtype):
    with pytest.raises(TypeError, match=rf"dtype must be a floating-point torch.dtype \(or None\), got {dtype!r}"):
        RandMultiHeadAttention(8, 2, 4, dtype=dtype)


def test_buffers_that_cannot_fit_are_refused_up_front():
    import time

    start = time.perf_counter()
    pattern = r"sketch_dim=1000000000\) needs about [\d,]+ bytes \([\d.]+ GiB\).* more than"
    with pytest.raises(ValueError, match=pattern):
        RandMultiHeadAttention(8, 2, 10**9)
    assert time.perf_counter() - start < 1.0
    assert RandMultiHeadAttention(8, 2, 10**9, device="meta").omega.shape == (2, 10**9, 4)  # nothing allocated


def test_layer_does_not_import_the_torch_backend():
    import ast
    import inspect

    import panther.nn.attention as module

    tree = ast.parse(inspect.getsource(module))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any(m.startswith("panther.backends.") for m in imported), imported
