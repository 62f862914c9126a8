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


# --- the released head layouts compute what the authors' forward passes compute -------------
# References written from lib/models/nets/hrnet.py (HRNet_W48_CONTRAST, HRNet_W48_OCR),
# lib/models/modules/decoder_block.py (DeepLabHead, ASPPModule) and spatial_ocr_block.py
# (SpatialGather_Module, ObjectAttentionBlock2D, SpatialOCR_Module), with plain functional ops
# on the heads' own weights.


def _randomize_norms(module: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(3)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
        elif isinstance(m, torch.nn.Conv2d) and m.bias is not None:
            m.bias.data.copy_(torch.randn(m.out_channels, generator=gen) * 0.1)


def _cbr(x, seq, relu=True, **conv):
    """Reference conv (seq[0]) + eval BN (seq[1]) (+ ReLU)."""
    import torch.nn.functional as F

    c, b = seq[0], seq[1]
    y = F.conv2d(x, c.weight, c.bias, **conv)
    y = F.batch_norm(y, b.running_mean, b.running_var, b.weight, b.bias, False, 0.0, b.eps)
    return F.relu(y) if relu else y


def _branches():
    torch.manual_seed(0)
    return [torch.randn(2, c, 32 // 2**i, 48 // 2**i) for i, c in enumerate((16, 32, 64, 128))]


def _concat(feats):
    import torch.nn.functional as F

    size = feats[0].shape[-2:]
    ups = [F.interpolate(f, size=size, mode="bilinear", align_corners=True) for f in feats[1:]]
    return torch.cat([feats[0], *ups], 1)


@torch.no_grad()
def test_released_hrnetv2_head_is_the_authors_cls_head():
    import torch.nn.functional as F

    from contrastseg.models.heads import HRNetV2Head, concat_branches

    head = HRNetV2Head(240, 5, dropout=0.1, variant="released").eval()
    _randomize_norms(head)
    feats = _branches()
    x = _concat(feats)
    ref = F.conv2d(_cbr(x, head.block, padding=1), head.classifier.weight)  # no bias
    out = head(feats)
    assert head.classifier.bias is None
    torch.testing.assert_close(out["seg"], ref)
    torch.testing.assert_close(out["features"], x)
    # the compact layout upsamples without align_corners: another representation
    assert not torch.allclose(concat_branches(feats), x)


@torch.no_grad()
def test_released_ocr_head_is_the_authors_hrnet_ocr():
    import torch.nn.functional as F

    from contrastseg.models.ocr import OCRHead

    head = OCRHead(
        240,
        240,
        5,
        mid_channels=64,
        key_channels=32,
        aux_channels=240,
        aux_kernel=3,
        concat=True,
        variant="released",
    ).eval()
    _randomize_norms(head)
    feats = _branches()
    x = _concat(feats)
    aux = F.conv2d(
        _cbr(x, head.aux_head[0], padding=1), head.aux_head[2].weight, head.aux_head[2].bias
    )
    pix = _cbr(x, head.pixel, padding=1)
    b, c, h, w = pix.shape
    probs = F.softmax(aux.view(b, 5, -1), dim=2)  # SpatialGather_Module
    ctx = torch.matmul(probs, pix.view(b, c, -1).permute(0, 2, 1)).permute(0, 2, 1).unsqueeze(3)
    rel = head.relation
    query = _cbr(_cbr(pix, rel.query[0]), rel.query[1]).view(b, 32, -1).permute(0, 2, 1)
    key = _cbr(_cbr(ctx, rel.key[0]), rel.key[1]).view(b, 32, -1)
    value = _cbr(ctx, rel.value).view(b, 32, -1).permute(0, 2, 1)
    sim = F.softmax(32**-0.5 * torch.matmul(query, key), dim=-1)
    context = torch.matmul(sim, value).permute(0, 2, 1).contiguous().view(b, 32, h, w)
    context = _cbr(context, rel.out)
    ref = _cbr(torch.cat([context, pix], 1), head.augment)
    ref = F.conv2d(ref, head.classifier.weight, head.classifier.bias)
    out = head(feats)
    torch.testing.assert_close(out["aux"], aux)
    torch.testing.assert_close(out["seg"], ref, rtol=1e-4, atol=1e-5)
    assert ref.abs().max() > 0.1


@torch.no_grad()
def test_released_deeplabv3_head_is_the_authors_deeplab_head():
    import torch.nn.functional as F

    from contrastseg.models.heads import DeepLabV3Head, FCNHead

    head = DeepLabV3Head(64, 5, channels=24, rates=(2, 4, 6), variant="released").eval()
    aux = FCNHead(32, 5, channels=16, variant="released").eval()
    _randomize_norms(head)
    _randomize_norms(aux)
    torch.manual_seed(1)
    layer3, layer4 = torch.randn(2, 32, 12, 10), torch.randn(2, 64, 12, 10)
    br = head.aspp.branches
    parts = [_cbr(layer4, br[0])]
    parts += [_cbr(layer4, br[i], padding=r, dilation=r) for i, r in ((1, 2), (2, 4), (3, 6))]
    pooled = _cbr(F.adaptive_avg_pool2d(layer4, 1), br[4].proj)
    parts.append(F.interpolate(pooled, size=(12, 10), mode="bilinear", align_corners=True))
    y = _cbr(torch.cat(parts, 1), head.aspp.project, padding=1)
    y = _cbr(y, head.bottleneck, relu=False, padding=1)  # refine: conv, BN, no ReLU
    ref = F.conv2d(y, head.classifier.weight, head.classifier.bias)
    torch.testing.assert_close(head([layer3, layer4])["seg"], ref)
    dsn = F.conv2d(_cbr(layer3, aux.block, padding=1), aux.classifier.weight, aux.classifier.bias)
    torch.testing.assert_close(aux(layer3), dsn)
