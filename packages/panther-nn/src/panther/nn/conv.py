"""Sketched 2-D convolution: :class:`SKConv2d`."""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

from panther.nn import _fit
from panther.nn._init import (
    check_dtype,
    check_int,
    check_int_pair,
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
from panther.ops import resolve_padding, sketched_conv2d

__all__ = ["SKConv2d"]

_size_2_t = Union[int, Tuple[int, int]]


class SKConv2d(nn.Module):
    r"""Applies a sketched 2-D convolution over an input signal composed of several input planes.

    The filters of :class:`torch.nn.Conv2d` are replaced by :math:`2L` randomized terms of rank :math:`k`
    (:math:`L` = ``num_terms``, :math:`k` = ``low_rank``): a convolution to :math:`2Lk` channels with the
    learned filters :math:`S_{1,i}` followed by a fixed :math:`1 \times 1` projection by Rademacher
    sketches :math:`U_{1,i}` (entries :math:`\pm 1/\sqrt{k}`):

    .. math::

        y = \frac{1}{2L} \sum_{i=1}^{2L} U_{1,i}^\top \operatorname{conv}(x, S_{1,i}) + b

    Initialised from a dense filter bank :math:`W_0` of shape ``(out_channels, in_channels, kh, kw)`` as
    :math:`S_{1,i} = U_{1,i} W_0` (over the output channels), so that over the draw of the sketches
    :math:`\mathbb{E}[y] = \operatorname{conv}(x, W_0) + b`. ``stride``, ``padding`` and ``dilation`` mean
    what they mean for :class:`torch.nn.Conv2d`; ``groups`` and padding modes other than zeros are not
    supported. It stores :math:`2Lk\,(C_{in} k_h k_w + C_{out})` values; a :class:`UserWarning` is raised
    when that is not fewer than the dense :math:`C_{out} C_{in} k_h k_w`, and a :class:`ValueError` (with the
    size needed) before anything is allocated when it cannot fit in the memory of ``device``. Every forward runs
    :func:`panther.ops.sketched_conv2d` on the backend selected at call time. Under :func:`torch.autocast`
    it computes and returns the autocast dtype, as :class:`torch.nn.Conv2d` does; with parameters cast by a
    mixed-precision wrapper (FSDP2), the fixed sketches are cast to their dtype at use.
    ``model.to(memory_format=torch.channels_last)`` lays ``S1s`` out as channels_last filters, and a
    channels_last input gives a channels_last output.

    Args:
        in_channels (int): number of channels in the input image.
        out_channels (int): number of channels produced by the convolution.
        kernel_size (int or tuple): size of the convolving kernel (int or pair).
        stride (int or tuple): stride of the convolution. Default: 1.
        padding (int, tuple or str): padding added to all four sides of the input: an int, a pair,
            ``'valid'`` (none) or ``'same'`` (output as large as the input; stride 1 only). Default: 0.
        dilation (int or tuple): spacing between kernel elements. Default: 1.
        bias (bool): if ``False``, the layer does not learn an additive bias. Default: ``True``.
        num_terms (int): :math:`L`; the layer has :math:`2L` terms. Default: 1.
        low_rank (int): :math:`k`, rank of each term. Default: 8.
        device (torch.device, optional): device of the parameters and buffers. Default: the default device.
        dtype (torch.dtype, optional): dtype of the parameters and buffers, one of ``torch.float16``,
            ``torch.bfloat16``, ``torch.float32`` and ``torch.float64``. Default: the default dtype.
        seed (int, optional): seed of the layer's own random generator (sketches and initial filters).
            Default: ``None``, seeded from one draw of the global RNG.
        generator (torch.Generator, optional): a generator to draw from instead. At most one of ``seed``
            and ``generator`` may be given.
        W_init (Tensor, optional): dense filters :math:`W_0` ``(out_channels, in_channels, kh, kw)`` to start
            from; the bias then starts at zero. Default: ``None``, filters and bias drawn like
            :class:`torch.nn.Conv2d`'s.

    Shape:
        - Input: :math:`(N, C_{in}, H_{in}, W_{in})` or :math:`(C_{in}, H_{in}, W_{in})`.
        - Output: :math:`(N, C_{out}, H_{out}, W_{out})` or :math:`(C_{out}, H_{out}, W_{out})`, with
          :math:`H_{out}`, :math:`W_{out}` as for :class:`torch.nn.Conv2d`.

    Attributes:
        S1s: the learnable filters, of shape ``(2 * num_terms, low_rank, in_channels, kh, kw)``.
        U1s: the fixed sketches (buffer) of shape ``(2 * num_terms, low_rank, out_channels)``.
        bias: the learnable bias of shape ``(out_channels,)``, or ``None``.
        seed: the seed of the layer's generator, or ``None`` when a ``generator`` was given.

    Examples:
        >>> import torch
        >>> from panther.nn import SKConv2d
        >>> m = SKConv2d(16, 33, 3, stride=2, num_terms=1, low_rank=4, seed=0)
        >>> m
        SKConv2d(16, 33, kernel_size=(3, 3), stride=(2, 2), num_terms=1, low_rank=4)
        >>> input = torch.randn(20, 16, 50, 100)
        >>> m(input).shape
        torch.Size([20, 33, 24, 49])
        >>> m = SKConv2d(16, 33, (3, 5), padding="same", num_terms=2, low_rank=2, seed=0)
        >>> m(input).shape
        torch.Size([20, 33, 50, 100])
    """

    __constants__ = [
        "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "num_terms", "low_rank",
    ]
    in_channels: int
    out_channels: int
    kernel_size: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Union[str, Tuple[int, int]]
    dilation: Tuple[int, int]
    num_terms: int
    low_rank: int
    seed: Optional[int]
    S1s: Tensor
    U1s: Tensor
    bias: Optional[Tensor]

    _backend: Optional[str] = None  # None: the selection in force at call time

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_2_t,
        stride: _size_2_t = 1,
        padding: Union[str, _size_2_t] = 0,
        dilation: _size_2_t = 1,
        bias: bool = True,
        num_terms: int = 1,
        low_rank: int = 8,
        device=None,
        dtype: Optional[torch.dtype] = None,
        *,
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        W_init: Optional[Tensor] = None,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": check_dtype("dtype", dtype)}
        super().__init__()
        self.in_channels = check_int("in_channels", in_channels)
        self.out_channels = check_int("out_channels", out_channels)
        self.kernel_size = check_int_pair("kernel_size", kernel_size, 1)
        self.stride = check_int_pair("stride", stride, 1)
        self.dilation = check_int_pair("dilation", dilation, 1)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be 'valid', 'same', an int or a pair of ints, got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError(
                    f"padding='same' is not supported for strided convolutions, got stride={stride!r}"
                )
            self.padding = padding
        else:
            self.padding = check_int_pair("padding", padding, 0)
        resolve_padding(self.padding, self.kernel_size, self.stride, self.dilation)  # the op's own rules
        self.num_terms = check_int("num_terms", num_terms)
        self.low_rank = check_int("low_rank", low_rank)
        if W_init is not None:
            check_weight("W_init", W_init, (self.out_channels, self.in_channels, *self.kernel_size))
        kh, kw = self.kernel_size
        terms, k, C, O = 2 * self.num_terms, self.low_rank, self.in_channels, self.out_channels
        factory_sizes(
            type(self).__name__, device, dtype,
            [("S1s", (terms, k, C, kh, kw)), ("U1s", (terms, k, O)), ("the dense initial filters", (O, C, kh, kw))],
            in_channels=C, out_channels=O, kernel_size=self.kernel_size, num_terms=self.num_terms, low_rank=k,
        )
        self._generator, self.seed = make_generator(seed, generator)
        prepare_backends(type(self).__name__)
        fan_in = self.in_channels * kh * kw
        warn_if_no_savings(
            type(self).__name__, self.num_terms, self.low_rank, fan_in, self.out_channels,
            in_name="in=in_channels*kh*kw", out_name="out=out_channels",
        )

        self.S1s = nn.Parameter(torch.empty((terms, k, self.in_channels, kh, kw), **factory_kwargs))
        self.register_buffer("U1s", torch.empty((terms, k, self.out_channels), **factory_kwargs))
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_channels, **factory_kwargs))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters(W_init)

    def reset_parameters(self, W_init: Optional[Tensor] = None) -> None:
        r"""Draw new sketches from the layer's generator and initialise the filters from dense ones.

        Args:
            W_init (Tensor, optional): dense filters :math:`W_0` ``(out_channels, in_channels, kh, kw)``; the
                bias is then zeroed. Default: ``None``, filters and bias drawn like :class:`torch.nn.Conv2d`'s.
        """
        terms, k, C, kh, kw = self.S1s.shape
        O = self.out_channels
        if W_init is not None:
            check_weight("W_init", W_init, (O, C, kh, kw))
        if self.S1s.is_meta:  # nothing to fill; after to_empty(), reset_parameters() draws what a real build would
            return
        gen = self._generator
        wd = work_dtype(self.S1s.dtype)
        dev = self.S1s.device
        fan_in = C * kh * kw
        U1 = rademacher((terms, k, O), k, gen, wd).to(dev)
        if W_init is None:
            W0 = kaiming_weight((O, C, kh, kw), fan_in, gen, wd).to(dev)
            b = uniform((O,), 1.0 / math.sqrt(fan_in), gen, wd) if self.bias is not None else None
        else:
            W0 = W_init.detach().to(device=dev, dtype=wd)
            b = torch.zeros(O, dtype=wd)
        with torch.no_grad():
            self.U1s.copy_(U1)
            self.S1s.copy_(torch.einsum("tko,ochw->tkchw", U1, W0))  # S1_i = U1_i W0  (k, C, kh, kw)
            if self.bias is not None:
                self.bias.copy_(b)

    def forward(self, input: Tensor) -> Tensor:
        """Convolve ``input`` of shape ``(N, C_in, H, W)`` or ``(C_in, H, W)``."""
        U1s = self.U1s.to(self.S1s.dtype)  # parameters cast by a mixed-precision wrapper: the sketches follow
        return sketched_conv2d(
            input, self.S1s, U1s, self.bias, self.stride, self.padding, self.dilation, backend=self._backend
        )

    def _apply(self, fn, recurse=True):
        # S1s (2L, k, C, kh, kw) goes through fn as the (2Lk, C, kh, kw) filters it holds, so that
        # Module.to(memory_format=torch.channels_last) lays it out as nn.Conv2d's weight (same shape and
        # state_dict; the op then convolves with channels_last filters)
        def as_filters(t):
            if t.dim() != 5:
                return fn(t)
            flat = t.flatten(0, 1)
            out = fn(flat)
            if out is flat:  # fn changed nothing (or worked in place): the tensor itself, not a view of it
                return t
            return out.unflatten(0, t.shape[:2]) if isinstance(out, Tensor) and out.dim() == 4 else out

        return super()._apply(as_filters, recurse)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding!r}" if isinstance(self.padding, str) else f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        s += f", num_terms={self.num_terms}, low_rank={self.low_rank}"
        if self.bias is None:
            s += ", bias=False"
        return s

    @classmethod
    def from_conv2d(
        cls,
        conv: nn.Conv2d,
        num_terms: int,
        low_rank: int,
        *,
        init: str = "optimal",
        calibration_data=None,
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> "SKConv2d":
        r"""A sketched layer initialised from a (trained) :class:`torch.nn.Conv2d`.

        The sketches are drawn from the new layer's generator; the filters are then fitted to
        ``conv.weight``, the bias is copied, and kernel size, stride, padding, dilation, dtype and device
        are ``conv``'s. ``conv`` is left unchanged.

        - ``init="optimal"`` (default): the filters that minimise the error of the effective filters
          :math:`\frac{1}{2L} \sum_i U_{1,i}^\top S_{1,i}` (flattened to ``(out_channels, in_channels * kh
          * kw)``): their projection on the row space of the stacked sketches :math:`U_{1,i}`, computed in
          float64 (the minimum-norm such filters). With :math:`2Lk \ge` ``out_channels`` the layer is exact.
        - ``init="unbiased"``: :math:`S_{1,i} = U_{1,i} W_0`, whose output equals ``conv``'s in expectation
          over the sketches, with a much larger error for any one draw.
        - ``calibration_data`` (with ``init="optimal"``): input images ``(N, C, H, W)`` or ``(C, H, W)``,
          one tensor or an iterable of them. Weighting the error by the input patches does not change the
          best filters (the sketches act on the output channels only), so the data correct the bias: it
          absorbs the mean output error over the patches. Without a bias they change nothing.

        Args:
            conv (torch.nn.Conv2d): the dense layer to replace; ``groups`` must be 1 and ``padding_mode``
                ``'zeros'``.
            num_terms (int): :math:`L`; the layer has :math:`2L` terms.
            low_rank (int): :math:`k`, rank of each term.
            init (str): ``"optimal"`` or ``"unbiased"``. Default: ``"optimal"``.
            calibration_data (Tensor or iterable of Tensors, optional): input images to correct the bias on.
            seed (int, optional): seed of the new layer's generator.
            generator (torch.Generator, optional): a generator to draw from instead.

        Examples:
            >>> import torch
            >>> from panther.nn import SKConv2d
            >>> dense = torch.nn.Conv2d(16, 32, 3, padding=1)
            >>> x = torch.randn(4, 16, 10, 10)
            >>> optimal = SKConv2d.from_conv2d(dense, 1, 4, seed=0)
            >>> unbiased = SKConv2d.from_conv2d(dense, 1, 4, init="unbiased", seed=0)
            >>> err = lambda m: ((m(x) - dense(x)).norm() / dense(x).norm()).item()
            >>> err(optimal) < err(unbiased)
            True
        """
        check_not_lazy("conv", conv)
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be a torch.nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"SKConv2d has no grouped convolution: conv.groups must be 1, got {conv.groups}")
        if conv.padding_mode != "zeros":
            raise ValueError(
                f"SKConv2d pads with zeros only: conv.padding_mode must be 'zeros', got {conv.padding_mode!r}"
            )
        _fit.check_init(init, calibration_data)
        moments = None
        if calibration_data is not None:
            moments = _fit.InputMoments(conv.weight[0].numel(), conv.weight.device, second=False)  # means suffice
            for batch in _fit.batches("calibration_data", calibration_data):
                moments.add(_fit.conv_patches("calibration_data", batch, conv))
            if moments.count == 0:
                raise ValueError("calibration_data holds no inputs (no batch, or only empty ones)")
        weight = conv.weight
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=conv.bias is not None,
            num_terms=num_terms,
            low_rank=low_rank,
            dtype=weight.dtype,
            device=weight.device,
            seed=seed,
            generator=generator,
            W_init=weight if init == "unbiased" else None,
        )
        if init == "optimal":
            _fit.init_conv(layer, weight, conv.bias, moments)
        elif conv.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(conv.bias)
        return layer

    @torch.no_grad()
    def to_dense(self) -> nn.Conv2d:
        r"""The :class:`torch.nn.Conv2d` that computes what this layer computes (for inference or export).

        Its filters are the effective filters :math:`\frac{1}{2L} \sum_i U_{1,i}^\top S_{1,i}`, formed in
        float64; bias, stride, padding, dilation, dtype, device and training mode are this layer's.

        Examples:
            >>> import torch
            >>> from panther.nn import SKConv2d
            >>> m = SKConv2d(16, 33, 3, padding=1, num_terms=1, low_rank=4, seed=0)
            >>> dense = m.to_dense()
            >>> dense
            Conv2d(16, 33, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
            >>> x = torch.randn(2, 16, 9, 9)
            >>> torch.allclose(dense(x), m(x), atol=1e-5)
            True
        """
        ref = self.S1s
        dense = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, stride=self.stride, padding=self.padding,
            dilation=self.dilation, bias=self.bias is not None, device="meta", dtype=ref.dtype,
        ).to_empty(device=ref.device)
        dense.weight.copy_(_fit.conv_effective_weight(self.S1s, self.U1s))
        if self.bias is not None:
            dense.bias.copy_(self.bias)
        return dense.train(self.training)

