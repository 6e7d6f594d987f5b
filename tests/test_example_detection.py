"""The worked example: a Swin backbone inside torchvision's Faster R-CNN trains on generated boxes."""
from __future__ import annotations

import torch

from examples.faster_rcnn import build_detector, generated_boxes, train_steps
from models import create_model


def test_torchvision_faster_rcnn_steps_on_a_swin_backbone(tmp_path):
    torch.manual_seed(0)
    classifier = create_model('swin_tiny_patch4_window7_224', embed_dim=16, num_heads=(1, 2, 4, 8), num_classes=10)
    weights = tmp_path / 'cls.pth'
    torch.save({'model': classifier.state_dict()}, weights)
    model = build_detector(weights=str(weights), embed_dim=16, num_heads=(1, 2, 4, 8))
    body = model.backbone.body
    assert torch.equal(body.layers[2].blocks[0].attn.qkv.weight, classifier.layers[2].blocks[0].attn.qkv.weight)
    before = body.layers[3].blocks[0].mlp.fc1.weight.detach().clone()
    losses = train_steps(model, steps=3)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(before, body.layers[3].blocks[0].mlp.fc1.weight)  # the backbone learns
    assert torch.equal(body.patch_embed.proj.weight, classifier.patch_embed.proj.weight)  # frozen stem
    model.eval()
    with torch.no_grad():
        out = model(generated_boxes(1, height=75, width=110, seed=5)[0])
    assert out[0]['boxes'].shape[-1] == 4
