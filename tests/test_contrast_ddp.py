"""Two gloo processes push different data; both end with identical memories holding both."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from contrastseg.contrast import ClassMemory

C, D = 3, 4


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_batch(rank: int, step: int):
    """Rank-specific data; channel 0 = class, 1 = rank, 2 = step, 3 = pixel id."""
    gen = torch.Generator().manual_seed(100 * rank + step)
    b = 2 + rank  # different batch sizes per rank
    target = torch.randint(0, C + 1, (b, 4, 5), generator=gen)
    target[target == C] = 255
    cls = torch.where(target == 255, -1, target).float()
    ids = torch.arange(b * 20, dtype=torch.float32).view(b, 4, 5)
    embed = torch.stack([cls, torch.full_like(ids, rank), torch.full_like(ids, step), ids], 1)
    image_ids = torch.arange(b) + 10 * rank
    return embed, target, image_ids


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        memories = {
            "fifo": ClassMemory(
                C, dim=D, pixel_size=40, pixels_per_image=3, region_size=30, seed=rank
            ),
            "per_image": ClassMemory(
                C,
                dim=D,
                pixel_size=6,
                pixels_per_image=3,
                region_mode="per_image",
                num_images=20,
                seed=rank,
            ),
        }
        for step in range(3):
            embed, target, image_ids = _rank_batch(rank, step)
            for mem in memories.values():
                mem.push(embed, target, image_ids)
        torch.save(
            {k: m.state_dict() for k, m in memories.items()},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.serial
def test_ranks_hold_identical_memories_with_both_ranks_data(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for kind in ("fifo", "per_image"):
        a, b = states[0][kind], states[1][kind]
        assert a.keys() == b.keys()
        for key in a:
            if key != "_extra_state":  # each rank's own generator state differs by design
                assert torch.equal(a[key], b[key]), (kind, key)

    fifo = states[0]["fifo"]
    count = fifo["pixel_count"]
    assert (count > 0).all()
    for c in range(C):
        entries = fifo["pixel_queue"][c, : count[c]]
        if count[c] == entries.shape[0] == 40:  # full ring: oldest entry at the pointer
            entries = torch.roll(entries, -int(fifo["pixel_ptr"][c]), 0)
        assert (entries[:, 0] == c).all()  # the pixel's own class
        assert set(entries[:, 1].tolist()) == {0.0, 1.0}  # data from both ranks
        # rank-major order inside each step: rank 0's entries precede rank 1's
        for step in range(3):
            ranks = entries[entries[:, 2] == step, 1].tolist()
            assert ranks == sorted(ranks)
    for c in range(C):
        regions = fifo["region_queue"][c, : fifo["region_count"][c]]
        # normalised means keep the sign of the planted rank channel: 0 for rank 0, > 0 for 1
        assert set((regions[:, 1] > 0).tolist()) == {False, True}

    per_image = states[0]["per_image"]
    filled = per_image["region_filled"]
    # rank 0 writes images 0-1, rank 1 images 10-12
    assert filled[:, :2].any() and filled[:, 10:13].any()
    assert not filled[:, 2:10].any() and not filled[:, 13:].any()
