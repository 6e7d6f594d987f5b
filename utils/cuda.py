"""Process-wide CUDA settings of a run: TF32 for fp32 matmuls and convolutions, cuDNN's autotuner.

On Ampere and later GPUs TF32 tensor cores run fp32 matrix products several times faster with a 10-bit mantissa
for the inputs (accumulation stays fp32); this is what ``--disable_amp`` (fp32) training and throughput runs then
use, unless ``ALLOW_TF32 False`` asks for full fp32. ``cudnn.benchmark`` times the convolution algorithms once
for the patch embedding's fixed input size and keeps the fastest. Mixed-precision (fp16/bf16) products are not
affected by either.
"""
from __future__ import annotations

import torch

__all__ = ['configure_cuda']


def configure_cuda(allow_tf32: bool = True) -> None:
    """TF32 (or full fp32, ``allow_tf32=False``) for fp32 matmuls and convolutions, and cuDNN's autotuner on.

    Set through ``torch.set_float32_matmul_precision`` and ``cudnn.allow_tf32``, which every torch release we
    support has, and after which every getter still answers: the old ones (``get_float32_matmul_precision``,
    which inductor's autotuning calls, ``cuda.matmul.allow_tf32``) and the newer ``fp32_precision`` flags.
    Setting the newer flags instead makes the old getters raise on recent torch releases.
    """
    torch.set_float32_matmul_precision('high' if allow_tf32 else 'highest')
    torch.backends.cudnn.allow_tf32 = allow_tf32
    torch.backends.cudnn.benchmark = True
