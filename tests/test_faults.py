"""Faults during training: non-finite losses, SIGTERM, and resuming after them."""

import json
import signal
import subprocess
import sys

import pytest
import torch

from contrastseg.engine import checkpoint as ckpt
from contrastseg.engine.trainer import Trainer, open_metrics_log
from contrastseg.errors import TrainingError
from tiny import TINY


def poison(trainer, bad_iterations):
    """Make the model's logits NaN at the given (0-based) iterations."""
    forward = trainer.model.forward

    def patched(x, labels=None):
        out = forward(x, labels=labels)
        if trainer.iteration in bad_iterations:
            out = {k: v * float("nan") for k, v in out.items()}
        return out

    trainer.model.forward = patched
    trainer.forward = trainer.model


def test_a_nan_step_is_skipped_and_logged(tiny_cfg, caplog):
    trainer = Trainer(tiny_cfg("train.iters=4"), progress=False)
    poison(trainer, {1})
    loader = iter(trainer._loader())
    trainer.train_step(next(loader))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    values = trainer.train_step(next(loader))  # iteration 1: NaN
    assert values["skipped"] == 1.0
    after = trainer.model.state_dict()
    for k, v in before.items():  # weights and batch-norm running statistics alike
        assert torch.equal(v, after[k]), f"{k} changed on a skipped step"
    values = trainer.train_step(next(loader))
    assert values["skipped"] == 0.0


def test_a_nan_input_leaves_no_trace_in_running_stats_or_memory(tiny_cfg):
    """NaN activations reach batch norm and the contrast memory before the loss is seen: the
    skipped step restores the running statistics, the memory refuses non-finite entries, and
    the next step trains normally."""
    cfg = tiny_cfg(
        "train.threads=1",
        "loss.contrast.enabled=true",
        "loss.contrast.warmup_iters=0",
        "loss.contrast.max_views=4",
        "loss.contrast.memory.enabled=true",
        "loss.contrast.memory.pixel_size=64",
        "loss.contrast.memory.region_size=8",
    )
    trainer = Trainer(cfg, progress=False)
    loader = iter(trainer._loader())
    assert trainer.train_step(next(loader))["skipped"] == 0.0
    model_before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    memory_before = {k: v.clone() for k, v in trainer.loss_set.state_dict().items()}
    batch = next(loader)
    batch["image"][1] = float("nan")
    assert trainer.train_step(batch)["skipped"] == 1.0
    for k, v in model_before.items():
        assert torch.equal(v, trainer.model.state_dict()[k]), k
    memory = trainer.loss_set.contrast.memory
    for name in ("pixel_queue", "region_queue"):
        assert torch.isfinite(getattr(memory, name)).all(), name
    # Image 0 of the batch was finite: its entries may enter, image 1's may not.
    assert int(memory.pixel_count.sum()) >= int(memory_before["contrast.memory.pixel_count"].sum())
    values = trainer.train_step(next(loader))
    assert values["skipped"] == 0.0 and values["contrast"] > 0


def test_nan_step_in_a_run_is_logged_and_training_goes_on(tiny_cfg, caplog):
    trainer = Trainer(tiny_cfg("train.iters=4"), progress=False)
    poison(trainer, {2})
    result = trainer.fit()
    assert result.iteration == 4
    assert "iteration 3: non-finite loss or gradient, step skipped (1 in a row)" in caplog.text
    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [0.0, 0.0, 1.0, 0.0]


def test_repeated_nans_stop_with_a_checkpoint_of_the_last_good_state(tiny_cfg):
    cfg = tiny_cfg("train.iters=20", "train.max_bad_steps=3", "train.checkpoint_every=100")
    trainer = Trainer(cfg, progress=False)
    poison(trainer, set(range(2, 20)))
    with pytest.raises(TrainingError, match=r"3 consecutive non-finite steps up to iteration 5"):
        trainer.fit()
    path = ckpt.list_checkpoints(cfg.run_dir / "checkpoints")[-1]
    state = ckpt.load_checkpoint(path)
    assert state["iteration"] == 5
    good = {k: v for k, v in trainer.model.state_dict().items()}
    for k, v in state["model"].items():
        assert torch.isfinite(v.float()).all(), k
        assert torch.equal(v, good[k])


SCRIPT = """
import sys, time
from contrastseg import load_config
from contrastseg.engine.trainer import Trainer
from contrastseg.errors import TrainingInterrupted
resume = sys.argv[1] == "resume"
trainer = Trainer(load_config(None, sys.argv[2:]), resume=resume, progress=False)
step = trainer.train_step
def slow_step(batch):
    out = step(batch)
    print("step", trainer.iteration, flush=True)
    time.sleep(0.2)
    return out
trainer.train_step = slow_step
try:
    trainer.fit()
except TrainingInterrupted as err:
    print("interrupted", err.iteration, flush=True)
    sys.exit(128 + err.signum)
"""


def overrides(root, name):
    return [
        "data.train_size=16",
        "data.val_size=6",
        *TINY,
        "train.iters=8",
        "train.batch_size=4",
        "train.log_every=1",
        "train.checkpoint_every=100",
        "train.deterministic=true",
        "train.threads=1",
        "eval.figure_images=0",
        f"output.root={root}",
        f"output.name={name}",
    ]


def start(mode, root, name):
    args = [sys.executable, "-c", SCRIPT, mode, *overrides(root, name)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, text=True)


def final_state(root, name):
    return ckpt.load_checkpoint(ckpt.list_checkpoints(root / name / "checkpoints")[-1])


def test_sigterm_writes_a_checkpoint_and_resume_matches_uninterrupted(tmp_path):
    """Every run in its own process with one thread, so that only the interruption differs."""
    proc = start("new", tmp_path, "killed")
    for line in proc.stdout:
        if line.startswith("step 3"):
            proc.send_signal(signal.SIGTERM)
            break
    out = proc.stdout.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    stopped_at = int(out.split("interrupted")[1].split()[0])
    assert 3 <= stopped_at < 8
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "killed" / "checkpoints")]
    assert names == [f"iter_{stopped_at:07d}.pt"]

    resumed, straight = start("resume", tmp_path, "killed"), start("new", tmp_path, "straight")
    assert resumed.wait(timeout=300) == 0 and straight.wait(timeout=300) == 0
    a, b = final_state(tmp_path, "killed"), final_state(tmp_path, "straight")
    assert a["iteration"] == b["iteration"] == 8
    for k, v in a["model"].items():
        assert torch.allclose(v.float(), b["model"][k].float(), atol=1e-6), k
    records = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["iter"] for r in records] == list(range(1, 9))


def test_metrics_log_keeps_records_up_to_the_checkpoint_and_drops_a_cut_line(tmp_path):
    """After a kill: records past the resumed checkpoint go, and so does a half-written line."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iter": 1}\n{"iter": 2}\n\n{"iter": 3}\n{"iter": 4, "ce": 0.')
    with open_metrics_log(path, 2) as log:
        log.write('{"iter": 3, "again": true}\n')
    assert path.read_text().splitlines() == [
        '{"iter": 1}',
        '{"iter": 2}',
        '{"iter": 3, "again": true}',
    ]
