"""`PixelContrast` under DDP (two gloo processes) against the plain float64 reference: each
process's value and gradients from the memory it read, and the memory after each push holding
both processes' entries in rank order, as the reference's ring buffer writes them."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from contrast_reference import (
    PARAM_KEYS,
    check_module_selection,
    local_entries,
    push,
    reference_call,
)
from test_contrast_parity import (
    IMAGE_IDS,
    MEMORY_ULP,
    Spy,
    batch,
    build,
    check_memory,
    close,
    options,
    state_of,
)

WORLD = 2
CASES = {
    "all-fifo-proj": dict(sampling="all", region="fifo", projection=True),
    "all-per_image-bf16-emb": dict(
        sampling="all", region="per_image", memory_dtype=torch.bfloat16, projection=False
    ),
    "semi_hard-fifo-proj": dict(sampling="semi_hard", region="fifo", projection=True),
    "random-none-fp16-emb": dict(
        sampling="random", region="none", memory_dtype=torch.float16, projection=False
    ),
}


def _opts(case: str, rank: int):
    opts = options(**CASES[case])
    opts.seed = rank  # each process draws its own pixels
    if opts.region_mode == "per_image":
        opts.num_images = 4
    return opts


def _rank_step(rank: int, step: int) -> int:
    return 10 * rank + step


def _image_ids(rank: int, step: int) -> list[int]:
    return [i + rank for i in IMAGE_IDS[step % 3]]  # ids 0..3, overlapping between ranks


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        record = {}
        for case in CASES:
            opts = _opts(case, rank)
            module = build(opts)
            spy = Spy(None)
            calls = []
            for step in range(3):
                x, logits, labels = batch(
                    _rank_step(rank, step), projection=opts.in_channels is not None
                )
                before = state_of(module)
                n = len(spy.index)
                features = x.clone().requires_grad_(True)
                for p in module.parameters():
                    p.grad = None
                ids = torch.tensor(_image_ids(rank, step))
                loss = module(features, logits, labels, image_ids=ids)
                loss.backward()
                calls.append(
                    {
                        "before": before,
                        "after": state_of(module),
                        "loss": loss.detach(),
                        "grad": features.grad,
                        "params": {k: p.grad for k, p in module.named_parameters()},
                        "index": spy.index[n] if len(spy.index) > n else None,
                    }
                )
            record[case] = calls
        torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.serial
@pytest.mark.parametrize("case", list(CASES))
def test_ddp_parity_with_the_reference(case, records):
    for step in range(3):
        entries, ids = [], []
        for rank in range(WORLD):
            opts = _opts(case, rank)
            call = records[rank][case][step]
            x, logits, labels = batch(
                _rank_step(rank, step), projection=opts.in_channels is not None
            )
            ref = reference_call(
                call["before"], opts, x, logits, labels, module_index=call["index"]
            )
            ref.loss.backward()
            what = f"{case} rank {rank} call {step}"
            close(call["loss"], ref.loss.detach(), 1e-9, f"{what} loss")
            close(call["grad"], ref.features.grad, 1e-9, f"{what} d/d features")
            if opts.in_channels is not None:
                for key in PARAM_KEYS:
                    close(call["params"][key], ref.params[key].grad, 1e-9, f"{what} d/d {key}")
            if call["index"] is not None:
                check_module_selection(call["index"], ref, opts, 1e-9, f"{what} memory subsets")
            entries.append(local_entries(ref.embed, ref.grid, opts, ref.generator))
            ids.append(_image_ids(rank, step))
            assert torch.equal(call["after"]["_extra_state"], ref.generator.get_state()), what
        # Both processes hold the same memory: both processes' entries, rank 0's first.
        for rank in range(WORLD):
            call = records[rank][case][step]
            expected = push(call["before"], opts, entries, ids)
            tol = MEMORY_ULP[opts.memory_dtype]
            check_memory(call["after"], expected, tol, f"{case} rank {rank} call {step}")
