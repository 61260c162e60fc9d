"""The sketched linear op: y = 1/(2L) Σ_i [(x S1_i) U1_i + (x U2_i) S2_i] + b (see forward.cu, backward.cu).

tile.cuh: the block tiles every kernel shares; forward.cu / backward.cu: the kernels; forward.py /
backward.py: their launchers; op.py: the differentiable op; limits.py: what the kernels refuse.
"""

from panther_cuda.ops.sketched_linear.backward import sketched_linear_backward
from panther_cuda.ops.sketched_linear.forward import ForwardPlan, sketched_linear_forward
from panther_cuda.ops.sketched_linear.op import SketchedLinearFunction, sketched_linear

__all__ = [
    "sketched_linear", "sketched_linear_forward", "sketched_linear_backward", "SketchedLinearFunction", "ForwardPlan",
]
