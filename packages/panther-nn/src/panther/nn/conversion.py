"""Whole-model conversion: :func:`convert` (dense -> sketched, with a :class:`ConversionReport`) and
:func:`to_dense` (sketched -> dense)."""

from __future__ import annotations

import copy
import dataclasses
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from panther._args import resolve_generator
from panther.nn import _fit
from panther.nn._fastpath import decline_fused_paths
from panther.nn.attention import RandMultiHeadAttention
from panther.nn.conv import SKConv2d
from panther.nn.linear import SKLinear

__all__ = ["convert", "to_dense", "ConversionReport", "LayerConversion"]

_DENSE = (nn.Linear, nn.Conv2d, nn.MultiheadAttention)
_SKETCHED = (SKLinear, SKConv2d, RandMultiHeadAttention)
_OVERRIDE_KEYS = {nn.Linear: ("num_terms", "low_rank"), nn.Conv2d: ("num_terms", "low_rank"),
                  nn.MultiheadAttention: ("sketch_dim", "kernel")}


@dataclasses.dataclass
class LayerConversion:
    """What :func:`convert` did with one layer.

    Attributes:
        name: the layer's qualified name in the model (as in ``model.named_modules()``).
        kind: the dense type and, when converted, the sketched one (``"Linear -> SKLinear"``).
        converted: whether the layer was replaced.
        reason: why it was kept dense (empty when converted).
        config: the sketch settings (``num_terms``, ``low_rank``, or ``sketch_dim``, ``kernel``).
        params_before, params_after: parameters of the layer before and after.
        bytes_before, bytes_after: bytes of its parameters and buffers (the fixed sketches are buffers).
        init: ``"optimal"``, ``"calibrated"`` or ``"unbiased"`` for linear and conv layers, else ``""``.
        weight_error: relative error of the effective weight, ``‖W - W_eff‖ / ‖W‖``, or ``None``.
    """

    name: str
    kind: str
    converted: bool
    reason: str
    config: Dict[str, Any]
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    init: str = ""
    weight_error: Optional[float] = None


@dataclasses.dataclass
class ConversionReport:
    """The outcome of :func:`convert`: one :class:`LayerConversion` per candidate layer and whole-model totals.

    ``str(report)`` is a table of the layers and the totals. Parameters count every ``nn.Parameter``;
    bytes count parameters and buffers (a sketched layer stores as many values in its fixed sketches as in
    its parameters).

    Attributes:
        layers: every layer of a converted type, in model order, converted or kept (with the reason).
        params_before, params_after: parameters of the whole model before and after.
        bytes_before, bytes_after: bytes of the whole model's parameters and buffers before and after.
    """

    layers: List[LayerConversion]
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int

    @property
    def converted(self) -> List[LayerConversion]:
        """The layers that were replaced."""
        return [layer for layer in self.layers if layer.converted]

    @property
    def skipped(self) -> List[LayerConversion]:
        """The layers kept dense, each with its ``reason``."""
        return [layer for layer in self.layers if not layer.converted]

    def __repr__(self) -> str:
        return (
            f"ConversionReport(converted={len(self.converted)}, skipped={len(self.skipped)}, "
            f"params={self.params_before:,} -> {self.params_after:,} "
            f"({_ratio(self.params_after, self.params_before)}), "
            f"bytes={self.bytes_before:,} -> {self.bytes_after:,} ({_ratio(self.bytes_after, self.bytes_before)}))"
        )

    def __str__(self) -> str:
        header = ["layer", "type", "sketch", "init", "weight err", "params", "bytes", "note"]
        rows = []
        for r in self.layers:
            config = ", ".join(f"{k}={v}" for k, v in r.config.items()) if r.converted else "-"
            err = "-" if r.weight_error is None else f"{r.weight_error:.3f}"
            if r.converted:
                params = f"{r.params_before:,} -> {r.params_after:,}"
                size = f"{r.bytes_before:,} -> {r.bytes_after:,}"
            else:
                params, size = f"{r.params_before:,}", f"{r.bytes_before:,}"
            rows.append([r.name or "(model)", r.kind, config, r.init or "-", err, params, size, r.reason or ""])
        rows.append(["total", "", "", "", "",
                     f"{self.params_before:,} -> {self.params_after:,} "
                     f"({_ratio(self.params_after, self.params_before)})",
                     f"{self.bytes_before:,} -> {self.bytes_after:,} ({_ratio(self.bytes_after, self.bytes_before)})",
                     f"{len(self.converted)} converted, {len(self.skipped)} kept"])
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
        fmt = lambda row: "  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip()  # noqa: E731
        rule = "  ".join("-" * w for w in widths)
        return "\n".join([fmt(header), rule] + [fmt(row) for row in rows[:-1]] + [rule, fmt(rows[-1])])


def _ratio(after: int, before: int) -> str:
    return f"{after / before:.1%}" if before else "-"


def _count(module: nn.Module) -> Tuple[int, int]:
    """(parameters, bytes of parameters and buffers) of a module, shared tensors counted once."""
    seen, params, size = set(), 0, 0
    for t, is_param in [(p, True) for p in module.parameters()] + [(b, False) for b in module.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        params += t.numel() if is_param else 0
        size += t.numel() * t.element_size()
    return params, size


def _matcher(name: str, spec) -> Optional[Any]:
    """peft's rule: a string is a regular expression the full name must match; a list holds exact names
    or name suffixes (``"fc"`` matches ``"fc"`` and ``"block.fc"``). Returns the entry that matched."""
    if isinstance(spec, str):
        return spec if re.fullmatch(spec, name) else None
    for entry in spec:
        if name == entry or name.endswith("." + entry):
            return entry
    return None


def _check_names(arg: str, spec) -> None:
    if spec is None:
        return
    if isinstance(spec, str):
        try:
            re.compile(spec)
        except re.error as err:
            raise ValueError(f"{arg} is not a valid regular expression: {spec!r} ({err})") from None
        return
    if not isinstance(spec, Iterable) or not all(isinstance(e, str) for e in spec):
        raise TypeError(f"{arg} must be a regular expression (str) or a list of module names, got {spec!r}")


def _dense_type(module: nn.Module) -> Optional[type]:
    for t in _DENSE:
        if isinstance(module, t):
            return t
    return None


def _candidates(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Linear, Conv2d and MultiheadAttention layers in model order, each once, without looking inside
    MultiheadAttention (its ``out_proj`` is a Linear it reads directly) or panther's layers."""
    found, seen = [], set()

    def walk(prefix: str, module: nn.Module) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        if _dense_type(module) is not None and not isinstance(module, _SKETCHED):
            found.append((prefix, module))
            return
        if isinstance(module, _SKETCHED):
            return
        for child_name, child in module.named_children():
            walk(f"{prefix}.{child_name}" if prefix else child_name, child)

    walk("", model)
    return found


def _resolve_budget(param_budget, total: int) -> int:
    if isinstance(param_budget, bool) or not isinstance(param_budget, (int, float)):
        raise TypeError(f"param_budget must be a fraction (float) or a parameter count (int), got {param_budget!r}")
    if isinstance(param_budget, float):
        if not 0.0 < param_budget <= 1.0:
            raise ValueError(
                f"param_budget as a fraction of the model's parameters must be in (0, 1], got {param_budget}"
            )
        return int(param_budget * total)
    if param_budget < 1:
        raise ValueError(f"param_budget as a parameter count must be >= 1, got {param_budget}")
    return param_budget


def _sizes(module: nn.Module) -> Tuple[int, int]:
    """(fan_in, fan_out) of the weight a sketch replaces: (in, out) for Linear, (C kh kw, out) for Conv2d."""
    if isinstance(module, nn.Conv2d):
        return module.weight[0].numel(), module.out_channels
    return module.in_features, module.out_features


def _sketch_params(module: nn.Module, L: int, k: int) -> int:
    """Parameters of the sketched weight: L k (in + out) for SKLinear, 2 L k C kh kw for SKConv2d."""
    fan_in, fan_out = _sizes(module)
    return 2 * L * k * fan_in if isinstance(module, nn.Conv2d) else L * k * (fan_in + fan_out)


def _saves(module: nn.Module, L: int, k: int) -> bool:
    """The API page's rule: the sketch stores 2 L k (in + out) values, fewer than the dense in * out."""
    fan_in, fan_out = _sizes(module)
    return 2 * L * k * (fan_in + fan_out) < fan_in * fan_out


def _budget_rank(module: nn.Module, L: int, fraction: float) -> int:
    """The rank whose sketch holds about ``fraction`` of the dense weight's parameters (at least 1)."""
    fan_in, fan_out = _sizes(module)
    per_rank = _sketch_params(module, L, 1)
    return max(1, int(fraction * fan_in * fan_out / per_rank))


def _run(model: nn.Module, batch) -> None:
    if isinstance(batch, torch.Tensor):
        model(batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    elif isinstance(batch, Mapping):
        model(**batch)
    else:
        raise TypeError(
            f"calibration_data must yield model inputs: tensors, tuples/lists of positional arguments or dicts "
            f"of keyword arguments, got {type(batch).__name__}"
        )


def _layer_rows(module: nn.Module, x) -> torch.Tensor:
    if isinstance(module, nn.Conv2d):
        return _fit.conv_patches("calibration_data", x, module)
    return _fit.linear_rows("calibration_data", x, module.in_features)


@torch.no_grad()
def _layer_moments(
    name: str, model: nn.Module, layer: nn.Module, reference: Optional[nn.Module], batches: List[Any]
) -> Optional[_fit.InputMoments]:
    """Moments of ``layer``'s inputs in ``model`` (its earlier layers already converted), paired row by row
    with the same layer's inputs in the dense ``reference`` (``None``: nothing before it changed)."""
    seen: Dict[str, List[torch.Tensor]] = {"model": [], "reference": []}

    def capture(key):
        def hook(module, args, kwargs):
            seen[key].append(_layer_rows(module, args[0] if args else kwargs.get("input")))

        return hook

    handles = [layer.register_forward_pre_hook(capture("model"), with_kwargs=True)]
    if reference is not None:
        handles.append(reference.get_submodule(name).register_forward_pre_hook(capture("reference"), with_kwargs=True))
    moments = None
    try:
        for batch in batches:
            seen["model"].clear()
            seen["reference"].clear()
            _run(model, batch)
            if reference is not None:
                _run(reference, batch)
            pairs = seen["reference"] if reference is not None else seen["model"]
            if [r.shape for r in seen["model"]] != [r.shape for r in pairs]:
                raise RuntimeError(
                    f"layer {name!r} received inputs of shapes {[tuple(r.shape) for r in seen['model']]} in the model "
                    f"being converted but {[tuple(r.shape) for r in pairs]} in the dense model on the same "
                    f"calibration batch; calibration needs a model whose calls do not depend on its outputs"
                )
            for rows, rows_ref in zip(seen["model"], pairs):
                if moments is None:
                    moments = _fit.InputMoments(rows.shape[1], rows.device)
                moments.add(rows, None if reference is None else rows_ref)
    finally:
        for h in handles:
            h.remove()
    return moments if moments is not None and moments.count else None


def _guard_fast_paths(model: nn.Module, changed: set) -> None:
    """torch's TransformerEncoder(Layer) fast paths read dense weights; disable them around the layers
    about to change (before calibration passes run the model with some of them converted)."""
    for m in model.modules():
        if not any(id(sub) in changed for sub in m.modules()):
            continue
        if isinstance(m, nn.TransformerEncoderLayer):
            decline_fused_paths(m)  # the layers about to be swapped in may not carry it yet
        elif isinstance(m, nn.TransformerEncoder):
            m.use_nested_tensor = False


def _replace(model: nn.Module, new: Dict[int, nn.Module]) -> nn.Module:
    """Put ``new[id(old)]`` wherever ``old`` is a child in ``model`` (shared layers everywhere); returns the
    model, or its replacement when the model itself is replaced."""
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):  # named_children() skips repeated children
            if child is not None and id(child) in new:
                setattr(parent, child_name, new[id(child)])
    return new.get(id(model), model)


def convert(
    model: nn.Module,
    *,
    num_terms: int = 1,
    low_rank: Optional[int] = None,
    sketch_dim: Optional[int] = None,
    param_budget: Optional[Union[float, int]] = None,
    modules: Sequence[type] = (nn.Linear, nn.Conv2d, nn.MultiheadAttention),
    target_modules: Optional[Union[str, Sequence[str]]] = None,
    exclude_modules: Optional[Union[str, Sequence[str]]] = None,
    min_params: int = 0,
    overrides: Optional[Mapping[str, Mapping[str, Any]]] = None,
    init: str = "optimal",
    calibration_data=None,
    seed: Optional[int] = None,
    inplace: bool = False,
) -> Tuple[nn.Module, ConversionReport]:
    r"""Replace the dense layers of a (trained) model by sketched ones; returns ``(model, report)``.

    Every :class:`torch.nn.Linear` becomes an :class:`SKLinear` (:meth:`SKLinear.from_linear`), every
    :class:`torch.nn.Conv2d` an :class:`SKConv2d` (:meth:`SKConv2d.from_conv2d`) and every
    :class:`torch.nn.MultiheadAttention` a :class:`RandMultiHeadAttention`
    (:meth:`RandMultiHeadAttention.from_multihead_attention`), by these rules, in this order:

    1. its type is one of ``modules``; layers inside a ``MultiheadAttention`` are never touched;
    2. its qualified name matches ``target_modules`` (when given) and not ``exclude_modules``, with peft's
       rule: a string is a regular expression the whole name must match, a list holds names or name
       suffixes (``["fc1", "fc2"]`` matches ``"block.0.fc1"``);
    3. it has at least ``min_params`` parameters;
    4. its settings: the first entry of ``overrides`` whose key is its name (or a regular expression
       matching it) over the keyword arguments (``num_terms``, ``low_rank`` for linear and conv layers;
       ``sketch_dim``, ``kernel`` for attention); with ``param_budget``, the rank of linear and conv
       layers without an override is chosen so that the model holds at most that many parameters;
    5. a linear or conv sketch must store fewer values than the dense weight,
       :math:`2Lk\,(\text{in} + \text{out}) < \text{in} \times \text{out}` (the fixed sketches count: they
       are buffers as large as the parameters); attention is converted for its linear cost in the sequence
       length and keeps its parameters (the projections are reused as they are).

    Layers that fail a rule are kept dense and listed in the report with the reason (a ``Conv2d`` with
    ``groups != 1`` or another ``padding_mode`` than zeros, a ``MultiheadAttention`` with ``add_bias_kv`` or
    ``add_zero_attn``, or without a ``sketch_dim``).

    **Budget.** ``param_budget`` is a fraction of the model's parameters (float in (0, 1]) or a count
    (int). Each linear or conv layer it governs gets the rank that gives its sketch the same fraction of its
    dense weight's parameters (at least 1), and that fraction is the largest for which the whole model
    holds at most ``param_budget`` parameters. It cannot be combined with ``low_rank``; ``num_terms``
    still applies. A budget below what rank 1 everywhere allows raises a :class:`ValueError`.

    **Initialisation.** ``init="optimal"`` (default) fits each sketched weight to the dense one by least
    squares for its drawn sketches; ``"unbiased"`` keeps the estimator whose expectation is the dense
    layer. With ``calibration_data``, the layers are converted in model order (the order they are
    registered in), each fitted so that, on the inputs its already converted predecessors give it, its
    outputs come closest to the dense layer's outputs on the dense model's inputs (least squares with a
    small ridge towards the weight fit, bias correcting the mean; moments in float64, ``fan_in²`` values
    for the layer at hand). This takes two passes over the data per layer (the model being converted and
    the dense one, eval mode, no gradients), so the batches are held in memory; layers the data do not
    reach keep the weight-only fit. Attention always reuses the trained projections; its error is that of
    the random features.

    Converted layers sit inside torch's :class:`torch.nn.TransformerEncoderLayer` as well: its fused
    inference path, which reads dense weights directly, is turned off there (by a no-op forward pre-hook,
    and ``use_nested_tensor = False`` on the encoder).

    Args:
        model (torch.nn.Module): the model to convert.
        num_terms (int): :math:`L` of linear and conv sketches. Default: 1.
        low_rank (int, optional): :math:`k` of linear and conv sketches. One of ``low_rank``,
            ``param_budget`` or an override must give every converted layer its rank.
        sketch_dim (int, optional): random features per head of converted attention. Default: ``None``
            (attention stays exact).
        param_budget (float or int, optional): the most parameters the converted model may hold.
        modules (sequence of types): layer types to convert, among ``nn.Linear``, ``nn.Conv2d``,
            ``nn.MultiheadAttention`` (subclasses included). Default: all three.
        target_modules (str or list of str, optional): only these layers (regular expression or names).
        exclude_modules (str or list of str, optional): never these layers.
        min_params (int): keep layers with fewer parameters dense. Default: 0.
        overrides (dict, optional): per-layer settings, ``{name or regex: {"low_rank": 32, ...}}``.
        init (str): ``"optimal"`` or ``"unbiased"``. Default: ``"optimal"``.
        calibration_data (optional): model inputs for calibration: a tensor (one batch), or an iterable
            of a few batches, each a tensor (``model(batch)``), a tuple or list (``model(*batch)``) or a dict
            (``model(**batch)``). For a loader of ``(x, y)`` pairs pass ``(x for x, _ in loader)``.
        seed (int, optional): seed from which each new layer's seed is drawn (reproducible conversion).
            Default: ``None``, drawn from the global RNG like a layer's own seed.
        inplace (bool): convert ``model`` itself instead of a deep copy. Default: ``False``.

    Returns:
        ``(converted_model, report)``: the model with the sketched layers (``model`` itself when
        ``inplace``, or the new layer when ``model`` is itself a converted layer), and a
        :class:`ConversionReport`.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> import panther as pr
        >>> model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))
        >>> sketched, report = pr.nn.convert(model, low_rank=16, seed=0)
        >>> [type(m).__name__ for m in sketched]
        ['SKLinear', 'ReLU', 'SKLinear', 'ReLU', 'Linear']
        >>> report.skipped[0].name, report.skipped[0].reason[:40]
        ('4', 'a sketch with num_terms=1, low_rank=16 w')
        >>> sketched, report = pr.nn.convert(model, param_budget=0.25, seed=0)
        >>> report.params_after <= 0.25 * report.params_before
        True
        >>> x = torch.randn(3, 256)
        >>> torch.allclose(pr.nn.to_dense(sketched)(x), sketched(x), atol=1e-5)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _fit.check_init(init, calibration_data)
    if isinstance(modules, type):
        modules = (modules,)
    modules = tuple(modules)
    for t in modules:
        if t not in _DENSE:
            raise ValueError(
                f"modules may hold nn.Linear, nn.Conv2d and nn.MultiheadAttention, got {t!r} in modules={modules!r}"
            )
    _check_names("target_modules", target_modules)
    _check_names("exclude_modules", exclude_modules)
    if isinstance(min_params, bool) or not isinstance(min_params, int) or min_params < 0:
        raise ValueError(f"min_params must be an int >= 0, got {min_params!r}")
    if param_budget is not None and low_rank is not None:
        raise ValueError(
            f"give low_rank or param_budget, not both (got low_rank={low_rank!r}, param_budget={param_budget!r}): "
            f"the budget chooses the ranks"
        )
    overrides = dict(overrides or {})
    for key, value in overrides.items():
        if not isinstance(key, str) or not isinstance(value, Mapping):
            raise TypeError(f"overrides must map layer names (str) to dicts of settings, got {key!r}: {value!r}")
        _check_names(f"overrides key {key!r}", key)
        known = {"num_terms", "low_rank", "sketch_dim", "kernel"}
        if set(value) - known:
            raise ValueError(
                f"overrides[{key!r}] has unknown settings {sorted(set(value) - known)}; known: {sorted(known)}"
            )
    seeds = None if seed is None else resolve_generator(seed, None)[0]

    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters()):
        raise ValueError(
            "model has uninitialised parameters (a lazy module such as nn.LazyLinear): run a forward pass with "
            "a batch of inputs before converting it"
        )
    original = model
    if not inplace:
        model = copy.deepcopy(model)
    params_before, bytes_before = _count(model)

    plans = _plan_layers(
        _candidates(model), modules, target_modules, exclude_modules, min_params, overrides, num_terms, low_rank,
        sketch_dim, param_budget,
    )
    # 4-5: ranks from the budget, then the savings rule
    if param_budget is not None:
        _solve_budget(plans, _resolve_budget(param_budget, params_before), params_before)
    for plan in plans:
        cfg = plan["config"]
        if plan["reason"] or plan["kind"] is nn.MultiheadAttention:
            continue
        if not _saves(plan["module"], cfg["num_terms"], cfg["low_rank"]):
            fan_in, fan_out = _sizes(plan["module"])
            plan["reason"] = (
                f"a sketch with num_terms={cfg['num_terms']}, low_rank={cfg['low_rank']} would store "
                f"{2 * cfg['num_terms'] * cfg['low_rank'] * (fan_in + fan_out):,} values, not fewer than the "
                f"dense weight's {fan_in * fan_out:,}"
            )

    chosen = [p for p in plans if not p["reason"]]
    batches, reference, modes = None, None, {}
    if calibration_data is not None:
        batches = list(_fit.batches("calibration_data", calibration_data))  # one pass per layer
        reference = copy.deepcopy(original) if inplace else original  # the dense model, unchanged
        modes = {m: m.training for m in [*model.modules(), *reference.modules()]}
        model.eval()
        reference.eval()

    _guard_fast_paths(model, {id(p["module"]) for p in chosen})
    try:
        model = _build_layers(model, chosen, init, seeds, batches, reference, modes)
    finally:
        for m, mode in modes.items():
            m.training = mode

    params_after, bytes_after = _count(model)
    layers = []
    for plan in plans:
        kind = plan["kind"].__name__
        converted = "new" in plan
        after = _count(plan["new"]) if converted else (plan["params"], plan["bytes"])
        layers.append(LayerConversion(
            name=plan["name"],
            kind=f"{kind} -> {type(plan['new']).__name__}" if converted else kind,
            converted=converted,
            reason=plan["reason"],
            config=plan["config"] if converted else {},
            params_before=plan["params"],
            params_after=after[0],
            bytes_before=plan["bytes"],
            bytes_after=after[1],
            init=plan.get("init", ""),
            weight_error=plan.get("weight_error"),
        ))
    return model, ConversionReport(layers, params_before, params_after, bytes_before, bytes_after)


def _fit_int(arg: str, value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{arg} for layer {name!r} must be an int >= 1, got {value!r}")


def _build_layers(model, chosen, init, seeds, batches, reference, modes) -> nn.Module:
    """Replace the chosen layers in model order, each calibrated (with ``batches``) on the inputs its
    converted predecessors give it; returns the model (the new layer when the model itself is replaced)."""
    changed = False
    for plan in chosen:
        module, cfg = plan["module"], plan["config"]
        layer_seed = None if seeds is None else int(torch.randint(0, 2**62, (), generator=seeds))
        if plan["kind"] is nn.MultiheadAttention:
            layer = RandMultiHeadAttention.from_multihead_attention(
                module, cfg["sketch_dim"], kernel=cfg["kernel"], seed=layer_seed
            )
        else:
            moments = None
            if batches is not None:
                moments = _layer_moments(plan["name"], model, module, reference if changed else None, batches)
            plan["init"] = init if moments is None else "calibrated"
            build = SKLinear.from_linear if plan["kind"] is nn.Linear else SKConv2d.from_conv2d
            layer = build(
                module, cfg["num_terms"], cfg["low_rank"], init=init if moments is None else "unbiased",
                seed=layer_seed,
            )
            if moments is not None:
                fit = _fit.init_linear if plan["kind"] is nn.Linear else _fit.init_conv
                fit(layer, module.weight, module.bias, moments)
            effective = layer.to_dense().weight.detach()
            plan["weight_error"] = _fit.relative_error(module.weight.detach().double(), effective.double())
        layer.train(modes.get(module, module.training))
        plan["new"] = layer
        model = _replace(model, {id(module): layer})
        changed = True
    return model


def _plan_layers(
    candidates, modules, target_modules, exclude_modules, min_params, overrides, num_terms, low_rank, sketch_dim,
    param_budget,
) -> List[Dict[str, Any]]:
    """Rules 1-4 of :func:`convert`: one plan per candidate, with its settings or the reason it stays dense."""
    plans: List[Dict[str, Any]] = []
    used_overrides = set()
    for name, module in candidates:
        kind = _dense_type(module)
        params, size = _count(module)
        plan = dict(name=name, module=module, kind=kind, reason="", config={}, budget=False,
                    params=params, bytes=size)
        plans.append(plan)
        key = next((k for k in overrides if k == name), None) or next(
            (k for k in overrides if re.fullmatch(k, name)), None
        )
        if key is not None:
            used_overrides.add(key)
            bad = set(overrides[key]) - set(_OVERRIDE_KEYS[kind])
            if bad:
                raise ValueError(
                    f"overrides[{key!r}] sets {sorted(bad)} for layer {name!r}, a {kind.__name__}, which takes "
                    f"{list(_OVERRIDE_KEYS[kind])}"
                )
        if not isinstance(module, modules):
            plan["reason"] = f"{kind.__name__} is not in modules"
        elif target_modules is not None and _matcher(name, target_modules) is None:
            plan["reason"] = "not in target_modules"
        elif exclude_modules is not None and _matcher(name, exclude_modules) is not None:
            plan["reason"] = "in exclude_modules"
        elif params < min_params:
            plan["reason"] = f"{params:,} parameters, fewer than min_params={min_params:,}"
        else:
            plan["reason"] = _unsupported(module)
        if plan["reason"]:
            continue
        own = dict(overrides[key]) if key is not None else {}
        if kind is nn.MultiheadAttention:
            plan["config"] = {"sketch_dim": own.get("sketch_dim", sketch_dim), "kernel": own.get("kernel", "softmax")}
            if plan["config"]["sketch_dim"] is None:
                plan["reason"] = "no sketch_dim given"
            continue
        L = own.get("num_terms", num_terms)
        _fit_int("num_terms", L, name)
        plan["config"] = {"num_terms": L, "low_rank": own.get("low_rank", low_rank)}
        if plan["config"]["low_rank"] is None:
            if param_budget is None:
                raise ValueError(
                    f"layer {name!r} has no low_rank: pass low_rank=, param_budget=, or overrides={{{name!r}: "
                    f"{{'low_rank': ...}}}}"
                )
            plan["budget"] = True
        else:
            _fit_int("low_rank", plan["config"]["low_rank"], name)
    unused = set(overrides) - used_overrides
    if unused:
        raise ValueError(f"overrides {sorted(unused)} match no Linear, Conv2d or MultiheadAttention layer of the model")
    for arg, spec in (("target_modules", target_modules), ("exclude_modules", exclude_modules)):
        if spec is not None and not isinstance(spec, str):
            missing = [e for e in spec if not any(_matcher(p["name"], [e]) for p in plans)]
            if missing:
                raise ValueError(f"{arg} entries {missing} match no Linear, Conv2d or MultiheadAttention layer")

    return plans


def _unsupported(module: nn.Module) -> str:
    """Why a layer cannot be sketched, or ``""``."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"groups={module.groups}: SKConv2d has no grouped convolution"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}: SKConv2d pads with zeros only"
    if isinstance(module, nn.MultiheadAttention):
        if module.bias_k is not None:
            return "add_bias_kv=True: not supported by RandMultiHeadAttention"
        if module.add_zero_attn:
            return "add_zero_attn=True: not supported by RandMultiHeadAttention"
    return ""


def _solve_budget(plans: List[Dict[str, Any]], budget: int, params_before: int) -> None:
    """Give each budget layer the rank for a common fraction f of its dense weight, the largest f that fits."""
    fixed = 0  # parameter change of layers with their own ranks (if they save, they are converted)
    for p in plans:
        if p["reason"] or p["budget"] or p["kind"] is nn.MultiheadAttention:
            continue
        L, k = p["config"]["num_terms"], p["config"]["low_rank"]
        if _saves(p["module"], L, k):
            fixed += _sketch_params(p["module"], L, k) - p["module"].weight.numel()
    governed = [p for p in plans if p["budget"] and not p["reason"]]

    def total(fraction: float) -> int:
        change = fixed
        for p in governed:
            L = p["config"]["num_terms"]
            k = _budget_rank(p["module"], L, fraction)
            if _saves(p["module"], L, k):
                change += _sketch_params(p["module"], L, k) - p["module"].weight.numel()
        return params_before + change

    smallest = total(0.0)
    if smallest > budget:
        raise ValueError(
            f"param_budget allows {budget:,} parameters, but the model holds at least {smallest:,} with rank 1 in "
            f"every layer it may sketch ({params_before:,} before); raise the budget or convert more layers"
        )
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) <= budget else (lo, mid)
    for p in governed:
        p["config"]["low_rank"] = _budget_rank(p["module"], p["config"]["num_terms"], lo)


def to_dense(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every :class:`SKLinear` and :class:`SKConv2d` of ``model`` by its dense equivalent.

    Each layer becomes the :class:`torch.nn.Linear` / :class:`torch.nn.Conv2d` of its :meth:`~SKLinear.to_dense`
    (effective weight formed in float64): the outputs are the same up to float rounding, for inference or
    export to tools that know only torch's layers. :class:`RandMultiHeadAttention` is kept: its random-feature
    attention has no dense equivalent (exact softmax attention computes something else).

    Args:
        model (torch.nn.Module): a model holding sketched layers (or a sketched layer).
        inplace (bool): change ``model`` itself instead of a deep copy. Default: ``False``.

    Returns:
        The model with dense layers (the dense layer itself when ``model`` is a sketched layer).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    new = {id(m): m.to_dense() for m in model.modules() if isinstance(m, (SKLinear, SKConv2d))}
    return _replace(model, new)
