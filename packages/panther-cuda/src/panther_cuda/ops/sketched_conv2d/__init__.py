"""The sketched conv2d op of the cuda backend: implicit-GEMM kernels (``sketched_conv2d.cu``), their
launchers (``forward.py``, ``backward.py``), the limits they refuse beyond (``limits.py``) and the
differentiable op (``op.py``)."""
