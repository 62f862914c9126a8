"""The backbones and heads of contrastseg's model zoo: one row each (in the supplement's
order), the only place a backbone is registered.

A backbone row names the value of ``model.backbone.name``, the timm model it builds, whether it
is an HRNet (four branches instead of a dilated last stage), the state-dict prefixes of timm's
classification head (dropped when ImageNet weights are loaded), a description for
``contrastseg models`` and its name in reports. ``config`` takes its allowed names from here,
``models`` builds from it, ``report`` and the benchmarks print its display names. ``TABLE1``
lists the rows of the supplement's Table 1 (config stem -> backbone, head). This module imports
nothing of the project, so every floor may read it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "BACKBONES",
    "BACKBONE_NAMES",
    "HEADS",
    "OTHER_SEGMENTERS",
    "PROTOTYPE_SEGMENTERS",
    "TABLE1",
    "BackboneEntry",
]


@dataclass(frozen=True)
class BackboneEntry:
    """One backbone of the zoo (or, built on the fly, a ``timm:<model>`` backbone)."""

    name: str  # the value of model.backbone.name
    timm_name: str
    hrnet: bool
    head_prefixes: tuple[str, ...]  # timm's classification head, absent from a feature extractor
    description: str  # for `contrastseg models`
    display: str  # in reports and benchmark tables


_HRNET_HEAD = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.")

BACKBONES: dict[str, BackboneEntry] = {
    row.name: row
    for row in (
        BackboneEntry(
            "mobilenetv1",
            "mobilenetv1_100",
            False,
            ("classifier.",),
            "MobileNet V1 (width 1.0), dilated",
            "MobileNet-V1",
        ),
        BackboneEntry(
            "mobilenetv2",
            "mobilenetv2_100",
            False,
            ("conv_head.", "bn2.", "classifier."),
            "MobileNet V2 (width 1.0), dilated",
            "MobileNet-V2",
        ),
        BackboneEntry(
            "mobilenetv3_large",
            "mobilenetv3_large_100",
            False,
            ("conv_head.", "classifier."),
            "MobileNet V3-Large (width 1.0), dilated",
            "MobileNet-V3",
        ),
        BackboneEntry(
            "resnet101",
            "resnet101",
            False,
            ("fc.",),
            "ResNet-101, 7x7 stem (torchvision layout), dilated",
            "ResNet-101",
        ),
        BackboneEntry(
            "resnet101_deep",
            "resnet101s",
            False,
            ("fc.",),
            "D-ResNet-101: deep stem of three 3x3 convs (64-64-128, no avg-down), dilated",
            "D-ResNet-101",
        ),
        BackboneEntry(
            "hrnetv2_w18_small",
            "hrnet_w18_small",
            True,
            _HRNET_HEAD,
            "HRNetV2-W18-Small (v1), four branches 16/32/64/128 at strides 4-32",
            "HRNetV2-W18-Small",
        ),
        BackboneEntry(
            "hrnetv2_w48",
            "hrnet_w48",
            True,
            _HRNET_HEAD,
            "HRNetV2-W48, four branches 48/96/192/384 at strides 4-32",
            "HRNetV2-W48",
        ),
        BackboneEntry(
            "xception71",
            "xception71",
            False,
            ("head.",),
            "D-Xception-71: aligned Xception-71 of DeepLabV3+, dilated",
            "D-Xception-71",
        ),
    )
}
#: The allowed values of ``model.backbone.name`` besides ``timm:<model>``.
BACKBONE_NAMES: tuple[str, ...] = tuple(BACKBONES)

#: ``model.head`` -> its name in reports, in the supplement's order.
HEADS: dict[str, str] = {
    "deeplabv3": "DeepLabV3",
    "hrnetv2": "HRNetV2",
    "ocr": "OCR",
    "pspnet": "PSPNet",
    "deeplabv3plus": "DeepLabV3+",
    "upernet": "UPerNet",
}

#: The rows of the supplement's Table 1: config stem -> (backbone, head).
TABLE1: dict[str, tuple[str, str]] = {
    "deeplabv3_mobilenetv1": ("mobilenetv1", "deeplabv3"),
    "deeplabv3_mobilenetv2": ("mobilenetv2", "deeplabv3"),
    "deeplabv3_mobilenetv3": ("mobilenetv3_large", "deeplabv3"),
    "deeplabv3_resnet101": ("resnet101_deep", "deeplabv3"),
    "hrnetv2_w48": ("hrnetv2_w48", "hrnetv2"),
    "ocr_resnet101": ("resnet101_deep", "ocr"),
    "ocr_hrnetv2_w48": ("hrnetv2_w48", "ocr"),
}

#: The other segmenters' Cityscapes configs (config stem under configs/cityscapes -> (backbone,
#: head)): PSPNet and DeepLabV3+ as the supplement's Table 1 compares them, UPerNet on ConvNeXt-T.
#: Each follows the public code its head comes from (docs/models.md), not the paper's recipe.
OTHER_SEGMENTERS: dict[str, tuple[str, str]] = {
    "pspnet_resnet101": ("resnet101_deep", "pspnet"),
    "deeplabv3plus_xception71": ("xception71", "deeplabv3plus"),
    "upernet_convnext_tiny": ("timm:convnext_tiny", "upernet"),
}

#: The segmenters with ProtoSeg's prototype classifier (``model.classifier: prototype``) that a
#: recipe trains: recipe path under configs -> (backbone, head). Any head takes the classifier.
PROTOTYPE_SEGMENTERS: dict[str, tuple[str, str]] = {
    "cityscapes/released/hrnetv2_w48_proto": ("hrnetv2_w48", "hrnetv2"),
    "ade20k/hrnetv2_w48_proto": ("hrnetv2_w48", "hrnetv2"),
}
