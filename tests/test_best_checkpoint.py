"""Periodic validation keeps the best checkpoint: checkpoints/best.pt, outside the rotation, named
with its iteration and mIoU in eval.json, and what ``report --checkpoint best`` reads."""

import json

import pytest
import torch
from typer.testing import CliRunner

from contrastseg import evaluate_checkpoint, train
from contrastseg.cli import app
from contrastseg.engine import checkpoint as ckpt
from contrastseg.errors import ContrastSegError
from contrastseg.report import percent
from contrastseg.rundir import load_run


def test_eval_every_keeps_the_best_checkpoint(tiny_cfg):
    cfg = tiny_cfg(
        "train.iters=6",
        "train.eval_every=2",
        "train.checkpoint_every=2",
        "optim.lr=0.05",
        "data.val_size=3",
        "eval.figure_images=0",
    )
    result = train(cfg, progress=False)
    run = result.run_dir
    best = run / "checkpoints" / "best.pt"
    assert best.is_file()
    # Reference: every checkpoint of the run evaluated afresh; the best is the first maximum.
    scores = []
    for path in ckpt.list_checkpoints(run / "checkpoints"):
        it = ckpt.load_checkpoint(path)["iteration"]
        out = run / f"eval_{it}.json"
        scores.append((it, evaluate_checkpoint(cfg, path, out=out)["mIoU"]))
    assert [it for it, _ in scores] == [2, 4, 6]
    top = max(m for _, m in scores)
    want_iter = next(it for it, m in scores if m == top)
    ev = json.loads((run / "eval.json").read_text())
    assert ev["best"]["iteration"] == want_iter
    assert ev["best"]["mIoU"] == pytest.approx(top, abs=1e-12)
    assert ev["best"]["checkpoint"] == "checkpoints/best.pt"
    assert ev["iteration"] == 6 and ev["mIoU"] == pytest.approx(scores[-1][1], abs=1e-12)
    # best.pt holds the weights of that iteration
    state = ckpt.load_checkpoint(best)
    assert state["iteration"] == want_iter
    same = ckpt.load_checkpoint(ckpt.checkpoint_path(run / "checkpoints", want_iter))
    for key, value in same["model"].items():
        assert torch.equal(value, state["model"][key]), key
    # never rotated away, never taken for a resume
    ckpt.rotate(run / "checkpoints", 1)
    assert best.is_file()
    assert best not in ckpt.list_checkpoints(run / "checkpoints")
    # report --checkpoint best reads it
    assert load_run(run, "best").miou == pytest.approx(top, abs=1e-12)
    assert load_run(run).miou == pytest.approx(scores[-1][1], abs=1e-12)
    out = CliRunner().invoke(app, ["report", str(run), "--table", "1", "--checkpoint", "best"])
    assert out.exit_code == 0, out.output
    assert f" {percent(top)}" in out.output


def test_without_eval_every_there_is_no_best(tiny_cfg):
    cfg = tiny_cfg("train.iters=2", "data.val_size=2", "eval.figure_images=0")
    run = train(cfg, progress=False).run_dir
    assert not (run / "checkpoints" / "best.pt").exists()
    assert "best" not in json.loads((run / "eval.json").read_text())
    with pytest.raises(ContrastSegError, match="no 'best' entry.*train.eval_every"):
        load_run(run, "best")
    with pytest.raises(ContrastSegError, match="checkpoint 'worst'"):
        load_run(run, "worst")
