import pytest
import torch

from contrastseg.config import ModelConfig
from contrastseg.errors import CheckpointError
from contrastseg.models import build_model
from contrastseg.models.backbones import load_backbone_weights


def small_cfg(**kw) -> ModelConfig:
    return ModelConfig.model_validate({"head_channels": 32, "aux_channels": 16, **kw})


# The training outputs, the projection head and the inference model's weights: see
# tests/test_contrast_module.py.


def test_resnet101_backbone_at_output_stride_8():
    model = build_model(
        small_cfg(backbone={"name": "resnet101", "output_stride": 8}), num_classes=3
    ).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out["seg"].shape == (2, 3, 8, 8) and out["aux"].shape == (2, 3, 8, 8)
    assert model.backbone.channels[-1] == 2048 and model.backbone.channels[-2] == 1024


def test_local_weights_load_and_mismatch_lists_keys(tmp_path):
    model = build_model(small_cfg(), num_classes=3)
    state = model.backbone.body.state_dict()
    path = tmp_path / "w.pth"
    torch.save(
        {k: torch.full_like(v, 0.5) if v.is_floating_point() else v for k, v in state.items()}, path
    )
    fresh = build_model(small_cfg(), num_classes=3)
    load_backbone_weights(fresh.backbone, path)
    first = next(iter(fresh.backbone.body.state_dict().values()))
    assert torch.all(first == 0.5)
    broken = dict(state)
    missing_key = next(iter(broken))
    broken.pop(missing_key)
    broken["extra.weight"] = torch.zeros(1)
    torch.save(broken, path)
    with pytest.raises(CheckpointError) as err:
        load_backbone_weights(fresh.backbone, path)
    assert missing_key in str(err.value) and "extra.weight" in str(err.value)
    load_backbone_weights(fresh.backbone, path, strict=False)  # loads what matches
