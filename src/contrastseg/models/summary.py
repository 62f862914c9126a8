"""The model zoo at a glance: every architecture, its parameters and FLOPs.

Models are built on PyTorch's ``meta`` device: no memory is allocated and nothing is computed,
so counting a ResNet-101 at 1024x2048 takes a fraction of a second. FLOPs come from
``torch.utils.flop_counter.FlopCounterMode``, which counts convolutions and matrix products
(one multiply-add = 2 FLOPs); normalisation, activations, pooling, softmax and interpolation are
not counted. ``GMACs`` below = FLOPs / 2 / 1e9 (the "FLOPs" of most segmentation papers).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from contrastseg.config import ModelConfig
from contrastseg.contrast import ProjectionHead
from contrastseg.model_table import (
    BACKBONES,
    HEADS,
    OTHER_SEGMENTERS,
    PROTOTYPE_SEGMENTERS,
    TABLE1,
)
from contrastseg.models.segmentor import InferenceModel, build_model, count_parameters

HEAD_DESCRIPTIONS = {
    "deeplabv3": "DeepLabV3: ASPP (rates 12/24/36) on the last stage + FCN auxiliary head",
    "hrnetv2": "HRNetV2: branches concatenated at stride 4, conv-BN-ReLU, classifier",
    "ocr": "OCR: soft object regions (aux), region representations, pixel-region attention",
    "pspnet": "PSPNet: pyramid pooling (bins 1/2/3/6) on the last stage + FCN auxiliary head",
    "deeplabv3plus": "DeepLabV3+: separable ASPP at stride 16, decoder with the stride-4 stage",
    "upernet": "UPerNet: pyramid pooling on the last stage, FPN over all stages at stride 4",
}


def architectures() -> list[tuple[str, str]]:
    """Every valid (backbone, head) pair of the project's backbones, in a stable order, then
    the timm pairs of the Cityscapes configs (UPerNet on timm:convnext_tiny). deeplabv3, pspnet
    and deeplabv3plus need a dilated backbone, hrnetv2 an HRNet; ocr and upernet take any."""
    pairs = []
    for head in HEADS:
        for name, spec in BACKBONES.items():
            if spec.hrnet and head in ("deeplabv3", "pspnet", "deeplabv3plus"):
                continue
            if head == "hrnetv2" and not spec.hrnet:
                continue
            pairs.append((name, head))
    pairs += [pair for pair in OTHER_SEGMENTERS.values() if pair not in pairs]
    return pairs


class _TrainingGraph(torch.nn.Module):
    """The training forward: the segmentor in training mode and the projection head of pixel
    contrast on its features."""

    def __init__(self, model: torch.nn.Module, projection: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.projection = model, projection

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model(x)
        return {**out, "embed": self.projection(out["features"])}


def _meta_model(cfg: ModelConfig, num_classes: int):
    # sizes do not depend on weights: never read or download any
    with torch.device("meta"):
        model = build_model(cfg, num_classes, backbone_weights=False)
        projection = ProjectionHead(
            model.feature_channels, cfg.projection_dim, cfg.projection_hidden
        )
        return model, _TrainingGraph(model, projection)


def _flops(module: torch.nn.Module, size: tuple[int, int], batch: int) -> int:
    counter = FlopCounterMode(display=False)
    with torch.device("meta"):
        x = torch.empty(batch, 3, *size)
    with counter, torch.no_grad():
        module(x)
    return counter.get_total_flops()


def summarize(
    cfg: ModelConfig,
    num_classes: int = 19,
    size: tuple[int, int] = (1024, 2048),
    batch: int = 1,
    flops: bool = True,
) -> dict[str, Any]:
    """Parameters and forward FLOPs of the inference model (backbone + decode head; for OCR the
    soft-object-region head is part of it) and of the training model (+ auxiliary FCN head,
    + projection head), at an input of ``batch x 3 x size``."""
    model, training = _meta_model(cfg, num_classes)
    inference = InferenceModel(model).eval()
    row: dict[str, Any] = {
        "backbone": cfg.backbone.name,
        "head": cfg.head,
        "classes": num_classes,
        "stride": model.output_stride,
        "size": tuple(size),
        "params_inference": count_parameters(inference),
        "params_training": count_parameters(training),
    }
    if flops:
        row["flops_inference"] = _flops(inference, size, batch)
        # The training graph (aux and projection heads run); batch norm stays in eval mode so
        # that a batch of 1 is allowed (ASPP's pooled 1x1 map): FLOPs are the same either way.
        training.train()
        for m in training.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
        row["flops_training"] = _flops(training, size, batch)
    return row


def format_summary(row: dict[str, Any]) -> str:
    h, w = row["size"]
    lines = [
        f"model {row['head']} + {row['backbone']}  ({row['classes']} classes, seg at stride "
        f"{row['stride']})",
        f"  parameters  inference {row['params_inference'] / 1e6:8.2f} M   "
        f"training {row['params_training'] / 1e6:8.2f} M (+ auxiliary and projection heads)",
    ]
    if "flops_inference" in row:
        lines.append(
            f"  FLOPs at {h}x{w}  inference {row['flops_inference'] / 1e9:9.1f} G "
            f"({row['flops_inference'] / 2e9:.1f} GMACs)   training forward "
            f"{row['flops_training'] / 1e9:9.1f} G ({row['flops_training'] / 2e9:.1f} GMACs)"
        )
        lines.append(
            "  (torch.utils.flop_counter: convolutions and matrix products, 1 multiply-add = "
            "2 FLOPs)"
        )
    return "\n".join(lines)


def list_models(num_classes: int = 19) -> list[dict[str, Any]]:
    """One row per architecture: names, stride, inference parameters, description."""
    table1 = {v: k for k, v in {**TABLE1, **OTHER_SEGMENTERS}.items()}
    rows = []
    for backbone, head in architectures():
        cfg = ModelConfig.model_validate({"backbone": {"name": backbone}, "head": head})
        row = summarize(cfg, num_classes, flops=False)
        row["table1"] = table1.get((backbone, head), "")
        about = BACKBONES[backbone].description if backbone in BACKBONES else backbone
        if cfg.backbone.output_stride == 32 and about.endswith(", dilated"):
            about = about.removesuffix(", dilated")  # output stride 32: not dilated (upernet)
        row["description"] = f"{HEAD_DESCRIPTIONS[head].split(':')[0]} on {about}"
        rows.append(row)
    # the prototype-classifier variants the recipes train (one row per architecture)
    recipes: dict[tuple[str, str], list[str]] = {}
    for recipe, pair in PROTOTYPE_SEGMENTERS.items():
        recipes.setdefault(pair, []).append(recipe)
    for (backbone, head), names in recipes.items():
        cfg = ModelConfig.model_validate(
            {"backbone": {"name": backbone}, "head": head, "classifier": "prototype"}
        )
        row = summarize(cfg, num_classes, flops=False)
        row["table1"] = names[0].rpartition("/")[2]
        about = BACKBONES[backbone].display if backbone in BACKBONES else backbone
        row["description"] = (
            f"{HEAD_DESCRIPTIONS[head].split(':')[0]} + prototype classifier on {about} "
            f"(configs/{{{','.join(names)}}}.yaml)"
        )
        rows.append(row)
    return rows


def format_models(rows: list[dict[str, Any]]) -> str:
    header = (
        f"{'model.head':<13} {'model.backbone.name':<19} {'stride':>6} {'params':>8}  "
        f"{'Cityscapes config':<24} description"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['head']:<13} {r['backbone']:<19} {r['stride']:>6} "
            f"{r['params_inference'] / 1e6:>7.1f}M  {r['table1'] or '-':<24} {r['description']}"
        )
    lines.append(
        f"params: inference model, {rows[0]['classes'] if rows else 19} classes. Training adds the "
        "auxiliary and projection heads; see `contrastseg summary CONFIG`."
    )
    lines.append(
        "model.classifier: prototype puts ProtoSeg's prototype classifier in place of any "
        "head's 1x1 classifier (model.prototype, loss.prototype; docs/prototypes.md)."
    )
    lines.append(
        "Any timm model with features_only: model.backbone.name: timm:<model> (e.g. "
        "timm:convnext_tiny, timm:resnet50d, timm:efficientnet_b3) with deeplabv3, pspnet, "
        "deeplabv3plus or ocr, dilated to output_stride; a family timm cannot dilate (e.g. "
        "timm:poolformer_s12, timm:swin_tiny_patch4_window7_224) gives all its levels, "
        "concatenated at the first one's stride for hrnetv2 or ocr; upernet takes every "
        "family's levels at their own strides."
    )
    return "\n".join(lines)
