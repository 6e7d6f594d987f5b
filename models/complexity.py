"""Model size and cost: parameter count and multiply-adds measured by PyTorch's FLOP counter."""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

__all__ = ['count_params', 'count_flops']


def count_params(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable, by default) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_flops(model: nn.Module, img_size: Union[int, Sequence[int]], in_chans: int = None) -> int:
    """Multiply-adds of one forward pass on one ``img_size`` image, as measured by FlopCounterMode.

    The pass runs on the meta device (weights replaced by shape-only stand-ins), so it is instant and
    leaves ``model`` untouched. Attention runs on the math SDPA backend: the counter sees no work in
    the fused kernels. The counter counts 2 FLOPs per multiply-add, hence the halving.
    """
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if in_chans is None:
        conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        in_chans = conv.in_channels if conv is not None else 3
    meta = {n: torch.empty_like(t, device='meta') for n, t in model.named_parameters()}
    meta.update({n: torch.empty_like(t, device='meta') for n, t in model.named_buffers()})
    x = torch.empty(1, in_chans, h, w, device='meta')
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            functional_call(model, meta, (x,))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
