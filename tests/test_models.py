import pytest
import torch

from contrastseg.config import ModelConfig
from contrastseg.errors import CheckpointError
from contrastseg.models import InferenceModel, build_model, count_parameters
from contrastseg.models.backbones import load_backbone_weights


def small_cfg(**kw) -> ModelConfig:
    return ModelConfig.model_validate({"head_channels": 32, "aux_channels": 16, **kw})


def test_training_outputs_shapes_and_stride():
    torch.manual_seed(0)
    model = build_model(small_cfg(), num_classes=5, with_projection=True).train()
    out = model(torch.randn(2, 3, 64, 96))
    assert set(out) == {"seg", "aux", "embed"}
    assert out["seg"].shape == (2, 5, 8, 12)  # output stride 8
    assert out["aux"].shape == (2, 5, 8, 12)
    assert out["embed"].shape == (2, 256, 8, 12)
    norms = out["embed"].norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    sum(v.sum() for v in out.values()).backward()
    assert model.projection.net[0].weight.grad is not None


def test_projection_hidden_width_is_the_features_width_unless_set():
    default = build_model(small_cfg(), num_classes=4, with_projection=True)
    features = default.projection.net[0].in_channels
    assert default.projection.net[0].out_channels == features  # METHOD.md: d -> d
    narrow = build_model(small_cfg(projection_hidden=24), num_classes=4, with_projection=True)
    convs = [m for m in narrow.projection.net if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(features, 24), (24, 256)]
    assert narrow.projection.net[1].num_features == 24
    embed = narrow.train()(torch.randn(2, 3, 64, 64))["embed"]
    assert embed.shape == (2, 256, 8, 8)
    torch.testing.assert_close(embed.norm(dim=1), torch.ones(2, 8, 8))


def test_eval_returns_only_seg_and_never_calls_training_heads():
    model = build_model(small_cfg(), num_classes=4, with_projection=True).eval()
    called = []
    model.projection.register_forward_hook(lambda *a: called.append("projection"))
    model.aux.register_forward_hook(lambda *a: called.append("aux"))
    out = model(torch.randn(1, 3, 64, 64))
    assert list(out) == ["seg"] and called == []


def test_inference_model_equals_baseline_graph_and_parameter_count():
    torch.manual_seed(1)
    with_contrast = build_model(small_cfg(), num_classes=4, with_projection=True).eval()
    torch.manual_seed(1)
    baseline = build_model(small_cfg(), num_classes=4, with_projection=False).eval()
    a, b = InferenceModel(with_contrast), InferenceModel(baseline)
    assert count_parameters(a) == count_parameters(b)
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(a(x), b(x))
    assert a(x).shape == (1, 4, 64, 64)
    assert not any("projection" in k for k in a.state_dict())


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
