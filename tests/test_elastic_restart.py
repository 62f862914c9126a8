"""Elastic restarts: a worker group that torchrun restarts (TORCHELASTIC_RESTART_COUNT > 0), or
a run with train.auto_resume, resumes from its newest loadable checkpoint without --resume.

The end-to-end test runs two gloo processes on the CPU under `torchrun --max-restarts 1`; worker
1 SIGKILLs itself after the first checkpoint, on the first attempt only (the CHILD script's
fault hook, switched on by an environment variable). torchrun stops the other worker, restarts
both, and the run ends exactly where an uninterrupted torchrun run ends.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from contrastseg.engine import checkpoint as ckpt
from contrastseg.engine.trainer import Trainer
from contrastseg.errors import CheckpointError
from tiny import SMALL_CONTRAST, TINY

ITERS = 6
EVERY = 3  # train.checkpoint_every
KILL_AT = 4  # worker 1 dies at the start of iteration 5, after iteration 4 is logged

CHILD = """
import logging, os, signal, sys
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
import torch
torch.set_num_threads(1)
from contrastseg import load_config
from contrastseg.engine.trainer import Trainer
trainer = Trainer(load_config(None, sys.argv[1:]), progress=False)
kill_at = int(os.environ.get("TEST_KILL_RANK1_AT", "0"))
if kill_at and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0" and trainer.dist.rank == 1:
    step = trainer.train_step
    def step_or_die(batch):
        if trainer.iteration == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return step(batch)
    trainer.train_step = step_or_die
trainer.fit()
torch.distributed.destroy_process_group()
"""


def overrides(root, name):
    return [
        "data.train_size=8",
        "data.val_size=4",
        *TINY,
        *SMALL_CONTRAST,
        f"train.iters={ITERS}",
        "train.batch_size=4",
        "train.log_every=1",
        f"train.checkpoint_every={EVERY}",
        "train.keep_checkpoints=5",
        "train.deterministic=true",
        "train.threads=1",
        "eval.batch_size=4",
        "eval.figure_images=0",
        f"output.root={root}",
        f"output.name={name}",
    ]


def torchrun(root, name, kill_at=0):
    """Two workers under torchrun with one restart allowed; returns (exit status, output)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "RANK"))}
    env.update(OMP_NUM_THREADS="1", TEST_KILL_RANK1_AT=str(kill_at))
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "1",
        "--monitor-interval",
        "0.1",
        "--no-python",
        sys.executable,
        "-c",
        CHILD,
        *overrides(root, name),
    ]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout + done.stderr


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_state(run_dir):
    path = ckpt.list_checkpoints(run_dir / "checkpoints")[-1]
    assert path.name == f"iter_{ITERS:07d}.pt"
    return ckpt.load_checkpoint(path)


@pytest.mark.slow
@pytest.mark.serial
def test_torchrun_restart_after_a_killed_worker_matches_an_uninterrupted_run(tmp_path):
    code, out = torchrun(tmp_path, "straight")
    assert code == 0, out
    code, out = torchrun(tmp_path, "restarted", kill_at=KILL_AT)
    assert code == 0, out
    run_dir, reference = tmp_path / "restarted", tmp_path / "straight"
    # The first attempt really died after its checkpoint, and the restart resumed from it.
    assert "failed (exitcode: -9) local_rank: 1" in out, out
    resumed = f"resumed from {ckpt.checkpoint_path(run_dir / 'checkpoints', EVERY)} at iteration"
    assert out.count(resumed) == 2, out  # both workers, without --resume
    assert "torchrun restart 1 (TORCHELASTIC_RESTART_COUNT)" in out

    a, b = final_state(run_dir), final_state(reference)
    assert a["iteration"] == b["iteration"] == ITERS
    for section in ("model", "loss"):
        assert a[section].keys() == b[section].keys(), section
        for key, value in a[section].items():
            assert torch.equal(value, b[section][key]), f"{section}.{key} differs"
    assert int(a["loss"]["contrast.memory.pixel_count"].sum()) > 0
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and sa
    for key in sa:
        assert torch.equal(sa[key]["momentum_buffer"], sb[key]["momentum_buffer"]), key
    # Each process's random state went through the restart: the two processes' generators
    # differ from each other and equal the uninterrupted run's.
    assert len(a["processes"]) == 2
    pa, pb = a["processes"], b["processes"]
    assert not torch.equal(
        pa[0]["loss"]["contrast._extra_state"], pa[1]["loss"]["contrast._extra_state"]
    )
    for r in range(2):
        assert torch.equal(pa[r]["rng"]["torch"], pb[r]["rng"]["torch"])
        for key, value in pa[r]["loss"].items():
            assert torch.equal(value, pb[r]["loss"][key]), (r, key)
    # The first attempt logged iteration 4; the restart dropped it and logged it again once.
    keys = ("iter", "total", "ce", "aux_ce", "contrast", "lr")
    got, want = records(run_dir), records(reference)
    assert [r["iter"] for r in got] == list(range(1, ITERS + 1))
    assert all(r["contrast"] > 0 for r in want)
    for ra, rb in zip(got, want, strict=True):
        assert {k: ra[k] for k in keys} == {k: rb[k] for k in keys}, ra["iter"]
    ea = json.loads((run_dir / "eval.json").read_text())
    eb = json.loads((reference / "eval.json").read_text())
    assert ea == eb


@pytest.fixture
def run_with_checkpoint(tiny_cfg):
    """A finished 3-iteration run: its folder holds the checkpoint of iteration 3."""
    cfg = tiny_cfg("train.iters=3", "train.threads=1")
    Trainer(cfg, progress=False).fit()
    assert [p.name for p in ckpt.list_checkpoints(cfg.run_dir / "checkpoints")] == [
        "iter_0000003.pt"
    ]
    return cfg


def test_restart_count_resumes_and_a_first_attempt_is_refused(
    run_with_checkpoint, tiny_cfg, monkeypatch
):
    longer = tiny_cfg("train.iters=5", "train.threads=1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    with pytest.raises(CheckpointError, match="already holds checkpoints: pass --resume"):
        Trainer(longer, progress=False)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert Trainer(longer, progress=False).iteration == 3
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "one")
    with pytest.raises(CheckpointError, match="TORCHELASTIC_RESTART_COUNT='one'"):
        Trainer(longer, progress=False)


def test_auto_resume_continues_a_run_and_starts_a_new_one(run_with_checkpoint, tiny_cfg):
    cfg = tiny_cfg("train.iters=5", "train.threads=1", "train.auto_resume=true")
    assert "TORCHELASTIC_RESTART_COUNT" not in os.environ
    trainer = Trainer(cfg, progress=False)
    assert trainer.iteration == 3
    assert trainer.fit().iteration == 5
    fresh = tiny_cfg(
        "train.iters=2", "train.threads=1", "train.auto_resume=true", "output.name=new"
    )
    assert Trainer(fresh, progress=False).iteration == 0


def test_auto_resume_over_only_broken_checkpoints_stops_and_keeps_them(
    run_with_checkpoint, tiny_cfg
):
    path = ckpt.list_checkpoints(run_with_checkpoint.run_dir / "checkpoints")[0]
    path.write_bytes(path.read_bytes()[:200])
    cfg = tiny_cfg("train.iters=5", "train.threads=1", "train.auto_resume=true")
    with pytest.raises(CheckpointError, match="train.auto_resume: no loadable checkpoint in"):
        Trainer(cfg, progress=False)
    assert path.is_file()  # nothing deleted
