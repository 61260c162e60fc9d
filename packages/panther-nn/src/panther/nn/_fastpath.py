"""Keeping torch's fused Transformer inference paths away from sketched layers.

In eval, nn.TransformerEncoderLayer may run one fused kernel that reads its submodules' dense weights
(``self_attn.in_proj_weight``, ``linear1.weight``...) directly, bypassing their ``forward``: sketched
layers inside it would be skipped, or fail. The layer declines that path when any of its submodules has
a forward hook (``why_not_sparsity_fast_path = "forward pre-/hooks are attached to the module"``), a
condition that does not depend on the data: a sketched layer carries a no-op forward pre-hook.
"""

from __future__ import annotations

from torch import nn


def module_path_only(module, args):
    """Forward pre-hook that does nothing: its presence makes a TransformerEncoderLayer that contains
    ``module`` run its submodules' forwards instead of the fused kernel."""
    return None


def decline_fused_paths(module: nn.Module) -> None:
    """Make every nn.TransformerEncoderLayer that contains ``module`` run it through its forward."""
    if module_path_only not in module._forward_pre_hooks.values():
        module.register_forward_pre_hook(module_path_only)
