"""SimMIM: masked image modelling pre-training for the Swin family.

Xie et al., "SimMIM: A Simple Framework for Masked Image Modeling", CVPR 2022.
Patch tokens under the mask are replaced by a learned ``mask_token`` before the stages; a light
decoder (one 1x1 convolution + pixel shuffle) predicts the pixels from the last stage's features; the
loss is the L1 distance on masked pixels only. Parameter names follow the official release:
``encoder.*`` (the backbone, plus ``encoder.mask_token``) and ``decoder.0.*``, so ``--pretrained``
turns such a checkpoint into a classifier's weights by dropping the prefix.

The backbone is any classifier of the family (SwinTransformer, SwinTransformerV2, SwinMLP) built
with no head; only its public pieces are used (patch_embed, absolute_pos_embed, pos_drop, layers,
norm, num_features, num_layers).
"""
from __future__ import annotations

from typing import Set

import torch
import torch.nn.functional as F
from torch import nn

from .layers import trunc_normal_

__all__ = ['SimMIM', 'norm_targets', 'upsample_mask']


def norm_targets(images: torch.Tensor, patch_size: int = 47) -> torch.Tensor:
    """Normalise each pixel by the mean and (unbiased) std of its ``patch_size`` neighbourhood.

    Window statistics ignore the zero padding at the borders, so edge pixels use the pixels that exist.
    """
    if patch_size % 2 != 1:
        raise ValueError(f"MODEL.SIMMIM.NORM_TARGET.PATCH_SIZE must be odd, got {patch_size}")
    pool = dict(kernel_size=patch_size, stride=1, padding=patch_size // 2)
    mean = F.avg_pool2d(images, count_include_pad=False, **pool)
    mean_sq = F.avg_pool2d(images ** 2, count_include_pad=False, **pool)
    count = F.avg_pool2d(torch.ones_like(images[:, :1]), count_include_pad=True, **pool) * patch_size ** 2
    var = ((mean_sq - mean ** 2) * count / (count - 1).clamp(min=1)).clamp(min=0.0)
    return (images - mean) / (var + 1e-6).sqrt()


def upsample_mask(mask: torch.Tensor, scale: int) -> torch.Tensor:
    """``(B, h, w)`` patch mask -> ``(B, 1, h * scale, w * scale)`` pixel mask."""
    return mask.repeat_interleave(scale, 1).repeat_interleave(scale, 2).unsqueeze(1)


class SimMIM(nn.Module):
    """Masked image modelling around a headless backbone.

    Args:
        encoder: a Swin-family model built with ``num_classes=0``; it gains the ``mask_token`` parameter.
        norm_target_patch_size: odd window for normalised pixel targets, or 0 for raw pixels.

    ``forward(images, mask)`` returns the loss: the mean L1 error over masked pixels and channels.
    ``mask`` is ``(B, H / patch, W / patch)`` with 1 where a patch is hidden.
    """

    def __init__(self, encoder: nn.Module, norm_target_patch_size: int = 0):
        super().__init__()
        self.encoder = encoder
        self.patch_size = int(encoder.patch_embed.patch_size[0])
        # Total downsampling: the patch, then one patch merging between consecutive stages.
        self.encoder_stride = self.patch_size * 2 ** (encoder.num_layers - 1)
        self.in_chans = int(encoder.patch_embed.proj.in_channels)
        embed_dim = int(encoder.patch_embed.proj.out_channels)
        # Registered on the encoder so the checkpoint key is the official 'encoder.mask_token'.
        encoder.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        trunc_normal_(encoder.mask_token, std=.02)
        self.decoder = nn.Sequential(
            nn.Conv2d(encoder.num_features, self.encoder_stride ** 2 * self.in_chans, kernel_size=1),
            nn.PixelShuffle(self.encoder_stride))
        self.norm_target_patch_size = norm_target_patch_size

    def encode(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Features of the last stage as a map ``(B, num_features, H / stride, W / stride)``."""
        enc = self.encoder
        x = enc.patch_embed(images)
        b, length, _ = x.shape
        if mask.shape[0] != b or mask[0].numel() != length:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit {length} patches per image")
        w = mask.reshape(b, length, 1).to(x.dtype)
        x = x * (1.0 - w) + enc.mask_token.to(x.dtype) * w
        if enc.absolute_pos_embed is not None:
            x = x + enc.absolute_pos_embed
        x = enc.pos_drop(x)
        for layer in enc.layers:
            x = layer(x)
        x = enc.norm(x)
        h, w_ = images.shape[-2] // self.encoder_stride, images.shape[-1] // self.encoder_stride
        return x.transpose(1, 2).reshape(b, -1, h, w_)

    def reconstruct(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Predicted pixels ``(B, in_chans, H, W)``."""
        return self.decoder(self.encode(images, mask))

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pred = self.reconstruct(images, mask)
        pixel_mask = upsample_mask(mask, self.patch_size).to(pred.dtype)
        target = images
        if self.norm_target_patch_size:
            target = norm_targets(images, self.norm_target_patch_size)
        err = F.l1_loss(pred.float(), target.float(), reduction='none')
        return (err * pixel_mask).sum() / (pixel_mask.sum() + 1e-5) / self.in_chans

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        skip = set(self.encoder.no_weight_decay()) if hasattr(self.encoder, 'no_weight_decay') else set()
        return {f'encoder.{name}' for name in skip | {'mask_token'}}

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> Set[str]:
        if hasattr(self.encoder, 'no_weight_decay_keywords'):
            return set(self.encoder.no_weight_decay_keywords())
        return set()
