"""Swin as a backbone: multi-scale feature maps, per-output norms, frozen stages (for detection and segmentation).

:class:`BackboneMixin` adds to the hierarchical models what detection and segmentation engines expect of a
backbone, as timm's ``features_only`` models and the official detection backbone have it:

* :meth:`~BackboneMixin.forward_intermediates`: the raw output of each requested stage, before its patch merging,
  as an NCHW map (strides 4, 8, 16, 32 for the standard 4 stages); with ``out_norm`` each passes a LayerNorm of its
  own first, named ``norm{i}`` as in the official detection backbone;
* ``features_only=True``: ``forward`` returns that list; the classifier (``norm``, ``head``) and the stages after
  the last requested one are left out, and ``feature_info`` lists channels and reductions;
* ``frozen_stages=k``: the patch embedding and the first ``k`` stages get no gradient and stay in eval mode
  (-1: nothing frozen; 0: the patch embedding only).

Classification checkpoints load into a backbone unchanged: the keys of the parts left out are ignored, and
output norms absent from the checkpoint keep their initial values (ones and zeros).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .layers import merged_size

__all__ = ['FeatureInfo', 'BackboneMixin']


class FeatureInfo(list):
    """One dict per feature output, ``num_chs``, ``reduction`` and ``module``, with timm's accessors."""

    def channels(self) -> List[int]:
        return [f['num_chs'] for f in self]

    def reduction(self) -> List[int]:
        return [f['reduction'] for f in self]

    def module_name(self) -> List[str]:
        return [f['module'] for f in self]


class BackboneMixin:
    """Feature outputs, frozen stages and a features-only mode for a model with ``patch_embed``, ``layers``, ``embed``
    (see :class:`~models.layers.HierarchicalClassifierMixin`), ``norm`` and ``head``. Call :meth:`init_backbone` at
    the end of the constructor, once the weights are initialised."""

    def init_backbone(self, features_only: bool, out_indices: Optional[Sequence[int]], out_norm: bool,
                      frozen_stages: int, norm_layer: type) -> None:
        """``out_indices``: the stages whose outputs :meth:`forward_intermediates` gives (default: all)."""
        n = self.num_layers
        out_indices = range(n) if out_indices is None else out_indices
        indices = sorted({int(i) % n if -n <= int(i) < n else _bad_index(i, n) for i in out_indices})
        if features_only and not indices:
            raise ValueError("features_only needs at least one entry in out_indices")
        if not -1 <= frozen_stages <= n:
            raise ValueError(f"frozen_stages {frozen_stages} must be in [-1, {n}] (-1: nothing frozen)")
        self.features_only, self.out_indices, self.out_norm = features_only, tuple(indices), out_norm
        self.frozen_stages = frozen_stages
        reduction = self.patch_embed.patch_size[0]
        self.feature_info = FeatureInfo(
            dict(num_chs=int(self.embed_dim * 2 ** i), reduction=reduction * 2 ** i, module=f'layers.{i}')
            for i in range(n))
        if out_norm:
            for i in indices:
                self.add_module(f'norm{i}', norm_layer(self.feature_info[i]['num_chs']))
        self._left_out: tuple = ()
        if features_only:
            self._leave_out_classifier()
        self.register_load_state_dict_pre_hook(_BackboneLoadHook())
        self._freeze_stages()

    def _leave_out_classifier(self) -> None:
        """Features only: no ``norm``/``head``, no stage after the last output, no patch merging after it."""
        last = self.out_indices[-1]
        left_out = ['norm.', 'head.'] + [f'layers.{i}.' for i in range(last + 1, self.num_layers)]
        if self.layers[last].downsample is not None:
            left_out.append(f'layers.{last}.downsample.')
            self.layers[last].downsample = None
        self.layers = self.layers[:last + 1]
        self.norm, self.head = None, None
        self.feature_info = FeatureInfo(self.feature_info[i] for i in self.out_indices)
        self._left_out = tuple(left_out)

    def _frozen_modules(self) -> List[nn.Module]:
        if self.frozen_stages < 0:
            return []
        modules = [self.patch_embed, self.pos_drop]
        for i in range(min(self.frozen_stages, len(self.layers))):
            modules.append(self.layers[i])
            if hasattr(self, f'norm{i}'):
                modules.append(getattr(self, f'norm{i}'))
        return modules

    def _freeze_stages(self) -> None:
        if self.frozen_stages >= 0 and self.absolute_pos_embed is not None:
            self.absolute_pos_embed.requires_grad = False
        for module in self._frozen_modules():
            module.eval()
            for p in module.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True):
        """As ``nn.Module.train``, but frozen stages stay in eval mode (their dropout and drop path off)."""
        super().train(mode)
        if mode:
            for module in self._frozen_modules():
                module.eval()
        return self

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Sequence[int]] = None) -> List[torch.Tensor]:
        """Images ``(B, C, H, W)`` of any size the model takes -> one ``(B, C_i, H_i, W_i)`` map per requested stage
        (default: ``out_indices``), the stage's output before its patch merging (through ``norm{i}`` when built
        with ``out_norm``)."""
        wanted = set(self.out_indices if indices is None else (i % self.num_layers for i in indices))
        if not wanted:
            return []
        last, b = max(wanted), x.shape[0]
        x, size = self.embed(x)
        outputs = []
        for i, layer in enumerate(self.layers):
            x = layer.forward_blocks(x, size)
            if i in wanted:
                y = getattr(self, f'norm{i}')(x) if hasattr(self, f'norm{i}') else x
                outputs.append(y.view(b, size[0], size[1], -1).permute(0, 3, 1, 2).contiguous())
            if i == last:
                break
            if layer.downsample is not None:
                x, size = layer.downsample(x, size), merged_size(size)
        return outputs

    def forward(self, x: torch.Tensor):
        if self.features_only:
            return self.forward_intermediates(x)
        return super().forward(x)


def _bad_index(i: int, n: int) -> int:
    raise ValueError(f"out_indices entry {i} is not a stage of a {n}-stage model (0..{n - 1}, or negative from the end)")


class _BackboneLoadHook:
    """Before a state dict loads into a backbone: drop the keys of the parts it left out, and let output norms
    absent from the state dict (a classification checkpoint) keep their values, so a strict load passes."""

    def __call__(self, module: nn.Module, state_dict: Dict[str, torch.Tensor], prefix: str, *args) -> None:
        for key in [k for k in state_dict if k.startswith(prefix)]:
            if key[len(prefix):].startswith(module._left_out):
                del state_dict[key]
        for i in module.out_indices if module.out_norm else ():
            norm_prefix = f'{prefix}norm{i}.'
            if not any(k.startswith(norm_prefix) for k in state_dict):
                for name, tensor in getattr(module, f'norm{i}').state_dict().items():
                    state_dict[norm_prefix + name] = tensor
