"""`PrototypeClassifier` under DDP (two gloo processes, float64, CPU) against the released code
run in one process per rank: after each step both processes hold the average of the prototypes
each rank's reference update gives (each from its own batch and its own Gumbel noise), and each
process's logits, targets and losses are its own reference's."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from test_prototype_parity import GRID, B, _check_margins, batch, build, close, draw_noise

WORLD = 2
STEPS = 2


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
        _, module = build("gumbel", noise_seed=rank)  # same weights, own noise
        calls = []
        for step in range(STEPS):
            x, labels = batch(step, rank)
            out = module(x, labels)
            calls.append(
                {
                    "logits": out.logits.detach(),
                    "target": out.target,
                    "ppc": out.ppc.detach(),
                    "ppd": out.ppd.detach(),
                    "prototypes": module.prototypes.clone(),
                    "generator": module.generator_state(),
                }
            )
        torch.save(calls, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.serial
def test_ddp_prototypes_are_the_average_of_the_reference_updates(records):
    refs = [build("gumbel")[0] for _ in range(WORLD)]
    gens = [torch.Generator().manual_seed(rank) for rank in range(WORLD)]
    shared = refs[0].prototypes.detach().clone()
    for step in range(STEPS):
        local = []
        for rank, (ref, gen) in enumerate(zip(refs, gens, strict=True)):
            what = f"rank {rank} step {step}"
            ref.prototypes = torch.nn.Parameter(shared.clone(), requires_grad=False)
            x, labels = batch(step, rank)
            noise = draw_noise(gen, B * GRID[0] * GRID[1])
            seg, _, target, ppc, ppd = ref(x, labels, noise)
            _check_margins(ref.checks, "gumbel", what)
            call = records[rank][step]
            close(call["logits"], seg.detach(), f"{what} logits")
            assert torch.equal(call["target"], target.long()), what
            close(call["ppc"], ppc.detach(), f"{what} PPC")
            close(call["ppd"], ppd.detach(), f"{what} PPD")
            assert torch.equal(call["generator"], gen.get_state()), what
            local.append(ref.prototypes.detach())
        # The release: each process divides its prototypes by the world size, then all-reduce.
        shared = sum(p / WORLD for p in local)
        assert not torch.allclose(local[0], local[1])  # the processes' updates differ
        for rank in range(WORLD):
            close(records[rank][step]["prototypes"], shared, f"rank {rank} step {step} average")
        assert torch.equal(records[0][step]["prototypes"], records[1][step]["prototypes"])
