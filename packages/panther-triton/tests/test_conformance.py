"""The shared backend conformance suite of panther-core, run against the triton backend.

Hypothesis draws ragged shapes (one row and 3-D inputs always among them) up to 256 features, L <= 4,
k <= 40 (so R up to 320: both the one-chunk and the chunked paths); forward and grads against float64.
Attention draws up to 64 positions under the interpreter (several causal chunks), fewer examples: the
interpreter runs its per-batch·head loops slowly.
"""

import torch

from panther.testing import make_conformance_suite
from triton_test_utils import DEVICE, needs_kernels

# bfloat16 on the GPU only: the interpreter's CPU time is better spent on more drawn shapes.
DTYPES = (torch.float32, torch.float16) if DEVICE == "cpu" else (torch.float32, torch.float16, torch.bfloat16)

TestTritonConformance = needs_kernels(
    make_conformance_suite("triton", ops=("sketched_linear",), dtypes=DTYPES, device=DEVICE, max_dim=256)
)

TestTritonAttentionConformance = needs_kernels(
    make_conformance_suite(
        "triton", ops=("rfa_attention",), dtypes=DTYPES, device=DEVICE,
        max_dim=64 if DEVICE == "cpu" else 256, max_examples=10 if DEVICE == "cpu" else None,
    )
)
