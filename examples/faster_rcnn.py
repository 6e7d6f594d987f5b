"""Swin as the backbone of torchvision's Faster R-CNN: a worked example that trains a few steps on the CPU.

    python -m examples.faster_rcnn --steps 5

The backbone is a ``features_only`` Swin (any input size, output norms ``norm{i}``, frozen stem) under
torchvision's ``FeaturePyramidNetwork``; the detector is torchvision's own ``FasterRCNN``. The data are generated:
noise images, each with one bright rectangle as its box. With ``--weights`` a classification checkpoint (ours or
the official) initialises the backbone.
"""
from __future__ import annotations

import argparse
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from models import create_model


class SwinFPN(nn.Module):
    """A features-only Swin and an FPN over its four maps; ``out_channels`` is what torchvision's detectors read."""

    def __init__(self, body: nn.Module, out_channels: int = 64):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.feature_info.channels(), out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(self.body(x))))


def build_detector(name: str = 'swin_tiny_patch4_window7_224', num_classes: int = 2, weights: Optional[str] = None,
                   min_size: int = 96, max_size: int = 160, **swin_kwargs) -> FasterRCNN:
    """Faster R-CNN on a Swin backbone; ``swin_kwargs`` override the variant's arguments (e.g. a tiny width)."""
    body = create_model(name, features_only=True, out_norm=True, frozen_stages=0, **swin_kwargs)
    if weights:
        state = torch.load(weights, map_location='cpu', weights_only=True)
        body.load_state_dict(state.get('model', state))  # classifier keys ignored, new output norms kept
    return FasterRCNN(SwinFPN(body), num_classes=num_classes, min_size=min_size, max_size=max_size)


def generated_boxes(count: int, height: int = 96, width: int = 128, seed: int = 0
                    ) -> Tuple[List[torch.Tensor], List[Dict[str, torch.Tensor]]]:
    """``count`` noise images in [0, 1], each with one bright rectangle and its box (label 1)."""
    gen = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(count):
        img = torch.rand(3, height, width, generator=gen) * 0.3
        h, w = (int(torch.randint(lo, hi, (1,), generator=gen)) for lo, hi in ((16, height // 2), (16, width // 2)))
        top, left = int(torch.randint(0, height - h, (1,), generator=gen)), int(torch.randint(0, width - w, (1,),
                                                                                            generator=gen))
        img[:, top:top + h, left:left + w] = 1.0
        images.append(img)
        targets.append({'boxes': torch.tensor([[left, top, left + w, top + h]], dtype=torch.float32),
                        'labels': torch.tensor([1])})
    return images, targets


def train_steps(model: FasterRCNN, steps: int, batch: int = 2, lr: float = 1e-4) -> List[float]:
    """``steps`` AdamW steps on generated boxes; the summed detection losses of each step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    model.train()
    losses = []
    for step in range(steps):
        images, targets = generated_boxes(batch, seed=step)
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser('Swin + torchvision Faster R-CNN on generated boxes')
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--weights', help='classification checkpoint for the backbone (ours or the official)')
    parser.add_argument('--embed-dim', type=int, default=32, help='backbone width (96 for the real Swin-T)')
    args = parser.parse_args(argv)
    heads = tuple(max(1, args.embed_dim // 32) * 2 ** i for i in range(4))
    model = build_detector(weights=args.weights, embed_dim=args.embed_dim, num_heads=heads)
    for step, loss in enumerate(train_steps(model, args.steps)):
        print(f"step {step}: loss {loss:.4f}")
    model.eval()
    with torch.no_grad():
        detections = model(generated_boxes(1, seed=99)[0])
    print(f"detections on a new image: {len(detections[0]['boxes'])} boxes")


if __name__ == '__main__':
    main()
