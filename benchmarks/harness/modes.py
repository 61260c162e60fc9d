"""Dtype modes: the dtype of every tensor and whether float32 matrix products may use TF32."""

import torch

MODES = {
    "fp32": (torch.float32, False),  # IEEE float32: TF32 off for cuBLAS and cuDNN
    "tf32": (torch.float32, True),  # float32 tensors, TF32 tensor cores allowed
    "bf16": (torch.bfloat16, False),  # bfloat16 tensors; float32 work inside ops stays IEEE
}


def set_tf32(on: bool) -> None:
    """Through the legacy flags: they keep the new fp32_precision API consistent, not the other way round."""
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on
