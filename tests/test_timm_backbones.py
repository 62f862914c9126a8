"""Any timm model as the project's backbone: ``model.backbone.name: timm:<model>``, dilated to
the output stride where timm can, otherwise every level concatenated (multi-level)."""

from __future__ import annotations

import pytest
import torch

from contrastseg.config import ModelConfig, load_config
from contrastseg.contrast import PixelContrast
from contrastseg.errors import ConfigError
from contrastseg.models import build_model
from contrastseg.models.summary import format_models, list_models, summarize


def cfg(name: str, head: str, **kw) -> ModelConfig:
    return ModelConfig.model_validate(
        {"backbone": {"name": name}, "head": head, "head_variant": "compact", **kw}
    )


@pytest.mark.parametrize(
    ("name", "head", "multi_level", "stride", "channels"),
    [
        ("timm:convnext_tiny", "deeplabv3", False, 8, 768),
        ("timm:resnet50d", "ocr", False, 8, 2048),
        ("timm:efficientnet_b3", "deeplabv3", False, 8, 384),
        ("timm:poolformer_s12", "hrnetv2", True, 4, 64 + 128 + 320 + 512),
    ],
)
def test_timm_backbone_trains_with_contrast(name, head, multi_level, stride, channels):
    torch.manual_seed(0)
    model = build_model(cfg(name, head), 5, backbone_weights=False).train()
    assert model.backbone.multi_level is multi_level
    assert model.output_stride == stride and model.feature_channels == channels
    out = model(torch.randn(2, 3, 64, 64))
    assert out["seg"].shape == (2, 5, 64 // stride, 64 // stride)
    assert out["features"].shape == (2, channels, 64 // stride, 64 // stride)
    contrast = PixelContrast(5, model.feature_channels, dim=16, max_views=2)
    labels = torch.arange(5).repeat_interleave(13)[:64].view(1, 64, 1).expand(2, 64, 64)
    loss = out["seg"].mean() + contrast(out["features"], out["seg"], labels.contiguous())
    loss.backward()
    grads = [p.grad for p in model.backbone.parameters() if p.grad is not None]
    assert grads and torch.isfinite(loss)


def test_summary_works_for_a_timm_backbone():
    row = summarize(cfg("timm:resnet50d", "deeplabv3"), 19, (64, 128))
    assert row["stride"] == 8 and row["params_training"] > row["params_inference"] > 20e6
    assert row["flops_training"] > row["flops_inference"] > 0


def test_models_listing_names_the_timm_families():
    text = format_models(list_models())
    assert "timm:<model>" in text and "timm:convnext_tiny" in text


def test_bad_timm_names_are_clear_errors():
    with pytest.raises(ConfigError, match="timm cannot give feature maps of 'not_a_model'"):
        build_model(cfg("timm:not_a_model", "deeplabv3"), 5, backbone_weights=False)
    with pytest.raises(ConfigError, match="needs a dilated backbone; 'timm:poolformer_s12'"):
        build_model(cfg("timm:poolformer_s12", "deeplabv3"), 5, backbone_weights=False)
    with pytest.raises(ConfigError, match="'timm:resnet18' is dilated"):
        build_model(cfg("timm:resnet18", "hrnetv2"), 5, backbone_weights=False)
    with pytest.raises(ConfigError, match=r"'timm:<model>'"):
        load_config(None, ["model.backbone.name=convnext"])
