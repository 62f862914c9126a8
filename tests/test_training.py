import json

import pytest
import torch

from contrastseg import evaluate_checkpoint, predict, train
from contrastseg.engine import checkpoint as ckpt
from contrastseg.engine.trainer import Trainer, poly_lr
from contrastseg.errors import CheckpointError


def final_weights(run_dir):
    path = ckpt.list_checkpoints(run_dir / "checkpoints")[-1]
    return ckpt.load_checkpoint(path)


def test_train_writes_a_self_describing_run_dir(tiny_cfg):
    result = train(tiny_cfg(), progress=False)
    run = result.run_dir
    assert result.iteration == 6
    for name in ("config.yaml", "environment.json", "metrics.jsonl", "eval.json"):
        assert (run / name).is_file(), name
    assert (run / "figures" / "val_predictions.png").stat().st_size > 1000
    assert list((run / "tensorboard").iterdir())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == list(range(1, 7))
    assert all({"ce", "aux_ce", "total", "lr", "s_per_iter"} <= set(r) for r in records)
    ev = json.loads((run / "eval.json").read_text())
    assert 0.0 <= ev["mIoU"] <= 1.0 and len(ev["per_class_iou"]) == len(ev["class_names"])
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == [
        "iter_0000003.pt",
        "iter_0000006.pt",
    ]


def test_resumed_run_ends_with_identical_weights(tiny_cfg, tmp_path):
    straight = train(tiny_cfg("output.name=straight"), progress=False)
    # Interrupted run: stop after 3 iterations (its checkpoint), then resume to 6.
    first = Trainer(tiny_cfg("output.name=resumed"), progress=False)
    loader = iter(first._loader())
    for _ in range(3):
        first.train_step(next(loader))
    first.save_checkpoint()
    del first, loader
    resumed = train(tiny_cfg("output.name=resumed"), resume=True, progress=False)
    a = final_weights(straight.run_dir)
    b = final_weights(resumed.run_dir)
    assert a["iteration"] == b["iteration"] == 6
    for key, value in a["model"].items():
        assert torch.allclose(value.float(), b["model"][key].float(), atol=1e-6), key
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    for k in sa:
        assert torch.allclose(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"], atol=1e-6)


def test_existing_run_needs_resume_flag(tiny_cfg):
    train(tiny_cfg("train.iters=3"), progress=False)
    with pytest.raises(CheckpointError, match="--resume"):
        Trainer(tiny_cfg("train.iters=3"), progress=False)


def test_resume_refuses_other_class_count(tiny_cfg, tmp_path):
    train(tiny_cfg("train.iters=3"), progress=False)
    path = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    state = ckpt.load_checkpoint(path)
    state["class_names"] = state["class_names"][:-1]
    ckpt.atomic_save(state, path)
    with pytest.raises(CheckpointError, match="classes"):
        Trainer(tiny_cfg("train.iters=3"), resume=True, progress=False)


def test_eval_and_predict_from_checkpoint(tiny_cfg, tmp_path):
    from PIL import Image

    cfg = tiny_cfg("train.iters=3")
    result = train(cfg, progress=False)
    path = ckpt.list_checkpoints(result.run_dir / "checkpoints")[-1]
    m = evaluate_checkpoint(cfg, path, out=tmp_path / "ev.json", print_table=False)
    assert m["mIoU"] == pytest.approx(result.metrics["mIoU"], abs=1e-9)
    images = tmp_path / "imgs"
    images.mkdir()
    Image.fromarray((torch.rand(40, 56, 3) * 255).byte().numpy()).save(images / "a.png")
    Image.fromarray((torch.rand(33, 47, 3) * 255).byte().numpy()).save(images / "b.jpg")
    written = predict(path, [images], tmp_path / "out")
    assert [p.name for p in written] == ["a_mask.png", "b_mask.png"]
    labels = Image.open(tmp_path / "out" / "b_labels.png")
    assert labels.size == (47, 33)
    overlay = Image.open(tmp_path / "out" / "a_overlay.png")
    assert overlay.size == (56, 40) and overlay.mode == "RGB"


def test_poly_lr_with_warmup():
    from contrastseg.config import OptimConfig

    cfg = OptimConfig(lr=0.1, warmup_iters=10, warmup_ratio=0.1, poly_power=0.9)
    assert poly_lr(cfg, 0, 100) == pytest.approx(0.01)
    assert poly_lr(cfg, 5, 100) == pytest.approx(0.1 * (0.1 + 0.9 * 0.5))
    assert poly_lr(cfg, 10, 100) == pytest.approx(0.1 * 0.9**0.9)
    assert poly_lr(cfg, 99, 100) == pytest.approx(0.1 * 0.01**0.9)


def test_bf16_autocast_training_on_cpu_stays_finite(tiny_cfg):
    trainer = Trainer(tiny_cfg("train.amp=bf16", "train.iters=3"), progress=False)
    loader = iter(trainer._loader())
    before = trainer.model.head.classifier.weight.detach().clone()
    for _ in range(3):
        values = trainer.train_step(next(loader))
        assert all(torch.isfinite(torch.tensor(v)) for v in values.values()), values
    assert not torch.equal(before, trainer.model.head.classifier.weight)
