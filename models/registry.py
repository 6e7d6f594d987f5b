"""A timm-style registry of named model variants.

Each architecture file decorates its variant functions with :func:`register_model`; a variant is a
function taking keyword overrides of the constructor's arguments and returning the model.
``create_model('swin_tiny_patch4_window7_224', num_classes=10)`` builds one by name.
"""
from __future__ import annotations

import fnmatch
from typing import Callable, Dict, List

from torch import nn

_MODELS: Dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its ``__name__``; returns ``fn`` unchanged (usable as a decorator)."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model variant {name!r} is registered twice")
    _MODELS[name] = fn
    return fn


def list_models(pattern: str = '*') -> List[str]:
    """Sorted names of the registered variants matching the shell-style ``pattern``."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def is_model(name: str) -> bool:
    """True when ``name`` is a registered variant."""
    return name in _MODELS


def create_model(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """Build the registered variant ``name``; ``kwargs`` override its constructor arguments.

    ``pretrained`` exists for timm-style calls: no weights are bundled, so only False is accepted
    (load released weights with ``--pretrained``). Raises KeyError naming an unknown variant.
    """
    if pretrained:
        raise ValueError("no pretrained weights are bundled; build with pretrained=False and load a checkpoint")
    if name not in _MODELS:
        close = [n for n in _MODELS if name.split('_')[0] in n][:5]
        hint = f" (similar: {', '.join(close)})" if close else ''
        raise KeyError(f"unknown model variant {name!r}{hint}; see models.list_models()")
    return _MODELS[name](**kwargs)
