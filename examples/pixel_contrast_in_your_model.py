"""Pixel contrast added to a model and training loop you already have.

The model here is torchvision's DeepLabV3-MobileNetV3 (random weights); the data is
contrastseg's embedded synthetic set, so the script runs anywhere without downloads::

    python examples/pixel_contrast_in_your_model.py --steps 20

Three things are added to an ordinary loop: a PixelContrast module (its parameters join the
optimiser), a forward hook that keeps the features the classifier reads, and one more term in
the loss. See docs/contrast.md.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import torchvision

from contrastseg import PixelContrast
from contrastseg.data import SegmentationDataset, SyntheticShapes, TrainTransform


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)

    source = SyntheticShapes("train", 64, (96, 96))
    data = SegmentationDataset(source, TrainTransform((96, 96)), seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch, shuffle=True)
    num_classes = len(source.classes)

    # 1. Your model, unchanged.
    model = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False
    )
    # 2. Keep the features the decode head reads (the backbone's last stage, 960 channels).
    features: dict[str, torch.Tensor] = {}
    model.backbone.register_forward_hook(lambda module, inputs, out: features.update(out))
    # 3. The contrast module: projection head, anchor sampler, class memory.
    contrast = PixelContrast(
        num_classes, in_channels=960, max_views=8, memory=True, memory_size=500, region_size=100
    )
    params = list(model.parameters()) + list(contrast.parameters())
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)

    model.train()
    contrast.train()
    step = 0
    while step < args.steps:
        for batch in loader:
            image, labels = batch["image"], batch["mask"]
            logits = model(image)["out"]  # (B, C, H, W), torchvision upsamples it
            ce = F.cross_entropy(logits, labels, ignore_index=255)
            # 4. One more term: features, logits (for the hard anchors), labels at any size.
            loss_c, info = contrast(
                features["out"], logits, labels, step=step, return_diagnostics=True
            )
            loss = ce + 0.1 * loss_c
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            print(
                f"step {step:3d}  ce {ce.item():.4f}  contrast {loss_c.item():.4f}  "
                f"anchors {info.anchors:4d}  memory {info.memory_filled}/{info.memory_capacity}"
            )
            step += 1
            if step == args.steps:
                break
    # At inference nothing changes: call the model alone.
    model.eval()
    with torch.no_grad():
        pred = model(image[:1])["out"].argmax(1)
    print(f"done: {step} steps; prediction of shape {tuple(pred.shape)}")


if __name__ == "__main__":
    main()
