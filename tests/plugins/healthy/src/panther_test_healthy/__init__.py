"""Test-only backends: ``healthy`` (low priority, counts its calls) and ``picky`` (top priority, only I == 7)."""

from panther.backends import Backend, tensor_reasons
from panther.backends.torch_backend import sketched_linear as _reference


class HealthyBackend(Backend):
    name = "healthy"
    priority = -5
    version = "0.0.1"
    calls = 0

    def reasons_cannot_run(self, op, *args, **kwargs):
        return super().reasons_cannot_run(op) + tensor_reasons(*args)

    def sketched_linear(self, *args):
        type(self).calls += 1
        return _reference(*args)


class PickyBackend(Backend):
    name = "picky"
    priority = 100
    version = "0.0.1"
    calls = 0

    def reasons_cannot_run(self, op, *args, **kwargs):
        reasons = super().reasons_cannot_run(op)
        if not reasons and args[0].shape[-1] != 7:
            reasons.append(f"picky only takes in_features == 7, got {args[0].shape[-1]}")
        return reasons

    def sketched_linear(self, *args):
        type(self).calls += 1
        return _reference(*args)
