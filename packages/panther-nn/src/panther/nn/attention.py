"""Linear-time multi-head attention with random features: :class:`RandMultiHeadAttention`."""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from panther import backends
from panther.nn._fastpath import decline_fused_paths
from panther.nn._init import (
    check_input,
    check_int,
    kaiming_weight,
    make_generator,
    orthogonal_gaussian_features,
    work_dtype,
    xavier_weight,
)
from panther.ops import rfa_attention, rfa_attention_weights
from panther.ops.rfa_attention import KERNELS

__all__ = ["RandMultiHeadAttention"]

_MASK_HELP = (
    "RandMultiHeadAttention computes linear-time (random-feature) attention, which never forms the "
    "attention matrix: it can apply a causal mask (is_causal=True, or attn_mask equal to the causal mask) "
    "and a key_padding_mask, and no other attn_mask"
)


class RandMultiHeadAttention(nn.Module):
    r"""Multi-head attention in linear time, with the softmax kernel approximated by random features.

    A drop-in for :class:`torch.nn.MultiheadAttention` (same projections, arguments, shapes and
    ``state_dict`` keys, plus the buffer ``omega``) whose cost is linear in the sequence length: per head,
    :math:`\operatorname{softmax}(QK^\top/\sqrt{d})V` is replaced by

    .. math::

        \operatorname{out}_t = \frac{\phi(q_t) \sum_s \phi(k_s)^\top v_s}{\phi(q_t) \cdot \sum_s \phi(k_s)},
        \qquad \phi(x) = \frac{1}{\sqrt{m}} \exp\!\left(\omega \hat{x} - \frac{\lVert \hat{x} \rVert^2}{2}\right),
        \quad \hat{x} = x / d^{1/4}

    with :math:`m` = ``sketch_dim`` positive orthogonal random features :math:`\omega` per head (FAVOR+,
    Choromanski et al., 2021), for which :math:`\mathbb{E}[\phi(q) \cdot \phi(k)] \propto
    \exp(q \cdot k / \sqrt{d})`. ``kernel="relu"`` uses :math:`\phi(x) = \operatorname{relu}(\omega\hat{x})
    / \sqrt{m}` instead. Causal masking runs as prefix sums. Every forward runs
    :func:`panther.ops.rfa_attention` on the backend selected at call time; its stabilisers and numerical
    limits are documented in :mod:`panther.ops.rfa_attention`.

    Queries that see no key: a query whose keys are all ignored (a sample fully padded by
    ``key_padding_mask``, a causal query before its sample's first unpadded key, or an empty key sequence
    :math:`S = 0`) gets attention 0, so its output is ``out_proj.bias`` (0 without bias), and it adds
    nothing to the gradients; the other samples are unaffected. This follows
    :func:`torch.nn.functional.scaled_dot_product_attention`, which returns 0 for a fully masked row (its
    math backend; torch 2.13 on the CPU), whereas :class:`torch.nn.MultiheadAttention` returns NaN there,
    and NaN gradients. The relu kernel's 0/0 (all features of a query, or of its keys, 0) is 0 likewise.
    An empty query sequence (:math:`L = 0`) gives an empty output.

    Autograd: gradients of every order are exact on the reference backend ``torch``, including
    ``create_graph=True`` (gradient penalties, double backward); torch.func transforms (grad, vmap,
    jvp) run on it.

    Training recipes: under :func:`torch.autocast` the attention computes in the autocast dtype, with
    ``omega`` cast alongside; with parameters cast by a mixed-precision wrapper (FSDP2), ``omega``
    follows their dtype. As ``self_attn`` (or ``multihead_attn``) of ``nn.TransformerEncoderLayer``,
    ``nn.TransformerEncoder`` or ``nn.TransformerDecoderLayer`` it always runs: a no-op forward pre-hook
    makes torch decline its fused exact-attention inference path, and the nested batches of
    ``nn.TransformerEncoder``'s padding path are taken. Under ``torch.compile`` / ``torch.export``
    the mask checks are assertions inside the graph (no graph break). See the training recipes guide.

    Args:
        embed_dim (int): total dimension of the model.
        num_heads (int): number of parallel attention heads; ``embed_dim`` must be divisible by it.
        sketch_dim (int): :math:`m`, the number of random features per head. Must be at least 1. Sizes
            whose parameters and buffers exceed the device's memory are refused before anything is allocated.
        dropout (float): dropout probability, applied in training to whole keys (see :meth:`forward`).
            Default: ``0.0``.
        bias (bool): if ``True``, the input and output projections have biases. Default: ``True``.
        batch_first (bool): if ``True``, inputs and outputs are ``(batch, seq, feature)``, else
            ``(seq, batch, feature)``. Default: ``False``.
        kernel (str): ``"softmax"`` (positive random features approximating softmax attention) or ``"relu"``.
            Default: ``"softmax"``.
        kdim (int, optional): number of features of the keys. Default: ``None`` (``embed_dim``).
        vdim (int, optional): number of features of the values. Default: ``None`` (``embed_dim``).
        device (torch.device, optional): device of the parameters and buffers.
        dtype (torch.dtype, optional): dtype of the parameters and buffers, a floating-point dtype.
        seed (int, optional): seed of the layer's own random generator (initial projections and random features).
            Default: ``None``, seeded from one draw of the global RNG.
        generator (torch.Generator, optional): a generator to draw from instead. At most one of ``seed``
            and ``generator`` may be given.

    Shape:
        - query: :math:`(L, E)` unbatched, :math:`(L, N, E)`, or :math:`(N, L, E)` when ``batch_first``.
        - key: :math:`(S, E_k)`, :math:`(S, N, E_k)` or :math:`(N, S, E_k)`; value likewise with :math:`E_v`.
        - output: shaped like query.
        - weights: ``None`` unless asked for with ``materialize_weights=True`` (see :meth:`forward`).

    Attributes:
        in_proj_weight: packed query/key/value projection ``(3 * embed_dim, embed_dim)`` when
            ``kdim == vdim == embed_dim``, else ``None`` and ``q_proj_weight``, ``k_proj_weight``,
            ``v_proj_weight`` hold them.
        in_proj_bias: ``(3 * embed_dim,)`` or ``None``.
        out_proj: the output projection, a :class:`torch.nn.Linear`.
        omega: the random features (persistent buffer), ``(num_heads, sketch_dim, head_dim)``.
        seed: the seed of the layer's generator, or ``None`` when a ``generator`` was given.

    Examples:
        >>> import torch
        >>> from panther.nn import RandMultiHeadAttention
        >>> attn = RandMultiHeadAttention(64, num_heads=4, sketch_dim=32, seed=0)
        >>> x = torch.randn(10, 2, 64)  # (seq, batch, embed)
        >>> out, weights = attn(x, x, x)
        >>> out.shape, weights
        (torch.Size([10, 2, 64]), None)
        >>> out, weights = attn(x, x, x, is_causal=True, materialize_weights=True)
        >>> weights.shape  # (batch, seq, seq), averaged over heads
        torch.Size([2, 10, 10])
        >>> mha = torch.nn.MultiheadAttention(64, 4, batch_first=True)
        >>> rand = RandMultiHeadAttention.from_multihead_attention(mha, sketch_dim=32, seed=0)
        >>> rand(x, x, x)[0].shape
        torch.Size([10, 2, 64])
    """

    __constants__ = ["embed_dim", "kdim", "vdim", "num_heads", "head_dim", "sketch_dim", "batch_first", "kernel"]
    embed_dim: int
    kdim: int
    vdim: int
    num_heads: int
    head_dim: int
    sketch_dim: int
    dropout: float
    batch_first: bool
    kernel: str
    seed: Optional[int]
    in_proj_weight: Optional[Tensor]
    q_proj_weight: Optional[Tensor]
    k_proj_weight: Optional[Tensor]
    v_proj_weight: Optional[Tensor]
    in_proj_bias: Optional[Tensor]
    omega: Tensor

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        sketch_dim: int,
        dropout: float = 0.0,
        bias: bool = True,
        batch_first: bool = False,
        kernel: str = "softmax",
        kdim: Optional[int] = None,
        vdim: Optional[int] = None,
        device=None,
        dtype: Optional[torch.dtype] = None,
        *,
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.embed_dim = check_int("embed_dim", embed_dim)
        self.num_heads = check_int("num_heads", num_heads)
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim must be divisible by num_heads, got embed_dim={self.embed_dim} and "
                f"num_heads={self.num_heads}"
            )
        self.head_dim = self.embed_dim // self.num_heads
        self.sketch_dim = check_int("sketch_dim", sketch_dim)
        self.kdim = embed_dim if kdim is None else check_int("kdim", kdim)
        self.vdim = embed_dim if vdim is None else check_int("vdim", vdim)
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1], got {dropout!r}")
        self.dropout = float(dropout)
        if not isinstance(kernel, str) or kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.kernel = kernel
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype (or None), got {dtype!r}")
        _check_fits(self.embed_dim, self.kdim, self.vdim, self.num_heads, self.sketch_dim, bias, device, dtype)
        self.batch_first = bool(batch_first)
        self._generator, self.seed = make_generator(seed, generator)
        # Backend discovery happens here, outside any traced region (torch.compile cannot run it).
        backends.available_backends()

        E = self.embed_dim
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty((3 * E, E), **factory_kwargs))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty((E, E), **factory_kwargs))
            self.k_proj_weight = nn.Parameter(torch.empty((E, self.kdim), **factory_kwargs))
            self.v_proj_weight = nn.Parameter(torch.empty((E, self.vdim), **factory_kwargs))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * E, **factory_kwargs))
        else:
            self.register_parameter("in_proj_bias", None)
        # Built on the meta device and materialised empty: reset_parameters fills it from our generator.
        self.out_proj = nn.Linear(E, E, bias=bias, device="meta", dtype=dtype).to_empty(
            device=torch.empty(0, device=device).device
        )
        omega = torch.empty((self.num_heads, self.sketch_dim, self.head_dim), **factory_kwargs)
        self.register_buffer("omega", omega)
        self.reset_parameters()
        # torch's fused TransformerEncoderLayer path would read in_proj_weight and run exact attention
        decline_fused_paths(self)

    def reset_parameters(self) -> None:
        """Initialise the projections like :class:`torch.nn.MultiheadAttention` and draw new random features.

        Input projections are xavier-uniform, the output projection kaiming-uniform like
        :class:`torch.nn.Linear`, biases zero; every draw comes from the layer's generator.
        """
        ref = self.out_proj.weight
        if ref.is_meta:  # nothing to fill; after to_empty(), reset_parameters() draws what a real build would
            return
        gen = self._generator
        wd = work_dtype(ref.dtype)
        with torch.no_grad():
            if self._qkv_same_embed_dim:
                self.in_proj_weight.copy_(xavier_weight(self.in_proj_weight.shape, gen, wd))
            else:
                for w in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
                    w.copy_(xavier_weight(w.shape, gen, wd))
            self.out_proj.weight.copy_(kaiming_weight(ref.shape, self.embed_dim, gen, wd))
            if self.in_proj_bias is not None:
                self.in_proj_bias.zero_()
                self.out_proj.bias.zero_()
        self.redraw_features()

    @torch.no_grad()
    def redraw_features(self) -> None:
        """Replace the random features ``omega`` with a fresh draw from the layer's generator.

        Redrawing from time to time during training (as Performers do) keeps the model from fitting one
        particular draw of the features.
        """
        H, m, D = self.omega.shape
        self.omega.copy_(orthogonal_gaussian_features(H, m, D, self._generator, torch.float64))

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        *,
        materialize_weights: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        r"""Attention of ``query`` over ``key``/``value``, in time linear in the sequence lengths.

        Args:
            query (Tensor): :math:`(L, E)`, :math:`(L, N, E)` or, with ``batch_first``, :math:`(N, L, E)`.
            key (Tensor): :math:`(S, E_k)`, :math:`(S, N, E_k)` or :math:`(N, S, E_k)`.
            value (Tensor): :math:`(S, E_v)`, :math:`(S, N, E_v)` or :math:`(N, S, E_v)`.
            key_padding_mask (Tensor, optional): :math:`(N, S)` (or :math:`(S)` unbatched), ``True`` where
                a key is ignored. A float mask holding only ``0`` and ``-inf`` is read the same way.
            need_weights (bool): return attention weights; they are only formed when ``materialize_weights`` is
                also ``True``, else ``None`` is returned in their place. Default: ``True``.
            attn_mask (Tensor, optional): only the causal mask is accepted: a bool :math:`(L, L)` (or
                :math:`(N \cdot H, L, L)`) mask that is ``True`` exactly above the diagonal, or a float one
                that is ``-inf`` there and ``0`` elsewhere. Linear-time attention cannot apply other masks.
            average_attn_weights (bool): average the returned weights over heads. Default: ``True``.
            is_causal (bool): query :math:`t` attends to keys :math:`s \le t` only (needs :math:`L = S`).
            materialize_weights (bool): with ``need_weights``, also form the :math:`O(L S)` matrix of normalised
                random-feature weights :math:`\phi(q_t) \cdot \phi(k_s) / \sum_{s'} \phi(q_t) \cdot
                \phi(k_{s'})` (masks applied, before dropout) for inspection: the weights the output is
                computed with (a row of zeros for a query that sees no key). Default: ``False``.

        Returns:
            ``(output, weights)``: output shaped like ``query`` (embedding ``E``); weights ``None``, or
            :math:`(N, L, S)` averaged over heads / :math:`(N, H, L, S)` per head (no :math:`N` unbatched).

        In training, dropout zeroes whole keys: a Bernoulli mask per (batch, head, key) on the rows of
        :math:`V`, scaled by :math:`1/(1-p)`.
        """
        if isinstance(query, Tensor) and query.is_nested:
            return self._nested_forward(query, key, value, key_padding_mask, attn_mask, is_causal)
        ref = self.out_proj.weight
        for name, t in (("query", query), ("key", key), ("value", value)):
            check_input(name, t, ref, type(self).__name__)
        if query.dim() not in (2, 3):
            raise ValueError(
                f"query must be (L, E) unbatched or 3-D batched ((L, N, E), or (N, L, E) with batch_first), "
                f"got shape {tuple(query.shape)}"
            )
        for name, t in (("key", key), ("value", value)):
            if t.dim() != query.dim():
                raise ValueError(
                    f"{name} must have as many dimensions as query ({query.dim()}), got shapes query "
                    f"{tuple(query.shape)} and {name} {tuple(t.shape)}"
                )
        for name, t, attr in (("query", query, "embed_dim"), ("key", key, "kdim"), ("value", value, "vdim")):
            dim = getattr(self, attr)
            if t.shape[-1] != dim:
                raise ValueError(
                    f"{name} must have {attr}={dim} features (last dimension), got shape {tuple(t.shape)}"
                )

        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if isinstance(key_padding_mask, Tensor) and key_padding_mask.dim() == 1:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # Now (N, L, E), (N, S, Ek), (N, S, Ev).
        N, L, _ = query.shape
        S = key.shape[1]
        if value.shape[:2] != key.shape[:2] or key.shape[0] != N:
            layout = "(N, seq, E)" if self.batch_first else "(seq, N, E)"
            q_shape, k_shape, v_shape = (_given_shape(t, unbatched, self.batch_first) for t in (query, key, value))
            hint = "" if unbatched else f" (is batch_first={not self.batch_first} what was meant?)"
            raise ValueError(
                f"query, key and value must share the batch size, and key and value the sequence length; with "
                f"batch_first={self.batch_first} inputs are {layout}, got query {q_shape}, key {k_shape} and "
                f"value {v_shape}{hint}"
            )
        key_padding_mask = _bool_key_padding_mask(key_padding_mask, N, S, unbatched)
        causal = bool(is_causal)
        if attn_mask is not None:
            if not _is_causal_mask(attn_mask, N * self.num_heads, L, S, query.device):
                raise ValueError(f"{_MASK_HELP}; got an attn_mask that is not the causal mask")
            causal = True

        H, D = self.num_heads, self.head_dim
        w_q, w_k, w_v = self._in_proj_weights()
        b_q, b_k, b_v = (None, None, None) if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        q = F.linear(query, w_q, b_q).view(N, L, H, D).transpose(1, 2)  # (N, H, L, D)
        k = F.linear(key, w_k, b_k).view(N, S, H, D).transpose(1, 2)  # (N, H, S, D)
        v = F.linear(value, w_v, b_v).view(N, S, H, D).transpose(1, 2)  # (N, H, S, D)
        if self.training and self.dropout > 0.0:
            # Zeroing v_s (scaled by 1/(1-p)) drops column s of the attention matrix in the numerator and
            # leaves the normaliser (built from the keys only): softmax dropout restricted to whole columns.
            keep = F.dropout(torch.ones(N, H, S, 1, dtype=v.dtype, device=v.device), self.dropout, training=True)
            v = v * keep
        omega = self.omega.to(self.out_proj.weight.dtype)  # parameters cast by a mixed-precision wrapper
        out = rfa_attention(q, k, v, omega, causal, self.kernel, key_padding_mask)  # (N, H, L, D)
        out = self.out_proj(out.transpose(1, 2).reshape(N, L, self.embed_dim))  # (N, L, E)

        weights = None
        if need_weights and materialize_weights:
            weights = self._weights(q, k, causal, key_padding_mask)  # (N, H, L, S)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if unbatched:
                weights = weights.squeeze(0)
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _nested_forward(self, query, key, value, key_padding_mask, attn_mask, is_causal):
        """Self-attention of a nested ``(N, *, E)`` batch (what nn.TransformerEncoder's nested-tensor path
        passes): padded, masked by the sequences' lengths, and returned nested, with weights ``None``."""
        if key is not query or value is not query or not self.batch_first:
            raise ValueError(
                "a nested query is supported for self-attention (key and value the same nested tensor) with "
                f"batch_first=True, got batch_first={self.batch_first}"
            )
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise ValueError(
                "a nested query carries its own lengths: pass no key_padding_mask, attn_mask or is_causal"
            )
        parts = query.unbind()
        lengths = torch.tensor([p.shape[0] for p in parts], device=query.device)
        padded = torch.nested.to_padded_tensor(query, 0.0)
        S = padded.shape[1]
        pad = torch.arange(S, device=query.device).unsqueeze(0) >= lengths.unsqueeze(1)
        out = self.forward(padded, padded, padded, key_padding_mask=pad, need_weights=False)[0]
        return torch.nested.as_nested_tensor([o[: p.shape[0]] for o, p in zip(out.unbind(), parts)]), None

    def _in_proj_weights(self) -> Tuple[Tensor, Tensor, Tensor]:
        if self._qkv_same_embed_dim:
            return self.in_proj_weight.chunk(3)
        return self.q_proj_weight, self.k_proj_weight, self.v_proj_weight

    def _weights(self, q: Tensor, k: Tensor, causal: bool, key_padding_mask: Optional[Tensor]) -> Tensor:
        """The normalised random-feature attention matrix (N, H, L, S) the output is computed with."""
        omega = self.omega.to(self.out_proj.weight.dtype)
        return rfa_attention_weights(q, k, omega, causal, self.kernel, key_padding_mask)

    def extra_repr(self) -> str:
        s = f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, sketch_dim={self.sketch_dim}"
        s += f", kernel={self.kernel!r}"
        if self.kdim != self.embed_dim or self.vdim != self.embed_dim:
            s += f", kdim={self.kdim}, vdim={self.vdim}"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.in_proj_bias is None:
            s += ", bias=False"
        s += f", batch_first={self.batch_first}"
        return s

    @classmethod
    def from_multihead_attention(
        cls,
        mha: nn.MultiheadAttention,
        sketch_dim: int,
        *,
        kernel: str = "softmax",
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> "RandMultiHeadAttention":
        r"""A random-feature attention layer that reuses a (trained) :class:`torch.nn.MultiheadAttention`.

        The projections (weights and biases) are copied; ``embed_dim``, ``num_heads``, ``kdim``, ``vdim``,
        ``dropout``, ``batch_first``, training mode, dtype and device are ``mha``'s. Only the random
        features are new.

        Args:
            mha (torch.nn.MultiheadAttention): the exact attention to replace; ``add_bias_kv`` and
                ``add_zero_attn`` are not supported.
            sketch_dim (int): :math:`m`, the number of random features per head.
            kernel (str): ``"softmax"`` or ``"relu"``. Default: ``"softmax"``.
            seed (int, optional): seed of the new layer's generator.
            generator (torch.Generator, optional): a generator to draw from instead.
        """
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be a torch.nn.MultiheadAttention, got {type(mha).__name__}")
        if mha.bias_k is not None or mha.bias_v is not None:
            raise ValueError("mha was built with add_bias_kv=True, which RandMultiHeadAttention does not support")
        if mha.add_zero_attn:
            raise ValueError(
                "mha was built with add_zero_attn=True, which RandMultiHeadAttention does not support"
            )
        ref = mha.out_proj.weight
        layer = cls(
            mha.embed_dim,
            mha.num_heads,
            sketch_dim,
            dropout=mha.dropout,
            bias=mha.in_proj_bias is not None,
            batch_first=mha.batch_first,
            kernel=kernel,
            kdim=mha.kdim,
            vdim=mha.vdim,
            device=ref.device,
            dtype=ref.dtype,
            seed=seed,
            generator=generator,
        )
        state = {name: t for name, t in mha.state_dict().items() if name in layer.state_dict()}
        state["omega"] = layer.omega
        layer.load_state_dict(state)
        layer.train(mha.training)
        return layer


def _check_fits(E: int, kdim: int, vdim: int, H: int, m: int, bias: bool, device, dtype) -> None:
    """Refuse, before allocating, hyper-parameters whose parameters and buffers exceed the device's memory."""
    device = torch.empty(0, device=device).device if device is not None else torch.device("cpu")
    if device.type == "meta":
        return
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # no sysconf (e.g. Windows): no bound
            return
    itemsize = torch.empty(0, dtype=dtype).element_size()
    D = E // H
    values = E * (E + kdim + vdim) + E * E + (4 * E if bias else 0) + H * m * D
    draw = 4 * H * -(-m // D) * D * D * 8  # float64 Gaussian blocks, their QR and the row norms
    need = values * itemsize + draw
    if need > total:
        raise ValueError(
            f"RandMultiHeadAttention(embed_dim={E}, num_heads={H}, sketch_dim={m}) needs about {need:,} bytes "
            f"({need / 2**30:.1f} GiB) for its parameters, random features and their draw, more than the "
            f"{total:,} bytes of {device}; lower sketch_dim or embed_dim"
        )


def _given_shape(t: Tensor, unbatched: bool, batch_first: bool) -> Tuple[int, ...]:
    """The shape the user passed, from the (N, seq, E) working layout."""
    if unbatched:
        return tuple(t.shape[1:])
    return tuple(t.shape if batch_first else t.transpose(0, 1).shape)


def _bool_key_padding_mask(mask, N: int, S: int, unbatched: bool) -> Optional[Tensor]:
    """key_padding_mask as a bool (N, S) tensor, True where a key is ignored."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"key_padding_mask must be a torch.Tensor or None, got {type(mask).__name__}")
    expected = f"({S},) or (1, {S})" if unbatched else f"(N={N}, S={S})"
    if not _has_shape(mask, (N, S)):
        raise ValueError(f"key_padding_mask must have shape {expected}, got {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point():
        ignored = mask == float("-inf")
        _require(
            ignored | (mask == 0),
            "a float key_padding_mask may only hold 0 (attend) and -inf (ignore); use a bool mask, "
            "True where a key is ignored",
        )
        return ignored
    raise TypeError(
        f"key_padding_mask must be a bool tensor (True = ignore) or a float 0/-inf one, got dtype {mask.dtype}"
    )


def _is_causal_mask(mask, batch_heads: int, L: int, S: int, device) -> bool:
    """True when attn_mask is the causal mask (bool True / float -inf strictly above the diagonal), False
    when L != S; any other mask of a valid shape raises (under tracing, when the graph runs)."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if not (_has_shape(mask, (L, S)) or _has_shape(mask, (batch_heads, L, S))):
        raise ValueError(
            f"attn_mask must have shape (L, S) = ({L}, {S}) or (N * num_heads, L, S) = ({batch_heads}, {L}, {S}), "
            f"got {tuple(mask.shape)}; note: {_MASK_HELP}"
        )
    if mask.device != device:
        raise RuntimeError(f"attn_mask is on {mask.device} but query is on {device}; they must be on one device")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"attn_mask must be a bool or float tensor, got dtype {mask.dtype}")
    if L != S:
        return False
    above = torch.ones(L, S, dtype=torch.bool, device=device).triu(1)
    if mask.dtype == torch.bool:
        causal = ~(mask ^ above)  # not ==: inductor's range analysis of eq on bools fails on this pattern
    else:
        causal = torch.where(above, mask == float("-inf"), mask == 0)
    # the only mask this layer applies is the causal one: anything else is refused, not ignored
    _require(causal, f"{_MASK_HELP}; got an attn_mask that is not the causal mask")
    return True


def _has_shape(t: Tensor, shape: Tuple[int, ...]) -> bool:
    """``t.shape == shape``, size by size (which symbolic sizes under torch.compile / export can decide)."""
    return t.dim() == len(shape) and all(a == b for a, b in zip(t.shape, shape))


def _require(ok: Tensor, message: str) -> None:
    """ValueError(message) unless ``ok`` is all True. Under torch.compile / torch.export a runtime assertion
    in the graph instead of a data-dependent branch (no graph break; it raises when the graph runs)."""
    if torch.compiler.is_compiling():
        torch._assert_async(ok.all(), message)
    elif not bool(ok.all()):
        raise ValueError(message)
