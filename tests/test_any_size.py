"""Every model of the zoo runs at any input size from the documented minimum up (sides that are
not multiples of 32 included): inference at 375x500, 250x500, 97x131 and the minimum, training
steps at an odd size, and HRNet's branch fusion sized to the target branch as the authors' own
HRNet does (checked against a plain loop written here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.models.hrnet import HighResolutionModule

from contrastseg.config import ModelConfig
from contrastseg.models import build_model
from contrastseg.models.backbones import TimmBackbone
from contrastseg.models.summary import architectures

MIN_SIZE = (32, 32)  # docs/models.md, "Input sizes"
ODD = [(375, 500), (250, 500), (97, 131)]
# A forward at 375x500 costs up to seconds on a CPU: every architecture runs at sizes with the
# same remainders modulo 64 instead (so the sizes ceil-halved five times, down to stride 32,
# keep the parity of 375x500's at every level: all the output-stride arithmetic sees), and one
# dilated network and HRNetV2-W48 at 375x500 itself.
FULL_SIZE = {("hrnetv2_w48", "hrnetv2"), ("mobilenetv3_large", "deeplabv3")}


def _stand_in(size: tuple[int, int]) -> tuple[int, int]:
    """Each side replaced by the smallest side of at least the documented minimum with the same
    remainder modulo 64: 375x500 -> 55x52, 250x500 -> 58x52, 97x131 -> 33x67."""
    return tuple(s % 64 if s % 64 >= MIN_SIZE[0] else s % 64 + 64 for s in size)


def _sizes(backbone: str, head: str) -> list[tuple[int, int]]:
    sizes = [_stand_in(s) for s in [*ODD, MIN_SIZE]]
    if (backbone, head) in FULL_SIZE:
        sizes.append((375, 500))
    return sizes


def test_stand_in_sizes_halve_like_the_real_ones():
    def chain(side):  # the side at strides 2, 4, ..., 32 (each level rounds up)
        out = []
        for _ in range(5):
            side = -(-side // 2)
            out.append(side % 2)
        return out

    for size in ODD:
        stand_in = _stand_in(size)
        assert MIN_SIZE[0] <= min(stand_in) and max(stand_in) < 96
        assert [chain(s) for s in stand_in] == [chain(s) for s in size], size


def _model(backbone: str, head: str, variant: str = "timm"):
    cfg = ModelConfig.model_validate(
        {"head": head, "backbone": {"name": backbone, "pretrained": False, "variant": variant}}
    )
    torch.manual_seed(0)
    return build_model(cfg, 5, backbone_weights=False)


def test_the_zoo_is_what_models_lists():
    assert len(architectures()) >= 12  # every (backbone, head) pair of the table


@pytest.mark.parametrize(("backbone", "head"), architectures())
def test_every_architecture_infers_at_odd_sizes(backbone, head):
    model = _model(backbone, head).eval()
    for size in _sizes(backbone, head):
        with torch.no_grad():
            logits = model.predict_logits(torch.randn(1, 3, *size))
        assert logits.shape == (1, 5, *size), (backbone, head, size)
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    ("backbone", "head"),
    [("hrnetv2_w18_small", "hrnetv2"), ("hrnetv2_w18_small", "ocr"), ("mobilenetv2", "deeplabv3")],
)
def test_training_steps_at_an_odd_size(backbone, head):
    model = _model(backbone, head, variant="released").train()
    out = model(torch.randn(2, 3, 97, 131))
    loss = sum(v.float().mean() for v in out.values())
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def _reference_fuse(module: HighResolutionModule, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The authors' fusion, written out: branch j below i is convolved, then bilinearly
    resized to branch i's exact size (corners aligned); above i it is strided down."""
    xs = [module.branches[k](t) for k, t in enumerate(xs)]
    out = []
    for i in range(len(module.fuse_layers)):
        y = xs[i]
        for j in range(len(xs)):
            if j == i:
                continue
            layer = module.fuse_layers[i][j]
            if j > i:
                z = layer[1](layer[0](xs[j]))
                z = F.interpolate(z, size=xs[i].shape[-2:], mode="bilinear", align_corners=True)
            else:
                z = layer(xs[j])
            y = y + z
        out.append(torch.relu(y))
    return out


def test_hrnet_fusion_resizes_to_the_target_branch_as_the_authors_do():
    torch.manual_seed(0)
    backbone = TimmBackbone("hrnetv2_w18_small", variant="released").eval()
    stage4 = backbone.body.stage4[0]
    sizes = [(25, 33), (13, 17), (7, 9), (4, 5)]  # the branches of a 97x131 input
    xs = [torch.randn(1, c, *s) for c, s in zip(backbone.channels, sizes, strict=True)]
    with torch.no_grad():
        ours = stage4([t.clone() for t in xs])
        ref = _reference_fuse(stage4, [t.clone() for t in xs])
    for a, b in zip(ours, ref, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert ours[0].abs().max() > 0.1


def test_hrnet_fusion_is_unchanged_where_sizes_halve_exactly():
    """At sides that are multiples of 32 the sized fusion is timm's own, bit for bit."""
    import timm

    from contrastseg.models.backbones import use_released_ops

    for variant in ("timm", "released"):
        torch.manual_seed(0)
        ours = TimmBackbone("hrnetv2_w18_small", variant=variant).eval()
        plain = timm.create_model(
            "hrnet_w18_small", features_only=True, feature_location="", out_indices=(1, 2, 3, 4)
        ).eval()
        plain.load_state_dict(ours.body.state_dict())
        if variant == "released":
            use_released_ops(plain)
        x = torch.randn(1, 3, 96, 128)
        with torch.no_grad():
            assert all(torch.equal(a, b) for a, b in zip(ours(x), plain(x), strict=True))
        with pytest.raises(RuntimeError, match="must match the size"), torch.no_grad():
            plain(torch.randn(1, 3, 97, 131))


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exported_hrnet_runs_at_odd_sizes(tmp_path, fmt):
    """The export's own check runs a 97x131 input; the file then takes 375x500 too."""
    import numpy as np

    from contrastseg.config import ExperimentConfig
    from contrastseg.convert import checkpoint_dict
    from contrastseg.export import export_checkpoint
    from contrastseg.models.segmentor import InferenceModel

    backbone = {"name": "hrnetv2_w18_small", "variant": "released", "pretrained": False}
    cfg = ExperimentConfig.model_validate({"model": {"head": "ocr", "backbone": backbone}})
    model = _model("hrnetv2_w18_small", "ocr", variant="released").eval()
    names = ["a", "b", "c", "d", "e"]
    state = checkpoint_dict(model.state_dict(), cfg.to_dict(), names, [[i] * 3 for i in range(5)])
    torch.save(state, tmp_path / "hr.pt")
    result = export_checkpoint(tmp_path / "hr.pt", tmp_path / f"hr.{fmt}", format=fmt)
    assert result.max_abs_diff < 1e-4
    x = torch.randn(1, 3, 375, 500)
    with torch.no_grad():
        ref = InferenceModel(model)(x).numpy()
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(result.model), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    else:
        with torch.no_grad():
            got = torch.jit.load(str(result.model))(x).numpy()
    assert got.shape == (1, 5, 375, 500)
    assert np.abs(got - ref).max() < 1e-3


def _hrnet_configs() -> dict[tuple, list[str]]:
    """Every config of configs/ with an HRNet backbone, grouped by what decides how a 375x500
    image is inferred: the head and the eval section."""

    from contrastseg.config import load_config

    groups: dict[tuple, list[str]] = {}
    root = Path(__file__).resolve().parents[1] / "configs"
    for path in sorted(root.rglob("*.yaml")):
        if path.name.startswith("_"):
            continue
        cfg = load_config(path)
        if not cfg.model.backbone.name.startswith("hrnet"):
            continue
        key = (cfg.model.head, repr(cfg.eval.model_dump(exclude={"batch_size", "figure_images"})))
        groups.setdefault(key, []).append(str(path.relative_to(root)))
    return groups


HRNET_CONFIGS = _hrnet_configs()


@pytest.mark.parametrize("group", list(HRNET_CONFIGS), ids=lambda g: HRNET_CONFIGS[g][0])
def test_every_hrnet_config_evaluates_and_predicts_a_375x500_image(group, tmp_path):
    """eval (the config's eval section: whole, scales, flip, the released tester's steps) and
    predict of one 375x500 image, with the config's head on HRNetV2-W18-Small (the same
    branch arithmetic as W48 at a fraction of the time)."""
    import numpy as np
    from PIL import Image

    from contrastseg.config import load_config
    from contrastseg.data import build_eval_dataset
    from contrastseg.engine.evaluator import evaluate
    from contrastseg.engine.inference import predict_ids

    path = HRNET_CONFIGS[group][0]
    root = tmp_path / "data"
    for sub in ("images", "masks", "splits"):
        (root / sub).mkdir(parents=True)
    (root / "classes.txt").write_text("".join(f"c{i}\n" for i in range(5)))
    (root / "splits" / "val.txt").write_text("a\n")
    rgb = np.random.default_rng(0).integers(0, 256, size=(375, 500, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "images" / "a.png")
    Image.fromarray(np.zeros((375, 500), np.uint8)).save(root / "masks" / "a.png")
    cfg = load_config(
        Path(__file__).resolve().parents[1] / "configs" / path,
        [
            "model.backbone.name=hrnetv2_w18_small",
            "model.backbone.pretrained=false",
            "data.name=folder",
            f"data.root={root}",
            "data.val_split=val",
            "data.num_workers=0",
        ],
    )
    model = build_model(cfg.model, 5, backbone_weights=False).eval()
    dataset = build_eval_dataset(cfg.data)
    metrics, kept = evaluate(model, dataset, torch.device("cpu"), eval_cfg=cfg.eval, keep=1)
    assert kept[0]["pred"].shape == (375, 500)
    assert sum(map(sum, metrics["confusion"])) == 375 * 500
    pred = predict_ids(model, cfg, rgb)
    assert pred.shape == (375, 500) and pred.max() < 5


@pytest.mark.parametrize("align_corners", [False, True])
def test_sliding_window_at_an_odd_size_equals_the_windows_by_hand(align_corners):
    """Sliding-window evaluation of a 375x500 image with windows that are not multiples of 32
    either: every window through the model, logits averaged where windows overlap."""
    from contrastseg.config import EvalConfig
    from contrastseg.engine.inference_modes import infer_scores

    model = _model("hrnetv2_w18_small", "hrnetv2", variant="released").eval()
    x = torch.randn(1, 3, 375, 500)
    cfg = EvalConfig(
        mode="slide", crop_size=(250, 333), stride=(125, 167), align_corners=align_corners
    )
    got = infer_scores(model, x, cfg)
    total, count = torch.zeros(1, 5, 375, 500), torch.zeros(375, 500)
    with torch.no_grad():
        for top in (0, 125):
            for left in (0, 167):
                window = x[..., top : top + 250, left : left + 333]
                logits = F.interpolate(
                    model(window)["seg"], size=(250, 333), mode="bilinear",
                    align_corners=align_corners,
                )  # fmt: skip
                total[..., top : top + 250, left : left + 333] += logits
                count[top : top + 250, left : left + 333] += 1
    torch.testing.assert_close(got, (total / count).softmax(1), rtol=1e-5, atol=1e-5)
