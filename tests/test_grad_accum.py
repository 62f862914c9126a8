"""Gradient accumulation: a step in micro-batches equals the full-batch step."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from contrastseg.config import load_config
from contrastseg.engine import checkpoint as ckpt
from contrastseg.engine.trainer import Trainer, collate_train
from contrastseg.errors import ConfigError
from test_ddp_training import free_port, join_as, overrides


def _float64_trainer(cfg) -> Trainer:
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return Trainer(cfg, progress=False)
    finally:
        torch.set_default_dtype(default)


def _batch(trainer: Trainer, indices: list[int]) -> dict:
    return collate_train([{**trainer.train_set[i], "index": i} for i in indices])


@pytest.mark.parametrize("accum", [2, 4])
def test_accumulated_step_equals_full_batch_step(tiny_cfg, accum):
    """With batch statistics out of play (BN frozen, no dropout), the weights after a step in
    ``accum`` micro-batches equal those after one full-batch step, and so do the logged terms:
    CE is normalised by the labelled pixels of the whole step, not of each micro-batch."""
    # batch 8: micro-batches of 4 and 2 images (one image per micro-batch is refused with the
    # DeepLabV3 head, whose image-pooling batch norm needs two in training)
    common = ["model.dropout=0.0", "train.batch_size=8", "loss.ce.aux_weight=0.4"]
    full = _float64_trainer(tiny_cfg(*common, "output.name=full"))
    split = _float64_trainer(tiny_cfg(*common, f"train.grad_accum={accum}", "output.name=split"))
    split.model.load_state_dict(full.model.state_dict())
    batch = _batch(full, [0, 3, 5, 9, 1, 12, 7, 14])
    # Make the labelled-pixel counts of the micro-batches unequal, so that a per-micro-batch
    # mean would differ from the full-batch mean.
    batch["mask"][0, :30] = 255
    for trainer in (full, split):
        trainer.model.train()
        for m in trainer.model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
    before = {k: v.clone() for k, v in full.model.state_dict().items()}
    a = full.train_step(batch)
    b = split.train_step(batch)
    assert a["ce"] == pytest.approx(b["ce"], rel=1e-12)
    assert a["aux_ce"] == pytest.approx(b["aux_ce"], rel=1e-12)
    assert a["total"] == pytest.approx(b["total"], rel=1e-12)
    moved = 0
    for key, value in full.model.state_dict().items():
        torch.testing.assert_close(value, split.model.state_dict()[key], rtol=1e-10, atol=1e-12)
        moved += not torch.equal(value, before[key])
    assert moved > 20  # the step really changed the weights


def test_a_batch_that_does_not_split_is_refused(tiny_cfg):
    with pytest.raises(ConfigError, match=r"train.batch_size = 4 .* train.grad_accum = 3"):
        Trainer(tiny_cfg("train.grad_accum=3"), progress=False)


def test_contrast_with_accumulation_trains_and_fills_the_memory(tiny_cfg):
    contrast = [
        "loss.contrast.enabled=true",
        "loss.contrast.warmup_iters=0",
        "loss.contrast.max_views=4",
        "loss.contrast.memory.enabled=true",
        "loss.contrast.memory.pixel_size=256",
        "loss.contrast.memory.region_size=8",
    ]
    split = Trainer(tiny_cfg(*contrast, "train.grad_accum=2", "output.name=a"), progress=False)
    full = Trainer(tiny_cfg(*contrast, "output.name=b"), progress=False)
    head = {k: v.clone() for k, v in split.loss_set.contrast.projection.state_dict().items()}
    batch = _batch(split, [0, 1, 2, 3])
    values = split.train_step(batch)
    full.train_step(batch)
    assert values["skipped"] == 0.0
    assert values["contrast"] > 0
    proj = split.loss_set.contrast.projection.state_dict()
    assert any("weight" in k and not torch.equal(v, head[k]) for k, v in proj.items())
    # Both micro-batches pushed their pixels: as many per class as the full-batch step.
    split_count = split.loss_set.contrast.memory.pixel_count
    assert int(split_count.sum()) > 0
    assert torch.equal(split_count, full.loss_set.contrast.memory.pixel_count)


def _worker(rank, world, port, root):
    join_as(rank, world, port)
    cfg = load_config(None, [*overrides(root, "ddp"), "train.batch_size=4", "train.grad_accum=2"])
    Trainer(cfg, progress=False).fit()
    dist.destroy_process_group()


@pytest.mark.serial
def test_two_process_accumulation_equals_single_process_accumulation(tmp_path):
    """Global batch 4 in 2 micro-batches: one process takes images (a, b) then (c, d); two
    processes take a | b then c | d. SyncBN sees the same micro-batches, DDP all-reduces only
    in the last backward, so the weights agree."""
    torch.set_num_threads(1)
    cfg = load_config(
        None, [*overrides(tmp_path, "single"), "train.batch_size=4", "train.grad_accum=2"]
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        Trainer(cfg, progress=False).fit()
    finally:
        torch.set_default_dtype(default)
    mp.spawn(_worker, args=(2, free_port(), tmp_path), nprocs=2, join=True)
    a = ckpt.load_checkpoint(ckpt.list_checkpoints(tmp_path / "single" / "checkpoints")[-1])
    b = ckpt.load_checkpoint(ckpt.list_checkpoints(tmp_path / "ddp" / "checkpoints")[-1])
    assert a["iteration"] == b["iteration"] == 3
    for key, value in a["model"].items():
        assert torch.allclose(value.float(), b["model"][key].float(), atol=1e-5), key
