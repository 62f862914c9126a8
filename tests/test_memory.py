"""ClassMemory: ring buffers against a plain Python model, region memories, storage, state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from contrastseg.contrast import ClassMemory
from contrastseg.errors import ConfigError

C, T, V, R = 3, 7, 2, 5


def _planted_batch(gen, b, h=3, w=4, step=0, counter=0):
    """Labels in {0, 1, 2, 255}; channel 0 = class, 1 = unique pixel id, 2 = step, 3 = 1."""
    probs = torch.rand(4, generator=gen) + 0.05
    target = torch.multinomial(probs, b * h * w, replacement=True, generator=gen).view(b, h, w)
    target[target == 3] = 255
    ids = torch.arange(counter, counter + b * h * w, dtype=torch.float32).view(b, h, w)
    cls = torch.where(target == 255, -1, target).float()
    embed = torch.stack([cls, ids, torch.full_like(ids, step), torch.ones_like(ids)], 1)
    return embed, target


class RingModel:
    """Per class a list of T slots written one entry at a time."""

    def __init__(self, size):
        self.size = size
        self.slots = [[None] * size for _ in range(C)]
        self.ptr = [0] * C
        self.count = [0] * C

    def write(self, c, item):
        self.slots[c][self.ptr[c]] = item
        self.ptr[c] = (self.ptr[c] + 1) % self.size
        self.count[c] = min(self.count[c] + 1, self.size)


def test_pixel_ring_matches_python_model_with_wrap_around():
    gen = torch.Generator().manual_seed(0)
    mem = ClassMemory(C, dim=4, pixel_size=T, pixels_per_image=V, region_mode="none", seed=1)
    model = RingModel(T)
    counter = 0
    for step in range(25):
        b = int(torch.randint(1, 6, (1,), generator=gen))  # up to 5 x 2 = 10 > T at once
        embed, target = _planted_batch(gen, b, step=step, counter=counter)
        counter += embed[:, 1].numel()
        mem.push(embed, target)
        for i in range(b):
            for c in range(C):
                ids = set(embed[i, 1][target[i] == c].long().tolist())
                for _ in range(min(V, len(ids))):
                    model.write(c, ((step, i), frozenset(ids)))
        assert mem.pixel_ptr.tolist() == model.ptr
        assert mem.pixel_count.tolist() == model.count
        groups: dict = {}
        for c in range(C):
            for s in range(T):
                entry = mem.pixel_queue[c, s]
                item = model.slots[c][s]
                if item is None:
                    assert torch.equal(entry, torch.zeros(4))
                    continue
                key, allowed = item
                assert entry[0].item() == c  # the pixel really has class c
                assert entry[2].item() == key[0]  # written by the right push
                assert int(entry[1].item()) in allowed  # ... and the right image and class
                groups.setdefault((c, key), []).append(int(entry[1].item()))
        for ids in groups.values():
            assert len(ids) == len(set(ids))  # distinct random pixels
    assert min(model.count) == T  # every class, class 0 included, wrapped around
    feats, labels = mem.bank()
    assert feats.shape == (C * T, 4) and torch.equal(feats[:, 0].long(), labels)


def test_random_pixels_are_uniform_within_a_class():
    mem = ClassMemory(2, dim=2, pixel_size=1000, pixels_per_image=1, region_mode="none")
    target = torch.tensor([[[0, 0, 0, 0, 1, 1]]])
    embed = torch.stack([torch.arange(6.0).view(1, 1, 6), torch.zeros(1, 1, 6)], 1)
    for _ in range(200):
        mem.push(embed, target)
    picked = mem.pixel_queue[0, :200, 0].long()
    counts = torch.bincount(picked, minlength=4)[:4]
    assert (counts > 25).all(), counts  # 50 expected per pixel of class 0
    assert set(mem.pixel_queue[1, :200, 0].long().tolist()) == {4, 5}


def _region_means(embed, target, c):
    x = embed.permute(0, 2, 3, 1)
    return [
        F.normalize(x[i][target[i] == c].mean(0), dim=0) if (target[i] == c).any() else None
        for i in range(embed.shape[0])
    ]


def test_region_fifo_matches_model():
    gen = torch.Generator().manual_seed(2)
    mem = ClassMemory(C, dim=4, pixel_size=0, region_mode="fifo", region_size=R)
    model = RingModel(R)
    for step in range(9):
        b = int(torch.randint(1, 4, (1,), generator=gen))
        embed, target = _planted_batch(gen, b, step=step)
        embed = embed + torch.randn(embed.shape, generator=gen)
        mem.push(embed, target)
        for i in range(b):
            for c in range(C):
                mean = _region_means(embed, target, c)[i]
                if mean is not None:
                    model.write(c, mean)
        assert mem.region_ptr.tolist() == model.ptr
        assert mem.region_count.tolist() == model.count
        for c in range(C):
            for s in range(R):
                if model.slots[c][s] is not None:
                    torch.testing.assert_close(mem.region_queue[c, s], model.slots[c][s])
    feats, labels = mem.bank()
    assert len(labels) == sum(model.count)


def test_region_per_image():
    gen = torch.Generator().manual_seed(3)
    mem = ClassMemory(C, dim=4, pixel_size=4, region_mode="per_image", num_images=6)
    embed, target = _planted_batch(gen, 3)
    embed = embed + torch.randn(embed.shape, generator=gen)
    mem.push(embed, target, image_ids=torch.tensor([4, 0, 4]))  # image 4 twice: last wins
    for c in range(C):
        means = _region_means(embed, target, c)
        for slot, i in ((4, 2), (0, 1)):
            assert bool(mem.region_filled[c, slot]) == (means[i] is not None)
            if means[i] is not None:
                torch.testing.assert_close(mem.region_queue[c, slot], means[i])
        assert not mem.region_filled[c, [1, 2, 3, 5]].any()
    with pytest.raises(ConfigError, match="image_ids"):
        mem.push(embed, target)
    with pytest.raises(ConfigError, match="num_images"):
        mem.push(embed, target, image_ids=torch.tensor([0, 6, 1]))
    with pytest.raises(ConfigError, match="num_images"):
        ClassMemory(C, region_mode="per_image")
    with pytest.raises(ConfigError, match="region_mode"):
        ClassMemory(C, region_mode="ring")


def test_float16_storage():
    gen = torch.Generator().manual_seed(4)
    mem = ClassMemory(C, dim=4, pixel_size=T, pixels_per_image=V, dtype=torch.float16)
    embed, target = _planted_batch(gen, 2)
    mem.push(embed, target)
    assert mem.pixel_queue.dtype == torch.float16 and mem.region_queue.dtype == torch.float16
    feats, labels = mem.bank()
    assert feats.dtype == torch.float32
    n_pix = int(mem.pixel_count.sum())
    assert torch.equal(feats[:n_pix, 0].long(), labels[:n_pix])  # small ints survive fp16
    assert mem.bank(dtype=None)[0].dtype == torch.float16


def test_state_dict_round_trip_and_generator_state():
    gen = torch.Generator().manual_seed(5)
    batches = [_planted_batch(gen, 2, step=s, counter=100 * s) for s in range(4)]
    mem = ClassMemory(C, dim=4, pixel_size=T, pixels_per_image=V, region_size=R, seed=7)
    for embed, target in batches[:3]:
        mem.push(embed, target)
    state = mem.state_dict()
    for key in ("pixel_queue", "pixel_ptr", "pixel_count", "region_queue", "region_ptr"):
        assert key in state
    other = ClassMemory(C, dim=4, pixel_size=T, pixels_per_image=V, region_size=R, seed=0)
    other.load_state_dict(state)
    for key, value in other.state_dict().items():
        assert torch.equal(value, state[key]), key
    mem.push(*batches[3])
    other.push(*batches[3])  # same generator state: the same random pixels
    assert torch.equal(mem.pixel_queue, other.pixel_queue)
    assert torch.equal(mem.bank()[0], other.bank()[0])


@pytest.mark.parametrize("mode", ["fifo", "per_image", "none"])
def test_fill_random_makes_every_slot_a_unit_vector_of_the_bank(mode):
    memory = ClassMemory(3, dim=8, pixel_size=5, region_mode=mode, region_size=4, num_images=6)
    memory.fill_random_(seed=1)
    feats, labels = memory.bank()
    regions = {"fifo": 4, "per_image": 6, "none": 0}[mode]
    assert feats.shape == (3 * (5 + regions), 8)
    assert torch.bincount(labels, minlength=3).tolist() == [5 + regions] * 3
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(len(feats)))
    assert len(torch.unique(feats, dim=0)) == len(feats)  # random, not one repeated vector


@pytest.mark.parametrize("mode", ["fifo", "per_image", "none"])
def test_slots_hold_exactly_the_entries_of_the_bank(mode):
    memory = ClassMemory(
        3, dim=4, pixel_size=5, pixels_per_image=2, region_mode=mode, region_size=3, num_images=4
    )
    g = torch.Generator().manual_seed(2)
    embed = F.normalize(torch.randn(2, 4, 4, 4, generator=g), dim=1)
    target = torch.randint(0, 3, (2, 4, 4), generator=g)
    target[0, 0] = 1  # class 1 more often than the others
    memory.push(embed, target, torch.tensor([0, 2]), generator=g)
    memory.push(embed.flip(0), target.flip(0), torch.tensor([1, 3]), generator=g)
    feats, labels = memory.bank()
    slots, filled = memory.slots()
    assert filled.shape == (3, 5 + {"fifo": 3, "per_image": 4, "none": 0}[mode])
    classes = torch.arange(3)[:, None].expand_as(filled)
    # Class by class, the same entries in the same order (pixels, then regions).
    for c in range(3):
        torch.testing.assert_close(slots[c][filled[c]], feats[labels == c])
    assert torch.equal(torch.sort(classes[filled]).values, torch.sort(labels).values)
