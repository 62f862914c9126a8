"""``contrastseg convert``: released ContrastiveSeg checkpoints -> contrastseg.

The released state dicts are generated here from a key/shape table written from the released
code (lib/models/nets/hrnet.py, deeplab.py, ocrnet.py, modules/decoder_block.py,
spatial_ocr_block.py, projection.py, backbones/resnet/resnet_models.py): heads and the ResNet
stem from the table, the HRNet body and the ResNet stages from timm's modules, whose key names
are the released ones. Full-size networks are checked on the ``meta`` device (shapes, no
memory); value checks use HRNetV2-W18-Small, or assign the tensors to a ``meta`` model.
"""

from __future__ import annotations

import pytest
import torch

from contrastseg.config import ModelConfig, load_config
from contrastseg.convert import (
    CHECKPOINT_FORMAT,
    HRNET_MEAN,
    HRNET_STD,
    IMAGENET_REASON,
    LAYOUTS,
    PROJECTION_REASON,
    RESNET_MEAN,
    RESNET_STD,
    convert_file,
    convert_state,
    detect_layout,
    eval_overrides,
    model_config,
    to_released,
)
from contrastseg.errors import CheckpointError
from contrastseg.models import build_model, count_parameters
from contrastseg.models.backbones import TimmBackbone

K = 19  # Cityscapes classes
PROJ = 256  # contrast.proj_dim of the released configs


def bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    """A BatchNorm2d's state (openseg: ``BNReLU`` = Sequential(BN, ReLU) -> ``<prefix>.0``)."""
    shapes: dict[str, tuple[int, ...]] = {
        f"{prefix}.{k}": (c,) for k in ("weight", "bias", "running_mean", "running_var")
    }
    shapes[f"{prefix}.num_batches_tracked"] = ()
    return shapes


def conv(prefix: str, cout: int, cin: int, k: int, bias: bool) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {f"{prefix}.weight": (cout, cin, k, k)}
    if bias:
        shapes[f"{prefix}.bias"] = (cout,)
    return shapes


def projection(c: int) -> dict[str, tuple[int, ...]]:
    """ProjectionHead(dim_in=c, proj='convmlp'): 1x1 conv, BNReLU, 1x1 conv (all with bias)."""
    return {
        **conv("proj_head.proj.0", c, c, 1, True),
        **bn("proj_head.proj.1.0", c),
        **conv("proj_head.proj.2", PROJ, c, 1, True),
    }


def ocr_module(prefix: str, cin: int = 512, key: int = 256) -> dict[str, tuple[int, ...]]:
    """SpatialOCR_Module(512, key 256, out 512): ObjectAttentionBlock2D + conv_bn_dropout."""
    att = f"{prefix}.object_context_block"
    shapes: dict[str, tuple[int, ...]] = {}
    for name in ("f_pixel", "f_object"):
        shapes |= conv(f"{att}.{name}.0", key, cin, 1, True) | bn(f"{att}.{name}.1.0", key)
        shapes |= conv(f"{att}.{name}.2", key, key, 1, True) | bn(f"{att}.{name}.3.0", key)
    shapes |= conv(f"{att}.f_down.0", key, cin, 1, True) | bn(f"{att}.f_down.1.0", key)
    shapes |= conv(f"{att}.f_up.0", cin, key, 1, True) | bn(f"{att}.f_up.1.0", cin)
    shapes |= conv(f"{prefix}.conv_bn_dropout.0", cin, 2 * cin, 1, True)
    shapes |= bn(f"{prefix}.conv_bn_dropout.1.0", cin)
    return shapes


def released_head(layout: str, c: int) -> dict[str, tuple[int, ...]]:
    """The released head's keys and shapes; ``c``: channels it reads (720 on HRNet-W48)."""
    if layout == "hrnet_w48":  # HRNet_W48_CONTRAST.cls_head
        return (
            conv("cls_head.0", c, c, 3, True)
            | bn("cls_head.1.0", c)
            | conv("cls_head.3", K, c, 1, False)
        )
    if layout == "hrnet_w48_ocr":  # HRNet_W48_OCR
        return (
            conv("aux_head.0", c, c, 3, True)
            | bn("aux_head.1.0", c)
            | conv("aux_head.2", K, c, 1, True)
            | conv("conv3x3.0", 512, c, 3, True)
            | bn("conv3x3.1.0", 512)
            | ocr_module("ocr_distri_head")
            | conv("cls_head", K, 512, 1, True)
        )
    if layout == "deeplab_v3":  # DeepLabHead: layer_dsn on layer 3 (1024), ASPP 512 on 2048
        shapes = conv("decoder.layer_dsn.0", 256, 1024, 3, True) | bn("decoder.layer_dsn.1.0", 256)
        shapes |= conv("decoder.layer_dsn.2", K, 256, 1, True)
        aspp = "decoder.layer_aspp"
        for i, k in enumerate((1, 3, 3, 3)):
            shapes |= conv(f"{aspp}.b{i}.0", 512, 2048, k, False) | bn(f"{aspp}.b{i}.1.0", 512)
        shapes |= conv(f"{aspp}.b4.1", 512, 2048, 1, False) | bn(f"{aspp}.b4.2.0", 512)
        shapes |= conv(f"{aspp}.project.0", 512, 5 * 512, 3, False) | bn(f"{aspp}.project.1.0", 512)
        shapes |= conv("decoder.refine.0", 512, 512, 3, False) | bn("decoder.refine.1", 512)
        return shapes | conv("decoder.refine.2", K, 512, 1, True)
    if layout == "spatial_ocrnet":  # SpatialOCRNet on deepbase_resnet101_dilated8
        return (
            conv("conv_3x3.0", 512, 2048, 3, True)
            | bn("conv_3x3.1.0", 512)
            | ocr_module("spatial_ocr_head")
            | conv("head", K, 512, 1, True)
            | conv("dsn_head.0", 512, 1024, 3, True)
            | bn("dsn_head.1.0", 512)
            | conv("dsn_head.3", K, 512, 1, True)
        )
    raise AssertionError(layout)


# openseg's deep stem (ResNet.resinit) -> timm's resnet101s stem; the stages share their names
RESINIT = {
    "conv1.0.": "resinit.conv1.",
    "conv1.1.": "resinit.bn1.",
    "conv1.3.": "resinit.conv2.",
    "conv1.4.": "resinit.bn2.",
    "conv1.6.": "resinit.conv3.",
    "bn1.": "resinit.bn3.",
}


def released_backbone(name: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        body = TimmBackbone(name).body
    shapes = {}
    for key, value in body.state_dict().items():
        for ours, theirs in RESINIT.items():
            if name.startswith("resnet") and key.startswith(ours):
                key = theirs + key[len(ours) :]
                break
        shapes["backbone." + key] = tuple(value.shape)
    return shapes


def released_shapes(layout: str, backbone: str, contrast: bool) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        channels = TimmBackbone(backbone).channels
    hrnet = backbone.startswith("hrnet")
    c = sum(channels) if hrnet else 2048
    shapes = released_backbone(backbone) | released_head(layout, c)
    return shapes | (projection(c) if contrast else {})


def materialize(shapes: dict[str, tuple[int, ...]], device: str = "cpu") -> dict:
    """Tensors of the given shapes; on the CPU each holds its own value (key index + 1)."""
    out = {}
    for i, (key, shape) in enumerate(shapes.items()):
        if key.endswith("num_batches_tracked"):
            out[key] = torch.full(shape, i + 1, dtype=torch.long, device=device)
        else:
            out[key] = torch.full(shape, float(i + 1), device=device)
    return out


FULL = [
    ("hrnet_w48", "hrnetv2_w48", True),
    ("hrnet_w48", "hrnetv2_w48", False),
    ("hrnet_w48_ocr", "hrnetv2_w48", True),
    ("deeplab_v3", "resnet101_deep", True),
    ("deeplab_v3", "resnet101_deep", False),
    ("spatial_ocrnet", "resnet101_deep", False),
]


@pytest.mark.parametrize(("layout", "backbone", "contrast"), FULL)
def test_full_size_released_layouts_map_every_key_once(layout, backbone, contrast):
    shapes = released_shapes(layout, backbone, contrast)
    state = materialize(shapes, device="meta")
    result = convert_state(state, "released.pth")
    assert result.layout.name == layout and result.backbone == backbone
    assert result.num_classes == K
    # every released key: mapped or dropped (the projection head, training only), never both
    assert set(result.mapping) | set(result.dropped) == set(shapes)
    assert not set(result.mapping) & set(result.dropped)
    assert set(result.dropped) == {k for k in shapes if k.startswith("proj_head.")}
    assert set(result.dropped.values()) <= {PROJECTION_REASON}
    assert len(result.dropped) == (9 if contrast else 0)  # 2 convs (w, b) + 1 BN (5)
    # every contrastseg key filled exactly once, with the released tensor's shape
    with torch.device("meta"):
        model = build_model(ModelConfig.model_validate(result.model_config), K)
    own = model.state_dict()
    assert sorted(result.mapping.values()) == sorted(own)
    assert not result.filled
    for src, dst in result.mapping.items():
        assert tuple(state[src].shape) == tuple(own[dst].shape), (src, dst)
    model.load_state_dict(result.state, strict=True, assign=True)


# Parameters of the released networks (without the projection head) as their code builds them:
# counted from lib/models/nets/*.py instantiated with 19 classes.
RELEASED_PARAMETERS = {
    "hrnet_w48": 70_006_560,
    "hrnet_w48_ocr": 74_522_182,
    "deeplab_v3": 89_570_278,  # with the layer_dsn auxiliary head (87_205_331 without)
    "spatial_ocrnet": 57_988_838,
}


@pytest.mark.parametrize(("layout", "backbone", "contrast"), FULL)
def test_converted_model_has_the_released_parameter_count(layout, backbone, contrast):
    shapes = released_shapes(layout, backbone, contrast=False)
    released = sum(
        torch.Size(s).numel()
        for k, s in shapes.items()
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    )
    assert released == RELEASED_PARAMETERS[layout]
    with torch.device("meta"):
        model = build_model(ModelConfig.model_validate(model_config(LAYOUTS[layout], backbone)), K)
    assert count_parameters(model) == released


def small_hrnet_state(layout: str = "hrnet_w48", contrast: bool = True) -> dict:
    """A released-layout state dict on HRNetV2-W18-Small (240 channels), distinct values."""
    return materialize(released_shapes(layout, "hrnetv2_w18_small", contrast))


@pytest.mark.parametrize("layout", ["hrnet_w48", "hrnet_w48_ocr"])
def test_every_parameter_receives_its_released_tensor_and_back_conversion_restores_it(layout):
    state = small_hrnet_state(layout)
    result = convert_state(state, "released.pth")
    assert result.backbone == "hrnetv2_w18_small"
    model = build_model(ModelConfig.model_validate(result.model_config), K, backbone_weights=False)
    model.load_state_dict(result.state, strict=True)
    own = model.state_dict()
    first = LAYOUTS[layout].first_conv
    for src, dst in result.mapping.items():
        expected = state[src].flip(1) if dst == first else state[src]
        assert torch.equal(own[dst], expected), (src, dst)
    values = [float(v.flatten()[0]) for k, v in own.items() if k != first]
    assert len(values) == len(set(values))  # no source tensor used twice
    back = to_released(result)
    kept = {k: v for k, v in state.items() if not k.startswith("proj_head.")}
    assert back.keys() == kept.keys()
    assert all(torch.equal(back[k], kept[k]) for k in kept)


def test_resnet_layout_values_land_once():
    state = materialize(released_shapes("deeplab_v3", "resnet101_deep", contrast=True))
    result = convert_state(state, "released.pth")
    with torch.device("meta"):
        model = build_model(ModelConfig.model_validate(result.model_config), K)
    model.load_state_dict(result.state, strict=True, assign=True)
    own = model.state_dict()
    assert torch.equal(own["backbone.body.conv1.0.weight"], state["backbone.resinit.conv1.weight"])
    assert torch.equal(
        own["backbone.body.bn1.running_var"], state["backbone.resinit.bn3.running_var"]
    )
    assert torch.equal(own["aux.block.0.bias"], state["decoder.layer_dsn.0.bias"])
    assert torch.equal(
        own["head.aspp.branches.4.proj.0.weight"], state["decoder.layer_aspp.b4.1.weight"]
    )
    assert torch.equal(own["head.bottleneck.1.weight"], state["decoder.refine.1.weight"])
    sources = {float(v.flatten()[0]) for v in own.values()}
    assert len(sources) == len(own)  # each contrastseg tensor from a different released one
    back = to_released(result)
    assert all(torch.equal(back[k], state[k]) for k in back)
    assert set(back) == {k for k in state if not k.startswith("proj_head.")}


def test_bgr_weights_on_rgb_input_give_the_released_logits():
    """The released model reads BGR; the converted one RGB: same logits (eval mode)."""
    torch.manual_seed(0)
    state = {
        k: (torch.randn_like(v) * 0.1 if v.is_floating_point() else v)
        for k, v in small_hrnet_state("hrnet_w48", contrast=False).items()
    }
    for k in state:
        if k.endswith("running_var"):
            state[k] = state[k].abs() + 0.5
    result = convert_state(state)
    cfg = ModelConfig.model_validate(result.model_config)
    converted = build_model(cfg, K, backbone_weights=False).eval()
    converted.load_state_dict(result.state)
    released = build_model(cfg, K, backbone_weights=False).eval()
    released.load_state_dict(
        {k: v for k, v in result.state.items()}
        | {LAYOUTS["hrnet_w48"].first_conv: result.state[LAYOUTS["hrnet_w48"].first_conv].flip(1)}
    )
    rgb = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a = converted(rgb)["seg"]
        b = released(rgb.flip(1))["seg"]  # same image in BGR order, unconverted first conv
    assert a.abs().max() > 0.01
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_file_converts_to_a_checkpoint_that_load_trained_model_loads(tmp_path, run_cli):
    from contrastseg.engine.checkpoint import FORMAT_VERSION
    from contrastseg.engine.inference import load_trained_model

    assert CHECKPOINT_FORMAT == FORMAT_VERSION
    state = small_hrnet_state("hrnet_w48_ocr", contrast=True)
    src = tmp_path / "hrnet_w48_ocr_contrast_max_performance.pth"
    wrapped = {"module." + k: v for k, v in state.items()}
    torch.save({"config_dict": {"network": {"model_name": "x"}}, "state_dict": wrapped}, src)
    out = tmp_path / "converted.pt"
    assert run_cli("convert", str(src), str(out)) == 0
    model, cfg, saved = load_trained_model(out)
    assert saved["class_names"][0] == "road" and len(saved["class_names"]) == K
    assert (cfg.model.head, cfg.model.head_variant) == ("ocr", "released")
    assert cfg.model.backbone.variant == "released"
    assert tuple(cfg.data.mean) == pytest.approx(HRNET_MEAN)
    assert tuple(cfg.data.std) == pytest.approx(HRNET_STD)
    assert saved["converted_from"]["layout"] == "hrnet_w48_ocr"
    assert saved["converted_from"]["dropped"] == [PROJECTION_REASON]
    own = model.state_dict()
    assert torch.equal(own["head.classifier.bias"], state["cls_head.bias"])
    assert torch.equal(own["head.aux_head.2.weight"], state["aux_head.2.weight"])


def test_eval_overrides_set_the_released_normalisation():
    for name, mean, std in (
        ("hrnet_w48", HRNET_MEAN, HRNET_STD),
        ("deeplab_v3", RESNET_MEAN, RESNET_STD),
    ):
        cfg = load_config(None, eval_overrides(LAYOUTS[name]))
        assert cfg.data.mean == pytest.approx(mean, rel=1e-5)
        assert cfg.data.std == pytest.approx(std, rel=1e-5)
    # (x / 255 - mean) / std of the ResNet layout is the released BGR x - 102.98 ... per channel
    x = torch.tensor([200.0, 100.0, 50.0])  # R, G, B
    ours = (x / 255 - torch.tensor(RESNET_MEAN)) / torch.tensor(RESNET_STD)
    released = x.flip(0) - torch.tensor([102.9801, 115.9465, 122.7717])  # B, G, R
    torch.testing.assert_close(ours, released.flip(0))


def test_hrnet_imagenet_weights_become_a_backbone_weights_file(tmp_path):
    import timm

    from contrastseg.models.backbones import load_backbone_weights

    classifier = timm.create_model("hrnet_w18_small", pretrained=False)
    state = {
        k: torch.full_like(v, i + 1) for i, (k, v) in enumerate(classifier.state_dict().items())
    }
    src = tmp_path / "hrnetv2_imagenet_pretrained.pth"
    torch.save(state, src)
    out = tmp_path / "backbone.pth"
    result = convert_file(src, out)
    assert result.layout.name == "hrnet_imagenet" and result.backbone == "hrnetv2_w18_small"
    heads = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.")
    assert set(result.dropped) == {k for k in state if k.startswith(heads)}
    assert set(result.dropped.values()) == {IMAGENET_REASON}
    backbone = TimmBackbone("hrnetv2_w18_small")
    load_backbone_weights(backbone, out)  # strict: every key, no other
    for k, v in backbone.body.state_dict().items():
        assert torch.equal(v, state[k]), k  # ImageNet weights stay RGB: nothing reversed


def test_unknown_layout_and_mismatches_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="unknown checkpoint layout"):
        detect_layout({"encoder.weight": torch.zeros(1)}, "x.pth")
    state = small_hrnet_state("hrnet_w48", contrast=False)
    bad = dict(state)
    bad["cls_head.0.weight"] = torch.zeros(240, 240, 1, 1)
    with pytest.raises(CheckpointError) as err:
        convert_state(bad, "x.pth")
    assert "x.pth" in str(err.value) and "cls_head.0.weight" in str(err.value)
    extra = dict(state) | {"cls_head.9.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"cls_head\.9\.weight"):
        convert_state(extra, "x.pth")
    missing = {k: v for k, v in state.items() if k != "cls_head.0.bias"}
    with pytest.raises(CheckpointError, match=r"head\.block\.0\.bias"):
        convert_state(missing, "x.pth")
    # batch-norm counters absent from an old file are filled (and said so), nothing else
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    result = convert_state(old, "x.pth")
    assert result.filled and all(k.endswith("num_batches_tracked") for k in result.filled)
    # 60 classes: not a Cityscapes model
    other = {k: v for k, v in state.items()} | {"cls_head.3.weight": torch.zeros(60, 240, 1, 1)}
    path = tmp_path / "context.pth"
    torch.save({"state_dict": other}, path)
    with pytest.raises(CheckpointError, match="60 classes"):
        convert_file(path, tmp_path / "out.pt")
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="context.pth"):
        convert_file(path, tmp_path / "out.pt")
    with pytest.raises(CheckpointError, match="not found"):
        convert_file(tmp_path / "absent.pth", tmp_path / "out.pt")
