"""Every bad argument raises the documented exception type with a message that names the argument."""

import numpy as np
import pytest
import torch

import panther
from panther.nn import RandMultiHeadAttention, SKConv2d, SKLinear
from panther.ops import sketched_conv2d, sketched_linear

pytestmark = pytest.mark.filterwarnings("ignore:.*not fewer than the:UserWarning")


def lin(**kw):
    return SKLinear(6, 4, 1, 1, seed=0, **kw)


def conv(*args, **kw):
    kw.setdefault("seed", 0)
    return SKConv2d(*(args or (3, 4, 3)), **kw)


def attn(**kw):
    return RandMultiHeadAttention(16, 2, 8, seed=0, **kw)


X16 = torch.randn(5, 2, 16)


def lin_op(x_shape=(2, 3), L=1, I=3, k=2, O=4, **kw):
    r = torch.randn
    return sketched_linear(r(*x_shape), r(L, I, k), r(L, k, O), r(L, k, O), r(L, I, k), **kw)


def conv_op(x_shape=(1, 3, 6, 6), terms=2, k=2, C=3, kernel=(3, 3), O=4, **kw):
    r = torch.randn
    return sketched_conv2d(r(*x_shape), r(terms, k, C, *kernel), r(terms, k, O), **kw)


CASES = {
    # --- SKLinear construction
    "in_features<1": (lambda: SKLinear(0, 4, 1, 1), ValueError, r"in_features must be >= 1, got 0"),
    "out_features<1": (lambda: SKLinear(4, -2, 1, 1), ValueError, r"out_features must be >= 1, got -2"),
    "num_terms<1": (lambda: SKLinear(4, 4, 0, 1), ValueError, r"num_terms must be >= 1, got 0"),
    "low_rank<1": (lambda: SKLinear(4, 4, 1, 0), ValueError, r"low_rank must be >= 1, got 0"),
    "in_features float": (lambda: SKLinear(4.0, 4, 1, 1), TypeError, r"in_features must be an int, got 4\.0"),
    "low_rank bool": (lambda: SKLinear(4, 4, 1, True), TypeError, r"low_rank must be an int, got True"),
    "W_init shape": (
        lambda: lin(W_init=torch.randn(6, 4)),
        ValueError,
        r"W_init must have shape \(4, 6\), got \(6, 4\)",
    ),
    "W_init type": (lambda: lin(W_init=[[0.0] * 6] * 4), TypeError, r"W_init must be a torch.Tensor, got list"),
    "W_init dtype": (
        lambda: lin(W_init=torch.zeros(4, 6, dtype=torch.long)),
        TypeError,
        r"W_init must be a floating-point",
    ),
    "seed and generator": (
        lambda: SKLinear(6, 4, 1, 1, seed=0, generator=torch.Generator()),
        ValueError,
        r"at most one of seed and generator",
    ),
    "generator type": (
        lambda: SKLinear(6, 4, 1, 1, generator=0),
        TypeError,
        r"generator must be a torch.Generator, got int",
    ),
    "seed type": (lambda: SKLinear(6, 4, 1, 1, seed="1"), TypeError, r"seed must be an int, got '1'"),
    "seed too large": (
        lambda: SKLinear(6, 4, 1, 1, seed=2**64),
        ValueError,
        r"seed must fit in 64 bits \(-2\*\*63 <= seed < 2\*\*64\), got 18446744073709551616",
    ),
    "from_linear type": (
        lambda: SKLinear.from_linear(torch.nn.Conv1d(2, 2, 1), 1, 1),
        TypeError,
        r"linear must be a torch.nn.Linear, got Conv1d",
    ),
    "from_linear num_terms": (
        lambda: SKLinear.from_linear(torch.nn.Linear(6, 4), 0, 1),
        ValueError,
        r"num_terms must be >= 1",
    ),
    # --- SKLinear forward
    "input last dim": (
        lambda: lin()(torch.randn(3, 5)),
        ValueError,
        r"x \(the input\) must have in_features=6 \(S1s.shape\[1\]\) as its last dimension, got shape \(3, 5\)",
    ),
    "input 0-d": (
        lambda: lin()(torch.tensor(1.0)), ValueError, r"x must have at least 1 dimension\(s\), got shape \(\)"
    ),
    "input dtype": (
        lambda: lin()(torch.randn(3, 6, dtype=torch.float64)),
        TypeError,
        r"x has dtype torch.float64 but S1s has dtype torch.float32; they must match \(convert one: "
        r"x.to\(torch.float32\), or a layer's parameters with layer.to\(torch.float64\)\)",
    ),
    "input integer": (
        lambda: lin()(torch.ones(3, 6, dtype=torch.long)),
        TypeError,
        r"x must be a floating-point tensor, got dtype torch.int64",
    ),
    "input type": (lambda: lin()([1.0] * 6), TypeError, r"x must be a torch.Tensor, got list"),
    "input device": (
        lambda: lin()(torch.empty(3, 6, device="meta")),
        RuntimeError,
        r"x is on meta but S1s is on cpu; they must be on one device \(move one: x.to\('cpu'\), or a layer "
        r"with layer.to\('meta'\)\)",
    ),
    # --- SKConv2d construction
    "in_channels<1": (lambda: conv(0, 4, 3), ValueError, r"in_channels must be >= 1, got 0"),
    "out_channels<1": (lambda: conv(3, 0, 3), ValueError, r"out_channels must be >= 1, got 0"),
    "kernel_size 0": (
        lambda: conv(3, 4, 0),
        ValueError,
        r"kernel_size must be an int or a pair of ints >= 1, got 0",
    ),
    "kernel_size triple": (lambda: conv(3, 4, (3, 3, 3)), ValueError, r"kernel_size must be an int or a pair"),
    "stride 0": (lambda: conv(stride=0), ValueError, r"stride must be an int or a pair of ints >= 1, got 0"),
    "dilation 0": (
        lambda: conv(dilation=(1, 0)),
        ValueError,
        r"dilation must be an int or a pair of ints >= 1, got \(1, 0\)",
    ),
    "padding negative": (
        lambda: conv(padding=-1),
        ValueError,
        r"padding must be an int or a pair of ints >= 0, got -1",
    ),
    "padding string": (
        lambda: conv(padding="full"),
        ValueError,
        r"padding must be 'valid', 'same', an int or a pair of ints, got 'full'",
    ),
    "padding same strided": (
        lambda: conv(padding="same", stride=2),
        ValueError,
        r"padding='same' is not supported for strided convolutions, got stride=2",
    ),
    "conv num_terms": (lambda: conv(num_terms=0), ValueError, r"num_terms must be >= 1, got 0"),
    "conv low_rank": (lambda: conv(low_rank=-3), ValueError, r"low_rank must be >= 1, got -3"),
    "conv W_init shape": (
        lambda: conv(W_init=torch.randn(4, 3, 3)),
        ValueError,
        r"W_init must have shape \(4, 3, 3, 3\), got \(4, 3, 3\)",
    ),
    "conv seed and generator": (lambda: conv(generator=torch.Generator()), ValueError, r"seed and generator"),
    "from_conv2d type": (
        lambda: SKConv2d.from_conv2d(torch.nn.Linear(3, 3), 1, 1),
        TypeError,
        r"conv must be a torch.nn.Conv2d, got Linear",
    ),
    "from_conv2d groups": (
        lambda: SKConv2d.from_conv2d(torch.nn.Conv2d(4, 4, 3, groups=2), 1, 1),
        ValueError,
        r"conv.groups must be 1, got 2",
    ),
    "from_conv2d padding_mode": (
        lambda: SKConv2d.from_conv2d(torch.nn.Conv2d(4, 4, 3, padding_mode="reflect"), 1, 1), ValueError,
        r"conv.padding_mode must be 'zeros', got 'reflect'",
    ),
    # --- SKConv2d forward
    "conv input channels": (
        lambda: conv()(torch.randn(2, 5, 8, 8)),
        ValueError,
        r"x \(the input\) must have in_channels=3 \(S1s.shape\[2\]\) channels at dim -3, got shape \(2, 5, 8, 8\)",
    ),
    "conv input 2-D": (lambda: conv()(torch.randn(8, 8)), ValueError, r"x \(the input\) must be \(N, C, H, W\)"),
    "conv input 5-D": (
        lambda: conv()(torch.randn(1, 2, 3, 8, 8)),
        ValueError,
        r"x \(the input\) must be \(N, C, H, W\).*\(1, 2, 3, 8, 8\)"
    ),
    "conv input dtype": (
        lambda: conv()(torch.randn(2, 3, 8, 8, dtype=torch.float64)),
        TypeError,
        r"x has dtype torch.float64 but S1s has dtype torch.float32",
    ),
    "conv input device": (
        lambda: conv()(torch.empty(2, 3, 8, 8, device="meta")),
        RuntimeError,
        r"x is on meta but S1s is on cpu",
    ),
    "conv input too small": (
        lambda: conv(3, 4, 5, dilation=2)(torch.randn(1, 3, 8, 20)),
        ValueError,
        r"x of shape \(1, 3, 8, 20\) is smaller than the dilated kernel: 8 after padding along dimension -2, "
        r"but the kernel spans 9",
    ),
    # --- functional ops: empty sizes, backend names
    "op num_terms 0": (
        lambda: lin_op(L=0),
        ValueError,
        r"num_terms L must be >= 1, got S1s.shape\[0\] = 0 \(S1s of shape \(0, 3, 2\)\)"
    ),
    "op in_features 0": (
        lambda: lin_op(x_shape=(2, 0), I=0), ValueError, r"in_features I must be >= 1, got S1s.shape\[1\] = 0"
    ),
    "conv op 2L 0": (lambda: conv_op(terms=0), ValueError, r"number of terms 2L must be >= 1, got S1s.shape\[0\] = 0"),
    "conv op k 0": (lambda: conv_op(k=0), ValueError, r"low_rank k must be >= 1, got S1s.shape\[1\] = 0"),
    "conv op C 0": (
        lambda: conv_op(x_shape=(1, 0, 6, 6), C=0), ValueError, r"in_channels C must be >= 1, got S1s.shape\[2\] = 0"
    ),
    "conv op kernel 0": (
        lambda: conv_op(kernel=(3, 0)), ValueError, r"kernel width kw must be >= 1, got S1s.shape\[4\] = 0"
    ),
    "conv op out_channels 0": (
        lambda: conv_op(O=0), ValueError, r"out_channels O must be >= 1, got U1s.shape\[2\] = 0"
    ),
    "conv op stride bool": (
        lambda: conv_op(stride=True), ValueError, r"stride must be an int or a pair of ints >= 1, got True"
    ),
    "op backend empty": (
        lambda: lin_op(backend=""), ValueError, r"backend must be a backend name .*got an empty string"
    ),
    "op backend int": (
        lambda: lin_op(backend=123), TypeError, r"backend must be a backend name \(str\).*got 123 \(int\)"
    ),
    "conv op backend int": (
        lambda: conv_op(backend=1.5), TypeError, r"backend must be a backend name \(str\).*got 1.5"
    ),
    "set_backend empty": (lambda: panther.set_backend(""), ValueError, r"name must be a backend name .*empty string"),
    # --- layer dtypes, lazy modules, sizes that cannot fit
    "dtype int": (
        lambda: lin(dtype=torch.int64), TypeError, r"dtype must be a real floating-point dtype .* got torch.int64"
    ),
    "dtype bool": (
        lambda: lin(dtype=torch.bool), TypeError, r"dtype must be a real floating-point dtype .* got torch.bool"
    ),
    "dtype complex": (
        lambda: lin(dtype=torch.complex64), TypeError, r"dtype must be a real floating.* got torch.complex64"
    ),
    "dtype str": (
        lambda: lin(dtype="float32"), TypeError, r"dtype must be a torch.dtype or None, got 'float32' \(str\)"
    ),
    "conv dtype int": (lambda: conv(dtype=torch.int32), TypeError, r"dtype must be a real floating.* got torch.int32"),
    "conv dtype complex": (
        lambda: conv(dtype=torch.complex128), TypeError, r"dtype must be a real floating.* got torch.complex128"
    ),
    "from_linear lazy": (
        lambda: SKLinear.from_linear(torch.nn.LazyLinear(4), 1, 1),
        ValueError,
        r"linear is a LazyLinear whose parameters are not initialised yet",
    ),
    "from_conv2d lazy": (
        lambda: SKConv2d.from_conv2d(torch.nn.LazyConv2d(4, 3), 1, 1),
        ValueError,
        r"conv is a LazyConv2d whose parameters are not initialised yet",
    ),
    "num_terms too large": (
        lambda: SKLinear(64, 64, 10**9, 64),
        ValueError,
        r"SKLinear\(in_features=64, out_features=64, num_terms=1000000000, low_rank=64\) would need 65.5 TB for its "
        r"tensors \(16.4 TB for S1s alone\), more than the .* of memory of cpu",
    ),
    "conv num_terms too large": (
        lambda: SKConv2d(64, 64, 3, num_terms=10**9, low_rank=64),
        ValueError,
        r"SKConv2d\(in_channels=64, out_channels=64, kernel_size=\(3, 3\), num_terms=1000000000, low_rank=64\) would "
        r"need [\d.]+ TB for its tensors \([\d.]+ TB for S1s alone\)",
    ),
    "in_features too large": (
        lambda: SKLinear(10**10, 10**10, 1, 1),
        ValueError,
        r"would need 400.0 EB for its tensors \(400.0 EB for the dense initial weight alone\)",
    ),
    "conv kernel_size float": (
        lambda: conv(3, 4, 3.0), ValueError, r"kernel_size must be an int or a pair of ints >= 1, got 3.0"
    ),
    "conv stride bool pair": (lambda: conv(stride=(1, True)), ValueError, r"stride must be .*got \(1, True\)"),
    # --- RandMultiHeadAttention construction
    "embed_dim<1": (lambda: RandMultiHeadAttention(0, 1, 4), ValueError, r"embed_dim must be >= 1, got 0"),
    "num_heads<1": (lambda: RandMultiHeadAttention(8, 0, 4), ValueError, r"num_heads must be >= 1, got 0"),
    "not divisible": (
        lambda: RandMultiHeadAttention(10, 3, 4),
        ValueError,
        r"embed_dim must be divisible by num_heads, got embed_dim=10 and num_heads=3",
    ),
    "sketch_dim<1": (lambda: RandMultiHeadAttention(8, 2, 0), ValueError, r"sketch_dim must be >= 1, got 0"),
    "kernel": (
        lambda: attn(kernel="gelu"),
        ValueError,
        r"kernel must be one of \('softmax', 'relu'\), got 'gelu'",
    ),
    "dropout": (lambda: attn(dropout=1.5), ValueError, r"dropout must be a probability in \[0, 1\], got 1.5"),
    "kdim": (lambda: attn(kdim=0), ValueError, r"kdim must be >= 1, got 0"),
    "vdim": (lambda: attn(vdim=2.5), TypeError, r"vdim must be an int, got 2.5"),
    "attn seed and generator": (
        lambda: RandMultiHeadAttention(8, 2, 4, seed=1, generator=torch.Generator()),
        ValueError,
        r"seed and generator",
    ),
    "from_mha type": (
        lambda: RandMultiHeadAttention.from_multihead_attention(torch.nn.Linear(2, 2), 4),
        TypeError,
        r"mha must be a torch.nn.MultiheadAttention, got Linear",
    ),
    "from_mha add_bias_kv": (
        lambda: RandMultiHeadAttention.from_multihead_attention(torch.nn.MultiheadAttention(8, 2, add_bias_kv=True), 4),
        ValueError,
        r"add_bias_kv=True",
    ),
    "from_mha add_zero_attn": (
        lambda: RandMultiHeadAttention.from_multihead_attention(
            torch.nn.MultiheadAttention(8, 2, add_zero_attn=True), 4
        ),
        ValueError,
        r"add_zero_attn=True",
    ),
    "from_mha sketch_dim": (
        lambda: RandMultiHeadAttention.from_multihead_attention(torch.nn.MultiheadAttention(8, 2), 0),
        ValueError,
        r"sketch_dim must be >= 1",
    ),
    # --- RandMultiHeadAttention forward
    "query embed": (
        lambda: attn()(torch.randn(5, 2, 12), X16, X16),
        ValueError,
        r"query must have embed_dim=16 features \(last dimension\), got shape \(5, 2, 12\)",
    ),
    "key kdim": (lambda: attn(kdim=6)(X16, X16, X16), ValueError, r"key must have kdim=6 features"),
    "value vdim": (lambda: attn(vdim=6)(X16, X16, X16), ValueError, r"value must have vdim=6 features"),
    "query 4-D": (
        lambda: attn()(torch.randn(1, 5, 2, 16), X16, X16),
        ValueError,
        r"query must be \(L, E\) unbatched or 3-D batched",
    ),
    "key dims": (
        lambda: attn()(X16, X16[:, 0], X16),
        ValueError,
        r"key must have as many dimensions as query \(3\)",
    ),
    "query dtype": (
        lambda: attn()(X16.double(), X16, X16),
        TypeError,
        r"query has dtype torch.float64 but the RandMultiHeadAttention parameters have dtype torch.float32",
    ),
    "value device": (
        lambda: attn()(X16, X16, torch.empty(5, 2, 16, device="meta")),
        RuntimeError,
        r"value is on meta but the RandMultiHeadAttention parameters are on cpu",
    ),
    "batch mismatch": (
        lambda: attn()(X16, torch.randn(2, 5, 16), torch.randn(2, 5, 16)),
        ValueError,
        r"share the batch size.*batch_first=False.*\(seq, N, E\).*is batch_first=True what was meant",
    ),
    "key/value length": (
        lambda: attn()(X16, X16, torch.randn(6, 2, 16)),
        ValueError,
        r"key and value the sequence length.*key \(5, 2, 16\) and value \(6, 2, 16\)",
    ),
    "kpm shape": (
        lambda: attn()(X16, X16, X16, key_padding_mask=torch.zeros(5, 2, dtype=torch.bool)),
        ValueError,
        r"key_padding_mask must have shape \(N=2, S=5\), got \(5, 2\)",
    ),
    "kpm dtype": (
        lambda: attn()(X16, X16, X16, key_padding_mask=torch.zeros(2, 5, dtype=torch.long)),
        TypeError,
        r"key_padding_mask must be a bool tensor.*got dtype torch.int64",
    ),
    "kpm float values": (
        lambda: attn()(X16, X16, X16, key_padding_mask=torch.full((2, 5), 0.5)),
        ValueError,
        r"a float key_padding_mask may only hold 0 \(attend\) and -inf \(ignore\)",
    ),
    "kpm type": (
        lambda: attn()(X16, X16, X16, key_padding_mask=[[True] * 5] * 2),
        TypeError,
        r"key_padding_mask must be a torch.Tensor or None, got list",
    ),
    "kpm unbatched shape": (
        lambda: attn()(X16[:, 0], X16[:, 0], X16[:, 0], key_padding_mask=torch.zeros(4, dtype=torch.bool)),
        ValueError,
        r"key_padding_mask must have shape \(5,\) or \(1, 5\), got \(1, 4\)",
    ),
    "attn_mask not causal (bool)": (
        lambda: attn()(X16, X16, X16, attn_mask=torch.ones(5, 5, dtype=torch.bool).tril(-1)), ValueError,
        r"can apply a causal mask .* and a key_padding_mask, and no other attn_mask; "
        r"got an attn_mask that is not the causal mask",
    ),
    "attn_mask not causal (float)": (
        lambda: attn()(X16, X16, X16, attn_mask=torch.randn(5, 5)), ValueError, r"linear-time.*not the causal mask",
    ),
    "attn_mask not causal (rectangular)": (
        lambda: attn()(X16, X16[:4], X16[:4], attn_mask=torch.ones(5, 4, dtype=torch.bool).triu(1)),
        ValueError,
        r"attn_mask that is not the causal mask",
    ),
    "attn_mask shape": (
        lambda: attn()(X16, X16, X16, attn_mask=torch.zeros(4, 4, dtype=torch.bool)),
        ValueError,
        r"attn_mask must have shape \(L, S\) = \(5, 5\) or \(N \* num_heads, L, S\) = \(4, 5, 5\), got \(4, 4\)",
    ),
    "attn_mask dtype": (
        lambda: attn()(X16, X16, X16, attn_mask=torch.zeros(5, 5, dtype=torch.long)),
        TypeError,
        r"attn_mask must be a bool or float tensor, got dtype torch.int64",
    ),
    "attn_mask type": (
        lambda: attn()(X16, X16, X16, attn_mask="causal"),
        TypeError,
        r"attn_mask must be a torch.Tensor or None, got str",
    ),
    "is_causal lengths": (
        lambda: attn()(X16, X16[:4], X16[:4], is_causal=True),
        ValueError,
        r"causal attention needs as many queries as keys, got T=5 queries and S=4 keys",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_argument(name):
    make, exc, pattern = CASES[name]
    with pytest.raises(exc, match=pattern):
        make()



@pytest.mark.parametrize("make", [
    lambda i: SKLinear(i(6), i(4), i(1), i(2), seed=i(0)),
    lambda i: SKConv2d(i(3), i(4), i(3), stride=i(2), padding=(i(1), i(0)), dilation=i(1), num_terms=i(1),
                       low_rank=i(2), seed=i(0)),
    lambda i: SKConv2d(i(3), i(4), (i(3), 2), seed=0),
])
def test_numpy_integers_are_accepted_everywhere(make):
    """Any ``operator.index``-able int works where an int does, and gives the layer that plain ints give."""
    with pytest.warns(UserWarning, match="not fewer than"):
        plain = make(int)
    for i in (np.int64, np.int32, np.uint8):
        with pytest.warns(UserWarning, match="not fewer than"):
            layer = make(i)
        assert repr(layer) == repr(plain)
        for (name, a), b in zip(layer.state_dict().items(), plain.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_numpy_integers_in_the_conv_op():
    x, S1s, U1s = torch.randn(1, 3, 7, 7), torch.randn(2, 2, 3, 3, 3), torch.randn(2, 2, 4)
    want = sketched_conv2d(x, S1s, U1s, None, 2, 1, 1)
    got = sketched_conv2d(x, S1s, U1s, None, np.int64(2), (np.int32(1), 1), np.int64(1))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_meta_layers_are_not_limited_by_memory():
    """The size check looks at the memory of the device the layer is built on; meta has none to run out of."""
    layer = SKLinear(10**5, 10**5, 64, 64, device="meta")
    assert layer.S1s.shape == (64, 10**5, 64) and layer.S1s.is_meta
