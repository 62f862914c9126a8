"""The public PixelContrast module: construction, projection head, warm-up, diagnostics,
state_dict round trip, and how the project's Segmentor and LossSet use it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import contrastseg
from contrastseg.config import ModelConfig, load_config
from contrastseg.contrast import ContrastDiagnostics, PixelContrast
from contrastseg.errors import ConfigError
from contrastseg.models import InferenceModel, build_model, count_parameters


def small_cfg(**kw) -> ModelConfig:
    return ModelConfig.model_validate({"head_channels": 32, "aux_channels": 16, **kw})


def labels_for(batch: int, size: tuple[int, int], classes: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, classes, (batch, 1, 3, 4), generator=g).float()
    return F.interpolate(coarse, size=size, mode="nearest")[:, 0].long()


def test_public_names():
    assert contrastseg.PixelContrast is PixelContrast
    assert "PixelContrast" in contrastseg.__all__


def test_segmentor_gives_features_and_the_module_projects_them():
    torch.manual_seed(0)
    model = build_model(small_cfg(), num_classes=5).train()
    out = model(torch.randn(2, 3, 64, 96))
    assert set(out) == {"seg", "aux", "features"}
    assert out["seg"].shape == (2, 5, 8, 12)  # output stride 8
    assert out["features"].shape == (2, model.feature_channels, 8, 12)
    contrast = PixelContrast(5, model.feature_channels)
    embed = contrast.projection(out["features"])
    assert embed.shape == (2, 256, 8, 12)
    torch.testing.assert_close(embed.norm(dim=1), torch.ones(2, 8, 12))
    loss = contrast(out["features"], out["seg"], labels_for(2, (64, 96), 5))
    (loss + out["seg"].sum()).backward()
    assert contrast.projection.net[0].weight.grad is not None
    assert model.backbone.parameters().__next__().grad is not None


def test_projection_hidden_width_is_the_features_width_unless_set():
    model = build_model(small_cfg(), num_classes=4)
    cfg = load_config(None, ["loss.contrast.enabled=true"])
    default = PixelContrast.from_config(cfg.loss.contrast, small_cfg(), 4, model.feature_channels)
    features = default.projection.net[0].in_channels
    assert features == model.feature_channels
    assert default.projection.net[0].out_channels == features  # the paper's d -> d
    narrow = PixelContrast.from_config(
        cfg.loss.contrast, small_cfg(projection_hidden=24), 4, model.feature_channels
    )
    convs = [m for m in narrow.projection.net if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(features, 24), (24, 256)]
    assert narrow.projection.net[1].num_features == 24


def test_eval_returns_only_seg_and_never_calls_the_auxiliary_head():
    model = build_model(small_cfg(), num_classes=4).eval()
    called = []
    model.aux.register_forward_hook(lambda *a: called.append("aux"))
    out = model(torch.randn(1, 3, 64, 64))
    assert list(out) == ["seg"] and called == []


def test_inference_model_has_no_contrast_weights():
    torch.manual_seed(1)
    model = build_model(small_cfg(), num_classes=4).eval()
    a = InferenceModel(model)
    assert count_parameters(a) == count_parameters(model) - count_parameters(model.aux)
    assert not any("projection" in k for k in a.state_dict())
    assert a(torch.randn(1, 3, 64, 64)).shape == (1, 4, 64, 64)


def test_warm_up_returns_an_attached_zero_and_pushes_nothing():
    contrast = PixelContrast(3, 8, dim=4, max_views=2, memory=True, memory_size=20, warmup_iters=2)
    features = torch.randn(2, 8, 6, 8, requires_grad=True)
    logits, labels = torch.randn(2, 3, 6, 8), labels_for(2, (12, 16), 3)
    loss, info = contrast(features, logits, labels, step=1, return_diagnostics=True)
    assert loss.item() == 0.0 and info == ContrastDiagnostics(False, 0, 0, 3 * (20 + 5000))
    loss.backward()
    assert all(p.grad is not None for p in contrast.projection.parameters())
    loss, info = contrast(features, logits, labels, step=2, return_diagnostics=True)
    assert info.active and info.anchors > 0 and loss.item() > 0
    assert info.memory_filled == len(contrast.memory) > 0
    with pytest.raises(ConfigError, match="pass step="):
        contrast(features, logits, labels)


def test_bad_inputs_name_the_value():
    contrast = PixelContrast(3, 8, dim=4)
    with pytest.raises(ConfigError, match=r"in_channels=8"):
        contrast(torch.randn(2, 6, 4, 4), torch.randn(2, 3, 4, 4), torch.zeros(2, 4, 4).long())
    with pytest.raises(ConfigError, match="logits"):
        contrast(torch.randn(2, 8, 4, 4), torch.randn(1, 3, 4, 4), torch.zeros(2, 4, 4).long())
    with pytest.raises(ConfigError, match="labels"):
        contrast(torch.randn(2, 8, 4, 4), torch.randn(2, 3, 4, 4), torch.zeros(2, 4).long())
    bare = PixelContrast(3, None, dim=4)
    with pytest.raises(ConfigError, match=r"dim=4"):
        bare(torch.randn(2, 8, 4, 4), torch.randn(2, 3, 4, 4), torch.zeros(2, 4, 4).long())
    with pytest.raises(ConfigError, match="warmup_iters"):
        PixelContrast(3, 8, warmup_iters=-1)


def test_state_dict_round_trip_reproduces_the_next_loss_exactly():
    def make(seed):
        return PixelContrast(
            4, 6, dim=5, max_views=3, memory=True, memory_size=30, region_size=8, seed=seed
        )

    torch.manual_seed(0)
    a = make(0)
    batches = []
    for i in range(4):
        g = torch.Generator().manual_seed(i)
        batches.append((torch.randn(2, 6, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)))
    labels = labels_for(2, (16, 16), 4)
    for features, logits in batches[:3]:
        a(features, logits, labels).backward()
    b = make(7)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    keys = set(a.state_dict())
    assert {"projection.net.0.weight", "memory.pixel_queue", "_extra_state"} <= keys
    features, logits = batches[3]
    assert a(features, logits, labels).item() == b(features, logits, labels).item()
    assert torch.equal(a.memory.pixel_queue, b.memory.pixel_queue)


def test_without_projection_it_takes_embeddings():
    contrast = PixelContrast(3, None, dim=4, max_views=2)
    assert contrast.projection is None and not list(contrast.parameters())
    embed = F.normalize(torch.randn(2, 4, 6, 8), dim=1).requires_grad_(True)
    loss = contrast(embed, torch.randn(2, 3, 6, 8), labels_for(2, (6, 8), 3))
    loss.backward()
    assert loss.item() > 0 and embed.grad.abs().sum() > 0
