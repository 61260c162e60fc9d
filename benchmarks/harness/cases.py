"""Benchmark cases as data: the three ops and the attention layer, what each is compared with, how much work each does, presets.

Every case builds fresh random inputs, lists its implementations (each Panther backend through
``panther.ops`` with ``backend=`` pinned, plus baselines), and counts the flops and the fewest elements
each family of implementations must move (inputs read once, outputs written once; intermediates that a
fused kernel could keep on chip are not counted; fixed sketches U get no gradient).
Families: "sketch" (the sketched math, whoever computes it) and the op's dense baseline.
Baselines of the sketch family: "plain" (the math term by term under autograd, as a user would first write
it) and "compiled" (the same math written as a user would for speed: the terms concatenated into the
fewest products, under torch.compile).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Callable, ClassVar, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

import panther.ops
from harness.timing import Budget

PASSES = ("fwd", "fwd+bwd")


@dataclasses.dataclass(frozen=True)
class Impl:
    name: str
    kind: str  # "backend": a Panther backend; "baseline": what a user would use instead
    family: str  # "sketch" or the case's dense family
    args: Tuple[str, ...]  # names of the inputs it takes, in order
    fn: Callable


def rademacher(shape, k, device, dtype):
    """Entries ±1/sqrt(k), as the fixed sketches U of the layers."""
    return (torch.randint(0, 2, shape, device=device).to(dtype) * 2 - 1) / math.sqrt(k)


class Case:
    """Shared by the op cases: backends and baselines, and the fields every record carries."""

    op: ClassVar[str]
    base: ClassVar[str]  # name of the baseline a user would use instead
    sketch_args: ClassVar[Tuple[str, ...]]
    x_key: ClassVar[str]  # case field on the x axis of the plots

    def impls(self, backends) -> Dict[str, Impl]:
        from panther.backends import load_backend

        found = {
            name: Impl(name, "backend", "sketch", self.sketch_args, self.backend_fn(name))
            for name in backends
            if load_backend(name).implements(self.op)  # e.g. triton has no conv2d kernels
        }
        found.update(self.baselines())
        return found

    @property
    def params(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("tag", "rounds")}

    def reference(self, inputs) -> torch.Tensor:
        """The plain math in float64 on the same inputs: what the backends' forward is checked against."""
        plain = self.baselines()["plain"]
        with torch.no_grad():
            return plain.fn(*(inputs[a].double() for a in plain.args))


@dataclasses.dataclass(frozen=True)
class LinearCase(Case):
    rows: int
    size: int  # in_features = out_features
    terms: int  # num_terms L
    rank: int  # low_rank k
    tag: str = ""
    rounds: Optional[int] = None  # overrides the preset's rounds

    op: ClassVar[str] = "sketched_linear"
    base: ClassVar[str] = "F.linear"
    sketch_args: ClassVar[Tuple[str, ...]] = ("x", "S1s", "S2s", "U1s", "U2s", "b")
    x_key: ClassVar[str] = "size"

    @property
    def label(self) -> str:
        return f"T={self.rows} {self.size}->{self.size} L={self.terms} k={self.rank}"

    @property
    def series(self) -> str:
        return f"L={self.terms} k={self.rank} T={self.rows}"

    def build(self, device, dtype) -> dict:
        T, I, O, L, k = self.rows, self.size, self.size, self.terms, self.rank
        new = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
        return {
            "x": new(T, I).requires_grad_(),
            "W": (new(O, I) / math.sqrt(I)).requires_grad_(),
            "b": (new(O) * 0.1).requires_grad_(),
            "S1s": (new(L, I, k) / math.sqrt(I)).requires_grad_(),
            "S2s": (new(L, k, O) / math.sqrt(k)).requires_grad_(),
            "U1s": rademacher((L, k, O), k, device, dtype),
            "U2s": rademacher((L, I, k), k, device, dtype),
            "g": new(T, O),
        }

    @staticmethod
    def backend_fn(name):
        return lambda *a: panther.ops.sketched_linear(*a, backend=name)

    def baselines(self) -> Dict[str, Impl]:
        return {
            "F.linear": Impl("F.linear", "baseline", "dense", ("x", "W", "b"), F.linear),
            "plain": Impl("plain", "baseline", "sketch", self.sketch_args, plain_linear),
            "compiled": Impl("compiled", "baseline", "sketch", self.sketch_args, torch.compile(concat_linear)),
        }

    def work(self, family: str, pass_: str) -> Tuple[float, float]:
        """(flops, elements moved)."""
        T, I, O, L, k = self.rows, self.size, self.size, self.terms, self.rank
        if family == "dense":
            flops = 2 * T * I * O * (1 if pass_ == "fwd" else 3)
            elems = T * I + I * O + O + T * O
            return flops, elems + (0 if pass_ == "fwd" else T * O + T * I + I * O + O)
        R = 2 * L * k
        # fwd: H = x[S1|U2] (2TIR), y = H[U1;S2] (2TRO). bwd: dH (2TOR), dx (2TRI), dS1 (TIR), dS2 (TRO).
        flops = R * T * (I + O) * (2 if pass_ == "fwd" else 5)
        elems = T * I + I * R + R * O + O + T * O
        return flops, elems + (0 if pass_ == "fwd" else T * O + T * I + I * L * k + L * k * O + O)


def plain_linear(x, S1s, S2s, U1s, U2s, b):
    """Σ_i (x S1_i) U1_i + (x U2_i) S2_i, one term at a time, autograd: the math as a user would write it."""
    L = S1s.shape[0]
    y = None
    for i in range(L):
        term = (x @ S1s[i]) @ U1s[i] + (x @ U2s[i]) @ S2s[i]
        y = term if y is None else y + term
    return y / (2 * L) + b


def concat_linear(x, S1s, S2s, U1s, U2s, b):
    """The same math as two matmuls, x [S1 | U2] then [U1; S2] / (2L) + b, with the terms concatenated
    (column / row block i of each factor is term i): what a user would write for torch.compile."""
    L, I, k = S1s.shape
    A = torch.cat([S1s.permute(1, 0, 2).reshape(I, L * k), U2s.permute(1, 0, 2).reshape(I, L * k)], dim=1)
    B = torch.cat([U1s.reshape(L * k, -1), S2s.reshape(L * k, -1)], dim=0)
    return (x @ A) @ B / (2 * L) + b


@dataclasses.dataclass(frozen=True)
class ConvCase(Case):
    batch: int
    in_channels: int
    out_channels: int
    height: int
    width: int
    kernel: int
    stride: int
    padding: int
    terms: int  # num_terms L: the op has 2L terms
    rank: int  # low_rank k
    tag: str = ""
    rounds: Optional[int] = None

    op: ClassVar[str] = "sketched_conv2d"
    base: ClassVar[str] = "F.conv2d"
    sketch_args: ClassVar[Tuple[str, ...]] = ("x", "S1s", "U1s", "b")
    x_key: ClassVar[str] = "batch"

    @property
    def label(self) -> str:
        return (
            f"N={self.batch} {self.in_channels}->{self.out_channels} {self.height}x{self.width} "
            f"{self.kernel}x{self.kernel} s{self.stride} p{self.padding} L={self.terms} k={self.rank}"
        )

    @property
    def series(self) -> str:
        return f"{self.in_channels}->{self.out_channels} {self.height}x{self.width} L={self.terms} k={self.rank}"

    def out_hw(self):
        f = lambda n: (n + 2 * self.padding - self.kernel) // self.stride + 1  # noqa: E731
        return f(self.height), f(self.width)

    def build(self, device, dtype) -> dict:
        N, C, O, H, W = self.batch, self.in_channels, self.out_channels, self.height, self.width
        ks, k = self.kernel, self.rank
        terms = 2 * self.terms
        new = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
        fan_in = math.sqrt(C * ks * ks)
        return {
            "x": new(N, C, H, W).requires_grad_(),
            "W": (new(O, C, ks, ks) / fan_in).requires_grad_(),
            "b": (new(O) * 0.1).requires_grad_(),
            "S1s": (new(terms, k, C, ks, ks) / fan_in).requires_grad_(),
            "U1s": rademacher((terms, k, O), k, device, dtype),
            "g": new(N, O, *self.out_hw()),
        }

    def backend_fn(self, name):
        s, p = self.stride, self.padding
        return lambda x, S1s, U1s, b: panther.ops.sketched_conv2d(x, S1s, U1s, b, s, p, backend=name)

    def baselines(self) -> Dict[str, Impl]:
        s, p = self.stride, self.padding
        return {
            "F.conv2d": Impl("F.conv2d", "baseline", "dense", ("x", "W", "b"), lambda x, W, b: F.conv2d(x, W, b, s, p)),
            "plain": Impl("plain", "baseline", "sketch", self.sketch_args, lambda *a: plain_conv2d(*a, s, p)),
            "compiled": Impl(
                "compiled", "baseline", "sketch", self.sketch_args,
                torch.compile(functools.partial(concat_conv2d, stride=s, padding=p)),
            ),
        }

    def work(self, family: str, pass_: str) -> Tuple[float, float]:
        N, C, O, ks = self.batch, self.in_channels, self.out_channels, self.kernel
        P = N * math.prod(self.out_hw())  # output pixels
        Kc = C * ks * ks
        x, y = N * C * self.height * self.width, P * O
        if family == "dense":
            flops = 2 * P * O * Kc * (1 if pass_ == "fwd" else 3)
            elems = x + O * Kc + O + y
            return flops, elems + (0 if pass_ == "fwd" else y + x + O * Kc + O)
        R = 2 * self.terms * self.rank
        # fwd: Z = conv(x, S) (2PRKc), y = U^T Z (2PRO). bwd: dZ (2PRO), dx (2PRKc), dS (2PRKc).
        flops = 2 * P * R * (Kc + O) if pass_ == "fwd" else 6 * P * R * Kc + 4 * P * R * O
        elems = x + R * Kc + R * O + O + y
        return flops, elems + (0 if pass_ == "fwd" else y + x + R * Kc + O)


def plain_conv2d(x, S1s, U1s, b, stride, padding):
    """Σ_i U1_i^T conv(x, S1_i) / (2L) + b, one term at a time (a k-channel conv, then a 1x1 conv), autograd."""
    terms = S1s.shape[0]
    y = None
    for i in range(terms):
        z = F.conv2d(x, S1s[i], None, stride, padding)
        term = F.conv2d(z, U1s[i].t()[:, :, None, None])
        y = term if y is None else y + term
    return y / terms + b.view(1, -1, 1, 1)


def concat_conv2d(x, S1s, U1s, b, stride, padding):
    """The same math as one convolution to 2Lk channels, then the fixed 1x1 projection to the output
    channels, / (2L) + b: what a user would write for torch.compile."""
    terms, k, C, kh, kw = S1s.shape
    z = F.conv2d(x, S1s.reshape(terms * k, C, kh, kw), None, stride, padding)
    y = F.conv2d(z, U1s.reshape(terms * k, -1).t()[:, :, None, None])
    return y / terms + b.view(1, -1, 1, 1)


@dataclasses.dataclass(frozen=True)
class AttentionCase(Case):
    seq: int
    sketch_dim: int
    causal: bool
    batch: int = 4
    heads: int = 8
    head_dim: int = 64
    tag: str = ""
    rounds: Optional[int] = None

    op: ClassVar[str] = "rfa_attention"
    base: ClassVar[str] = "sdpa"
    sketch_args: ClassVar[Tuple[str, ...]] = ("q", "k", "v", "omega")
    x_key: ClassVar[str] = "seq"

    @property
    def label(self) -> str:
        mask = "causal" if self.causal else "full"
        return f"B={self.batch} H={self.heads} T={self.seq} D={self.head_dim} m={self.sketch_dim} {mask}"

    @property
    def series(self) -> str:
        return f"m={self.sketch_dim} {'causal' if self.causal else 'full'}"

    def build(self, device, dtype) -> dict:
        shape = (self.batch, self.heads, self.seq, self.head_dim)
        new = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
        return {
            "q": new(*shape).requires_grad_(),
            "k": new(*shape).requires_grad_(),
            "v": new(*shape).requires_grad_(),
            "omega": new(self.heads, self.sketch_dim, self.head_dim),  # per head, as RandMultiHeadAttention
            "g": new(*shape),
        }

    def backend_fn(self, name):
        causal = self.causal
        return lambda q, k, v, omega: panther.ops.rfa_attention(q, k, v, omega, causal, backend=name)

    def baselines(self) -> Dict[str, Impl]:
        from panther.backends.torch_backend.rfa_attention import _attention  # the same math, plain autograd

        causal = self.causal
        return {
            "sdpa": Impl(
                "sdpa", "baseline", "sdpa", ("q", "k", "v"),
                lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
            ),
            "plain": Impl(
                "plain", "baseline", "sketch", self.sketch_args,
                lambda q, k, v, omega: _attention(q, k, v, omega, causal, "softmax", None),
            ),
            "compiled": Impl(
                "compiled", "baseline", "sketch", self.sketch_args,
                torch.compile(functools.partial(favor_plain, causal=causal)),
            ),
        }

    def work(self, family: str, pass_: str) -> Tuple[float, float]:
        B, H, T, D, m = self.batch, self.heads, self.seq, self.head_dim, self.sketch_dim
        n = B * H * T
        elems = (4 if pass_ == "fwd" else 8) * n * D  # q, k, v, out (+ grad out, dq, dk, dv)
        if family == "sdpa":
            fwd = 4 * B * H * T * T * D * (0.5 if self.causal else 1.0)  # QK^T and PV
            return fwd * (1 if pass_ == "fwd" else 3.5), elems  # FlashAttention's count: bwd = 2.5 fwd
        # fwd: features of q and k (4nmD), kv state and its product with q's features (4nmD), causal or not.
        # bwd: features (4nmD) and the four products around the state (8nmD).
        return (8 if pass_ == "fwd" else 20) * n * m * D, elems + H * m * D


def favor_plain(q, k, v, omega, causal, chunk=128):
    """FAVOR+ (softmax kernel) as a user would write it in plain PyTorch for torch.compile: float32
    features, the queries' stabiliser per row and one maximum over all keys (it cancels in the ratio);
    causal as chunked prefix sums without a Python loop (masked products within a chunk, an exclusive
    cumulative sum of the chunk states across chunks)."""
    B, H, T, D = q.shape
    m, Dv = omega.shape[-2], v.shape[-1]
    qs, ks = q.float() * D**-0.25, k.float() * D**-0.25
    om = omega.float().transpose(-1, -2)  # (H, D, m)
    ql = qs @ om - 0.5 * (qs * qs).sum(-1, keepdim=True)
    kl = ks @ om - 0.5 * (ks * ks).sum(-1, keepdim=True)
    qf = torch.exp(ql - ql.detach().amax(-1, keepdim=True))
    kf = torch.exp(kl - kl.detach().amax((-1, -2), keepdim=True))
    vf = v.float()
    if not causal:
        num = qf @ (kf.transpose(-1, -2) @ vf)
        den = (qf * kf.sum(-2, keepdim=True)).sum(-1)
    else:
        C = min(chunk, T)
        n = -(-T // C)
        qc, kc, vc = (F.pad(t, (0, 0, 0, n * C - T)).view(B, H, n, C, -1) for t in (qf, kf, vf))
        scores = (qc @ kc.transpose(-1, -2)).tril()
        states = kc.transpose(-1, -2) @ vc  # (B, H, n, m, Dv)
        before = torch.cat([torch.zeros_like(states[:, :, :1]), states.cumsum(2)[:, :, :-1]], dim=2)
        zs = kc.sum(-2, keepdim=True)  # (B, H, n, 1, m)
        zbefore = torch.cat([torch.zeros_like(zs[:, :, :1]), zs.cumsum(2)[:, :, :-1]], dim=2)
        num = (scores @ vc + qc @ before).reshape(B, H, n * C, Dv)[:, :, :T]
        den = (scores.sum(-1) + (qc * zbefore).sum(-1)).reshape(B, H, n * C)[:, :, :T]
    return (num / den.unsqueeze(-1)).to(q.dtype)


@dataclasses.dataclass(frozen=True)
class AttentionLayerCase(Case):
    """The layers themselves: RandMultiHeadAttention against nn.MultiheadAttention(need_weights=False) with
    the same projections (``from_multihead_attention``), batch_first, self-attention, no mask. The
    layers travel in the inputs (their parameters are leaves whose gradients are reset between calls)."""

    seq: int
    sketch_dim: int = 64
    embed_dim: int = 512
    heads: int = 8
    batch: int = 2
    tag: str = ""
    rounds: Optional[int] = None

    op: ClassVar[str] = "rfa_attention_layer"
    base: ClassVar[str] = "nn.MultiheadAttention"
    sketch_args: ClassVar[Tuple[str, ...]] = ("x", "rand")
    x_key: ClassVar[str] = "seq"

    @property
    def label(self) -> str:
        return f"RandMultiHeadAttention E={self.embed_dim} H={self.heads} B={self.batch} T={self.seq} m={self.sketch_dim}"

    @property
    def series(self) -> str:
        return f"layer m={self.sketch_dim}"

    def impls(self, backends) -> Dict[str, Impl]:
        from panther.backends import load_backend

        found = {
            name: Impl(name, "backend", "sketch", self.sketch_args, self.backend_fn(name))
            for name in backends
            if load_backend(name).implements("rfa_attention")
        }
        found.update(self.baselines())
        return found

    def build(self, device, dtype) -> dict:
        from panther.nn import RandMultiHeadAttention

        E, B, T = self.embed_dim, self.batch, self.seq
        mha = torch.nn.MultiheadAttention(E, self.heads, batch_first=True, device=device, dtype=dtype)
        rand = RandMultiHeadAttention.from_multihead_attention(mha, self.sketch_dim, seed=0)
        return {
            "x": torch.randn(B, T, E, device=device, dtype=dtype).requires_grad_(),
            "mha": mha,
            "rand": rand,
            "g": torch.randn(B, T, E, device=device, dtype=dtype),
        }

    @staticmethod
    def backend_fn(name):
        """The layer on backend ``name``; None: on the selection in force (as the ops' ``backend=None``)."""

        def call(x, rand):
            with panther.use_backend(name) if name is not None else contextlib.nullcontext():
                return rand(x, x, x, need_weights=False)[0]

        return call

    def baselines(self) -> Dict[str, Impl]:
        return {
            "nn.MultiheadAttention": Impl(
                "nn.MultiheadAttention", "baseline", "dense", ("x", "mha"),
                lambda x, mha: mha(x, x, x, need_weights=False)[0],
            ),
        }

    def reference(self, inputs) -> torch.Tensor:
        """The same layer in float64 on the torch backend."""
        import copy

        rand = copy.deepcopy(inputs["rand"]).double()
        x = inputs["x"].detach().double()
        with torch.no_grad(), panther.use_backend("torch"):
            return rand(x, x, x, need_weights=False)[0]

    def work(self, family: str, pass_: str) -> Tuple[float, float]:
        B, T, E, H, m = self.batch, self.seq, self.embed_dim, self.heads, self.sketch_dim
        D, n = E // H, B * T
        proj = 8 * n * E * E  # q, k, v and out projections
        elems = 2 * n * E + 4 * E * E + 4 * E  # x, out, the weights and biases
        if pass_ != "fwd":
            proj, elems = 3 * proj, elems + 2 * n * E + 4 * E * E + 4 * E  # + grad out, dx, the weights' grads
        if family == "dense":
            core = 4 * B * H * T * T * D * (1 if pass_ == "fwd" else 3.5)
        else:
            core = (8 if pass_ == "fwd" else 20) * n * H * m * D
        return proj + core, elems


def layer_leaves(inputs: dict) -> list:
    """What gets a gradient in a case's inputs: the tensors that require one, and the parameters of the
    modules among them (reset between timed calls)."""
    leaves = [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]
    return leaves + [p for t in inputs.values() if isinstance(t, torch.nn.Module) for p in t.parameters()]


def attention_layers(seqs, sketch_dims):
    return [AttentionLayerCase(T, m, tag="issue-14") for T in seqs for m in sketch_dims]


# --- presets -----------------------------------------------------------------------------------------

SPEC_TERMS = ((1, 64), (2, 32), (4, 32), (8, 64))  # num_terms * low_rank = 64, plus (4, 32) and (8, 64)


def linear_grid(rows, sizes, terms):
    return [LinearCase(r, s, L, k) for r in rows for s in sizes for L, k in terms]


def spec_conv(batch=32):
    """The spec's example: 32x64x56x56 -> 128 channels, 3x3, padding 1, num_terms=1, low_rank=16."""
    return ConvCase(batch, 64, 128, 56, 56, 3, 1, 1, 1, 16)


def deep_conv(batch=64):
    """A deeper layer: 64x256x28x28 -> 256 channels, 3x3, padding 1, num_terms=1, low_rank=32."""
    return ConvCase(batch, 256, 256, 28, 28, 3, 1, 1, 1, 32)


def attention_grid(seqs, sketch_dims):
    return [AttentionCase(T, m, c) for T in seqs for m in sketch_dims for c in (False, True)]


@dataclasses.dataclass(frozen=True)
class Preset:
    device: str
    modes: Tuple[str, ...]
    budget: Budget  # per measurement
    ceiling_budget: Budget
    rounds: int  # each case's measurements are repeated this many times, interleaved; the median is kept
    max_call_s: float  # skip a measurement whose roofline floor per call is above this
    deadline_min: Optional[float]  # start no case after this many minutes
    cases: tuple
    drop: Tuple[Tuple[str, str], ...] = ()  # (op, impl) pairs not run in this preset
    note: str = ""


GPU_MODES = ("bf16", "tf32", "fp32")  # bf16 first: the targets are quoted in bf16
PRESETS = {
    "cpu": Preset(
        device="cpu",
        modes=("fp32",),
        budget=Budget(warmup_calls=2, warmup_s=0.2, run_s=0.5, min_reps=5, max_reps=50),
        ceiling_budget=Budget(warmup_calls=1, warmup_s=0.1, run_s=1.0, min_reps=5, max_reps=20),
        rounds=3,
        max_call_s=5.0,  # the CPU cases are chosen to fit; load lowers the measured ceilings, so be generous
        deadline_min=None,
        cases=(
            LinearCase(512, 4096, 1, 64, tag="issue-2", rounds=9),
            LinearCase(128, 1024, 1, 64),
            LinearCase(128, 1024, 8, 64),
            LinearCase(512, 2048, 2, 32),
            LinearCase(512, 4096, 4, 32),
            spec_conv(batch=4),
            *attention_grid((1024,), (64,)),
            AttentionLayerCase(1024),
        ),
        note="a few minutes on 2 cores; conv at batch 4 instead of the spec's 32; attention at T=1024 only",
    ),
    "gpu-quick": Preset(
        device="cuda",
        modes=GPU_MODES,
        budget=Budget(warmup_calls=2, warmup_s=0.02, run_s=0.04, min_reps=5, max_reps=200),
        ceiling_budget=Budget(warmup_calls=3, warmup_s=0.05, run_s=0.3, min_reps=10, max_reps=100),
        rounds=1,
        max_call_s=0.1,
        deadline_min=4.0,
        cases=(  # most telling first: the deadline cuts the tail (Triton autotunes each new shape on first use)
            *linear_grid((4096, 128), (1024, 2048, 4096, 8192), ((1, 64),)),  # the README's headline table
            spec_conv(),
            deep_conv(),
            *attention_grid((8192, 65536), (64,)),
            *attention_layers((4096, 16384, 65536), (64,)),
            LinearCase(4096, 8192, 8, 64),
            *attention_grid((1024,), (64,)),
            *attention_grid((1024, 8192, 65536), (256,)),
            LinearCase(128, 8192, 8, 64),
            LinearCase(4096, 2048, 2, 32),
        ),
        drop=(("rfa_attention", "plain"),),
        note="about 4 minutes on an H200",
    ),
    "gpu": Preset(
        device="cuda",
        modes=GPU_MODES,
        budget=Budget(warmup_calls=3, warmup_s=0.05, run_s=0.2, min_reps=20, max_reps=1000),
        ceiling_budget=Budget(warmup_calls=3, warmup_s=0.1, run_s=0.5, min_reps=10, max_reps=200),
        rounds=1,
        max_call_s=1.0,
        deadline_min=None,
        cases=(
            *linear_grid((128, 4096), (1024, 2048, 4096, 8192), SPEC_TERMS),
            spec_conv(),
            deep_conv(),
            *attention_grid(tuple(2**p for p in range(10, 17)), (64, 256)),
            *attention_layers((1024, 4096, 16384, 65536), (64, 256)),
        ),
        note="every case of the spec tables; split it with --filter to fit one 10-minute device call",
    ),
}


def select(preset, filters=(), modes: str = ""):
    """The preset's cases whose ``"op label tag"`` matches any of the regular expressions ``filters`` (all
    when none is given), and its dtype modes among the comma-separated ``modes`` (all when empty)."""
    import re

    kept_modes = [m for m in preset.modes if not modes or m in modes.split(",")]
    cases = [c for c in preset.cases if not filters or any(re.search(f, f"{c.op} {c.label} {c.tag}") for f in filters)]
    return cases, kept_modes
