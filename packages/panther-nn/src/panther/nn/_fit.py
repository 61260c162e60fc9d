"""Least-squares fits of sketched layers to a dense weight, for fixed sketches (float64 throughout).

Linear, with ``W = W0ᵀ`` ``(I, O)``, ``U1 = cat_i U1_i`` ``(r1, O)`` stacked by rows and ``U2 = cat_i U2_i``
``(I, r2)`` by columns: the effective weight is ``W_eff = A U1 + U2 B`` with ``A = cat_i S1_i / (2L)`` and
``B = cat_i S2_i / (2L)``. The set of such matrices is ``{M : (1 - Q) M (1 - P) = 0}`` (``P``, ``Q`` the
projectors on the row space of ``U1`` and the column space of ``U2``), so the best ``W_eff`` is
``W - (1 - Q) W (1 - P)``. :func:`solve_factors` returns the minimum-norm ``(A, B)`` that reaches it.

Calibration: with the layer's inputs ``X`` in the model being converted and ``X_ref`` in the dense model
(the same when only this layer changes), ``‖X W_eff - X_ref W‖² + ε ‖W - W_eff‖²`` is, up to a constant,
``‖R (W̃ - W_eff)‖²`` with ``G = XᵀX + ε = RᵀR`` and ``W̃ = G⁻¹ (XᵀX_ref + ε) W``: the same problem for
``(R W̃, U1, R U2)``, solved for ``(R A, B)``.

Conv, with the flattened filters ``W0`` ``(O, F)`` and ``U1`` ``(2Lk, O)``: ``W_eff = U1ᵀ S / (2L)``, best at
``S = 2L (U1ᵀ)⁺ W0`` (the projection of ``W0`` on ``U1``'s row space) whatever the input weighting.
"""

from __future__ import annotations

from typing import Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from panther.ops import resolve_padding

_F64 = torch.float64

# Ridge of the calibration objective, relative to the mean input energy: ‖X E‖² + ε·mean(diag XᵀX)·‖E‖².
CALIBRATION_DAMPING = 1e-2

INITS = ("optimal", "unbiased")


def check_init(init, calibration_data) -> None:
    """``init`` is one of :data:`INITS`; calibration data go with the optimal fit only."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if init == "unbiased" and calibration_data is not None:
        raise ValueError(
            "calibration_data fits the factors to the data, which the unbiased init does not do; "
            "use init='optimal' with calibration_data, or drop calibration_data"
        )


def _range_basis(m: Tensor, side: str) -> Tuple[Tensor, Tensor]:
    """Orthonormal basis of the column (``side="col"``) or row (``"row"``) space of ``m`` and the squared
    singular values, dropping those below float64 round-off."""
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    keep = s > s.max() * max(m.shape) * torch.finfo(_F64).eps if s.numel() else s > 0
    basis = u[:, keep] if side == "col" else vh[keep].transpose(0, 1)
    return basis, s[keep] ** 2


def solve_factors(W: Tensor, U1: Tensor, U2: Tensor) -> Tuple[Tensor, Tensor]:
    """Minimum-norm ``(A, B)`` minimising ``‖W - A U1 - U2 B‖_F``; W ``(I, O)``, U1 ``(r1, O)``, U2 ``(I, r2)``.

    The map ``T(A, B) = A U1 + U2 B`` has ``T T*(R) = R U1ᵀU1 + U2U2ᵀR``, diagonal in the eigenbases of
    ``U1ᵀU1`` (``V``, eigenvalues λ) and ``U2U2ᵀ`` (``Z``, μ) with eigenvalues ``λ_b + μ_a``; the minimum-norm
    solution is ``T*(R)`` with ``R = (T T*)⁺ W``, formed on the thin bases (the complements have λ = 0 or μ = 0).
    """
    V, lam = _range_basis(U1, "row")  # (O, p), (p,)
    Z, mu = _range_basis(U2, "col")  # (I, q), (q,)
    WV = W @ V  # (I, p)
    ZW = Z.transpose(0, 1) @ W  # (q, O)
    C = Z.transpose(0, 1) @ WV  # (q, p)
    R = Z @ (C / (mu[:, None] + lam[None, :])) @ V.transpose(0, 1)
    R = R + Z @ ((ZW - C @ V.transpose(0, 1)) / mu[:, None])  # Z-range, outside V: only U2 B reaches it
    R = R + ((WV - Z @ C) / lam[None, :]) @ V.transpose(0, 1)  # V-range, outside Z: only A U1 reaches it
    return R @ U1.transpose(0, 1), U2.transpose(0, 1) @ R


class InputMoments:
    """Moments of a layer's inputs, accumulated in float64: count, sums and ``Σ x xᵀ``.

    Rows come in pairs: ``x`` as the layer sees it in the model being converted and ``x_ref`` as it sees
    it in the dense model (the same rows when only the layer changes). The cross moment ``Σ x x_refᵀ`` is
    kept only once a pair differs.
    """

    def __init__(self, features: int, device, second: bool = True) -> None:
        self.count = 0
        self.sum = torch.zeros(features, dtype=_F64, device=device)
        self.sum_ref = torch.zeros(features, dtype=_F64, device=device)
        self.gram = torch.zeros(features, features, dtype=_F64, device=device) if second else None
        self.cross: Optional[Tensor] = None  # Σ x x_refᵀ, None while it equals gram

    def add(self, rows: Tensor, rows_ref: Optional[Tensor] = None) -> None:
        rows = rows.detach().to(device=self.sum.device, dtype=_F64)
        same = rows_ref is None
        rows_ref = rows if same else rows_ref.detach().to(device=self.sum.device, dtype=_F64)
        self.count += rows.shape[0]
        self.sum += rows.sum(0)
        self.sum_ref += rows_ref.sum(0)
        if self.gram is not None:
            if self.cross is None and not (same or torch.equal(rows, rows_ref)):
                self.cross = self.gram.clone()
            self.gram += rows.transpose(0, 1) @ rows
            if self.cross is not None:
                self.cross += rows.transpose(0, 1) @ rows_ref

    @property
    def mean(self) -> Tensor:
        return self.sum / self.count

    @property
    def mean_ref(self) -> Tensor:
        return self.sum_ref / self.count

    def target(self, W: Tensor, centered: bool) -> Tuple[Tensor, Tensor]:
        """``(G, W̃)`` of the fit ``min ‖X W_eff - X_ref W‖² + ε ‖W - W_eff‖²`` = ``min ‖R (W̃ - W_eff)‖²`` + const
        with ``G = XᵀX + ε = RᵀR`` and ``W̃ = G⁻¹ (XᵀX_ref + ε) W`` (``W̃ = W`` when ``X = X_ref``); the
        moments are centred when a bias absorbs the means, and ε is the damping times the mean of diag(XᵀX)."""
        g = self.gram / self.count
        if centered:
            g = g - torch.outer(self.mean, self.mean)
        energy = g.diagonal().mean()
        ridge = CALIBRATION_DAMPING * (energy if energy > 0 else 1.0)  # inputs all zero: the weight fit
        eye = torch.eye(g.shape[0], dtype=_F64, device=g.device)
        G = g + ridge * eye
        if self.cross is None:
            return G, W
        c = self.cross / self.count
        if centered:
            c = c - torch.outer(self.mean, self.mean_ref)
        return G, torch.linalg.solve(G, (c + ridge * eye) @ W)


def linear_rows(name: str, x, features: int) -> Tensor:
    """A batch of inputs of a linear layer as rows ``(T, features)``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must hold torch.Tensor batches, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != features:
        raise ValueError(f"{name} batches must have in_features={features} as last dimension, got {tuple(x.shape)}")
    return x.reshape(-1, features)


def conv_patches(name: str, x, conv) -> Tensor:
    """The input patches a convolution sees, as rows ``(N * positions, C * kh * kw)`` (zero padding)."""
    C = conv.in_channels
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must hold torch.Tensor batches, got {type(x).__name__}")
    if x.dim() not in (3, 4) or x.shape[-3] != C:
        raise ValueError(f"{name} batches must be (N, C, H, W) or (C, H, W) with C = {C}, got {tuple(x.shape)}")
    if x.dim() == 3:
        x = x.unsqueeze(0)
    sym, extra = resolve_padding(conv.padding, tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.dilation))
    if extra is not None:
        x = F.pad(x, extra)
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=sym, stride=conv.stride)  # (N, F, P)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def batches(name: str, data) -> Iterable[Tensor]:
    """``data`` as an iterable of batches: one tensor is one batch."""
    if isinstance(data, Tensor):
        return (data,)
    try:
        return iter(data)
    except TypeError:
        raise TypeError(f"{name} must be a tensor or an iterable of tensors, got {type(data).__name__}") from None


def fit_linear(
    weight: Tensor, U1s: Tensor, U2s: Tensor, moments: Optional[InputMoments] = None, centered: bool = False
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(S1s, S2s, bias_shift)`` in float64 for SKLinear's sketches and a dense ``weight`` ``(O, I)``.

    Without ``moments``, the weight-error optimum; with them, the (damped) output-error optimum, and with
    ``centered`` the bias shift ``mean(x_ref) W - mean(x) W_eff`` that keeps the mean output.
    """
    L, k, O = U1s.shape
    I = U2s.shape[1]
    W = weight.detach().to(_F64).transpose(0, 1)  # (I, O)
    U1 = U1s.to(_F64).reshape(L * k, O)
    U2 = U2s.to(_F64).permute(1, 0, 2).reshape(I, L * k)
    shift = None
    if moments is None:
        A, B = solve_factors(W, U1, U2)
    else:
        G, target = moments.target(W, centered)
        R = torch.linalg.cholesky(G, upper=True)  # G = RᵀR
        RA, B = solve_factors(R @ target, U1, R @ U2)
        A = torch.linalg.solve_triangular(R, RA, upper=True)
        if centered:
            shift = moments.mean_ref @ W - moments.mean @ (A @ U1 + U2 @ B)
    S1s = (2 * L * A).reshape(I, L, k).permute(1, 0, 2)
    S2s = (2 * L * B).reshape(L, k, O)
    return S1s, S2s, shift


def fit_conv(
    weight: Tensor, U1s: Tensor, moments: Optional[InputMoments] = None, centered: bool = False
) -> Tuple[Tensor, Optional[Tensor]]:
    """``(S1s, bias_shift)`` in float64 for SKConv2d's sketches ``(2L, k, O)`` and dense filters ``(O, C, kh, kw)``.

    The input weighting does not move the optimum (it only acts on the filters' input side): the filters fit
    ``W̃`` of :meth:`InputMoments.target` (``W`` itself when the layer's inputs are the dense model's), and
    with ``centered`` the bias shifts by ``W mean(patch_ref) - W_eff mean(patch)``. Moments are of patches.
    """
    T, k, O = U1s.shape
    W = weight.detach().to(_F64).reshape(O, -1).transpose(0, 1)  # (F, O)
    U1 = U1s.to(_F64).reshape(T * k, O)
    target = W
    if moments is not None and moments.gram is not None:
        target = moments.target(W, centered)[1]
    A, _ = solve_factors(target, U1, U1.new_zeros(W.shape[0], 0))  # Sᵀ/(2L), (F, 2Lk)
    shift = None
    if moments is not None and centered:
        shift = moments.mean_ref @ W - moments.mean @ (A @ U1)
    return (T * A.transpose(0, 1)).reshape(T, k, *weight.shape[1:]), shift


def linear_effective_weight(S1s: Tensor, S2s: Tensor, U1s: Tensor, U2s: Tensor) -> Tensor:
    """``W_effᵀ`` ``(O, I)`` in float64: ``1/(2L) Σ_i (S1_i U1_i + U2_i S2_i)``, transposed like nn.Linear's weight."""
    L = S1s.shape[0]
    d = lambda t: t.detach().to(_F64)  # noqa: E731
    W = torch.einsum("lik,lko->io", d(S1s), d(U1s)) + torch.einsum("lik,lko->io", d(U2s), d(S2s))
    return (W / (2 * L)).transpose(0, 1)


def conv_effective_weight(S1s: Tensor, U1s: Tensor) -> Tensor:
    """Dense filters ``(O, C, kh, kw)`` in float64: ``1/(2L) Σ_i U1_iᵀ S1_i``."""
    T = S1s.shape[0]
    return torch.einsum("tko,tkchw->ochw", U1s.detach().to(_F64), S1s.detach().to(_F64)) / T


def relative_error(reference: Tensor, approx: Tensor) -> float:
    """``‖reference - approx‖ / ‖reference‖``."""
    return float((reference - approx).norm() / reference.norm().clamp_min(torch.finfo(_F64).tiny))


@torch.no_grad()
def init_linear(layer, weight: Tensor, bias: Optional[Tensor], moments: Optional[InputMoments] = None) -> None:
    """Set an SKLinear's factors (and bias) to the optimum for its sketches: weight-only, or on ``moments``."""
    S1s, S2s, shift = fit_linear(weight, layer.U1s, layer.U2s, moments, centered=bias is not None)
    layer.S1s.copy_(S1s)
    layer.S2s.copy_(S2s)
    if bias is not None:
        b = bias.detach().to(_F64)
        layer.bias.copy_(b if shift is None else b + shift)


@torch.no_grad()
def init_conv(layer, weight: Tensor, bias: Optional[Tensor], moments: Optional[InputMoments] = None) -> None:
    """Set an SKConv2d's filters (and bias) to the optimum for its sketches, on patch ``moments`` if given."""
    S1s, shift = fit_conv(weight, layer.U1s, moments, centered=bias is not None)
    layer.S1s.copy_(S1s)
    if bias is not None:
        b = bias.detach().to(_F64)
        layer.bias.copy_(b if shift is None else b + shift)
