"""The sketched linear op: y = 1/(2L) Σ_i [(x S1_i) U1_i + (x U2_i) S2_i] + b (see forward.py, backward.py)."""

from panther_triton.ops.sketched_linear.backward import sketched_linear_backward
from panther_triton.ops.sketched_linear.forward import sketched_linear_forward
from panther_triton.ops.sketched_linear.op import SketchedLinearFunction, sketched_linear
from panther_triton.ops.sketched_linear.plan import BackwardPlan, ForwardPlan, use_plans

__all__ = [
    "sketched_linear", "sketched_linear_forward", "sketched_linear_backward",
    "SketchedLinearFunction", "ForwardPlan", "BackwardPlan", "use_plans",
]
