"""CPU acceleration of the reference models, kept apart from them and swapped in by ``build_model`` on a CPU.

:func:`accelerate` turns the reference modules of a model into their CPU versions (:mod:`models.cpu.modules`) in
place: the same parameters, buffers and state-dict keys, the same function to float rounding. What serves where:

* on any CPU with oneDNN (PyTorch's x86 builds): linears that add their bias in oneDNN's epilogue, ``fc1`` + GELU
  as one primitive and low-precision weight copies cached in evaluation (:mod:`models.cpu.linear`);
* where the CPU has AVX-512 and a C++ compiler is installed: our kernels (:mod:`models.cpu.kernels`), built on
  first use: ``softmax(logits + bias)``, LayerNorm, GELU fused with ``fc2``'s backward, bf16 weight gradients.

``SWIN_CPU_KERNELS=0`` in the environment, or the config key ``CPU_KERNELS False``, leaves the reference model
as it is. Each swapped module runs the reference forward for tensors off the CPU and under torch.compile.

These modules use a few private PyTorch functions (dispatch-mode and functorch checks, the softmax backward), so
they switch themselves off, with one log line, on a torch release outside the ones they were tested on
(:data:`BUILT_FOR`) or one that lacks those functions: the reference model then runs, unchanged.
"""
from __future__ import annotations

import functools
import logging
import os
import re

import torch
from torch import nn

from .modules import SWAPS

__all__ = ['accelerate', 'enabled', 'BUILT_FOR']

# The torch releases (major, minor) these modules were tested on, first and last.
BUILT_FOR = ((2, 6), (2, 14))
_PRIVATE_APIS = ((torch._C, '_are_functorch_transforms_active'), (torch, '_softmax_backward_data'))
_logger = logging.getLogger(__name__)


def enabled() -> bool:
    """Whether the environment allows the swap (``SWIN_CPU_KERNELS`` is not '0'), PyTorch has oneDNN, and this
    torch is one the modules were built for (:func:`torch_supported`)."""
    return (os.environ.get('SWIN_CPU_KERNELS', '1') != '0' and torch.backends.mkldnn.is_available()
            and torch_supported(torch.__version__))


@functools.lru_cache(maxsize=None)
def torch_supported(version: str) -> bool:
    """Whether torch ``version`` lies in :data:`BUILT_FOR` and has the private functions the modules call; logs
    once why not."""
    found = re.match(r'(\d+)\.(\d+)', version)
    release = (int(found.group(1)), int(found.group(2))) if found else (0, 0)
    missing = [f'{owner.__name__}.{name}' for owner, name in _PRIVATE_APIS if not hasattr(owner, name)]
    if BUILT_FOR[0] <= release <= BUILT_FOR[1] and not missing:
        return True
    (first, last) = BUILT_FOR
    why = f"lacks {', '.join(missing)}" if missing else f"is {version}"
    _logger.warning(f"CPU modules off (the reference model runs): built for torch {first[0]}.{first[1]} to "
                    f"{last[0]}.{last[1]}, this torch {why}")
    return False


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
