"""The hierarchical Swin model, for every family: :class:`SwinBase` builds and runs it from a block and a merge.

A forward pass, top to bottom: the stem embeds patches (a strided convolution, ``patch_embed``), adds the optional
absolute position embedding and dropout; the stages (``layers``, :class:`~models.layers.BasicLayer`) each run their
blocks over the token map and end with patch merging, which halves the map and doubles the width (not after the last
stage); the classifier normalises the last stage's tokens (``norm``), averages them and applies the linear ``head``.

The families differ in their block and merge only: :class:`~models.swin_transformer.SwinTransformer` (V1),
:class:`~models.swin_transformer_v2.SwinTransformerV2`, :class:`~models.swin_mlp.SwinMLP` and
:class:`~models.swin_transformer_moe.SwinTransformerMoE` are short subclasses naming theirs.

As a backbone (for detection and segmentation engines, as timm's ``features_only`` models and the official detection
backbone have it):

* :meth:`~SwinBase.forward_intermediates`: the raw output of each requested stage, before its patch merging, as an
  NCHW map (strides 4, 8, 16, 32 for the standard 4 stages); with ``out_norm`` each passes a LayerNorm of its own
  first, named ``norm{i}`` as in the official detection backbone;
* ``features_only=True``: ``forward`` returns that list; the classifier (``norm``, ``head``) and the stages after
  the last requested one are left out, and ``feature_info`` lists channels and reductions;
* ``frozen_stages=k``: the patch embedding and the first ``k`` stages get no gradient and stay in eval mode
  (-1: nothing frozen; 0: the patch embedding only).

Classification checkpoints load into a backbone unchanged: the keys of the parts left out are ignored, and output
norms absent from the checkpoint keep their initial values (ones and zeros). Official checkpoints load as they are:
the derived buffers they carry (:data:`~models.windows.DERIVED_BUFFERS`) are dropped.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Dict, FrozenSet, List, Mapping, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .layers import BasicLayer, PatchEmbed, PatchMerging, drop_path_rates, init_weights, to_2tuple, trunc_normal_
from .windows import check_resolution, is_derived_buffer, merged_size, stage_resolutions

__all__ = ['SwinBase', 'FeatureInfo']


class FeatureInfo(list):
    """One dict per feature output, ``num_chs``, ``reduction`` and ``module``, with timm's accessors."""

    def channels(self) -> List[int]:
        return [f['num_chs'] for f in self]

    def reduction(self) -> List[int]:
        return [f['reduction'] for f in self]

    def module_name(self) -> List[str]:
        return [f['module'] for f in self]


class SwinBase(nn.Module):
    """Swin classifier and backbone: patch embedding, stages of ``block`` with ``merge`` at the end of all but the
    last, final norm, average pooling, linear ``head``.

    Args:
        block: builds one block, called with the keywords ``dim``, ``input_resolution``, ``num_heads``,
            ``window_size``, ``shift_size`` (half a window in every second block), ``mlp_ratio``, ``drop``,
            ``drop_path``, ``norm_layer``, plus the stage's ``stage_args`` and the block's ``block_args``.
        merge: builds the patch merging of a stage, ``merge(input_resolution, dim, norm_layer)``.
        stage: builds a stage, ``stage(blocks, downsample, use_checkpoint=...)``.
        stage_args: block arguments that differ between stages: name -> one value per stage (``num_heads`` is one).
        block_args: ``(stage, index) -> block arguments`` for the arguments that differ between blocks of a stage.
        init_std: std of the truncated-normal initialisation of the linear weights and the position embedding.

    The other arguments keep the official names. A fixed-size model must tile every stage with whole windows at
    ``img_size``; a ``dynamic_img_size`` one (default: on for ``features_only``) takes any size, padding as the official
    detection backbone does, and ``img_size`` only sizes the parameters: the position table's grid and, where a stage
    is smaller than the window there, V1's bias tables and Swin-MLP's spatial MLPs
    (:func:`~models.windows.held_window_rule`). ``features_only``, ``out_indices``, ``out_norm`` and
    ``frozen_stages``: see the module docstring.
    """

    # Name fragments of the parameters the optimizer exempts from weight decay (besides absolute_pos_embed).
    weight_decay_exempt: ClassVar[FrozenSet[str]] = frozenset({'relative_position_bias_table'})

    def __init__(self, block: Callable[..., nn.Module], merge: Callable[..., nn.Module] = PatchMerging, *,
                 img_size: Union[int, Sequence[int]] = 224, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7, mlp_ratio: float = 4.0,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.1, norm_layer: type = nn.LayerNorm,
                 ape: bool = False, patch_norm: bool = True, use_checkpoint: bool = False,
                 dynamic_img_size: Optional[bool] = None, features_only: bool = False,
                 out_indices: Optional[Sequence[int]] = None, out_norm: bool = False, frozen_stages: int = -1,
                 init_std: float = .02, stage: Callable[..., nn.Module] = BasicLayer,
                 stage_args: Optional[Mapping[str, Sequence]] = None,
                 block_args: Optional[Callable[[int, int], Mapping[str, Any]]] = None):
        super().__init__()
        stage_args = {'num_heads': num_heads, **(stage_args or {})}
        if any(len(values) != len(depths) for values in stage_args.values()):
            named = ', '.join(f'{name} {list(values)}' for name, values in stage_args.items())
            raise ValueError(f"{named} must have one entry per stage (depths {list(depths)})")
        self.num_classes = num_classes
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.ape = ape
        self.patch_norm = patch_norm
        self.num_features = int(embed_dim * 2 ** (self.num_layers - 1))
        self.mlp_ratio = mlp_ratio
        self.init_std = init_std
        self.dynamic_img_size = features_only if dynamic_img_size is None else dynamic_img_size

        # stem
        if not self.dynamic_img_size:
            check_resolution(to_2tuple(img_size), to_2tuple(patch_size), self.num_layers, window_size)
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim,
                                      norm_layer=norm_layer if patch_norm else None, dynamic=self.dynamic_img_size)
        self.patches_resolution = self.patch_embed.patches_resolution
        self.stage_resolutions = stage_resolutions(self.patches_resolution, self.num_layers)
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim))
            trunc_normal_(self.absolute_pos_embed, std=init_std)
        else:
            self.absolute_pos_embed = None
        self.pos_drop = nn.Dropout(p=drop_rate)

        # stages
        dpr = drop_path_rates(drop_path_rate, depths)
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            dim, res, first = int(embed_dim * 2 ** i), self.stage_resolutions[i], sum(depths[:i])
            of_stage = {name: values[i] for name, values in stage_args.items()}
            blocks = [block(dim=dim, input_resolution=res, window_size=window_size,
                            shift_size=0 if j % 2 == 0 else window_size // 2, mlp_ratio=mlp_ratio, drop=drop_rate,
                            drop_path=dpr[first + j], norm_layer=norm_layer, **of_stage,
                            **(block_args(i, j) if block_args else {}))
                      for j in range(depth)]
            downsample = merge(res, dim, norm_layer) if i < self.num_layers - 1 else None
            self.layers.append(stage(blocks, downsample, use_checkpoint=use_checkpoint))

        # classifier
        self.norm = norm_layer(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

        # backbone: outputs, their norms (initialised as LayerNorms are: not by _init_weights), frozen stages
        n = self.num_layers
        out_indices = range(n) if out_indices is None else out_indices
        indices = sorted({int(i) % n if -n <= int(i) < n else _bad_index(i, n) for i in out_indices})
        if features_only and not indices:
            raise ValueError("features_only needs at least one entry in out_indices")
        if not -1 <= frozen_stages <= n:
            raise ValueError(f"frozen_stages {frozen_stages} must be in [-1, {n}] (-1: nothing frozen)")
        self.features_only, self.out_indices, self.out_norm = features_only, tuple(indices), out_norm
        self.frozen_stages = frozen_stages
        self.feature_info = FeatureInfo(
            dict(num_chs=int(embed_dim * 2 ** i), reduction=self.patch_embed.patch_size[0] * 2 ** i,
                 module=f'layers.{i}') for i in range(n))
        if out_norm:
            for i in indices:
                self.add_module(f'norm{i}', norm_layer(self.feature_info[i]['num_chs']))
        self.left_out: Tuple[str, ...] = ()  # state-dict key prefixes of the parts a backbone leaves out
        if features_only:
            self._leave_out_classifier()
        self.register_load_state_dict_pre_hook(_prepare_state_dict)
        self._freeze_stages()

    def _init_weights(self, m: nn.Module) -> None:
        """Initialise module ``m`` (applied to every module, children before parents, once all are built)."""
        init_weights(m, self.init_std)

    # ------------------------------------------------------------------------------------- forward

    def embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Images ``(B, C, H, W)`` -> patch tokens ``(B, L, embed_dim)`` (plus the position embedding, then dropout)
        and their map size."""
        size = self.patch_embed.grid_size(x.shape[-2:])
        x = self.patch_embed(x)
        if self.absolute_pos_embed is not None:
            x = x + self.position_embedding(size)
        return self.pos_drop(x), size

    def position_embedding(self, size: Tuple[int, int]) -> torch.Tensor:
        """The absolute position embedding ``(1, L, C)`` for a ``size`` map: the table itself at the built size,
        else the table resized bicubically (official detection backbone)."""
        if tuple(size) == tuple(self.patches_resolution):
            return self.absolute_pos_embed
        h, w = self.patches_resolution
        grid = self.absolute_pos_embed.reshape(1, h, w, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=tuple(size), mode='bicubic', align_corners=False)
        return grid.flatten(2).transpose(1, 2).contiguous()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` -> normalised tokens of the last stage ``(B, L, num_features)``."""
        x, size = self.embed(x)
        for layer in self.layers:
            x = layer(x, size)
            if layer.downsample is not None:
                size = merged_size(size)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Average the tokens, then classify (or return the pooled features when ``pre_logits``)."""
        x = x.mean(dim=1)
        return x if pre_logits else self.head(x)

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
                y = getattr(self, f'norm{i}')(x) if self.out_norm and i in self.out_indices else x
                outputs.append(y.view(b, size[0], size[1], -1).permute(0, 3, 1, 2).contiguous())
            if i == last:
                break
            if layer.downsample is not None:
                x, size = layer.downsample(x, size), merged_size(size)
        return outputs

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        """Images -> logits, or with ``features_only`` the stage maps of :meth:`forward_intermediates`."""
        if self.features_only:
            return self.forward_intermediates(x)
        return self.forward_head(self.forward_features(x))

    # ------------------------------------------------------------------------------------- classifier

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head by a fresh one with ``num_classes`` outputs (0: no head)."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.head.apply(self._init_weights)

    def flops(self) -> int:
        """Multiply-adds by the official formula (attention or spatial MLPs, linears, norms, head)."""
        flops = self.patch_embed.flops() + sum(layer.flops() for layer in self.layers)
        flops += self.num_features * self.patches_resolution[0] * self.patches_resolution[1] // 2 ** self.num_layers
        return flops + self.num_features * self.num_classes

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {'absolute_pos_embed'}

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> Set[str]:
        return set(self.weight_decay_exempt)

    # ------------------------------------------------------------------------------------- backbone

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
        self.left_out = tuple(left_out)

    def _frozen_modules(self) -> List[nn.Module]:
        if self.frozen_stages < 0:
            return []
        modules = [self.patch_embed, self.pos_drop]
        for i in range(min(self.frozen_stages, len(self.layers))):
            modules.append(self.layers[i])
            if self.out_norm and i in self.out_indices:
                modules.append(getattr(self, f'norm{i}'))
        return modules

    def _freeze_stages(self) -> None:
        if self.frozen_stages >= 0 and self.absolute_pos_embed is not None:
            self.absolute_pos_embed.requires_grad = False
        for module in self._frozen_modules():
            module.eval()
            for p in module.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True) -> 'SwinBase':
        """As ``nn.Module.train``, but frozen stages stay in eval mode (their dropout and drop path off)."""
        super().train(mode)
        if mode:
            for module in self._frozen_modules():
                module.eval()
        return self


def _bad_index(i: int, n: int) -> int:
    raise ValueError(f"out_indices entry {i} is not a stage of a {n}-stage model (0..{n - 1}, or negative from "
                     "the end)")


def _prepare_state_dict(module: SwinBase, state_dict: Dict[str, torch.Tensor], prefix: str, *args) -> None:
    """Before a state dict loads into ``module``: drop the derived buffers (official checkpoints carry them) and the
    keys of the parts a backbone left out, and let output norms absent from the state dict (a classification
    checkpoint) keep their values, so a strict load passes."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        name = key[len(prefix):]
        if is_derived_buffer(name) or name.startswith(module.left_out):
            del state_dict[key]
    for i in module.out_indices if module.out_norm else ():
        norm_prefix = f'{prefix}norm{i}.'
        if not any(k.startswith(norm_prefix) for k in state_dict):
            for name, tensor in getattr(module, f'norm{i}').state_dict().items():
                state_dict[norm_prefix + name] = tensor
