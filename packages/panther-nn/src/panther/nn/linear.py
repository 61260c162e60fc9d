"""Sketched linear layers: :class:`SKLinear` and its Triton-pinned twin :class:`SKLinear_triton`."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from panther.nn import _fit
from panther.nn._init import (
    check_dtype,
    check_int,
    check_not_lazy,
    check_weight,
    factory_sizes,
    kaiming_weight,
    make_generator,
    prepare_backends,
    rademacher,
    uniform,
    warn_if_no_savings,
    work_dtype,
)
from panther.ops import sketched_linear

__all__ = ["SKLinear", "SKLinear_triton"]


class SKLinear(nn.Module):
    r"""Applies a sketched linear transformation to the incoming data.

    The dense weight of :class:`torch.nn.Linear` is replaced by a sum of :math:`2L` randomized rank-:math:`k`
    terms (:math:`L` = ``num_terms``, :math:`k` = ``low_rank``):

    .. math::

        y = \frac{1}{2L} \sum_{i=1}^{L} \left[ (x S_{1,i}) U_{1,i} + (x U_{2,i}) S_{2,i} \right] + b

    where :math:`S_{1,i}` and :math:`S_{2,i}` are learned and :math:`U_{1,i}`, :math:`U_{2,i}` are fixed
    Rademacher sketches with entries :math:`\pm 1/\sqrt{k}`. The layer is initialised from a dense weight
    :math:`W_0` of shape ``(out_features, in_features)`` as :math:`S_{1,i} = W_0^\top U_{1,i}^\top` and
    :math:`S_{2,i} = U_{2,i}^\top W_0^\top`, so that, over the draw of the sketches, the expected output is
    the dense layer's, :math:`\mathbb{E}[y] = x W_0^\top + b`.

    It stores :math:`2Lk\,(\text{in} + \text{out})` values (half of them parameters, half buffers) instead
    of :math:`\text{in} \times \text{out}`; a :class:`UserWarning` is raised when that is not fewer, and a
    :class:`ValueError` (with the size needed) before anything is allocated when it cannot fit in the memory
    of ``device``.
    Every forward runs :func:`panther.ops.sketched_linear` on the backend selected by
    :func:`panther.set_backend` / :func:`panther.use_backend` at call time. Under :func:`torch.autocast` it
    computes and returns the autocast dtype, as :class:`torch.nn.Linear` does; with parameters cast by a
    mixed-precision wrapper (FSDP2), the fixed sketches are cast to their dtype at use.

    Args:
        in_features (int): size of each input sample.
        out_features (int): size of each output sample.
        num_terms (int): :math:`L`, number of pairs of sketched terms. Must be at least 1.
        low_rank (int): :math:`k`, rank of each term. Must be at least 1.
        W_init (Tensor, optional): dense weight :math:`W_0` of shape ``(out_features, in_features)`` to
            start from (e.g. a trained ``nn.Linear``'s ``weight``); the bias then starts at zero. Default:
            ``None``, a weight drawn like :class:`torch.nn.Linear`'s (kaiming-uniform) and a bias like its bias.
        bias (bool): if ``False``, the layer does not learn an additive bias. Default: ``True``.
        device (torch.device, optional): device of the parameters and buffers. Default: the default device.
        dtype (torch.dtype, optional): dtype of the parameters and buffers, one of ``torch.float16``,
            ``torch.bfloat16``, ``torch.float32`` and ``torch.float64``. Default: the default dtype.
        seed (int, optional): seed of the layer's own random generator, which draws the sketches and the
            initial weight. Default: ``None``, seeded from one draw of the global RNG (so
            :func:`torch.manual_seed` makes construction reproducible).
        generator (torch.Generator, optional): a generator to draw from instead (advanced in place). At
            most one of ``seed`` and ``generator`` may be given.

    Shape:
        - Input: :math:`(*, H_{in})` where :math:`*` means any number of dimensions (none included) and
          :math:`H_{in} = \text{in\_features}`.
        - Output: :math:`(*, H_{out})`, all but the last dimension as the input, and
          :math:`H_{out} = \text{out\_features}`.

    Attributes:
        S1s: the learnable left factors, of shape ``(num_terms, in_features, low_rank)``.
        S2s: the learnable right factors, of shape ``(num_terms, low_rank, out_features)``.
        U1s: the fixed sketches (buffer) of shape ``(num_terms, low_rank, out_features)``.
        U2s: the fixed sketches (buffer) of shape ``(num_terms, in_features, low_rank)``.
        bias: the learnable bias of shape ``(out_features,)``, or ``None``.
        seed: the seed of the layer's generator, or ``None`` when a ``generator`` was given.

    Examples:
        >>> import torch
        >>> from panther.nn import SKLinear
        >>> m = SKLinear(20, 30, num_terms=1, low_rank=4, seed=0)
        >>> m
        SKLinear(in_features=20, out_features=30, num_terms=1, low_rank=4, bias=True)
        >>> input = torch.randn(128, 20)
        >>> output = m(input)
        >>> print(output.size())
        torch.Size([128, 30])
        >>> [name for name, _ in m.named_parameters()]
        ['S1s', 'S2s', 'bias']
        >>> m2 = SKLinear.from_linear(torch.nn.Linear(20, 30), num_terms=1, low_rank=4, seed=0)
        >>> m2(torch.randn(5, 7, 20)).shape
        torch.Size([5, 7, 30])
    """

    __constants__ = ["in_features", "out_features", "num_terms", "low_rank"]
    in_features: int
    out_features: int
    num_terms: int
    low_rank: int
    seed: Optional[int]
    S1s: Tensor
    S2s: Tensor
    U1s: Tensor
    U2s: Tensor
    bias: Optional[Tensor]

    _backend: Optional[str] = None  # None: the selection in force at call time

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_terms: int,
        low_rank: int,
        W_init: Optional[Tensor] = None,
        bias: bool = True,
        device=None,
        dtype: Optional[torch.dtype] = None,
        *,
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": check_dtype("dtype", dtype)}
        super().__init__()
        self.in_features = check_int("in_features", in_features)
        self.out_features = check_int("out_features", out_features)
        self.num_terms = check_int("num_terms", num_terms)
        self.low_rank = check_int("low_rank", low_rank)
        if W_init is not None:
            check_weight("W_init", W_init, (self.out_features, self.in_features))
        L, k, I, O = self.num_terms, self.low_rank, self.in_features, self.out_features
        factory_sizes(
            type(self).__name__, device, dtype,
            [("S1s", (L, I, k)), ("S2s", (L, k, O)), ("U1s", (L, k, O)), ("U2s", (L, I, k)),
             ("the dense initial weight", (O, I))],
            in_features=I, out_features=O, num_terms=L, low_rank=k,
        )
        self._generator, self.seed = make_generator(seed, generator)
        prepare_backends(type(self).__name__, self._backend)
        warn_if_no_savings(type(self).__name__, L, k, I, O)

        self.S1s = nn.Parameter(torch.empty((L, I, k), **factory_kwargs))
        self.S2s = nn.Parameter(torch.empty((L, k, O), **factory_kwargs))
        self.register_buffer("U1s", torch.empty((L, k, O), **factory_kwargs))
        self.register_buffer("U2s", torch.empty((L, I, k), **factory_kwargs))
        if bias:
            self.bias = nn.Parameter(torch.empty(O, **factory_kwargs))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters(W_init)

    def reset_parameters(self, W_init: Optional[Tensor] = None) -> None:
        r"""Draw new sketches from the layer's generator and initialise the factors from a dense weight.

        Args:
            W_init (Tensor, optional): the dense weight :math:`W_0` ``(out_features, in_features)``; the
                bias is then zeroed. Default: ``None``, a weight and bias drawn like :class:`torch.nn.Linear`'s.
        """
        L, k, I, O = self.num_terms, self.low_rank, self.in_features, self.out_features
        if W_init is not None:
            check_weight("W_init", W_init, (O, I))
        if self.S1s.is_meta:  # nothing to fill; after to_empty(), reset_parameters() draws what a real build would
            return
        gen = self._generator
        wd = work_dtype(self.S1s.dtype)
        dev = self.S1s.device
        U1 = rademacher((L, k, O), k, gen, wd).to(dev)
        U2 = rademacher((L, I, k), k, gen, wd).to(dev)
        if W_init is None:
            W0 = kaiming_weight((O, I), I, gen, wd).to(dev)
            b = uniform((O,), 1.0 / math.sqrt(I), gen, wd) if self.bias is not None else None
        else:
            W0 = W_init.detach().to(device=dev, dtype=wd)
            b = torch.zeros(O, dtype=wd)
        with torch.no_grad():
            self.U1s.copy_(U1)
            self.U2s.copy_(U2)
            self.S1s.copy_(torch.einsum("oi,lko->lik", W0, U1))  # S1_i = W0ᵀ U1_iᵀ   (I, k)
            self.S2s.copy_(torch.einsum("lik,oi->lko", U2, W0))  # S2_i = U2_iᵀ W0ᵀ   (k, O)
            if self.bias is not None:
                self.bias.copy_(b)

    def forward(self, input: Tensor) -> Tensor:
        """Apply the layer to ``input`` of shape ``(*, in_features)``; returns ``(*, out_features)``."""
        dt = self.S1s.dtype  # parameters cast by a mixed-precision wrapper (FSDP2): the fixed sketches follow
        U1s, U2s = self.U1s.to(dt), self.U2s.to(dt)
        return sketched_linear(input, self.S1s, self.S2s, U1s, U2s, self.bias, backend=self._backend)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, num_terms={self.num_terms}, "
            f"low_rank={self.low_rank}, bias={self.bias is not None}"
        )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        num_terms: int,
        low_rank: int,
        *,
        init: str = "optimal",
        calibration_data=None,
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> "SKLinear":
        r"""A sketched layer initialised from a (trained) :class:`torch.nn.Linear`.

        The sketches are drawn from the new layer's generator; the factors are then fitted to
        ``linear.weight`` (:math:`W = W_0^\top`), the bias is copied, and the new layer has ``linear``'s dtype
        and device. ``linear`` is left unchanged.

        - ``init="optimal"`` (default): the factors that minimise the weight error
          :math:`\lVert W - W_\text{eff} \rVert_F` for the drawn sketches (the minimum-norm such factors,
          computed in float64). The effective weight is then :math:`W - (1 - Q) W (1 - P)`, with :math:`P`
          and :math:`Q` the projectors on the row space of the stacked :math:`U_{1,i}` and the column space
          of the stacked :math:`U_{2,i}`: every part of :math:`W` that a sketch can reach is kept exactly.
        - ``init="unbiased"``: :math:`S_{1,i} = W U_{1,i}^\top`, :math:`S_{2,i} = U_{2,i}^\top W`, whose
          output equals ``linear``'s in expectation over the sketches, with a much larger error for any one
          draw.
        - ``calibration_data`` (with ``init="optimal"``): inputs of the layer, ``(*, in_features)``, one
          tensor or an iterable of them. The factors then minimise the output error
          :math:`\lVert X W - X W_\text{eff} \rVert_F` on these inputs (plus a ridge of 1% of the mean
          input energy times the weight error, which keeps directions the data do not reach close to
          the weight-error optimum), and the bias absorbs the mean of the remaining output error. The
          moments are accumulated in float64, :math:`\text{in\_features}^2` values.

        Args:
            linear (torch.nn.Linear): the dense layer to replace.
            num_terms (int): :math:`L`, number of pairs of sketched terms.
            low_rank (int): :math:`k`, rank of each term.
            init (str): ``"optimal"`` or ``"unbiased"``. Default: ``"optimal"``.
            calibration_data (Tensor or iterable of Tensors, optional): inputs to fit the output on.
            seed (int, optional): seed of the new layer's generator.
            generator (torch.Generator, optional): a generator to draw from instead.

        Examples:
            >>> import torch
            >>> from panther.nn import SKLinear
            >>> dense = torch.nn.Linear(64, 48)
            >>> x = torch.randn(512, 64)
            >>> fitted = SKLinear.from_linear(dense, 1, 8, calibration_data=x, seed=0)
            >>> unbiased = SKLinear.from_linear(dense, 1, 8, init="unbiased", seed=0)
            >>> err = lambda m: ((m(x) - dense(x)).norm() / dense(x).norm()).item()
            >>> err(fitted) < err(unbiased)
            True
        """
        check_not_lazy("linear", linear)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        _fit.check_init(init, calibration_data)
        moments = None
        if calibration_data is not None:
            moments = _fit.InputMoments(linear.in_features, linear.weight.device)
            for batch in _fit.batches("calibration_data", calibration_data):
                moments.add(_fit.linear_rows("calibration_data", batch, linear.in_features))
            if moments.count == 0:
                raise ValueError("calibration_data holds no inputs (no batch, or only empty ones)")
        weight = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            num_terms,
            low_rank,
            W_init=weight if init == "unbiased" else None,
            bias=linear.bias is not None,
            dtype=weight.dtype,
            device=weight.device,
            seed=seed,
            generator=generator,
        )
        if init == "optimal":
            _fit.init_linear(layer, weight, linear.bias, moments)
        elif linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        return layer

    @torch.no_grad()
    def to_dense(self) -> nn.Linear:
        r"""The :class:`torch.nn.Linear` that computes what this layer computes (for inference or export).

        Its weight is the effective weight :math:`W_\text{eff}^\top = \frac{1}{2L} \sum_i (S_{1,i} U_{1,i} +
        U_{2,i} S_{2,i})^\top`, formed in float64; bias, dtype, device and training mode are this layer's.

        Examples:
            >>> import torch
            >>> from panther.nn import SKLinear
            >>> m = SKLinear(20, 30, num_terms=1, low_rank=4, seed=0)
            >>> dense = m.to_dense()
            >>> dense
            Linear(in_features=20, out_features=30, bias=True)
            >>> x = torch.randn(8, 20)
            >>> torch.allclose(dense(x), m(x), atol=1e-5)
            True
        """
        ref = self.S1s
        dense = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device="meta", dtype=ref.dtype
        ).to_empty(device=ref.device)
        dense.weight.copy_(_fit.linear_effective_weight(self.S1s, self.S2s, self.U1s, self.U2s))
        if self.bias is not None:
            dense.bias.copy_(self.bias)
        return dense.train(self.training)


class SKLinear_triton(SKLinear):
    r""":class:`SKLinear` whose forward always runs on the ``triton`` backend (package panther-randnla-triton).

    The math, parameters, initialisation and state dict are :class:`SKLinear`'s; only the dispatch
    differs: every call asks for the ``triton`` backend by name, so it runs the Triton kernels or raises
    :class:`panther.BackendError` saying why not (it never falls back to another backend). Construction
    raises :class:`panther.BackendError` at once when the ``triton`` backend is not installed or cannot
    run on this machine (it needs a CUDA GPU, or ``TRITON_INTERPRET=1`` for Triton's CPU interpreter).
    Use :class:`SKLinear` to let :func:`panther.set_backend` or ``auto`` dispatch choose.

    Args:
        in_features (int): size of each input sample.
        out_features (int): size of each output sample.
        num_terms (int): :math:`L`, number of pairs of sketched terms.
        low_rank (int): :math:`k`, rank of each term.
        W_init (Tensor, optional): dense weight ``(out_features, in_features)`` to start from.
        bias (bool): if ``False``, no additive bias. Default: ``True``.
        device (torch.device, optional): device of the parameters and buffers.
        dtype (torch.dtype, optional): dtype of the parameters and buffers.
        seed (int, optional): seed of the layer's generator.
        generator (torch.Generator, optional): a generator to draw from instead.

    Shape:
        - Input: :math:`(*, H_{in})`.
        - Output: :math:`(*, H_{out})`.
    """

    _backend = "triton"

