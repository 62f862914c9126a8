"""PSPNet, DeepLabV3+ and UPerNet: each builds, runs at odd input sizes, gives pixel contrast the
map its classifier reads, trains with and without contrast, exports (ONNX and TorchScript equal
to PyTorch), and has the parameters of its reference layout, counted here layer by layer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
import torch.nn.functional as F

from contrastseg import export_checkpoint, train
from contrastseg.benchmarks.train_step import format_table1, run_table1_benchmark
from contrastseg.config import ModelConfig, load_config, save_config
from contrastseg.contrast import PixelContrast
from contrastseg.engine import checkpoint as ckpt
from contrastseg.engine.inference import load_trained_model
from contrastseg.errors import ConfigError
from contrastseg.model_table import HEADS, OTHER_SEGMENTERS
from contrastseg.models import InferenceModel, build_model, count_parameters
from contrastseg.models.pyramid_pooling import adaptive_avg_pool
from contrastseg.models.summary import format_models, list_models, summarize
from contrastseg.report import format_markdown
from contrastseg.rundir import load_runs
from test_model_zoo import _few_threads, model_cfg  # noqa: F401  (autouse fixture)
from tiny import SMALL_CONTRAST, zoo_run_overrides

CONFIGS = Path(__file__).parents[1] / "configs" / "cityscapes"
NUM_CLASSES = 5


# ------------------------------------------------ the reference layouts, one layer at a time
def conv(cin: int, cout: int, k: int = 1, groups: int = 1, bias: bool = False) -> int:
    return cout * (cin // groups) * k * k + (cout if bias else 0)


def bn(c: int) -> int:
    return 2 * c  # weight and bias


def cbr(cin: int, cout: int, k: int = 1) -> int:
    """conv without bias -> BN -> ReLU."""
    return conv(cin, cout, k) + bn(cout)


def separable(cin: int, cout: int) -> int:
    """depthwise 3x3 -> BN -> ReLU -> pointwise 1x1 -> BN -> ReLU (TF DeepLab's split form)."""
    return conv(cin, cin, 3, groups=cin) + bn(cin) + cbr(cin, cout)


def classifier(cin: int, classes: int) -> int:
    return conv(cin, classes, bias=True)


def fcn_aux(cin: int, classes: int, width: int = 256) -> int:
    """3x3 conv-BN-ReLU, dropout, classifier (PSPNet's aux, mmsegmentation's FCNHead)."""
    return cbr(cin, width, 3) + classifier(width, classes)


def psp_head(cin: int, classes: int, width: int = 512, bins: int = 4) -> int:
    """semseg's PPM (cin / bins wide per bin) and cls (3x3 on 2 cin, dropout, classifier)."""
    return bins * cbr(cin, cin // bins) + cbr(2 * cin, width, 3) + classifier(width, classes)


def deeplabv3plus_head(cin: int, low: int, classes: int, width: int = 256) -> int:
    """TF DeepLab: image pooling + 1x1 + three separable atrous branches, 1x1 projection of the
    five; decoder: 48-channel projection of the stride-4 map, two separable 3x3; logits."""
    aspp = 2 * cbr(cin, width) + 3 * separable(cin, width) + cbr(5 * width, width)
    decoder = cbr(low, 48) + separable(width + 48, width) + separable(width, width)
    return aspp + decoder + classifier(width, classes)


def upernet_head(chans: list[int], classes: int, width: int = 512, bins: int = 4) -> int:
    """mmsegmentation's UPerHead: PPM + 3x3 bottleneck on the last stage, 1x1 laterals and 3x3
    FPN convs on the others, 3x3 fusion of all levels, classifier."""
    ppm = bins * cbr(chans[-1], width) + cbr(chans[-1] + bins * width, width, 3)
    fpn = sum(cbr(c, width) for c in chans[:-1]) + len(chans[:-1]) * cbr(width, width, 3)
    return ppm + fpn + cbr(len(chans) * width, width, 3) + classifier(width, classes)


def deep_base_resnet101() -> int:
    """The deep-base ResNet-101 of PSPNet's code (and openseg): three 3x3 stem convs 64-64-128
    with BN, bottlenecks (1x1, 3x3, 1x1, each + BN) in stages of 3/4/23/3, a 1x1 + BN
    projection on the first block of each stage."""
    n = cbr(3, 64, 3) + cbr(64, 64, 3) + cbr(64, 128, 3)
    cin = 128
    for planes, blocks in zip((64, 128, 256, 512), (3, 4, 23, 3), strict=True):
        for block in range(blocks):
            n += cbr(cin, planes) + cbr(planes, planes, 3) + cbr(planes, 4 * planes)
            if block == 0:
                n += cbr(cin, 4 * planes)
            cin = 4 * planes
    return n


def timm_without_classifier(name: str, head_prefix: str) -> int:
    """The ImageNet model of timm, its classifier (``head_prefix``) left out."""
    with torch.device("meta"):
        model = timm.create_model(name)
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(head_prefix))


def counts(cfg: ModelConfig, classes: int = 19) -> tuple[int, int, int]:
    """(backbone, inference model, auxiliary head) parameters of our model."""
    with torch.device("meta"):
        model = build_model(cfg, classes, backbone_weights=False)
    aux = count_parameters(model.aux) if model.aux is not None else 0
    return count_parameters(model.backbone), count_parameters(InferenceModel(model)), aux


def test_pspnet_on_d_resnet101_has_the_reference_parameters():
    cfg = load_config(CONFIGS / "pspnet_resnet101_ce.yaml", ["model.backbone.pretrained=false"])
    backbone, inference, aux = counts(cfg.model)
    assert backbone == deep_base_resnet101()
    assert inference == deep_base_resnet101() + psp_head(2048, 19)
    assert aux == fcn_aux(1024, 19)


def test_deeplabv3plus_on_xception71_has_the_reference_parameters():
    cfg = load_config(
        CONFIGS / "deeplabv3plus_xception71_ce.yaml", ["model.backbone.pretrained=false"]
    )
    backbone, inference, aux = counts(cfg.model)
    assert backbone == timm_without_classifier("xception71", "head.")
    assert inference == backbone + deeplabv3plus_head(2048, 256, 19)
    assert aux == 0  # the reference has no auxiliary head


def test_upernet_on_convnext_tiny_has_the_reference_parameters():
    cfg = load_config(
        CONFIGS / "upernet_convnext_tiny_ce.yaml", ["model.backbone.pretrained=false"]
    )
    backbone, inference, aux = counts(cfg.model)
    # timm's features leave out the classifier and its LayerNorm (head.norm)
    assert backbone == timm_without_classifier("convnext_tiny", "head.")
    assert inference == backbone + upernet_head([96, 192, 384, 768], 19)
    assert aux == fcn_aux(384, 19)


def test_pyramid_pooling_matches_adaptive_average_pooling():
    gen = torch.Generator().manual_seed(0)
    for size in [(13, 17), (7, 9), (1, 1), (2, 5), (25, 33)]:
        x = torch.randn(2, 3, *size, generator=gen, dtype=torch.float64)
        for bins in (1, 2, 3, 6):
            torch.testing.assert_close(adaptive_avg_pool(x, bins), F.adaptive_avg_pool2d(x, bins))


# ------------------------------------------------------------------ odd sizes, contrast map
# (backbone, head, seg stride, auxiliary head, extra config)
ODD = [
    ("mobilenetv3_large", "pspnet", 8, True, {}),
    ("mobilenetv3_large", "deeplabv3plus", 4, False, {}),
    ("timm:resnet50d", "deeplabv3plus", 4, False, {"backbone": {"output_stride": 8}}),
    ("timm:convnext_tiny", "upernet", 4, True, {}),
    ("timm:swin_tiny_patch4_window7_224", "upernet", 4, True, {}),
    ("timm:resnet50d", "upernet", 4, True, {}),
    ("hrnetv2_w18_small", "upernet", 4, True, {}),
]


@pytest.mark.parametrize(
    ("backbone", "head", "stride", "has_aux", "extra"),
    ODD,
    ids=[f"{h}-{b}" for b, h, *_ in ODD],
)
def test_head_runs_at_odd_sizes_and_contrast_reads_the_classifier_input(
    backbone, head, stride, has_aux, extra
):
    torch.manual_seed(0)
    extra = dict(extra)
    bcfg = {"name": backbone, **extra.pop("backbone", {})}
    cfg = ModelConfig.model_validate({"backbone": bcfg, "head": head, "head_channels": 32, **extra})
    model = build_model(cfg, NUM_CLASSES).train()
    assert model.output_stride == stride and model.feature_channels == 32
    x = torch.randn(2, 3, 97, 131)
    out = model(x)
    assert set(out) == {"seg", "features"} | ({"aux"} if has_aux else set())
    h, w = out["seg"].shape[2:]
    assert abs(h - 97 / stride) <= 1 and abs(w - 131 / stride) <= 1
    assert out["features"].shape == (2, 32, h, w)  # on the grid of seg
    contrast = PixelContrast(NUM_CLASSES, model.feature_channels, dim=16)
    embed = contrast.projection(out["features"])
    (sum(v.float().mean() for k, v in out.items() if k != "features") + embed.mean()).backward()
    named = [*model.named_parameters(), *contrast.named_parameters()]
    assert not [n for n, p in named if p.grad is None]  # DDP without find_unused_parameters

    model.eval()
    seen = []
    model.head.classifier.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        decoded = model.head(model.backbone(x))
        logits = InferenceModel(model)(x)
    assert torch.equal(decoded["features"], seen[0])  # the map the classifier reads
    assert logits.shape == (2, NUM_CLASSES, 97, 131)


def test_xception71_and_resnet101_heads_run_at_a_small_odd_size():
    x = torch.randn(1, 3, 65, 97)
    for backbone, head, grid in [
        ("xception71", "deeplabv3plus", (17, 25)),
        ("resnet101_deep", "pspnet", (9, 13)),
    ]:
        model = build_model(model_cfg(backbone, head), NUM_CLASSES).eval()
        with torch.no_grad():
            seg = model(x)["seg"]
        assert seg.shape == (1, NUM_CLASSES, *grid)


# ------------------------------------------------------------------------ configuration
def test_head_defaults_follow_the_references():
    plus = model_cfg("mobilenetv2", "deeplabv3plus")
    assert (plus.backbone.output_stride, plus.aspp_rates, plus.aux) == (16, (6, 12, 18), False)
    plus8 = ModelConfig.model_validate(
        {"backbone": {"name": "mobilenetv2", "output_stride": 8}, "head": "deeplabv3plus"}
    )
    assert plus8.aspp_rates == (12, 24, 36)
    uper = model_cfg("timm:resnet50d", "upernet")
    assert uper.backbone.output_stride == 32 and uper.aux
    assert model_cfg("hrnetv2_w48", "upernet").backbone.output_stride == 8
    psp = model_cfg("resnet101_deep", "pspnet")
    assert (psp.backbone.output_stride, psp.ppm_bins, psp.aux) == (8, (1, 2, 3, 6), True)


def test_bad_combinations_are_config_errors_naming_the_field():
    with pytest.raises(ConfigError, match="model.head = 'pspnet' needs a dilatable backbone"):
        load_config(None, ["model.head=pspnet", "model.backbone.name=hrnetv2_w48"])
    with pytest.raises(ConfigError, match="model.ppm_bins"):
        load_config(None, ["model.head=pspnet", "model.ppm_bins=[1, 1]"])
    with pytest.raises(ConfigError, match="model.head.*upernet"):
        load_config(None, ["model.head=uper"])
    swin = "timm:swin_tiny_patch4_window7_224"
    with pytest.raises(ConfigError, match="model.backbone.output_stride = 16.*set model.backbone"):
        build_model(model_cfg(swin, "deeplabv3plus"), 5, backbone_weights=False)
    with pytest.raises(ConfigError, match="model.head = 'pspnet' needs a dilated backbone"):
        build_model(model_cfg(swin, "pspnet"), 5, backbone_weights=False)
    with pytest.raises(ConfigError, match="needs a backbone with a stride-4 stage"):
        build_model(model_cfg("timm:vit_tiny_patch16_224", "deeplabv3plus"), 5)


def test_models_summary_and_report_name_the_new_heads(tmp_path):
    text = format_models(list_models())
    for stem, (backbone, head) in OTHER_SEGMENTERS.items():
        assert stem in text and head in text and backbone in text
    paper = load_config(CONFIGS / "deeplabv3_resnet101_contrast.yaml").loss.contrast
    checked = 0
    for path in sorted(CONFIGS.glob("*.yaml")):
        stem, _, kind = path.stem.rpartition("_")
        if stem in OTHER_SEGMENTERS:
            cfg = load_config(path, ["model.backbone.pretrained=false"])
            assert (cfg.model.backbone.name, cfg.model.head) == OTHER_SEGMENTERS[stem]
            # the _contrast files add the paper's Cityscapes pixel contrast, the _ce files none
            assert cfg.loss.contrast.enabled == (kind == "contrast")
            if kind == "contrast":
                assert cfg.loss.contrast == paper
            row = summarize(cfg.model, 19, (128, 256))
            assert row["flops_training"] > row["flops_inference"] > 0
            checked += 1
    assert checked == 2 * len(OTHER_SEGMENTERS)

    runs = []
    for i, (stem, miou) in enumerate(
        [
            ("pspnet_resnet101", 0.5),
            ("deeplabv3plus_xception71", 0.6),
            ("upernet_convnext_tiny", 0.7),
        ]
    ):
        for kind, gain in (("ce", 0.0), ("contrast", 0.01)):
            run = tmp_path / f"{stem}_{kind}"
            save_config(load_config(CONFIGS / f"{stem}_{kind}.yaml"), run / "config.yaml")
            (run / "metrics.jsonl").write_text("")
            record = {"mIoU": miou + gain + i / 1000, "pixel_acc": 0.9, "iteration": 8}
            (run / "eval.json").write_text(json.dumps(record))
            runs.append(run)
    table = format_markdown(load_runs(runs), "1")
    for head in ("pspnet", "deeplabv3plus", "upernet"):
        assert f"| {HEADS[head]} " in table and f"| {HEADS[head]} + Ours " in table
    assert "D-Xception-71" in table and "D-ResNet-101" in table and "(+1.00)" in table


# ---------------------------------------------- training with and without contrast, export
# timm's ResNet-18: the ONNX exporter's time grows with the graph (the heads on ConvNeXt-T and
# MobileNetV3 run at odd sizes above)
TRAIN = [
    ("pspnet", "timm:resnet18"),
    ("deeplabv3plus", "timm:resnet18"),
    ("upernet", "timm:resnet18"),
]


@pytest.mark.parametrize(("head", "backbone"), TRAIN, ids=[h for h, _ in TRAIN])
def test_head_trains_with_and_without_contrast_and_exports(tmp_path, head, backbone):
    common = zoo_run_overrides(tmp_path, head, backbone)
    logs = {}
    for contrast in (False, True):
        extra = [*SMALL_CONTRAST, "loss.contrast.memory.enabled=false"] if contrast else []
        name = "contrast" if contrast else "ce"
        cfg = load_config(None, [*common, *extra, f"output.name={name}"])
        result = train(cfg, progress=False)
        lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
        logs[contrast] = [json.loads(line) for line in lines]
    assert all("contrast" not in r for r in logs[False])
    assert all(r["contrast"] > 0 and np.isfinite(r["total"]) for r in logs[True])
    assert len(logs[True]) == len(logs[False]) == 2

    path = ckpt.list_checkpoints(tmp_path / "contrast" / "checkpoints")[-1]
    segmentor, _, _ = load_trained_model(path)
    net = InferenceModel(segmentor).eval()
    x = torch.randn(1, 3, 65, 97, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = net(x).numpy()
    onnx_file = export_checkpoint(path, tmp_path / "m.onnx", format="onnx").model
    sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert got.shape == ref.shape and ref.shape[2:] == (65, 97)
    assert np.abs(got - ref).max() < 1e-3
    scripted = export_checkpoint(path, tmp_path / "m.torchscript.pt", format="torchscript")
    with torch.no_grad():
        got_ts = torch.jit.load(str(scripted.model))(x).numpy()
    assert np.abs(got_ts - ref).max() < 1e-4


# ------------------------------------------------------------------------- bench train
def test_bench_train_has_a_row_per_new_head(tmp_path):
    """The rows of ``bench train`` for the new configs, on small stand-ins of the same names."""
    for stem, (_, head) in OTHER_SEGMENTERS.items():
        backbone = "timm:convnext_tiny" if head == "upernet" else "mobilenetv3_large"
        text = "\n".join(
            [
                f"model: {{head: {head}, backbone: {{name: '{backbone}'}}, head_channels: 16,",
                "        aux_channels: 8, projection_dim: 16}",
                "loss: {contrast: {enabled: true, max_views: 4, memory: {enabled: false}}}",
            ]
        )
        (tmp_path / f"{stem}_contrast.yaml").write_text(text)
    rows = run_table1_benchmark(tmp_path, list(OTHER_SEGMENTERS), 2, (48, 48), repeats=1)
    assert [r["config"] for r in rows] == list(OTHER_SEGMENTERS)
    assert [r["model"] for r in rows] == ["PSPNet", "DeepLabV3+", "UPerNet"]
    assert all(r["s_iter_contrast"] > 0 and r["s_iter_baseline"] > 0 for r in rows)
    text = format_table1(rows)
    assert "DeepLabV3+" in text and "D-Xception-71" in text and "ConvNeXt-T" in text


def test_classification_weights_load_into_flattened_feature_extractors(tmp_path):
    """timm's feature wrappers rename ``stages.0.`` to ``stages_0.`` (ConvNeXt, Xception): a
    classification model's file still loads, every tensor in its place."""
    from contrastseg.models.backbones import TimmBackbone, load_backbone_weights

    full = timm.create_model("convnext_atto")
    torch.save(full.state_dict(), tmp_path / "atto.pth")
    backbone = TimmBackbone("timm:convnext_atto", output_stride=32)
    assert any(k.startswith("stages_0.") for k in backbone.body.state_dict())
    load_backbone_weights(backbone, tmp_path / "atto.pth")
    reference = full.state_dict()
    for key, value in backbone.body.state_dict().items():
        first, _, rest = key.partition(".")
        assert torch.equal(value, reference[first.replace("_", ".") + "." + rest]), key
