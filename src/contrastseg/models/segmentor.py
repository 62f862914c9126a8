"""Segmentor = backbone -> decode head (+ auxiliary head in training)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from contrastseg.config import ModelConfig
from contrastseg.errors import ConfigError
from contrastseg.models.backbones import TimmBackbone, load_backbone_weights
from contrastseg.models.deeplabv3plus import build_deeplabv3plus
from contrastseg.models.heads import DeepLabV3Head, FCNHead, HRNetV2Head
from contrastseg.models.ocr import OCRHead
from contrastseg.models.pspnet import build_pspnet
from contrastseg.models.upernet import build_upernet
from contrastseg.prototype import PrototypeClassifier, PrototypeOutput


class Segmentor(nn.Module):
    """A semantic segmenter.

    ``forward(x: (B, 3, H, W)) -> dict``. In training mode: ``seg`` (B, C, h, w) logits at the
    head's stride (``output_stride``: 8 for DeepLabV3, 4 for HRNetV2 and OCR-HRNet), ``aux``
    (B, C, h', w') when an auxiliary head exists (DeepLabV3's FCN head, OCR's soft object
    regions), and ``features`` (B, feature_channels, h, w), the map the decode head classified
    (what :class:`contrastseg.PixelContrast` reads; on the grid of ``seg``). In eval mode only
    ``seg``: the auxiliary FCN head is not called, so inference costs what the baseline costs.

    With a prototype classifier (``model.classifier: prototype``), ``forward(x, labels)`` in
    training mode also returns ``ppc`` and ``ppd`` (the classifier's two losses, unweighted)
    and moves the prototypes: the labels (B, H, W) reach the head's classifier for the length
    of the call only (:func:`_labels_to`), so the heads and the exported graph stay as they
    are. Without labels, in eval mode, or with a conv classifier, ``labels`` changes nothing.

    The decode head maps the backbone's list of feature maps to ``{"seg", "features", "aux"?}``
    (see :mod:`contrastseg.models.heads`).
    """

    def __init__(
        self,
        backbone: TimmBackbone,
        head: nn.Module,
        aux: nn.Module | None = None,
        output_stride: int | None = None,
        feature_channels: int | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.aux = aux
        self.output_stride = output_stride
        self.feature_channels = feature_channels

    def forward(
        self, x: torch.Tensor, labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        feats = self.backbone(x)
        learned: list[PrototypeOutput] = []
        if self.training and labels is not None and self.prototype_classifier is not None:
            decoded, learned = _head_with_labels(
                self.head, feats, self.prototype_classifier, labels
            )
        else:
            decoded = self.head(feats)
        out = {"seg": decoded["seg"]}
        if self.training:
            if "aux" in decoded:
                out["aux"] = decoded["aux"]
            elif self.aux is not None:
                out["aux"] = self.aux(feats[self.backbone.aux_index])
            out["features"] = decoded["features"]
            if learned:
                out["ppc"] = learned[0].ppc
                out["ppd"] = learned[0].ppd
        return out

    @property
    def prototype_classifier(self) -> PrototypeClassifier | None:
        """The decode head's classifier when it is a :class:`PrototypeClassifier`
        (``model.classifier: prototype``), else None."""
        classifier = getattr(self.head, "classifier", None)
        return classifier if isinstance(classifier, PrototypeClassifier) else None

    @torch.no_grad()
    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Eval-mode logits upsampled to the input size: (B, 3, H, W) -> (B, C, H, W)."""
        seg = self(x)["seg"]
        return F.interpolate(seg, size=x.shape[-2:], mode="bilinear", align_corners=False)


@torch.compiler.disable
def _head_with_labels(
    head: nn.Module,
    feats: list[torch.Tensor],
    classifier: PrototypeClassifier,
    labels: torch.Tensor,
) -> tuple[dict[str, torch.Tensor], list[PrototypeOutput]]:
    """``head(feats)`` with the labels handed to its prototype ``classifier`` (:func:`_labels_to`),
    and what the classifier learned. Under ``torch.compile`` the whole call runs eagerly: the
    hooks are installed and removed per call, and the prototype update draws from the module's
    own generator, neither of which a graph can hold. The backbone before it and the auxiliary
    head after it stay compiled (docs/training.md, "Compiling")."""
    learned: list[PrototypeOutput] = []
    with _labels_to(classifier, labels, learned):
        decoded = head(feats)
    return decoded, learned


@contextmanager
def _labels_to(
    classifier: PrototypeClassifier, labels: torch.Tensor, learned: list[PrototypeOutput]
) -> Iterator[None]:
    """For the length of the block, the head's call ``classifier(features)`` is made as
    ``classifier(features, labels)``; its :class:`PrototypeOutput` is appended to ``learned``
    and the head receives the logits, as from a conv classifier. Two hooks removed on exit:
    the module, its state_dict and the scripted or exported inference graph are untouched."""

    def add_labels(_module, args, kwargs):
        return args, {**kwargs, "labels": labels}

    def keep_output(_module, _args, output):
        if isinstance(output, PrototypeOutput):
            learned.append(output)
            return output.logits
        return output

    handles = [
        classifier.register_forward_pre_hook(add_labels, with_kwargs=True),
        classifier.register_forward_hook(keep_output),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class InferenceModel(nn.Module):
    """The deployable graph: backbone + decode head only, ``(B, 3, H, W) -> (B, C, H, W)``."""

    def __init__(self, segmentor: Segmentor) -> None:
        super().__init__()
        self.backbone = segmentor.backbone
        self.head = segmentor.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seg = self.head(self.backbone(x))["seg"]
        return F.interpolate(seg, size=x.shape[-2:], mode="bilinear", align_corners=False)


def build_model(
    cfg: ModelConfig,
    num_classes: int,
    backbone_weights: bool = True,
    prototype_seed: int = 0,
) -> Segmentor:
    """Build the segmenter a config describes.

    With ``backbone_weights=False`` neither timm's ImageNet weights (``pretrained``) nor the
    file ``model.backbone.weights`` are loaded: for callers that load a whole checkpoint over
    the model (inference, export), so that no network or weight file is needed.

    deeplabv3: ASPP on the last stage of a dilated backbone, FCN auxiliary head on the stage
    before (``cfg.aux``), features (what pixel contrast reads) from the last stage. hrnetv2: the
    HRNet branches concatenated at stride 4, no auxiliary head, features = the concatenation.
    ocr: on HRNet the concatenation feeds the soft-object-region head and the pixel
    representation and is the features; on a dilated backbone the region head reads the stage
    before the last, the pixel representation and the features are the last stage.

    ``model.classifier: prototype`` puts a :class:`PrototypeClassifier` (``model.prototype``)
    in place of the decode head's final 1x1 conv, reading the same map, under the same name
    (``head.classifier.*``); ``prototype_seed`` seeds its prototypes and its generator (the
    trainer gives each process its own).
    """
    bcfg = cfg.backbone
    pretrained = bcfg.pretrained and backbone_weights
    backbone = TimmBackbone(
        bcfg.name, bcfg.output_stride, pretrained=pretrained, variant=bcfg.variant
    )
    if bcfg.weights is not None and backbone_weights:
        load_backbone_weights(backbone, bcfg.weights, strict=bcfg.strict)
    top = backbone.channels[backbone.out_index]
    aux = None
    if cfg.head in ("hrnetv2", "ocr") and backbone.multi_level:
        features_channels, stride = sum(backbone.channels), backbone.strides[0]
    else:
        features_channels, stride = top, backbone.strides[backbone.out_index]
    variant = cfg.head_variant
    if cfg.head == "deeplabv3":
        if backbone.multi_level:
            raise ConfigError(
                f"model.head = 'deeplabv3' needs a dilated backbone; {bcfg.name!r} gives "
                "several levels at their own strides: use model.head: hrnetv2 or ocr"
            )
        channels = cfg.head_channels or (512 if variant == "released" else 256)
        head: nn.Module = DeepLabV3Head(
            top, num_classes, channels, cfg.aspp_rates, cfg.dropout, backbone.out_index, variant
        )
        if cfg.aux:
            aux_in = backbone.channels[backbone.aux_index]
            aux = FCNHead(aux_in, num_classes, cfg.aux_channels, cfg.dropout, variant)
    elif cfg.head == "hrnetv2":
        if not backbone.multi_level:
            raise ConfigError(
                f"model.head = 'hrnetv2' needs a multi-level backbone (HRNet, or a timm model "
                f"that cannot be dilated); {bcfg.name!r} is dilated: use deeplabv3 or ocr"
            )
        dropout = cfg.dropout if variant == "released" else 0.0
        head = HRNetV2Head(features_channels, num_classes, dropout, variant)
    elif cfg.head == "ocr":
        hr = backbone.multi_level
        aux_in = features_channels if hr else backbone.channels[backbone.aux_index]
        aux_channels = cfg.ocr_aux_channels or (features_channels if hr else 512)
        head = OCRHead(
            features_channels,
            aux_in,
            num_classes,
            mid_channels=cfg.ocr_mid_channels,
            key_channels=cfg.ocr_key_channels,
            aux_channels=aux_channels,
            aux_kernel=1 if hr and variant == "compact" else 3,
            dropout=cfg.ocr_dropout,
            concat=backbone.multi_level,
            in_index=backbone.out_index,
            aux_index=backbone.aux_index,
            variant=variant,
            aux_dropout=0.0 if hr else cfg.ocr_dropout,
        )
    elif cfg.head == "pspnet":
        head, aux, features_channels, stride = build_pspnet(backbone, cfg, num_classes)
    elif cfg.head == "deeplabv3plus":
        head, aux, features_channels, stride = build_deeplabv3plus(backbone, cfg, num_classes)
    elif cfg.head == "upernet":
        head, aux, features_channels, stride = build_upernet(backbone, cfg, num_classes)
    else:  # pragma: no cover - the config's Literal rules it out
        raise ConfigError(f"model.head = {cfg.head!r}: unknown head")
    if cfg.classifier == "prototype":
        head.classifier = build_prototype_classifier(
            cfg, num_classes, head.classifier.in_channels, prototype_seed
        )
    return Segmentor(backbone, head, aux, output_stride=stride, feature_channels=features_channels)


def build_prototype_classifier(
    cfg: ModelConfig, num_classes: int, in_channels: int, seed: int = 0
) -> PrototypeClassifier:
    """The :class:`PrototypeClassifier` ``model.prototype`` describes, on ``in_channels`` (the
    section's keys are the classifier's arguments of the same names)."""
    return PrototypeClassifier(num_classes, in_channels, **cfg.prototype.model_dump(), seed=seed)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
