"""Two gloo processes on the loopback interface against one process: same weights, same counts."""

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from contrastseg.config import load_config
from contrastseg.data import build_eval_dataset
from contrastseg.engine import checkpoint as ckpt
from contrastseg.engine.evaluator import evaluate
from contrastseg.engine.inference import load_trained_model
from contrastseg.engine.trainer import Trainer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(root, name):
    return [
        "data.train_size=8",
        "data.val_size=5",  # odd: 3 images on rank 0, 2 on rank 1
        "data.image_size=[48, 48]",
        "data.crop_size=[40, 40]",
        "model.head_channels=16",
        "model.aux_channels=8",
        "model.dropout=0.0",  # dropout masks are per process: leave them out of the comparison
        "train.iters=3",
        "train.batch_size=2",
        "train.log_every=1",
        "train.checkpoint_every=100",
        "train.deterministic=true",
        "train.device=cpu",
        "eval.figure_images=0",
        f"output.root={root}",
        f"output.name={name}",
    ]


def join_as(rank, world, port):
    """The environment torchrun gives process ``rank``; one thread, float64 by default."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)


def _worker(rank, world, port, root, reference_ckpt):
    join_as(rank, world, port)
    cfg = load_config(None, overrides(root, "ddp"))
    Trainer(cfg, progress=False).fit()  # joins the process group
    model, _, _ = load_trained_model(reference_ckpt, "cpu")
    metrics, _ = evaluate(
        model, build_eval_dataset(cfg.data), torch.device("cpu"), 2, rank=rank, world_size=world
    )
    if rank == 0:
        (root / "ddp_confusion.json").write_text(json.dumps(metrics["confusion"]))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.serial
def test_two_process_training_equals_single_process(tmp_path):
    """float64 throughout, so that only a logic difference (batch split, SyncBN, loss
    normalisation, gradient averaging) can exceed the tolerance; in float32 batch-norm
    backward passes amplify summation-order noise to ~1e-4 within three steps."""
    torch.set_num_threads(1)
    single_cfg = load_config(None, overrides(tmp_path, "single"))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        Trainer(single_cfg, progress=False).fit()
    finally:
        torch.set_default_dtype(default)
    single_ckpt = ckpt.list_checkpoints(tmp_path / "single" / "checkpoints")[-1]

    mp.spawn(_worker, args=(2, free_port(), tmp_path, single_ckpt), nprocs=2, join=True)

    a = ckpt.load_checkpoint(single_ckpt)
    b = ckpt.load_checkpoint(ckpt.list_checkpoints(tmp_path / "ddp" / "checkpoints")[-1])
    assert a["iteration"] == b["iteration"] == 3
    moved = 0
    for key, value in a["model"].items():
        other = b["model"][key]
        assert torch.allclose(value.float(), other.float(), atol=1e-5), key
        moved += 1
    assert moved > 100
    # Distributed evaluation over 5 images counts every image exactly once.
    model, _, _ = load_trained_model(single_ckpt, "cpu")
    single_metrics, _ = evaluate(model, build_eval_dataset(single_cfg.data), torch.device("cpu"), 2)
    ddp_confusion = json.loads((tmp_path / "ddp_confusion.json").read_text())
    assert ddp_confusion == single_metrics["confusion"]
    assert sum(map(sum, ddp_confusion)) == 5 * 48 * 48
    # Only rank 0 wrote the run directory's logs: one record per iteration.
    records = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["iter"] for r in records] == [1, 2, 3]
