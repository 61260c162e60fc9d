"""The shared backend conformance suite of panther-core, run against the cuda backend on a GPU.

Hypothesis draws ragged shapes up to 256 features / channels (the rows' explicit examples always among
them); forward and every gradient against the float64 references, in float32, float16 and bfloat16.
float32 runs twice: under torch's default precision ``"highest"`` (the kernels' exact float32 path, on
the CUDA cores) and under ``"high"`` (their TF32 tensor-core path).
"""

import pytest
import torch

from panther.testing import make_conformance_suite

OPS = ("sketched_linear", "sketched_conv2d")

TestCudaConformance = pytest.mark.gpu(
    make_conformance_suite(
        "cuda", ops=OPS, dtypes=(torch.float32, torch.float16, torch.bfloat16), device="cuda",
        float32_precision="highest",
    )
)

TestCudaConformanceTF32 = pytest.mark.gpu(
    make_conformance_suite("cuda", ops=OPS, dtypes=(torch.float32,), device="cuda", float32_precision="high")
)
