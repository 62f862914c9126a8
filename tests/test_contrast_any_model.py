"""PixelContrast attached to models from other libraries, as docs/contrast.md shows: torchvision's
DeepLabV3-MobileNetV3 (features by a forward hook), segmentation_models_pytorch's Unet (a small
wrapper) and a bare timm backbone with the user's own classifier. For each: a few SGD steps
with CE + contrast; the contrast loss is finite and positive, its gradient reaches the user's
backbone, the memory fills, and a state_dict round trip reproduces the next loss exactly."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from contrastseg import PixelContrast

NUM_CLASSES = 4
ROOT = Path(__file__).parents[1]


def block_labels(seed: int, batch: int = 2, size: int = 128) -> torch.Tensor:
    """Labels made of 4x4 blocks of classes, so each class covers many pixels; some ignore."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, NUM_CLASSES, (batch, 1, 4, 4), generator=g).float()
    labels = F.interpolate(coarse, size=(size, size), mode="nearest")[:, 0].long()
    labels[:, :2] = 255
    return labels


class TorchvisionDeepLab(nn.Module):
    """torchvision's model, its backbone's output caught by a forward hook."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
            weights=None, weights_backbone=None, num_classes=NUM_CLASSES, aux_loss=False
        )
        self.features: dict[str, torch.Tensor] = {}
        self.net.backbone.register_forward_hook(lambda m, i, out: self.features.update(out))
        self.backbone = self.net.backbone
        self.feature_channels = 960

    def forward(self, x):
        return self.net(x)["out"], self.features["out"]


class SmpUnet(nn.Module):
    """segmentation_models_pytorch's Unet; features = the decoder's output."""

    def __init__(self) -> None:
        super().__init__()
        self.net = smp.Unet("resnet18", encoder_weights=None, classes=NUM_CLASSES)
        self.backbone = self.net.encoder
        self.feature_channels = 16

    def forward(self, x):
        decoded = self.net.decoder(self.net.encoder(x))
        return self.net.segmentation_head(decoded), decoded


class TimmWithClassifier(nn.Module):
    """A bare timm backbone (its last stage) and the user's own 1x1 classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = timm.create_model(
            "resnet18", pretrained=False, features_only=True, out_indices=(3,)
        )
        self.feature_channels = self.backbone.feature_info.channels()[-1]
        self.classifier = nn.Conv2d(self.feature_channels, NUM_CLASSES, 1)

    def forward(self, x):
        features = self.backbone(x)[-1]
        return self.classifier(features), features


def make_contrast(in_channels: int, seed: int) -> PixelContrast:
    return PixelContrast(
        NUM_CLASSES,
        in_channels,
        dim=32,
        max_views=4,
        memory=True,
        memory_size=200,
        region_size=20,
        warmup_iters=1,
        seed=seed,
    )


def train_steps(model, contrast, steps, start=0):
    params = list(model.parameters()) + list(contrast.parameters())
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    losses = []
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(step)
        image = torch.randn(2, 3, 128, 128, generator=g)
        labels = block_labels(step)
        logits, features = model(image)
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear")
        value = contrast(features, logits, labels, step=step)
        loss = F.cross_entropy(logits, labels, ignore_index=255) + 0.1 * value
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(value.item())
    return losses


def next_loss(model, contrast, step):
    torch.manual_seed(1234)  # dropout, if the model has any
    image = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(step))
    labels = block_labels(step)
    logits, features = model(image)
    return contrast(features, logits, labels, step=step)


@pytest.mark.parametrize("make", [TorchvisionDeepLab, SmpUnet, TimmWithClassifier])
def test_pixel_contrast_trains_any_model(make):
    torch.manual_seed(0)
    model = make().train()
    contrast = make_contrast(model.feature_channels, seed=0).train()

    losses = train_steps(model, contrast, steps=3)
    assert losses[0] == 0.0  # warm-up step
    assert all(torch.isfinite(torch.tensor(losses))) and all(v > 0 for v in losses[1:])
    assert len(contrast.memory) > 0  # pushed from step 1 on

    # The contrast term alone sends a gradient into the user's backbone.
    model.zero_grad()
    next_loss(model, contrast, step=3).backward()
    grads = [p.grad for p in model.backbone.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0

    # A state_dict round trip (model and contrast module) reproduces the next loss exactly.
    filled = len(contrast.memory)
    # seed 99: overwritten by the loaded generator state
    model_copy, contrast_copy = make(), make_contrast(model.feature_channels, seed=99)
    model_copy.load_state_dict(copy.deepcopy(model.state_dict()))
    contrast_copy.load_state_dict(copy.deepcopy(contrast.state_dict()))
    model_copy.train()
    contrast_copy.train()
    a = next_loss(model, contrast, step=4)
    b = next_loss(model_copy, contrast_copy, step=4)
    assert a.item() == b.item() and a.item() > 0
    assert len(contrast.memory) > filled
    assert torch.equal(contrast.memory.pixel_queue, contrast_copy.memory.pixel_queue)


def test_the_example_script_runs():
    script = ROOT / "examples" / "pixel_contrast_in_your_model.py"
    out = subprocess.run(
        [sys.executable, str(script), "--steps", "3", "--batch", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("step")]
    assert len(lines) == 3
    contrast = [float(line.split("contrast")[1].split()[0]) for line in lines]
    assert all(v > 0 for v in contrast)
    assert "done: 3 steps" in out.stdout
