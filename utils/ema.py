"""Exponential moving average of the model weights (TRAIN.EMA), on top of timm's ``ModelEmaV3``.

The average is a plain copy of the bare model, so its ``state_dict`` has the model's own keys and
can be evaluated or released as weights directly (``{'model': ema.state_dict()}``).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from timm.utils import ModelEmaV3

from utils.distributed import unwrap_model


class ModelEma:
    """EMA of ``model``'s parameters and floating buffers: ema = decay * ema + (1 - decay) * model.

    ``update(model, step)``: with a step number, the first update (step <= 1) copies the weights,
    as timm does; pass the DDP- or compile-wrapped model freely, it is unwrapped.
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.9998, device: Optional[torch.device] = None) -> None:
        # float32 EMA even for a low-precision model: (1 - decay) * delta vanishes in bf16/fp16. (timm takes
        # ``dtype`` from 1.0.15 on: it is passed only when needed, so older timm serves fp32 models.)
        bare = unwrap_model(model)
        needs_fp32 = any(p.dtype in (torch.float16, torch.bfloat16) for p in bare.parameters())
        self._ema = ModelEmaV3(bare, decay=decay, device=device, **({'dtype': torch.float32} if needs_fp32 else {}))
        self._ema.requires_grad_(False)

    @property
    def module(self) -> torch.nn.Module:
        """The averaged model, in eval mode: evaluate it like the model itself."""
        return self._ema.module

    @property
    def decay(self) -> float:
        return self._ema.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: Optional[int] = None) -> None:
        self._ema.update(unwrap_model(model), step=step)

    @torch.no_grad()
    def set(self, model: torch.nn.Module) -> None:
        """Copy the model's current weights into the average (e.g. after resuming without EMA state)."""
        self._ema.set(unwrap_model(model))

    def state_dict(self) -> dict[str, Any]:
        return self._ema.module.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True):
        return self._ema.module.load_state_dict(state_dict, strict=strict)

