"""The common interface of all sketch operators: :class:`SketchOperator`."""

from __future__ import annotations

import copy
from typing import ClassVar, List, Optional, Tuple, Union

import torch

from panther._args import check_fits, check_int, resolve_generator
from panther.sketch._checks import check_floating_dtype, check_input

DeviceLike = Union[torch.device, str, int, None]


class SketchOperator:
    r"""A random linear map :math:`S \in \mathbb{R}^{k \times n}` with :math:`\mathbb{E}[S^\top S] = I_n`.

    The random draws are made once, at construction, from a CPU ``torch.Generator`` (or the one given) and
    then moved to ``device``, so the same ``seed`` gives the same operator on every device and, up to
    rounding, in every dtype. The global random number generator is never used.

    Subclasses implement :meth:`_draw` (make the random tensors), :meth:`_apply` (apply along the last
    axis without forming :math:`S` where the structure allows) and :meth:`to_dense`.

    Args:
        sketch_dim (int): :math:`k`, the number of rows (the size of the output along ``dim``).
        input_dim (int): :math:`n`, the number of columns (the size of the input along ``dim``).
        seed (int, optional): seed of a fresh CPU generator to draw the operator from.
        generator (torch.Generator, optional): generator to draw from (its state advances). Give at
            most one of ``seed`` and ``generator``; with neither, a fresh nondeterministic seed is drawn
            from the OS and stored in :attr:`seed`.
        device (torch.device, optional): device of the operator's tensors. Default: CPU.
        dtype (torch.dtype, optional): floating-point dtype of the operator. Default: ``torch.float32``.

    Attributes:
        sketch_dim (int): :math:`k`.
        input_dim (int): :math:`n`.
        seed (int or None): the seed the operator was drawn from; ``None`` if a ``generator`` was given.
        dtype (torch.dtype): dtype of the operator (inputs must have the same dtype).
        device (torch.device): device of the operator (inputs must be on the same device).
    """

    kind: ClassVar[str] = ""
    # Names of the tensor attributes that hold the draws; .to() moves them (and casts floating ones).
    _tensor_attrs: ClassVar[Tuple[str, ...]] = ()
    # Where _apply expects the sketched axis: -1 (last) or 0 (first).
    _axis: ClassVar[int] = -1

    def __init__(
        self,
        sketch_dim: int,
        input_dim: int,
        *,
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        device: DeviceLike = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.sketch_dim = check_int("sketch_dim", sketch_dim)
        self.input_dim = check_int("input_dim", input_dim)
        self.dtype = check_floating_dtype("dtype", dtype)
        target = torch.device("cpu") if device is None else torch.device(device)
        self._check_dims()
        extra = self.extra_repr()
        sizes = f"sketch_dim={self.sketch_dim}, input_dim={self.input_dim}" + (f", {extra}" if extra else "")
        call = f"{type(self).__name__}({sizes})"
        gen, self.seed = resolve_generator(seed, generator)
        check_fits(call, self._memory_needs(), gen.device)  # draws are made on the generator's device
        self._draw(gen)
        self._move(target, self.dtype)

    # -- hooks for subclasses -------------------------------------------------------------------------

    def _check_dims(self) -> None:
        """Raise if ``sketch_dim``/``input_dim`` (and subclass parameters) are inconsistent."""

    def _memory_needs(self) -> List[Tuple[str, int]]:
        """``(name, bytes)`` of the tensors that :meth:`_draw` makes (the draws and what is kept)."""
        return []

    def _draw(self, generator: torch.Generator) -> None:
        """Set the attributes named in ``_tensor_attrs`` from draws of ``generator`` (in ``self.dtype``)."""
        raise NotImplementedError

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the operator along axis ``_axis`` of the checked ``x``: ``(..., n) -> (..., k)`` for the
        last axis, ``(n, ...) -> (k, ...)`` for the first."""
        raise NotImplementedError

    def to_dense(self) -> torch.Tensor:
        """Return the operator as a dense ``(sketch_dim, input_dim)`` tensor (a new tensor)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ""

    # -- public interface -----------------------------------------------------------------------------

    @property
    def shape(self) -> torch.Size:
        """``torch.Size([sketch_dim, input_dim])``."""
        return torch.Size((self.sketch_dim, self.input_dim))

    @property
    def device(self) -> torch.device:
        return getattr(self, self._tensor_attrs[0]).device

    def apply(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        r"""Apply the operator along axis ``dim`` of ``x``: contract :math:`S` with that axis.

        For a 1-D ``x`` this is :math:`S x`. In general, the result ``y`` has ``y.shape[dim] ==
        sketch_dim``, the other sizes of ``x``, and ``y[..., i, ...] = sum_j S[i, j] * x[..., j, ...]``
        along ``dim``. The dense matrix is not formed where the structure allows. Differentiable with
        respect to ``x``.

        Args:
            x (Tensor): floating-point tensor with ``x.shape[dim] == input_dim``, of the operator's
                dtype and device.
            dim (int): the axis to sketch. Default: ``-1``.

        Returns:
            Tensor: ``x`` with axis ``dim`` of size ``sketch_dim``.
        """
        dim = check_input(x, dim, self.input_dim, self.dtype, self.device)
        y = self._apply(torch.movedim(x, dim, self._axis))
        return torch.movedim(y, self._axis, dim)

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        """``S @ x`` with matmul semantics: along dim 0 of a 1-D ``x``, else along dim ``-2``."""
        if not isinstance(x, torch.Tensor):
            return NotImplemented
        return self.apply(x, dim=0 if x.dim() == 1 else -2)

    def to(self, device: DeviceLike = None, dtype: Optional[torch.dtype] = None) -> "SketchOperator":
        """Return a copy of the operator (same draws) on ``device`` and/or in ``dtype``.

        Args:
            device (torch.device, optional): target device. Default: keep the current one.
            dtype (torch.dtype, optional): target floating-point dtype. Default: keep the current one.
        """
        target_dtype = self.dtype if dtype is None else check_floating_dtype("dtype", dtype)
        target_device = self.device if device is None else torch.device(device)
        new = copy.copy(self)
        new._move(target_device, target_dtype)
        return new

    def __repr__(self) -> str:
        extra = self.extra_repr()
        return (
            f"{type(self).__name__}(sketch_dim={self.sketch_dim}, input_dim={self.input_dim}"
            f"{', ' + extra if extra else ''}, dtype={self.dtype}, device={self.device})"
        )

    # -- helpers --------------------------------------------------------------------------------------

    def _move(self, device: torch.device, dtype: torch.dtype) -> None:
        for name in self._tensor_attrs:
            t = getattr(self, name)
            if t.is_floating_point():
                t = t.to(device=device, dtype=dtype)
            else:
                t = t.to(device=device)
            setattr(self, name, t)
        self.dtype = dtype
