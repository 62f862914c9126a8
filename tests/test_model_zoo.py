"""The model zoo of Table 1: every architecture builds, trains, evaluates; sizes match the papers.

Parameter counts and FLOPs are taken on the ``meta`` device (no memory, no compute), so even
HRNetV2-W48 and ResNet-101 cost a fraction of a second there; real forward/backward passes use
tiny inputs.
"""

from pathlib import Path
from unittest import mock

import pytest
import torch

from contrastseg.config import ModelConfig, load_config
from contrastseg.contrast import PixelContrast
from contrastseg.errors import CheckpointError, ConfigError
from contrastseg.model_table import OTHER_SEGMENTERS, TABLE1
from contrastseg.models import InferenceModel, build_model, count_parameters
from contrastseg.models.backbones import TimmBackbone, load_backbone_weights
from contrastseg.models.summary import (
    architectures,
    format_models,
    format_summary,
    list_models,
    summarize,
)

CONFIGS = Path(__file__).parents[1] / "configs" / "cityscapes"
NUM_CLASSES = 5


@pytest.fixture(autouse=True)
def _few_threads():
    """One thread: these tiny convolutions gain nothing from more, and on a busy machine the
    thread pool's waiting makes them many times slower (overrides the conftest fixture)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model_cfg(backbone: str, head: str, **kw) -> ModelConfig:
    return ModelConfig.model_validate({"backbone": {"name": backbone}, "head": head, **kw})


def meta_model(backbone: str, head: str, num_classes: int = 19, **kw):
    with torch.device("meta"):
        return build_model(model_cfg(backbone, head, **kw), num_classes)


# (backbone, head, stride of seg, aux expected): the seven rows of Table 1 and the small HRNet
# of the demo.
ZOO = [
    ("mobilenetv1", "deeplabv3", 8, True),
    ("mobilenetv2", "deeplabv3", 8, True),
    ("mobilenetv3_large", "deeplabv3", 8, True),
    ("hrnetv2_w18_small", "hrnetv2", 4, False),
    ("hrnetv2_w18_small", "ocr", 4, True),
    ("resnet101_deep", "deeplabv3", 8, True),
    ("resnet101_deep", "ocr", 8, True),
    ("hrnetv2_w48", "hrnetv2", 4, False),
    ("hrnetv2_w48", "ocr", 4, True),
]


@pytest.mark.parametrize(
    ("backbone", "head", "stride", "has_aux"), ZOO, ids=[f"{h}-{b}" for b, h, *_ in ZOO]
)
def test_architecture_trains_and_infers(backbone, head, stride, has_aux):
    size = (64, 128)
    torch.manual_seed(0)
    model = build_model(model_cfg(backbone, head), NUM_CLASSES).train()
    contrast = PixelContrast(NUM_CLASSES, model.feature_channels)
    assert model.output_stride == stride
    h, w = size[0] // stride, size[1] // stride
    out = model(torch.randn(2, 3, *size))
    assert set(out) == {"seg", "features"} | ({"aux"} if has_aux else set())
    assert out["seg"].shape == (2, NUM_CLASSES, h, w)
    embed = contrast.projection(out["features"])
    assert embed.shape == (2, 256, h, w)  # on the grid of seg
    if has_aux:
        assert out["aux"].shape == (2, NUM_CLASSES, h, w)
    norms = embed.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-4)
    (sum(v.mean() for k, v in out.items() if k != "features") + embed.mean()).backward()
    # every parameter takes part in the training graph (DDP without find_unused_parameters)
    named = [*model.named_parameters(), *contrast.named_parameters()]
    unused = [n for n, p in named if p.grad is None]
    assert not unused, unused[:5]

    model.eval()
    called = []
    if model.aux is not None:
        model.aux.register_forward_hook(lambda *a: called.append("aux"))
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        seg = model(x)
        logits = InferenceModel(model)(x)
    assert list(seg) == ["seg"] and called == []
    assert seg["seg"].shape == (2, NUM_CLASSES, h, w)
    assert logits.shape == (2, NUM_CLASSES, *size)
    up = torch.nn.functional.interpolate(seg["seg"], size=size, mode="bilinear")
    assert torch.allclose(logits, up, atol=1e-5)


def test_hrnet_backbones_expose_raw_branches():
    with torch.device("meta"):
        w48 = TimmBackbone("hrnetv2_w48")
        small = TimmBackbone("hrnetv2_w18_small")
    assert w48.channels == [48, 96, 192, 384] and w48.strides == [4, 8, 16, 32]
    assert small.channels == [16, 32, 64, 128] and small.strides == [4, 8, 16, 32]
    assert not any("incre" in k or "classifier" in k for k in w48.state_dict())


def test_resnet101_deep_stem_is_three_3x3_convolutions():
    with torch.device("meta"):
        deep = TimmBackbone("resnet101_deep")
        plain = TimmBackbone("resnet101")
    stem = [m for m in deep.body.conv1.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [m.kernel_size for m in stem] == [(3, 3)] * 3
    assert [m.out_channels for m in stem] == [64, 64, 128]
    assert plain.body.conv1.kernel_size == (7, 7)
    assert deep.strides[-1] == 8 and deep.channels[-2:] == [1024, 2048]


@pytest.mark.parametrize(
    ("backbone", "head", "channels"),
    [
        ("hrnetv2_w48", "hrnetv2", 720),
        ("hrnetv2_w48", "ocr", 720),
        ("resnet101_deep", "deeplabv3", 2048),
        ("resnet101_deep", "ocr", 2048),
        ("mobilenetv2", "deeplabv3", 320),
    ],
)
def test_projection_reads_the_decoder_input(backbone, head, channels):
    model = meta_model(backbone, head)
    assert model.feature_channels == channels
    assert PixelContrast(19, model.feature_channels).projection.net[0].in_channels == channels


@pytest.mark.parametrize(
    ("backbone", "head", "published"),
    [
        ("hrnetv2_w48", "hrnetv2", 65.9e6),  # HRNetV2-W48, 19 classes (HRNet paper)
        ("resnet101", "deeplabv3", 58.6e6),  # torchvision deeplabv3_resnet101 without aux head
        ("resnet101_deep", "deeplabv3", 58.6e6),  # same with the deep stem (+0.1M)
        ("hrnetv2_w48", "ocr", 70.3e6),  # HRNetV2-W48 + OCR (HRNet-OCR release)
    ],
)
def test_compact_parameter_counts_match_published(backbone, head, published):
    model = meta_model(backbone, head, head_variant="compact")
    params = count_parameters(InferenceModel(model))
    assert abs(params - published) / published < 0.02, params
    assert count_parameters(model) >= params  # training adds the aux head where there is one


# The released networks as the authors' code builds them (lib/models/nets/hrnet.py HRNet_W48 /
# HRNet_W48_OCR, deeplab.py DeepLabV3 with DeepLabHead, ocrnet.py SpatialOCRNet; 19 classes,
# projection head left out): parameters of the whole network (auxiliary heads included) and of
# the inference graph.
RELEASED = [
    ("hrnetv2_w48", "hrnetv2", 70_006_560, 70_006_560),
    ("hrnetv2_w48", "ocr", 74_522_182, 74_522_182),
    ("resnet101_deep", "deeplabv3", 89_570_278, 87_205_331),  # layer_dsn: 2_364_947
    ("resnet101_deep", "ocr", 57_988_838, 57_988_838),
]


@pytest.mark.parametrize(("backbone", "head", "total", "inference"), RELEASED)
def test_released_parameter_counts_are_the_authors_networks(backbone, head, total, inference):
    model = meta_model(backbone, head)  # head_variant: released (the default)
    assert count_parameters(model) == total
    assert count_parameters(InferenceModel(model)) == inference
    backbone_params = {"hrnetv2_w48": 65_325_120, "resnet101_deep": 42_623_936}[backbone]
    assert count_parameters(model.backbone) == backbone_params  # openseg's backbones exactly


def shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items() if "running" not in k}


def test_released_hrnetv2_head_layers():
    head = meta_model("hrnetv2_w48", "hrnetv2").head
    # cls_head: Conv2d(720, 720, 3, padding=1) (bias), BNReLU(720), Dropout2d(0.1),
    # Conv2d(720, 19, 1, bias=False)
    assert shapes(head) == {
        "block.0.weight": (720, 720, 3, 3),
        "block.0.bias": (720,),
        "block.1.weight": (720,),
        "block.1.bias": (720,),
        "block.1.num_batches_tracked": (),
        "classifier.weight": (19, 720, 1, 1),
    }
    assert head.block[0].padding == (1, 1) and head.dropout.p == 0.1
    assert head.align_corners  # the branches are upsampled with align_corners=True
    compact = meta_model("hrnetv2_w48", "hrnetv2", head_variant="compact").head
    assert compact.block[0].kernel_size == (1, 1) and compact.classifier.bias is not None
    assert isinstance(compact.dropout, torch.nn.Identity) and not compact.align_corners


def test_released_deeplabv3_head_layers():
    model = meta_model("resnet101_deep", "deeplabv3")
    head = model.head
    # ASPPModule(2048, 512): four branches (1x1, 3x3 at 12/24/36) and pooling, no conv bias;
    # project: 3x3 conv 2560 -> 512, BNReLU; refine: 3x3 conv, BN (no ReLU), 1x1 classifier
    assert [tuple(b[0].weight.shape) for b in head.aspp.branches[:4]] == [
        (512, 2048, 1, 1),
        *[(512, 2048, 3, 3)] * 3,
    ]
    assert [b[0].dilation for b in head.aspp.branches[1:4]] == [(12, 12), (24, 24), (36, 36)]
    assert tuple(head.aspp.branches[4].proj[0].weight.shape) == (512, 2048, 1, 1)
    assert tuple(head.aspp.project[0].weight.shape) == (512, 2560, 3, 3)
    assert all(m.bias is None for m in head.aspp.modules() if isinstance(m, torch.nn.Conv2d))
    assert [type(m).__name__ for m in head.bottleneck] == ["Conv2d", "BatchNorm2d"]
    assert head.bottleneck[0].bias is None and tuple(head.bottleneck[0].weight.shape) == (
        512,
        512,
        3,
        3,
    )
    assert isinstance(head.dropout, torch.nn.Identity)
    assert shapes(head.classifier) == {"weight": (19, 512, 1, 1), "bias": (19,)}
    # layer_dsn on layer 3: Conv2d(1024, 256, 3) with bias, BNReLU, Conv2d(256, 19, 1); no dropout
    aux = model.aux
    assert shapes(aux.block[0]) == {"weight": (256, 1024, 3, 3), "bias": (256,)}
    assert isinstance(aux.dropout, torch.nn.Identity)
    assert shapes(aux.classifier) == {"weight": (19, 256, 1, 1), "bias": (19,)}


@pytest.mark.parametrize(("backbone", "width", "aux_kernel"), [("hrnetv2_w48", 720, 3)])
def test_released_ocr_head_layers_on_hrnet(backbone, width, aux_kernel):
    head = meta_model(backbone, "ocr").head
    # aux_head: Conv2d(720, 720, 3) (bias), BNReLU, Conv2d(720, 19, 1) (bias); conv3x3: 720 ->
    # 512 with bias; SpatialOCR_Module(512, 256, 512): every 1x1 conv with bias; cls_head 512->19
    assert shapes(head.aux_head[0][0]) == {
        "weight": (width, width, aux_kernel, aux_kernel),
        "bias": (width,),
    }
    assert isinstance(head.aux_head[1], torch.nn.Identity)  # no dropout on HRNet
    assert shapes(head.aux_head[2]) == {"weight": (19, width, 1, 1), "bias": (19,)}
    assert shapes(head.pixel[0]) == {"weight": (512, width, 3, 3), "bias": (512,)}
    convs = [m for m in head.relation.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [tuple(c.weight.shape) for c in convs] == [
        (256, 512, 1, 1),
        (256, 256, 1, 1),
        (256, 512, 1, 1),
        (256, 256, 1, 1),
        (256, 512, 1, 1),
        (512, 256, 1, 1),
    ]
    assert all(c.bias is not None for c in convs)
    assert shapes(head.augment[0]) == {"weight": (512, 1024, 1, 1), "bias": (512,)}
    assert head.dropout.p == 0.05
    assert shapes(head.classifier) == {"weight": (19, 512, 1, 1), "bias": (19,)}


def test_released_ocr_head_layers_on_resnet():
    head = meta_model("resnet101_deep", "ocr").head
    # dsn_head: Conv2d(1024, 512, 3) (bias), BNReLU, Dropout2d(0.05), Conv2d(512, 19, 1)
    assert shapes(head.aux_head[0][0]) == {"weight": (512, 1024, 3, 3), "bias": (512,)}
    assert head.aux_head[1].p == 0.05
    assert shapes(head.aux_head[2]) == {"weight": (19, 512, 1, 1), "bias": (19,)}
    assert shapes(head.pixel[0]) == {"weight": (512, 2048, 3, 3), "bias": (512,)}
    compact = meta_model("resnet101_deep", "ocr", head_variant="compact").head
    assert compact.pixel[0].bias is None and len(compact.aux_head) == 2


def test_released_backbone_variant_switches_upsampling_and_pooling():
    with torch.device("meta"):
        hr = TimmBackbone("hrnetv2_w18_small", variant="released")
        resnet = TimmBackbone("resnet101_deep", variant="released")
        plain = TimmBackbone("resnet101_deep")
    ups = [m for m in hr.body.modules() if isinstance(m, torch.nn.Upsample)]
    assert ups and all(m.mode == "bilinear" and m.align_corners for m in ups)
    assert resnet.body.maxpool.ceil_mode and not plain.body.maxpool.ceil_mode
    # the released max-pool: 64x64 -> stem 32x32 -> 17x17 (timm: 16x16) -> 9x9 at stride 8
    small = TimmBackbone("resnet101", variant="released")
    assert [f.shape[-1] for f in small(torch.randn(1, 3, 64, 64))][1:] == [17, 9, 9, 9]
    with pytest.raises(ConfigError, match="model.backbone.variant"):
        TimmBackbone("resnet101", variant="openseg")


def test_summary_flops_scale_with_pixels_and_training_costs_more():
    cfg = model_cfg("hrnetv2_w18_small", "hrnetv2")
    small = summarize(cfg, 19, (64, 128))
    large = summarize(cfg, 19, (128, 256))
    assert large["flops_inference"] == 4 * small["flops_inference"]  # no image pooling
    assert small["flops_training"] > small["flops_inference"] > 0
    assert small["params_training"] > small["params_inference"]
    text = format_summary(small)
    assert "FLOPs at 64x128" in text and "GMACs" in text


def test_models_lists_every_architecture():
    pairs = architectures()
    # 6 dilated backbones (deeplabv3, pspnet, deeplabv3plus), 2 HRNets (hrnetv2), all 8 (ocr,
    # upernet), and UPerNet on timm:convnext_tiny
    assert len(pairs) == 3 * 6 + 2 + 2 * 8 + 1
    assert set(TABLE1.values()) | set(OTHER_SEGMENTERS.values()) <= set(pairs)
    text = format_models(list_models())
    for backbone, head in pairs:
        assert backbone in text and head in text
    for stem in TABLE1:
        assert stem in text


def table1_configs():
    paths = sorted(CONFIGS.glob("*_ce.yaml")) + sorted(CONFIGS.glob("*_contrast.yaml"))
    stems = {p.name.rsplit("_", 1)[0] for p in paths}
    # the other segmenters' configs follow their own references (tests/test_new_heads.py)
    assert stems == set(TABLE1) | set(OTHER_SEGMENTERS)
    return [p for p in paths if p.name.rsplit("_", 1)[0] in TABLE1]


def test_every_table1_config_loads_and_builds():
    paths = table1_configs()
    stems = {p.name.rsplit("_", 1)[0] for p in paths}
    assert stems == set(TABLE1) and len(paths) == 14
    for path in paths:
        cfg = load_config(path, ["model.backbone.pretrained=false"])
        backbone, head = TABLE1[path.name.rsplit("_", 1)[0]]
        assert (cfg.model.backbone.name, cfg.model.head) == (backbone, head)
        # the released layouts: heads, HRNet fuse upsampling / ResNet stem pooling, ASPP 512
        assert (cfg.model.head_variant, cfg.model.backbone.variant) == ("released", "released")
        if head == "deeplabv3":
            assert cfg.model.head_channels == 512
        assert cfg.train.iters == 80000
        assert cfg.train.batch_size == (16 if "mobilenet" in path.name else 8)
        contrast = cfg.loss.contrast
        assert contrast.enabled == path.name.endswith("_contrast.yaml")
        if contrast.enabled:
            assert (contrast.weight, contrast.warmup_iters, contrast.temperature) == (
                0.1,
                5000,
                0.1,
            )
            assert contrast.memory.enabled and contrast.memory.sampling == "all"
            assert contrast.memory.pixel_size == contrast.memory.region_size == 5000
        with torch.device("meta"):
            model = build_model(cfg.model, 19)
            if contrast.enabled:
                module = PixelContrast.from_config(contrast, cfg.model, 19, model.feature_channels)
                assert module.memory is not None and module.warmup_iters == 5000


@pytest.mark.parametrize(
    ("overrides", "keys"),
    [
        (["model.head=hrnetv2"], ["model.head", "model.backbone.name"]),
        (["model.backbone.name=hrnetv2_w48"], ["model.head", "model.backbone.name"]),
        (
            ["model.backbone.pretrained=true", "model.backbone.weights=/x.pth"],
            ["model.backbone.pretrained", "model.backbone.weights"],
        ),
        (
            [
                "model.backbone.name=hrnetv2_w48",
                "model.head=ocr",
                "model.backbone.output_stride=16",
            ],
            ["model.backbone.output_stride"],
        ),
    ],
)
def test_impossible_combinations_are_refused(overrides, keys):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert all(k in str(err.value) for k in keys)


def test_pretrained_without_network_says_what_to_do():
    import timm

    real = timm.create_model

    def offline(name, pretrained=False, **kw):
        if pretrained:
            raise OSError("no network")
        return real(name, pretrained=False, **kw)

    cfg = ModelConfig.model_validate(
        {"backbone": {"name": "hrnetv2_w18_small", "pretrained": True}, "head": "hrnetv2"}
    )
    with mock.patch("contrastseg.models.backbones.timm.create_model", side_effect=offline) as fn:
        with pytest.raises(CheckpointError) as err:
            build_model(cfg, 3)
        assert fn.call_args.kwargs["pretrained"] is True
        # a checkpoint will be loaded over the model: no network needed
        build_model(cfg, 3, backbone_weights=False)
        assert summarize(cfg, 3, (64, 64))["params_inference"] > 0
        cfg.backbone.pretrained = False
        build_model(cfg, 3)  # random init needs no network
    assert "model.backbone.weights" in str(err.value) and "no network" in str(err.value)


def test_hrnet_classification_checkpoint_loads_and_mismatch_stops(tmp_path):
    import timm
    from safetensors.torch import save_file

    classifier = timm.create_model("hrnet_w18_small", pretrained=False)
    state = {
        k: torch.full_like(v, 0.25) if v.is_floating_point() else v
        for k, v in classifier.state_dict().items()
    }
    path = tmp_path / "hrnet_w18_small.safetensors"
    save_file(state, str(path))
    backbone = TimmBackbone("hrnetv2_w18_small")
    load_backbone_weights(backbone, path)  # incre/downsample/final/classifier keys are dropped
    assert all(
        torch.all(v == 0.25)
        for k, v in backbone.body.state_dict().items()
        if v.is_floating_point() and not k.endswith("num_batches_tracked")
    )
    # a ResNet checkpoint does not fit: the error lists keys and stops, unless strict is off
    state = {k: v for k, v in state.items() if not k.startswith("stage4")}
    state["layer9.weight"] = torch.zeros(1)
    save_file(state, str(path))
    with pytest.raises(CheckpointError) as err:
        load_backbone_weights(backbone, path)
    assert "stage4" in str(err.value) and "layer9.weight" in str(err.value)
    assert "strict: false" in str(err.value)
    load_backbone_weights(backbone, path, strict=False)


def test_ocr_on_a_backbone_whose_last_two_stages_differ_in_stride():
    # MobileNet V2 at output stride 32: region head at stride 16, pixel features at stride 32
    cfg = ModelConfig.model_validate(
        {"backbone": {"name": "mobilenetv2", "output_stride": 32}, "head": "ocr"}
    )
    model = build_model(cfg, NUM_CLASSES).train()
    out = model(torch.randn(2, 3, 64, 128))
    assert model.output_stride == 32
    assert out["seg"].shape == (2, NUM_CLASSES, 2, 4) and out["features"].shape[-2:] == (2, 4)
    assert out["aux"].shape == (2, NUM_CLASSES, 4, 8)
