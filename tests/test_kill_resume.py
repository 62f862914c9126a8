"""SIGKILL at a random step, then --resume: the run ends bit for bit where an uninterrupted run
ends (weights, optimiser state, contrast memory, RNG, metrics log, eval.json).

Each run is its own process on one CPU thread in deterministic mode, so that only the kill
differs. SIGKILL cannot be caught: no checkpoint is written on the way out, so the resumed run
starts from the newest periodic checkpoint and repeats the iterations after it.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from contrastseg import load_config
from contrastseg.engine import checkpoint as ckpt
from contrastseg.engine.trainer import Trainer
from contrastseg.errors import CheckpointError
from tiny import SMALL_CONTRAST, TINY

ITERS = 12
EVERY = 3  # train.checkpoint_every

CHILD = """
import logging, os, sys, time
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
from contrastseg import load_config
from contrastseg.engine.trainer import Trainer
trainer = Trainer(load_config(None, sys.argv[2:]), resume=sys.argv[1] == "resume", progress=False)
delay = float(os.environ.get("STEP_DELAY", "0"))
if delay:  # slow steps down so that the parent's kill lands close to the step it chose
    step = trainer.train_step
    def slow_step(batch):
        out = step(batch)
        time.sleep(delay)
        return out
    trainer.train_step = slow_step
trainer.fit()
"""


def overrides(root, name):
    return [
        "data.train_size=16",
        "data.val_size=4",
        *TINY,
        *SMALL_CONTRAST,
        f"train.iters={ITERS}",
        "train.batch_size=4",
        "train.log_every=1",
        f"train.checkpoint_every={EVERY}",
        "train.keep_checkpoints=2",
        "train.deterministic=true",
        "train.threads=1",
        "eval.batch_size=4",
        "eval.figure_images=0",
        f"output.root={root}",
        f"output.name={name}",
    ]


def launch(mode, root, name, delay=0.0):
    """Start a training process; its stdout and stderr go to files in ``root``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STEP_DELAY": str(delay)}
    log = root / f"{name}.{mode}.log"
    with log.open("w") as out:
        args = [sys.executable, "-c", CHILD, mode, *overrides(root, name)]
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    return proc, log


def run(mode, root, name):
    proc, log = launch(mode, root, name)
    code = proc.wait(timeout=300)
    return code, log.read_text()


def logged_iters(run_dir):
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    # A record is one write of one line; only complete lines count.
    lines = path.read_text().split("\n")[:-1]
    return [json.loads(line)["iter"] for line in lines]


def kill_at(root, name, step):
    """Train with slowed steps and SIGKILL the process once iteration ``step`` is logged.
    Returns the last iteration logged before the process died."""
    proc, log = launch("new", root, name, delay=0.15)
    deadline = time.monotonic() + 300
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if any(i >= step for i in logged_iters(root / name)):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == -signal.SIGKILL, f"the run was not killed (exit {code}):\n{log.read_text()}"
    last = max(logged_iters(root / name))
    assert step <= last < ITERS, (step, last)
    assert not (root / name / "eval.json").exists()
    return last


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run every interrupted one is compared with."""
    root = tmp_path_factory.mktemp("straight")
    code, out = run("new", root, "straight")
    assert code == 0, out
    return root / "straight"


def final_state(run_dir):
    path = ckpt.list_checkpoints(run_dir / "checkpoints")[-1]
    assert path.name == f"iter_{ITERS:07d}.pt"
    return ckpt.load_checkpoint(path)


def assert_identical_runs(run_dir, reference):
    a, b = final_state(run_dir), final_state(reference)
    assert a["iteration"] == b["iteration"] == ITERS
    for section in ("model", "loss"):
        assert a[section].keys() == b[section].keys(), section
        for key, value in a[section].items():
            assert torch.equal(value, b[section][key]), f"{section}.{key} differs"
    # The contrast memory is really part of the comparison: it was filled and read.
    assert int(a["loss"]["contrast.memory.pixel_count"].sum()) > 0
    assert all(r["contrast"] > 0 for r in _records(reference))
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and sa
    for key in sa:
        assert torch.equal(sa[key]["momentum_buffer"], sb[key]["momentum_buffer"]), key
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    ea = json.loads((run_dir / "eval.json").read_text())
    eb = json.loads((reference / "eval.json").read_text())
    assert ea == eb  # mIoU, per-class IoU and accuracy, confusion matrix, iteration
    assert logged_iters(run_dir) == list(range(1, ITERS + 1))
    keys = ("total", "ce", "aux_ce", "contrast", "lr")
    for ra, rb in zip(_records(run_dir), _records(reference), strict=True):
        assert {k: ra[k] for k in keys} == {k: rb[k] for k in keys}, ra["iter"]
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))  # no torn temporary file left


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# Seed 1 draws step 5 (between checkpoints), seed 7 step 6: the kill lands while or just after
# iteration 6's checkpoint is written.
@pytest.mark.parametrize("seed", [1, 7])
def test_sigkill_at_a_random_step_then_resume_matches_uninterrupted(tmp_path, straight, seed):
    step = random.Random(seed).randint(EVERY + 1, ITERS - 2)  # after the first checkpoint
    last = kill_at(tmp_path, "killed", step)
    on_disk = ckpt.list_checkpoints(tmp_path / "killed" / "checkpoints")
    for path in on_disk:  # a kill during a save leaves the previous file whole
        ckpt.load_checkpoint(path)
    newest = int(on_disk[-1].stem.split("_")[1])
    assert newest % EVERY == 0 and last - EVERY <= newest <= last, (step, last, newest)

    code, out = run("resume", tmp_path, "killed")
    assert code == 0, out
    assert f"resumed from {on_disk[-1]} at iteration {newest}" in out
    assert_identical_runs(tmp_path / "killed", straight)


def test_sigkill_before_the_first_checkpoint(tmp_path, straight):
    """Nothing to resume from: --resume refuses and names the empty checkpoint folder; the
    same command without --resume starts again from iteration 0 (the killed run's metrics
    records are dropped) and ends identical to the uninterrupted run."""
    kill_at(tmp_path, "early", 1)
    assert ckpt.list_checkpoints(tmp_path / "early" / "checkpoints") == []

    where = tmp_path / "early" / "checkpoints"
    expected = re.escape(f"--resume: no loadable checkpoint in {where}")
    with pytest.raises(CheckpointError, match=expected):
        Trainer(load_config(None, overrides(tmp_path, "early")), resume=True, progress=False)

    code, out = run("new", tmp_path, "early")
    assert code == 0, out
    assert_identical_runs(tmp_path / "early", straight)
