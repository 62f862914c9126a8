"""The loss set: every enabled term, weights, warm-up, AAF's parameters in the optimiser and in
checkpoints, the Table 2 configs and `bench losses`."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from contrastseg import train
from contrastseg.benchmarks.losses import format_losses_benchmark, run_losses_benchmark
from contrastseg.cli import app
from contrastseg.config import load_config
from contrastseg.contrast import PixelContrast
from contrastseg.engine import checkpoint as ckpt
from contrastseg.engine.trainer import Trainer
from contrastseg.errors import ConfigError
from contrastseg.losses import loss_set as loss_set_module
from contrastseg.losses.aaf import AAFLoss
from contrastseg.losses.loss_set import LossSet
from contrastseg.losses.lovasz import lovasz_softmax
from contrastseg.losses.rmi import rmi_loss

IGN = 255
TABLE2 = Path(__file__).parents[1] / "configs" / "cityscapes" / "table2"
ALL_ON = [
    "loss.lovasz.enabled=true",
    "loss.lovasz.weight=0.5",
    "loss.rmi.enabled=true",
    "loss.rmi.weight=2.0",
    "loss.rmi.pool_size=2",
    "loss.aaf.enabled=true",
    "loss.aaf.weight=0.3",
    "loss.aaf.decay_steps=10",
]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def batch(seed=0, B=2, C=3, h=6, w=8, H=12, W=16):
    g = torch.Generator().manual_seed(seed)
    seg = torch.randn(B, C, h, w, generator=g, requires_grad=True)
    aux = torch.randn(B, C, h, w, generator=g, requires_grad=True)
    target = torch.randint(0, C, (B, H, W), generator=g)
    target[:, :2] = IGN
    return {"seg": seg, "aux": aux}, target


def test_every_enabled_term_unweighted_and_the_weighted_total():
    cfg = load_config(None, ALL_ON)
    ls = LossSet(cfg.loss, 3)
    outputs, target = batch()
    terms = ls(outputs, target, step=4)
    assert set(terms) == {"ce", "aux_ce", "lovasz", "rmi", "aaf", "total"}
    seg = outputs["seg"]
    ce = torch.nn.functional.cross_entropy(
        torch.nn.functional.interpolate(seg, (12, 16), mode="bilinear"), target, ignore_index=IGN
    )
    assert terms["ce"].item() == pytest.approx(ce.item(), rel=1e-6)
    assert terms["lovasz"].item() == pytest.approx(lovasz_softmax(seg, target).item(), rel=1e-6)
    assert terms["rmi"].item() == pytest.approx(rmi_loss(seg, target, pool_size=2).item(), rel=1e-6)
    reference_aaf = AAFLoss(3, decay_steps=10)(seg, target, step=4)
    assert terms["aaf"].item() == pytest.approx(reference_aaf.item(), rel=1e-6)
    expected = (
        terms["ce"]
        + 0.4 * terms["aux_ce"]
        + 0.5 * terms["lovasz"]
        + 2.0 * terms["rmi"]
        + 0.3 * terms["aaf"]
    )
    assert terms["total"].item() == pytest.approx(expected.item(), rel=1e-6)
    terms["total"].backward()
    assert ls.aaf.edge_logits.grad is not None and seg.grad is not None


def test_a_term_in_warm_up_is_not_computed(monkeypatch):
    cfg = load_config(
        None,
        [
            *ALL_ON,
            "loss.lovasz.warmup_iters=5",
            "loss.rmi.warmup_iters=2",
            "loss.aaf.warmup_iters=3",
        ],
    )
    ls = LossSet(cfg.loss, 3)
    outputs, target = batch()
    calls = []
    real = loss_set_module.lovasz_softmax
    monkeypatch.setattr(
        loss_set_module, "lovasz_softmax", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    expected = {0: set(), 2: {"rmi"}, 3: {"rmi", "aaf"}, 5: {"rmi", "aaf", "lovasz"}}
    for step, extra in expected.items():
        terms = ls(outputs, target, step=step)
        assert set(terms) == {"ce", "aux_ce", "total"} | extra, step
    assert len(calls) == 1  # only at step 5


def test_with_contrast_the_warm_up_keeps_the_embedding_in_the_graph():
    cfg = load_config(
        None,
        [
            "loss.lovasz.enabled=true",
            "loss.contrast.enabled=true",
            "loss.contrast.warmup_iters=2",
            "loss.contrast.max_views=4",
        ],
    )
    contrast = PixelContrast.from_config(cfg.loss.contrast, cfg.model, 3, in_channels=8)
    ls = LossSet(cfg.loss, 3, contrast=contrast)
    outputs, target = batch(h=12, w=16)
    features = torch.randn(2, 8, 12, 16, requires_grad=True)
    outputs["features"] = features
    terms = ls(outputs, target, step=0)
    assert set(terms) == {"ce", "aux_ce", "lovasz", "total"}
    terms["total"].backward()
    # The projection head is in the graph (zero gradients), and so are the features.
    head = [p.grad for p in contrast.projection.parameters()]
    assert all(g is not None and g.abs().max() == 0 for g in head)
    assert features.grad is not None and features.grad.abs().max() == 0
    terms = ls(outputs, target, step=2)
    assert {"lovasz", "contrast"} <= set(terms)
    assert terms["total"].item() == pytest.approx(
        (terms["ce"] + 0.4 * terms["aux_ce"] + terms["lovasz"] + 0.1 * terms["contrast"]).item(),
        rel=1e-6,
    )


def test_optimizer_groups_state_and_decay_length():
    cfg = load_config(None, ["loss.aaf.enabled=true", "loss.aaf.lr_mult=10"])
    ls = LossSet(cfg.loss, 3, total_iters=100)
    assert ls.aaf.decay_steps == 100
    (group,) = ls.optimizer_groups()
    assert group["weight_decay"] == 0.0 and group["lr_mult"] == 10.0
    assert len(group["params"]) == 2
    assert {"aaf.edge_logits", "aaf.nonedge_logits"} <= set(ls.state_dict())
    cfg = load_config(None, ["loss.aaf.enabled=true", "loss.aaf.decay_steps=7"])
    assert LossSet(cfg.loss, 3, total_iters=100).aaf.decay_steps == 7
    plain = LossSet(load_config(None).loss, 3)
    assert plain.optimizer_groups() == [] and list(plain.parameters()) == []
    plain.sync_gradients()  # a no-op in one process


def test_trainer_logs_every_term_and_resumes_the_aaf_weights(tiny_cfg):
    on = [*ALL_ON, "loss.aaf.decay_steps=null", "loss.aaf.lr_mult=50", "train.iters=4"]
    on += ["train.checkpoint_every=2", "eval.figure_images=0"]
    straight = train(tiny_cfg(*on, "output.name=straight"), progress=False)
    records = [json.loads(x) for x in (straight.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all({"ce", "aux_ce", "lovasz", "rmi", "aaf", "total"} <= set(r) for r in records)
    state = ckpt.load_checkpoint(ckpt.list_checkpoints(straight.run_dir / "checkpoints")[-1])
    assert len(state["optimizer"]["param_groups"]) == 2
    assert state["optimizer"]["param_groups"][1]["weight_decay"] == 0.0
    uniform = torch.full_like(state["loss"]["aaf.edge_logits"], 1 / 3).log()
    assert not torch.allclose(state["loss"]["aaf.edge_logits"], uniform)  # they moved
    # 2 steps, checkpoint, resume to 4: the same AAF weights and model
    first = Trainer(tiny_cfg(*on, "output.name=resumed"), progress=False)
    loader = iter(first._loader())
    for _ in range(2):
        first.train_step(next(loader))
    first.save_checkpoint()
    del first, loader
    resumed = train(tiny_cfg(*on, "output.name=resumed"), resume=True, progress=False)
    other = ckpt.load_checkpoint(ckpt.list_checkpoints(resumed.run_dir / "checkpoints")[-1])
    for key in ("aaf.edge_logits", "aaf.nonedge_logits"):
        assert torch.allclose(state["loss"][key], other["loss"][key], atol=1e-6)
    for key, value in state["model"].items():
        assert torch.allclose(value.float(), other["model"][key].float(), atol=1e-5), key


def test_config_keys_and_errors():
    cfg = load_config(None)
    assert not (cfg.loss.lovasz.enabled or cfg.loss.rmi.enabled or cfg.loss.aaf.enabled)
    assert (cfg.loss.rmi.radius, cfg.loss.rmi.pool, cfg.loss.rmi.pool_size) == (3, "avg", 4)
    assert (cfg.loss.rmi.bce_weight, cfg.loss.rmi.rmi_weight) == (0.5, 0.5)
    assert (cfg.loss.aaf.distances, cfg.loss.aaf.margin) == ((1, 2, 3), 3.0)
    assert (cfg.loss.ce.ohem, cfg.loss.ce.ohem_threshold, cfg.loss.ce.ohem_min_kept) == (
        False,
        0.7,
        100000,
    )
    for bad, key in (
        ("loss.aaf.distances=[1, 1]", "loss.aaf"),
        ("loss.aaf.init_weights=[1.0, 2.0]", "loss.aaf"),
        ("loss.lovasz.per_img=true", "loss.lovasz.per_img"),
        ("loss.rmi.radius=0", "loss.rmi.radius"),
    ):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [bad])


def test_the_eight_table2_configs():
    expected = {
        "ce": set(),
        "aaf": {"aaf"},
        "rmi": {"rmi"},
        "lovasz": {"lovasz"},
        "contrast": {"contrast"},
        "aaf_contrast": {"aaf", "contrast"},
        "rmi_contrast": {"rmi", "contrast"},
        "lovasz_contrast": {"lovasz", "contrast"},
    }
    paths = sorted(TABLE2.glob("*.yaml"))
    assert {p.stem.removeprefix("hrnetv2_w48_") for p in paths} == set(expected)
    for path in paths:
        cfg = load_config(path)
        on = {k for k in ("lovasz", "rmi", "aaf", "contrast") if getattr(cfg.loss, k).enabled}
        assert on == expected[path.stem.removeprefix("hrnetv2_w48_")], path.name
        assert (cfg.model.backbone.name, cfg.model.head) == ("hrnetv2_w48", "hrnetv2")
        assert (cfg.train.iters, cfg.train.batch_size, cfg.data.name) == (40000, 8, "cityscapes")
        if "contrast" in on:
            assert (cfg.loss.contrast.warmup_iters, cfg.loss.contrast.weight) == (2500, 0.1)
            assert cfg.loss.contrast.memory.enabled


def test_bench_losses_tiny_and_cli():
    result = run_losses_benchmark(batch=1, size=(32, 64), repeats=1)
    names = [r["loss"] for r in result["rows"]]
    assert names == ["ce", "ohem_ce", "lovasz", "rmi", "aaf"]
    assert result["rows"][0]["ratio"] == 1.0 and all(r["ms"] > 0 for r in result["rows"])
    assert result["logits"] == (1, 19, 8, 16)
    text = format_losses_benchmark(result)
    assert "x CE" in text and "stride 4" in text
    out = CliRunner().invoke(
        app, ["bench", "losses", "--height", "32", "--width", "64", "--batch", "1"]
    )
    assert out.exit_code == 0, out.output
    assert all(name in out.output for name in names)


def test_the_contrast_module_must_match_the_config():
    on = load_config(None, ["loss.contrast.enabled=true"])
    with pytest.raises(ConfigError, match="loss.contrast.enabled is True"):
        LossSet(on.loss, 3)
    off = load_config(None, [])
    with pytest.raises(ConfigError, match="loss.contrast.enabled is False"):
        LossSet(off.loss, 3, contrast=PixelContrast(3, 8))


@pytest.mark.parametrize(
    "weights", [(), ("loss.prototype.ppc_weight=0.5", "loss.prototype.ppd_weight=2.0")]
)
@pytest.mark.parametrize("fraction", [1.0, 0.25])
def test_prototype_terms_through_the_public_modules_match_a_float64_reference(weights, fraction):
    """LossSet + PrototypeClassifier, then backward(), against plain float64 autograd on a twin
    classifier: total, the gradients of the features and of every parameter, and the state left
    behind (prototypes, generator)."""
    from contrastseg.prototype import PrototypeClassifier

    cfg = load_config(None, list(weights))
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 8, 6, 8, generator=g, dtype=torch.float64)
    target = torch.randint(0, 3, (2, 12, 16), generator=g)
    target[:, :2] = IGN

    def run(use_loss_set: bool):
        torch.manual_seed(7)  # the projection convs' initialisation, the same for both twins
        clf = PrototypeClassifier(3, 8, num_prototypes=2, seed=5).double().train()
        x = feats.clone().requires_grad_(True)
        out = clf(x, target)
        if use_loss_set:
            outputs = {"seg": out.logits, "ppc": out.ppc, "ppd": out.ppd}
            total = LossSet(cfg.loss, 3)(outputs, target, step=0, fraction=fraction)["total"]
        else:
            up = torch.nn.functional.interpolate(
                out.logits, (12, 16), mode="bilinear", align_corners=cfg.loss.ce.align_corners
            )
            ce = torch.nn.functional.cross_entropy(up, target, ignore_index=IGN)
            p = cfg.loss.prototype
            # CE is normalised by the step's labelled pixels; the other terms scale by fraction
            total = ce + fraction * (p.ppc_weight * out.ppc + p.ppd_weight * out.ppd)
        total.backward()
        return total, x.grad, clf

    got, got_grad, got_clf = run(True)
    want, want_grad, want_clf = run(False)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-14)
    for (name, a), (_, b) in zip(
        got_clf.named_parameters(), want_clf.named_parameters(), strict=True
    ):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14, msg=name)
    torch.testing.assert_close(got_clf.prototypes, want_clf.prototypes, rtol=0, atol=0)
    assert torch.equal(got_clf.generator_state(), want_clf.generator_state())
