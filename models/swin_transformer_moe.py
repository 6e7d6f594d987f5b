"""Swin-MoE: Swin Transformer whose listed blocks replace their MLP by a mixture of experts.

Hwang et al., "Tutel: Adaptive Mixture-of-Experts at Scale" (2022), the official ``swin_transformer_moe.py``.
Parameter names follow the official release (``layers.2.blocks.1.mlp._moe_layer.experts.batched_fc1_w``, ...).

A forward pass: :class:`~models.swin_base.SwinBase`'s stem, four stages of :class:`SwinTransformerBlockMoE`, its
classifier. Each block is V1's pre-norm block (shifted-window attention, then an MLP in a residual branch) with two
differences from V1: the attention bias is a continuous position bias (``cpb_mlp`` on log-spaced offsets, as
SwinV2's but without the 16 * sigmoid), and in the blocks listed in ``moe_blocks`` the MLP is :class:`MoEMlp`
(:mod:`models.moe`). Those blocks also return their auxiliary load-balancing loss; ``forward`` returns ``(logits,
aux_loss_weight * sum of the blocks' losses)``.
"""
from __future__ import annotations

from functools import partial
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import Mlp, PatchMerging, ShiftedWindowBlock, to_2tuple, window_attention
from .moe import ExpertParallel, MoELayer, init_moe_weights
from .registry import register_model
from .swin_base import SwinBase
from .swin_transformer_v2 import continuous_position_bias, relative_coords_table
from .windows import derived_on, map_size, merged_size, register_derived_buffer, relative_position_index

__all__ = ['WindowAttention', 'MoEMlp', 'SwinTransformerBlockMoE', 'MoEStage', 'SwinTransformerMoE']


class WindowAttention(nn.Module):
    """V1's scaled dot-product window attention with a continuous relative position bias from ``cpb_mlp`` (SwinV2's,
    without the ``16 * sigmoid``)."""

    def __init__(self, dim: int, window_size: Tuple[int, int], num_heads: int, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 pretrained_window_size: Tuple[int, int] = (0, 0)):
        super().__init__()
        self.dim, self.window_size, self.num_heads = dim, to_2tuple(window_size), num_heads
        self.pretrained_window_size = to_2tuple(pretrained_window_size)
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512, bias=True), nn.ReLU(inplace=True),
                                     nn.Linear(512, num_heads, bias=False))
        register_derived_buffer(self, 'relative_coords_table',
                                relative_coords_table(self.window_size, self.pretrained_window_size))
        register_derived_buffer(self, 'relative_position_index', relative_position_index(self.window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def attention_bias(self, mask: Optional[torch.Tensor] = None,
                       window_size: Optional[Union[int, Tuple[int, int]]] = None) -> torch.Tensor:
        """``(nW or 1, nH, N, N)``: ``cpb_mlp``'s bias (in fp32) for ``window_size`` windows (default: the built ones;
        another gets the coordinates a model built with it has) plus the shift ``mask``."""
        window_size = self.window_size if window_size is None else to_2tuple(window_size)
        coords, index = self.relative_coords_table, self.relative_position_index
        if window_size != self.window_size:
            coords = derived_on(relative_coords_table, (window_size, self.pretrained_window_size), coords.device)
            index = derived_on(relative_position_index, (window_size,), index.device)
        n = window_size[0] * window_size[1]
        bias = continuous_position_bias(self.cpb_mlp, coords, index, n, self.num_heads).unsqueeze(0)
        return bias if mask is None else bias + mask.unsqueeze(1)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                window_size: Optional[Union[int, Tuple[int, int]]] = None) -> torch.Tensor:
        """x: ``(B * nW, N, C)``, the tokens of each ``window_size`` window (default: the built one); mask:
        ``(nW, N, N)`` additive, or None."""
        bw, n, c = x.shape
        q, k, v = self.qkv(x).reshape(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        bias = self.attention_bias(mask, window_size)
        x = window_attention(q, k, v, bias, self.scale, self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(bw, n, c)))

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, window_size={self.window_size}, '
                f'pretrained_window_size={self.pretrained_window_size}, num_heads={self.num_heads}')


class MoEMlp(nn.Module):
    """The MLP of an MoE block: :class:`~models.moe.MoELayer` as ``_moe_layer`` (the official attribute name).
    Without an fc2 bias (``mlp_fc2_bias=False``) the experts' ``batched_fc2_bias`` stays a frozen zero, as in the
    official model."""

    def __init__(self, dim: int, hidden_dim: int, parallel: ExpertParallel, mlp_fc2_bias: bool = True, **moe):
        super().__init__()
        self._moe_layer = MoELayer(dim, hidden_dim, parallel, **moe)
        if not mlp_fc2_bias:
            self._moe_layer.experts.batched_fc2_bias.requires_grad = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._moe_layer(x)


class SwinTransformerBlockMoE(ShiftedWindowBlock):
    """Pre-norm block: (shifted) window attention, then a dense MLP or, with ``moe``, :class:`MoEMlp`.
    Returns ``(x, l_aux)``; ``l_aux`` is 0 for a dense block. The window rule is V2's (the position MLP takes any
    window)."""

    def __init__(self, dim: int, input_resolution: Tuple[int, int], num_heads: int, window_size: int = 7,
                 shift_size: int = 0, mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, norm_layer: type = nn.LayerNorm,
                 mlp_fc2_bias: bool = True, pretrained_window_size: int = 0, moe: Optional[dict] = None,
                 parallel: Optional[ExpertParallel] = None):
        super().__init__(dim, input_resolution, num_heads, window_size, shift_size, mlp_ratio, holds_window=False)
        self.is_moe = moe is not None
        self.capacity_factor, self.top_value = (moe['capacity_factor'], moe['k']) if moe else (1.0, 1)
        attn = WindowAttention(dim, to_2tuple(self.window_size), num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                               attn_drop=attn_drop, proj_drop=drop,
                               pretrained_window_size=to_2tuple(pretrained_window_size))
        hidden = int(dim * mlp_ratio)
        mlp = (MoEMlp(dim, hidden, parallel, mlp_fc2_bias=mlp_fc2_bias, **moe) if moe
               else Mlp(dim, hidden, drop=drop, fc2_bias=mlp_fc2_bias))
        self.add_branches('attn', attn, mlp, drop_path, norm_layer)

    def forward(self, x: torch.Tensor, size: Optional[Tuple[int, int]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Row-major tokens of a ``size`` map (default: the built size) -> (tokens, auxiliary loss)."""
        size = map_size(x, size, self.input_resolution)
        x = self.drop_path.residual(x, self.attend_in_windows(self.attn, self.norm1(x), size))
        if self.is_moe:
            y, l_aux = self.mlp(self.norm2(x))
        else:
            y, l_aux = self.mlp(self.norm2(x)), x.new_zeros((), dtype=torch.float32)
        return self.drop_path.residual(x, y), l_aux

    def mlp_flops(self) -> float:
        """Official count: an MoE MLP does the capacity's worth of expert work per token."""
        return super().mlp_flops() * (self.capacity_factor * self.top_value if self.is_moe else 1)


class MoEStage(nn.Module):
    """One stage (``blocks``, then the optional ``downsample``) of blocks that return ``(x, l_aux)``; returns the
    tokens and the sum of its blocks' auxiliary losses."""

    def __init__(self, blocks: Sequence[nn.Module], downsample: Optional[nn.Module], use_checkpoint: bool = False):
        super().__init__()
        self.blocks, self.downsample, self.use_checkpoint = nn.ModuleList(blocks), downsample, use_checkpoint

    def forward(self, x: torch.Tensor, size: Optional[Tuple[int, int]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        l_aux = x.new_zeros((), dtype=torch.float32)
        for blk in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                x, aux = checkpoint(blk, x, size, use_reentrant=False)  # the RNG state is replayed: same gate noise
            else:
                x, aux = blk(x, size)
            l_aux = l_aux + aux
        if self.downsample is not None:
            x = self.downsample(x, size)
        return x, l_aux

    def flops(self) -> int:
        return sum(b.flops() for b in self.blocks) + (self.downsample.flops() if self.downsample else 0)


class SwinTransformerMoE(SwinBase):
    """Swin-MoE classifier (:class:`~models.swin_base.SwinBase` of :class:`SwinTransformerBlockMoE` in
    :class:`MoEStage`; fixed size, no backbone outputs). Arguments keep the official names; ``moe_blocks`` lists, per
    stage, the indices of the blocks with an MoE MLP (``[-1]``: none). The experts are placed over the ranks of the
    default process group (one process: all local) per ``num_local_experts`` (:class:`~models.moe.ExpertParallel`);
    ``expert_world_size`` builds rank 0's share of a job of that size instead (to count or inspect it);
    ``frozen_stages`` is the base's (frozen experts stay out of DDP's ignore list: they have no gradient)."""

    weight_decay_exempt = frozenset({'cpb_mlp', 'relative_position_bias_table', 'fc1_bias', 'fc2_bias', 'temperature',
                                     'cosine_projector', 'sim_matrix'})

    def __init__(self, img_size: Union[int, Sequence[int]] = 224, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, qk_scale: Optional[float] = None, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1, ape: bool = False, patch_norm: bool = True,
                 mlp_fc2_bias: bool = True, init_std: float = 0.02, use_checkpoint: bool = False,
                 pretrained_window_sizes: Sequence[int] = (0, 0, 0, 0), moe_blocks=((-1,), (-1,), (-1,), (-1,)),
                 num_local_experts: int = 1, top_value: int = 1, capacity_factor: float = 1.25,
                 cosine_router: bool = False, normalize_gate: bool = False, use_bpr: bool = True,
                 is_gshard_loss: bool = False, gate_noise: float = 1.0, cosine_router_dim: int = 256,
                 cosine_router_init_t: float = 0.5, moe_drop: float = 0.0, aux_loss_weight: float = 0.01,
                 expert_world_size: Optional[int] = None, frozen_stages: int = -1):
        if not any(pretrained_window_sizes):  # the all-zero default fits any number of stages
            pretrained_window_sizes = [0] * len(depths)
        if len(moe_blocks) != len(depths):
            raise ValueError(f"moe_blocks {[list(b) for b in moe_blocks]} must have one entry per stage "
                             f"(depths {list(depths)})")
        parallel = ExpertParallel(num_local_experts, world_size=expert_world_size)
        moe = dict(k=top_value, capacity_factor=capacity_factor, gate_noise=gate_noise,
                   batch_prioritized_routing=use_bpr, normalize_gate=normalize_gate, is_gshard_loss=is_gshard_loss,
                   cosine_router=cosine_router, cosine_router_dim=cosine_router_dim,
                   cosine_router_init_t=cosine_router_init_t, moe_drop=moe_drop)
        block = partial(SwinTransformerBlockMoE, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop_rate,
                        mlp_fc2_bias=mlp_fc2_bias, parallel=parallel)
        super().__init__(
            block, PatchMerging, img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
            embed_dim=embed_dim, depths=depths, num_heads=num_heads, window_size=window_size, mlp_ratio=mlp_ratio,
            drop_rate=drop_rate, drop_path_rate=drop_path_rate, ape=ape, patch_norm=patch_norm,
            use_checkpoint=use_checkpoint, frozen_stages=frozen_stages, init_std=init_std, stage=MoEStage,
            stage_args={'pretrained_window_size': pretrained_window_sizes},
            block_args=lambda stage, index: {'moe': moe if index in moe_blocks[stage] else None})
        self.parallel = parallel
        self.aux_loss_weight = aux_loss_weight

    def _init_weights(self, m: nn.Module) -> None:
        init_moe_weights(m, self.init_std)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> (normalised last-stage tokens ``(B, L, C)``, summed auxiliary loss of the MoE blocks)."""
        x, size = self.embed(x)
        l_aux = x.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            x, aux = layer(x, size)
            l_aux = l_aux + aux
            if layer.downsample is not None:
                size = merged_size(size)
        return self.norm(x), l_aux

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Sequence[int]] = None):
        raise NotImplementedError("Swin-MoE has no backbone outputs: its stages return auxiliary losses too")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> (logits, ``aux_loss_weight`` * auxiliary loss): add the second to the classification loss."""
        x, l_aux = self.forward_features(x)
        return self.forward_head(x), l_aux * self.aux_loss_weight


def _swin_moe(name: str, **defaults):
    def fn(**kwargs) -> SwinTransformerMoE:
        return SwinTransformerMoE(**{**defaults, **kwargs})
    fn.__name__ = name
    fn.__doc__ = f"Swin-MoE {name} (official configuration at 192 px, 21841 classes; keyword arguments override it)."
    return register_model(fn)


_MOE = dict(img_size=192, window_size=12, depths=(2, 2, 18, 2), num_classes=21841, mlp_fc2_bias=False, init_std=0.005,
            moe_blocks=((-1,), (-1,), tuple(range(1, 18, 2)), (1,)), capacity_factor=1.25, moe_drop=0.1)
_swin_moe('swin_moe_small_patch4_window12_192_32expert_32gpu_22k', embed_dim=96, num_heads=(3, 6, 12, 24),
          drop_path_rate=0.2, **_MOE)
_swin_moe('swin_moe_base_patch4_window12_192_32expert_32gpu_22k', embed_dim=128, num_heads=(4, 8, 16, 32),
          drop_path_rate=0.3, **_MOE)
