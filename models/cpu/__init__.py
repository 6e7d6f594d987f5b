"""CPU acceleration of the reference models, kept apart from them and swapped in by ``build_model`` on a CPU.

:func:`accelerate` turns the reference modules of a model into their CPU versions (:mod:`models.cpu.modules`) in
place: the same parameters, buffers and state-dict keys, the same function to float rounding. What serves where:

* on any CPU with oneDNN (PyTorch's x86 builds): linears that add their bias in oneDNN's epilogue, ``fc1`` + GELU
  as one primitive and low-precision weight copies cached in evaluation (:mod:`models.cpu.linear`);
* where the CPU has AVX-512 and a C++ compiler is installed: our kernels (:mod:`models.cpu.kernels`), built on
  first use: ``softmax(logits + bias)``, LayerNorm, GELU fused with ``fc2``'s backward, bf16 weight gradients.

``SWIN_CPU_KERNELS=0`` in the environment, or the config key ``CPU_KERNELS False``, leaves the reference model
as it is. Each swapped module runs the reference forward for tensors off the CPU and under torch.compile.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from .modules import SWAPS

__all__ = ['accelerate', 'enabled']


def enabled() -> bool:
    """Whether the environment allows the swap (``SWIN_CPU_KERNELS`` is not '0') and PyTorch has oneDNN."""
    return os.environ.get('SWIN_CPU_KERNELS', '1') != '0' and torch.backends.mkldnn.is_available()


def accelerate(model: nn.Module) -> nn.Module:
    """Swap the CPU versions in for the reference modules of ``model`` (in place; returns it). A no-op where
    :func:`enabled` is False. Parameters keep their identity, so an optimizer built before still holds them."""
    if not enabled():
        return model
    for module in model.modules():
        cpu_class = SWAPS.get(type(module))
        if cpu_class is not None:
            module.__class__ = cpu_class  # same attributes, parameters and keys; only the methods change
            module.adopt()
    return model
