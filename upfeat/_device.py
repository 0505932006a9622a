"""What the hardware does fast (shared by training and the implicit fit)."""
from __future__ import annotations

import torch


def bf16_fast(device: torch.device) -> bool:
    """Whether bfloat16 matrix products are faster than float32 on ``device`` (CPU: oneDNN with
    native bfloat16, e.g. AVX512-BF16 or AMX; elsewhere emulated bfloat16 is slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()
