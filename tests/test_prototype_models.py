"""The prototype classifier in the model zoo (``model.classifier: prototype``): every head trains
with it, with and without pixel contrast, logs PPC and PPD, infers at odd sizes, exports to
TorchScript (and, for two heads, ONNX) equal to PyTorch, and resumes exactly (prototypes and
the Gumbel generator travel in the checkpoint)."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from contrastseg import export_checkpoint, train
from contrastseg.config import ModelConfig, load_config
from contrastseg.engine import checkpoint as ckpt
from contrastseg.engine.inference import load_trained_model
from contrastseg.engine.trainer import Trainer
from contrastseg.losses import LossSet
from contrastseg.models import InferenceModel, build_model
from contrastseg.prototype import PrototypeClassifier
from test_model_zoo import _few_threads  # noqa: F401  (autouse fixture)
from tiny import SMALL_CONTRAST, TINY, zoo_run_overrides

NUM_CLASSES = 5

# (head, backbone, extra overrides): small stand-ins, a training step in well under a second
HEADS = [
    ("deeplabv3", "timm:mobilenetv3_small_050", []),
    ("hrnetv2", "hrnetv2_w18_small", ["model.head_variant=released"]),
    (
        "ocr",
        "timm:mobilenetv3_small_050",
        ["model.ocr_mid_channels=16", "model.ocr_key_channels=8"],
    ),
    ("pspnet", "timm:mobilenetv3_small_050", []),
    ("deeplabv3plus", "timm:mobilenetv3_small_050", []),
    ("upernet", "timm:mobilenetv3_small_050", []),
]
ONNX_HEADS = ("hrnetv2", "deeplabv3plus")


def overrides(root, head, backbone, extra, name):
    return [
        *zoo_run_overrides(root, head, backbone),
        *extra,
        "model.classifier=prototype",
        "model.prototype.num_prototypes=3",
        f"output.name={name}",
    ]


@pytest.mark.parametrize(("head", "backbone", "extra"), HEADS, ids=[h for h, *_ in HEADS])
def test_head_trains_with_prototypes_with_and_without_contrast_and_exports(
    tmp_path, head, backbone, extra
):
    logs = {}
    for contrast in (False, True):
        more = [*SMALL_CONTRAST, "loss.contrast.memory.enabled=false"] if contrast else []
        name = "proto_contrast" if contrast else "proto"
        cfg = load_config(None, [*overrides(tmp_path, head, backbone, extra, name), *more])
        result = train(cfg, progress=False)
        lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
        logs[contrast] = [json.loads(line) for line in lines]
    for contrast, records in logs.items():
        assert len(records) == 2
        for r in records:
            assert r["ppc"] > 0 and r["ppd"] > 0 and np.isfinite(r["total"])
            assert ("contrast" in r) == contrast
            # the total holds the prototype terms at the released weights
            known = r["ce"] + 0.4 * r.get("aux_ce", 0.0) + 0.1 * r.get("contrast", 0.0)
            assert r["total"] == pytest.approx(known + 0.01 * r["ppc"] + 0.001 * r["ppd"], 1e-4)

    path = ckpt.list_checkpoints(tmp_path / "proto_contrast" / "checkpoints")[-1]
    state = ckpt.load_checkpoint(path)
    assert {"head.classifier.prototypes", "head.classifier._extra_state"} <= set(state["model"])
    assert not any(k.startswith("head.classifier.weight") for k in state["model"])
    segmentor, _, _ = load_trained_model(path)
    assert isinstance(segmentor.head.classifier, PrototypeClassifier)
    net = InferenceModel(segmentor).eval()
    x = torch.randn(1, 3, 33, 67, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = net(x).numpy()
    assert ref.shape == (1, NUM_CLASSES + 2, 33, 67) and np.isfinite(ref).all()
    scripted = export_checkpoint(path, tmp_path / "m.torchscript.pt", format="torchscript")
    with torch.no_grad():
        got_ts = torch.jit.load(str(scripted.model))(x).numpy()
    assert np.abs(got_ts - ref).max() < 1e-4
    if head in ONNX_HEADS:
        onnx_file = export_checkpoint(path, tmp_path / "m.onnx", format="onnx").model
        sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() < 1e-3


def test_the_classifier_sees_the_labels_only_in_training_calls_with_labels():
    cfg = ModelConfig.model_validate(
        {
            "backbone": {"name": "timm:mobilenetv3_small_050"},
            "head": "upernet",
            "head_channels": 16,
            "classifier": "prototype",
            "prototype": {"num_prototypes": 2, "momentum": 0.5, "assignment": "argmax"},
        }
    )
    torch.manual_seed(0)
    model = build_model(cfg, 3, prototype_seed=7).train()
    proto = model.head.classifier
    assert isinstance(proto, PrototypeClassifier) and model.prototype_classifier is proto
    assert (proto.num_prototypes, proto.momentum, proto.assignment) == (2, 0.5, "argmax")
    assert proto._rng.seed == 7
    x = torch.randn(2, 3, 40, 56)
    labels = torch.randint(0, 3, (2, 40, 56))
    before = proto.prototypes.clone()
    out = model(x)  # no labels: no prototype losses, no update
    assert "ppc" not in out and torch.equal(proto.prototypes, before)
    out = model(x, labels)
    assert {"ppc", "ppd"} <= set(out) and out["ppc"].requires_grad
    assert not torch.equal(proto.prototypes, before)
    assert not proto._forward_hooks and not proto._forward_pre_hooks  # the hooks are gone
    moved = proto.prototypes.clone()
    with torch.no_grad():
        seg = model.eval()(x, labels)["seg"]
        assert set(model(x, labels)) == {"seg"}
    assert torch.equal(proto.prototypes, moved)
    assert seg.shape[1] == 3
    # the conv classifier ignores labels
    plain = build_model(cfg.model_copy(update={"classifier": "conv"}), 3).train()
    assert set(plain(x, labels)) == {"seg", "aux", "features"}


def test_loss_set_weights_the_prototype_terms():
    cfg = load_config(None, ["loss.prototype.ppc_weight=0.5", "loss.prototype.ppd_weight=2"])
    losses = LossSet(cfg.loss, 3)
    seg = torch.zeros(1, 3, 4, 4, requires_grad=True)
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    ppc, ppd = torch.tensor(1.5), torch.tensor(0.25)
    terms = losses({"seg": seg, "ppc": ppc, "ppd": ppd}, target, 0)
    assert terms["ppc"] == ppc and terms["ppd"] == ppd
    total = float(terms["ce"].detach()) + 0.5 * 1.5 + 2 * 0.25
    assert float(terms["total"].detach()) == pytest.approx(total)
    default = load_config(None).loss.prototype
    assert (default.ppc_weight, default.ppd_weight) == (0.01, 0.001)


def test_prototype_config_is_validated_once_naming_the_key():
    from contrastseg.errors import ConfigError

    with pytest.raises(ConfigError, match="model.prototype.assignment"):
        load_config(None, ["model.prototype.assignment=soft"])
    with pytest.raises(ConfigError, match="model.classifier"):
        load_config(None, ["model.classifier=linear"])
    with pytest.raises(ConfigError, match="model.prototype.momentum"):
        load_config(None, ["model.prototype.momentum=1.5"])


def test_resumed_run_repeats_the_uninterrupted_prototypes_and_noise(tiny_cfg):
    proto = [
        "model.classifier=prototype",
        "model.prototype.num_prototypes=3",
        "model.prototype.momentum=0.5",  # prototypes that move visibly in a few steps
    ]
    straight = train(tiny_cfg(*proto, "output.name=straight"), progress=False)
    first = Trainer(tiny_cfg(*proto, "output.name=resumed"), progress=False)
    loader = iter(first._loader())
    for _ in range(3):
        first.train_step(next(loader))
    first.save_checkpoint()
    del first, loader
    resumed = train(tiny_cfg(*proto, "output.name=resumed"), resume=True, progress=False)
    a = ckpt.load_checkpoint(ckpt.list_checkpoints(straight.run_dir / "checkpoints")[-1])
    b = ckpt.load_checkpoint(ckpt.list_checkpoints(resumed.run_dir / "checkpoints")[-1])
    assert a["iteration"] == b["iteration"] == 6
    gen = "head.classifier._extra_state"
    assert a["model"][gen].numel() > 0 and torch.equal(a["model"][gen], b["model"][gen])
    assert torch.equal(a["processes"][0]["model"][gen], b["processes"][0]["model"][gen])
    start = build_model(load_config(None, TINY + proto).model, NUM_CLASSES + 2)
    assert not torch.allclose(
        a["model"]["head.classifier.prototypes"], start.state_dict()["head.classifier.prototypes"]
    )  # the prototypes moved
    for key, value in a["model"].items():
        if value.is_floating_point():
            assert torch.allclose(value, b["model"][key], atol=1e-6), key
        else:
            assert torch.equal(value, b["model"][key]), key
    ra = [json.loads(x) for x in (straight.run_dir / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    # the resumed log holds iterations 4-6 (the first three ran outside fit)
    assert [r["iter"] for r in rb] == [4, 5, 6]
    assert [r["ppc"] for r in ra[3:]] == pytest.approx([r["ppc"] for r in rb], rel=1e-5)


def test_the_prototype_recipes_hold_the_released_values():
    from pathlib import Path

    from contrastseg.model_table import PROTOTYPE_SEGMENTERS

    root = Path(__file__).resolve().parents[1] / "configs"
    for recipe, (backbone, head) in PROTOTYPE_SEGMENTERS.items():
        cfg = load_config(root / f"{recipe}.yaml", ["model.backbone.pretrained=false"])
        assert (cfg.model.backbone.name, cfg.model.head) == (backbone, head)
        assert cfg.model.classifier == "prototype" and not cfg.loss.contrast.enabled
        p = cfg.model.prototype
        assert (p.num_prototypes, p.momentum, p.sinkhorn_iterations, p.sinkhorn_epsilon) == (
            10,
            0.999,
            3,
            0.05,
        )
        assert (p.assignment, p.projection_norm, p.update_prototypes) == ("gumbel", "width", True)
        assert (cfg.loss.prototype.ppc_weight, cfg.loss.prototype.ppd_weight) == (0.01, 0.001)
    city = load_config(root / "cityscapes/released/hrnetv2_w48_proto.yaml")
    assert (city.train.iters, city.train.batch_size, city.optim.lr) == (80000, 8, 0.01)
    assert city.data.crop_size == (512, 1024) and city.loss.ce.class_weights[0] == 0.8373
    ade = load_config(root / "ade20k/hrnetv2_w48_proto.yaml")
    ce = load_config(root / "ade20k/hrnetv2_w48_ce.yaml")
    # the same protocol as the CE recipe: only the classifier and its losses differ
    assert ade.model.model_copy(update={"classifier": "conv"}) == ce.model
    assert (ade.data, ade.optim, ade.train, ade.eval) == (ce.data, ce.optim, ce.train, ce.eval)
