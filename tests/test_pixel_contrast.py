"""Pixel contrast: sampler, loss, memory sampling, module and benchmark."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from contrastseg.benchmarks.contrast_loss import (
    format_loss_benchmark,
    loop_reference_loss,
    run_loss_benchmark,
)
from contrastseg.contrast import (
    PixelContrast,
    contrast_loss,
    sample_anchors,
    select_from_bank,
)
from contrastseg.errors import ConfigError

TAU, TAU_B = 0.1, 0.07


# ----------------------------------------------------------------------------- references
def naive_loss(feats, labels, tau, tau_b, bank_feats=None, bank_labels=None, bank_index=None):
    """The loss of docs/method.md with explicit loops over anchors and candidates."""
    z = feats.tolist()
    y = labels.tolist()
    bz = bank_feats.tolist() if bank_feats is not None else []
    by = bank_labels.tolist() if bank_labels is not None else []

    def dot(u, v):
        return sum(a * b for a, b in zip(u, v, strict=True)) / tau

    losses = []
    for i in range(len(z)):
        cands = [(z[j], y[j]) for j in range(len(z)) if j != i]
        if bank_feats is not None:
            cols = range(len(bz)) if bank_index is None else bank_index[i].tolist()
            cands += [(bz[j], by[j]) for j in cols if j >= 0]
        pos = [dot(z[i], v) for v, lab in cands if lab == y[i]]
        neg = [dot(z[i], v) for v, lab in cands if lab != y[i]]
        if not pos:
            continue
        neg_sum = sum(math.exp(s) for s in neg)
        terms = [s - math.log(math.exp(s) + neg_sum) for s in pos]
        losses.append(-(tau / tau_b) * sum(terms) / len(terms))
    return sum(losses) / len(losses) if losses else 0.0


def _unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


def _labels(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, k, (n,), generator=g)


# ----------------------------------------------------------------------------------- loss
def test_loss_matches_naive_in_batch():
    feats, labels = _unit(14, 6, 0), _labels(14, 4, 1)
    got = contrast_loss(feats, labels, TAU, TAU_B)
    assert got.dtype == torch.float64
    assert abs(got.item() - naive_loss(feats, labels, TAU, TAU_B)) < 1e-9


@pytest.mark.parametrize("cache_bytes", [1 << 30, 0])  # similarities kept / recomputed
@pytest.mark.parametrize("chunk_elements", [1 << 21, 13])
def test_loss_matches_naive_with_whole_bank(chunk_elements, cache_bytes):
    feats, labels = _unit(12, 5, 2), _labels(12, 3, 3)
    bank, bank_labels = _unit(17, 5, 4), _labels(17, 4, 5)
    got = contrast_loss(
        feats,
        labels,
        TAU,
        TAU_B,
        bank,
        bank_labels,
        chunk_elements=chunk_elements,
        cache_bytes=cache_bytes,
    )
    want = naive_loss(feats, labels, TAU, TAU_B, bank, bank_labels)
    assert abs(got.item() - want) < 1e-9


def test_loss_matches_naive_with_bank_index():
    feats, labels = _unit(10, 5, 6), _labels(10, 3, 7)
    bank, bank_labels = _unit(15, 5, 8), _labels(15, 3, 9)
    g = torch.Generator().manual_seed(10)
    index = torch.randint(-1, 15, (10, 6), generator=g)
    got = contrast_loss(feats, labels, TAU, TAU_B, bank, bank_labels, index)
    want = naive_loss(feats, labels, TAU, TAU_B, bank, bank_labels, index)
    assert abs(got.item() - want) < 1e-9
    # A different subset gives a different value: the index is really used.
    assert abs(contrast_loss(feats, labels, TAU, TAU_B, bank, bank_labels).item() - want) > 1e-6


def test_chunked_bank_gradient_equals_unchunked():
    """Whole bank in one chunk or in chunks of 7 entries, similarities kept or recomputed."""
    feats, labels = _unit(9, 4, 11), _labels(9, 3, 12)
    bank, bank_labels = _unit(20, 4, 13), _labels(20, 3, 14)
    grads = []
    for chunk, cache in ((1 << 21, 1 << 30), (7, 1 << 30), (7, 0), (1 << 21, 0)):
        x = feats.clone().requires_grad_(True)
        contrast_loss(
            x, labels, TAU, TAU_B, bank, bank_labels, chunk_elements=chunk, cache_bytes=cache
        ).backward()
        grads.append(x.grad)
    for other in grads[1:]:
        torch.testing.assert_close(grads[0], other, rtol=0, atol=1e-12)


@pytest.mark.parametrize("bank_mode", ["none", "all_chunked", "all_recomputed", "index"])
def test_gradcheck(bank_mode):
    g = torch.Generator().manual_seed(15)
    x = torch.randn(8, 4, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0])
    bank, bank_labels = _unit(9, 4, 16), _labels(9, 3, 17)
    index = torch.randint(-1, 9, (8, 5), generator=g)

    def fn(x):
        z = F.normalize(x, dim=1)
        if bank_mode == "none":
            return contrast_loss(z, labels, 0.5, TAU_B)
        if bank_mode == "all_chunked":
            return contrast_loss(z, labels, 0.5, TAU_B, bank, bank_labels, chunk_elements=20)
        if bank_mode == "all_recomputed":
            return contrast_loss(
                z, labels, 0.5, TAU_B, bank, bank_labels, chunk_elements=20, cache_bytes=0
            )
        return contrast_loss(z, labels, 0.5, TAU_B, bank, bank_labels, index)

    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7)


def test_loss_is_stable_and_exact_for_extreme_logits():
    feats, labels = _unit(10, 5, 18), _labels(10, 3, 19)
    got = contrast_loss(feats, labels, 0.002, TAU_B)  # logits up to 500: naive exp overflows
    assert torch.isfinite(got)
    # log-sum-exp identity: shifting all similarities leaves the value unchanged
    small = contrast_loss(feats * 0.1, labels, 0.02, TAU_B) * (TAU_B / 0.02)
    scaled = naive_loss(feats * 0.1, labels, 0.02, TAU_B) * (TAU_B / 0.02)
    assert abs(small.item() - scaled) < 1e-9


def test_no_positive_gives_exact_zero_with_graph():
    x = _unit(4, 3, 20).requires_grad_(True)
    loss = contrast_loss(x, torch.tensor([0, 1, 2, 3]), TAU, TAU_B)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    empty = torch.zeros(0, 3, requires_grad=True)
    loss = contrast_loss(empty, torch.zeros(0, dtype=torch.long), TAU, TAU_B)
    assert loss.item() == 0.0
    loss.backward()


def test_anchor_without_negatives_contributes_zero():
    feats = _unit(5, 3, 21)
    labels = torch.zeros(5, dtype=torch.long)
    assert contrast_loss(feats, labels, TAU, TAU_B).item() == 0.0
    assert naive_loss(feats, labels, TAU, TAU_B) == pytest.approx(0.0, abs=1e-12)


# -------------------------------------------------------------------------------- sampler
def _hand_map():
    """One 4 x 8 image; max_views = 5 and max_samples = 18 give n_view = 5.

    class 0: 6 hard + 4 easy (both >= 2.5: 2 hard + 3 easy)
    class 1: 1 hard + 9 easy (hard short: 1 hard + 4 easy)
    class 2: 9 hard + 1 easy (easy short: 4 hard + 1 easy)
    class 3: 2 pixels (<= max_views: never an anchor); 255: ignore.
    """
    target = torch.tensor([0] * 10 + [1] * 10 + [2] * 10 + [3] * 2).view(1, 4, 8)
    wrong = torch.tensor(
        [1] * 6 + [0] * 4 + [1] * 1 + [0] * 9 + [1] * 9 + [0] * 1 + [0] * 2, dtype=torch.bool
    ).view(1, 4, 8)
    pred = torch.where(wrong, (target + 1) % 4, target)
    target = torch.cat([target, torch.full((1, 1, 8), 255)], 1)  # an ignore row
    pred = torch.cat([pred, torch.zeros(1, 1, 8, dtype=torch.long)], 1)
    embed = torch.arange(40, dtype=torch.float64).view(1, 1, 5, 8)  # channel 0 = pixel id
    return embed, pred, target


def test_sampler_views_and_hard_easy_fill_up():
    embed, pred, target = _hand_map()
    flat_t, flat_p = target.flatten(), pred.flatten()
    expect = {0: (2, 3), 1: (1, 4), 2: (4, 1)}
    seen = set()
    for seed in range(60):
        gen = torch.Generator().manual_seed(seed)
        feats, labels, pair = sample_anchors(embed, pred, target, 18, 5, 255, gen)
        ids = feats[:, 0].long()
        assert len(set(ids.tolist())) == len(ids)  # without replacement
        assert torch.equal(flat_t[ids], labels)
        assert set(labels.tolist()) == {0, 1, 2}
        assert torch.equal(torch.bincount(pair), torch.full((3,), 5))
        for c, (n_hard, n_easy) in expect.items():
            sel = ids[labels == c]
            hard = (flat_p[sel] != c).sum().item()
            assert (hard, len(sel) - hard) == (n_hard, n_easy)
        seen.update(ids.tolist())
    # uniform choice within a kind: every pixel of classes 0-2 is drawn at some point
    assert seen == set(range(30))


def test_sampler_pairs_and_ignore_on_random_maps():
    g = torch.Generator().manual_seed(22)
    coarse = torch.randint(0, 6, (3, 3, 4), generator=g)
    coarse[0, 0, 0] = 255
    target = F.interpolate(coarse[:, None].float(), size=(24, 32), mode="nearest")[:, 0].long()
    target[1, :, :3] = 2  # a thin extra strip
    pred = torch.where(torch.rand(target.shape, generator=g) < 0.3, 0, target)
    embed = torch.randn(3, 4, 24, 32, generator=g)
    feats, labels, pair = sample_anchors(embed, pred, target, 300, 40, 255, g)
    pairs = [
        (b, c)
        for b in range(3)
        for c in range(6)
        if (target[b] == c).sum() > 40  # more than max_views pixels
    ]
    n_view = min(300 // len(pairs), 40)
    assert len(labels) == len(pairs) * n_view
    assert torch.equal(torch.bincount(pair), torch.full((len(pairs),), n_view))
    assert 255 not in labels.tolist()
    # pair order: (image, class); each pair's anchors carry its class
    assert [labels[pair == k][0].item() for k in range(len(pairs))] == [c for _, c in pairs]
    # every anchor feature is a pixel of its image with that label
    flat = embed.permute(0, 2, 3, 1).reshape(-1, 4)
    where = (feats[:, None, :] == flat[None]).all(2).float().argmax(1)
    assert torch.equal(target.flatten()[where], labels)


def test_sampler_gradcheck():
    _, pred, target = _hand_map()
    x = torch.randn(1, 3, 5, 8, dtype=torch.float64, requires_grad=True)

    def fn(x):
        gen = torch.Generator().manual_seed(0)
        feats, labels, _ = sample_anchors(x, pred, target, 18, 5, 255, gen)
        return feats * labels[:, None].double()

    assert torch.autograd.gradcheck(fn, (x,))


def test_sampler_small_classes_and_no_pair():
    embed, pred, target = _hand_map()
    feats, labels, pair = sample_anchors(embed, pred, target, 18, 10, 255)
    assert feats.shape == (0, 1) and labels.numel() == 0 and pair.numel() == 0
    module = PixelContrast(4, None, dim=3, max_views=10)
    x = embed.float().expand(1, 3, 5, 8).clone().requires_grad_(True)
    loss = module(x, F.one_hot(pred, 4).permute(0, 3, 1, 2).float(), target)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    all_ignore = torch.full_like(target, 255)
    assert module(x, torch.zeros(1, 4, 5, 8), all_ignore).item() == 0.0


def test_sampler_rejects_bad_arguments():
    embed, pred, target = _hand_map()
    with pytest.raises(ConfigError, match="max_views"):
        sample_anchors(embed, pred, target, 18, 0)
    with pytest.raises(ConfigError, match="target"):
        sample_anchors(embed, pred, target[:, :2], 18, 5)


# ---------------------------------------------------------------------------------- module
def _batch(seed, b=2, h=24, w=32, c=5, d=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, c, (b, 3, 4), generator=g)
    target = F.interpolate(coarse[:, None].float(), size=(2 * h, 2 * w), mode="nearest")
    target = target[:, 0].long()
    embed = F.normalize(torch.randn(b, d, h, w, generator=g), dim=1).to(dtype)
    logits = torch.randn(b, c, h // 2, w // 2, generator=g)
    return embed.requires_grad_(True), logits, target


def test_module_determinism_and_seed():
    embed, logits, target = _batch(23)
    a = PixelContrast(5, None, dim=8, max_views=20, max_samples=200, seed=3)(embed, logits, target)
    b = PixelContrast(5, None, dim=8, max_views=20, max_samples=200, seed=3)(embed, logits, target)
    c = PixelContrast(5, None, dim=8, max_views=20, max_samples=200, seed=4)(embed, logits, target)
    assert a.item() == b.item()
    assert a.item() != c.item()


def test_module_generator_state_round_trip():
    embed, logits, target = _batch(24)
    m1 = PixelContrast(5, None, dim=8, max_views=20, max_samples=200, seed=5)
    m1(embed, logits, target)
    state = m1.state_dict()
    m2 = PixelContrast(5, None, dim=8, max_views=20, max_samples=200, seed=99)
    m2.load_state_dict(state)
    assert m1(embed, logits, target).item() == m2(embed, logits, target).item()


def test_module_under_bf16_autocast():
    embed, logits, target = _batch(25)
    module = PixelContrast(5, None, dim=8, max_views=20, max_samples=200)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module(embed.to(torch.bfloat16), logits.to(torch.bfloat16), target)
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert torch.isfinite(embed.grad).all() and embed.grad.abs().sum() > 0


def test_module_with_memory_reads_before_push():
    embed, logits, target = _batch(26)
    plain = PixelContrast(5, None, dim=8, max_views=20, max_samples=200, seed=1)
    with_mem = PixelContrast(
        5,
        None,
        dim=8,
        max_views=20,
        max_samples=200,
        memory=True,
        memory_size=50,
        region_size=10,
        memory_sampling="hardest",
        k_pos=16,
        k_neg=32,
        seed=1,
    )
    first = with_mem(embed, logits, target)
    assert first.item() == plain(embed, logits, target).item()  # memory was empty
    assert len(with_mem.memory) > 0
    second = with_mem(embed, logits, target)
    assert torch.isfinite(second) and second.item() != first.item()
    second.backward()
    assert "memory.pixel_queue" in with_mem.state_dict()


@pytest.mark.parametrize("mode", ["all", "semi_hard"])
def test_module_uses_the_memory_bank(mode):
    embed, logits, target = _batch(27)
    module = PixelContrast(
        5,
        None,
        dim=8,
        max_views=20,
        max_samples=200,
        memory=True,
        memory_size=30,
        region_size=10,
        memory_sampling=mode,
        k_pos=8,
        k_neg=16,
        semi_hard_fraction=0.5,
    )
    module(embed, logits, target)
    bank, bank_labels = module.memory.bank()
    gen = torch.Generator()
    gen.set_state(module.generator_state())
    grid = module.grid_labels(target, (24, 32))
    pred = F.interpolate(logits, size=(24, 32), mode="bilinear").argmax(1)
    feats, labels, _ = sample_anchors(embed, pred, grid, 200, 20, 255, gen)
    index = select_from_bank(feats, labels, bank, bank_labels, mode, 8, 16, 0.5, None, gen)
    want = contrast_loss(feats, labels, TAU, TAU_B, bank, bank_labels, index)
    assert module(embed, logits, target).item() == pytest.approx(want.item(), abs=1e-6)
    assert want.item() != pytest.approx(contrast_loss(feats, labels, TAU, TAU_B).item())


def test_module_rejects_bad_configuration():
    with pytest.raises(ConfigError, match="memory_sampling"):
        PixelContrast(5, 16, memory_sampling="semi")
    with pytest.raises(ConfigError, match="ignore_index"):
        PixelContrast(5, 16, ignore_index=3)
    with pytest.raises(ConfigError, match="in_channels"):
        PixelContrast(5, 0)
    with pytest.raises(ConfigError, match="temperature"):
        PixelContrast(5, 16, temperature=0.0)


# ------------------------------------------------------------------------- memory sampling
def _select_setup():
    feats, labels = _unit(11, 4, 27), _labels(11, 3, 28)
    bank, bank_labels = _unit(40, 4, 29), _labels(40, 4, 30)
    bank_labels[bank_labels == 2] = 1  # class 2 has no positives in the bank
    return feats, labels, bank, bank_labels


@pytest.mark.parametrize("mode", ["random", "hardest", "semi_hard"])
def test_selection_kinds_and_chunking(mode):
    feats, labels, bank, bank_labels = _select_setup()
    k_pos, k_neg = 5, 9
    runs = [
        select_from_bank(
            feats,
            labels,
            bank,
            bank_labels,
            mode,
            k_pos,
            k_neg,
            0.3,
            chunk,
            torch.Generator().manual_seed(0),
        )
        for chunk in (None, 3)
    ]
    assert torch.equal(runs[0], runs[1])
    idx = runs[0]
    assert idx.shape == (11, k_pos + k_neg)
    for i in range(11):
        pos, neg = idx[i, :k_pos], idx[i, k_pos:]
        n_pos = int((bank_labels == labels[i]).sum())
        n_neg = 40 - n_pos
        if mode == "semi_hard":
            want_pos = min(k_pos, math.ceil(0.3 * n_pos - 1e-9)) if n_pos else 0
            want_neg = min(k_neg, math.ceil(0.3 * n_neg - 1e-9))
        else:
            want_pos, want_neg = min(k_pos, n_pos), min(k_neg, n_neg)
        for part, want, same in ((pos, want_pos, True), (neg, want_neg, False)):
            valid = part[part >= 0]
            assert len(valid) == want and len(set(valid.tolist())) == want
            assert bool(((bank_labels[valid] == labels[i]) == same).all())
            assert bool((part[want:] == -1).all())
        if mode == "semi_hard":  # within the nearest negatives / farthest positives
            sims = bank @ feats[i]
            neg_ids = [j for j in range(40) if bank_labels[j] != labels[i]]
            near = sorted(neg_ids, key=lambda j: -sims[j].item())[: math.ceil(0.3 * n_neg - 1e-9)]
            assert set(neg[neg >= 0].tolist()) <= set(near)


def test_hardest_is_exact_top_k():
    feats, labels, bank, bank_labels = _select_setup()
    idx = select_from_bank(feats, labels, bank, bank_labels, "hardest", 4, 6)
    for i in range(11):
        sims = (bank @ feats[i]).tolist()
        pos_ids = [j for j in range(40) if bank_labels[j] == labels[i]]
        neg_ids = [j for j in range(40) if bank_labels[j] != labels[i]]
        want_pos = sorted(pos_ids, key=lambda j: sims[j])[:4]
        want_neg = sorted(neg_ids, key=lambda j: -sims[j])[:6]
        assert set(idx[i, :4][idx[i, :4] >= 0].tolist()) == set(want_pos)
        assert set(idx[i, 4:].tolist()) == set(want_neg)


def test_selection_all_and_bad_mode():
    feats, labels, bank, bank_labels = _select_setup()
    assert select_from_bank(feats, labels, bank, bank_labels, "all", 4, 6) is None
    with pytest.raises(ConfigError, match="allowed values"):
        select_from_bank(feats, labels, bank, bank_labels, "easiest", 4, 6)


# ------------------------------------------------------------------------------- benchmark
def test_loop_reference_equals_vectorised_on_kind_constant_embeddings():
    """Embeddings that depend only on (class, hard/easy): any valid sampling gives one value."""
    g = torch.Generator().manual_seed(31)
    coarse = torch.randint(0, 5, (2, 3, 4), generator=g)
    target = F.interpolate(coarse[:, None].float(), size=(24, 32), mode="nearest")[:, 0].long()
    pred = torch.where(torch.rand(target.shape, generator=g) < 0.25, (target + 1) % 5, target)
    codes = F.normalize(torch.randn(5, 2, 6, generator=g, dtype=torch.float64), dim=2)
    embed = codes[target, (pred == target).long()].permute(0, 3, 1, 2).contiguous()
    logits = F.one_hot(pred, 5).permute(0, 3, 1, 2).double()
    vec = PixelContrast(5, None, dim=6, max_samples=300, max_views=40)(embed, logits, target)
    loop = loop_reference_loss(embed, logits, target, max_samples=300, max_views=40, generator=g)
    assert vec.item() > 0
    assert abs(vec.item() - loop.item()) < 1e-9


def test_benchmark_rows_and_table():
    rows = run_loss_benchmark(batch_sizes=(1,), grids=((16, 32),), dim=8, repeats=1)
    assert len(rows) == 1
    row = rows[0]
    assert row["batch"] == 1 and row["grid"] == "16x32"
    assert row["ms_vectorised"] > 0 and row["ms_loop"] > 0
    assert row["speedup"] == pytest.approx(row["ms_loop"] / row["ms_vectorised"])
    table = format_loss_benchmark(rows)
    assert "speedup" in table.splitlines()[0] and "16x32" in table


# ------------------------------------------------------------- whole memory in class slots
def _slots(num_classes, k, d, seed, fill):
    """A class memory's layout: ``slots (C, K, D)`` and ``filled (C, K)`` with ~``fill`` set;
    the unfilled slots hold garbage that must be ignored."""
    g = torch.Generator().manual_seed(seed)
    slots = F.normalize(torch.randn(num_classes, k, d, generator=g, dtype=torch.float64), dim=2)
    filled = torch.rand(num_classes, k, generator=g) < fill
    return slots, filled


def _flat(slots, filled):
    classes = torch.arange(slots.shape[0])[:, None].expand_as(filled)
    return slots[filled], classes[filled]


@pytest.mark.parametrize("fill", [1.0, 0.6])
@pytest.mark.parametrize("cache_bytes", [1 << 30, 0])  # class-slot block / streamed fallback
def test_loss_with_bank_slots_matches_naive(fill, cache_bytes):
    feats, labels = _unit(11, 5, 30), _labels(11, 4, 31)
    slots, filled = _slots(4, 6, 5, 32, fill)
    got = contrast_loss(
        feats, labels, TAU, TAU_B, bank_slots=(slots, filled), cache_bytes=cache_bytes
    )
    want = naive_loss(feats, labels, TAU, TAU_B, *_flat(slots, filled))
    assert abs(got.item() - want) < 1e-9
    if fill < 1:  # the unfilled slots really are left out
        every = (slots.reshape(-1, 5), torch.arange(4).repeat_interleave(6))
        assert abs(naive_loss(feats, labels, TAU, TAU_B, *every) - want) > 1e-6


def test_bank_slots_gradient_equals_the_flat_bank_gradient():
    feats, labels = _unit(9, 4, 33), _labels(9, 3, 34)
    slots, filled = _slots(3, 7, 4, 35, 0.7)
    grads = []
    for kwargs in (
        {"bank_slots": (slots, filled)},
        dict(zip(("bank_feats", "bank_labels"), _flat(slots, filled), strict=True)),
    ):
        x = feats.clone().requires_grad_(True)
        contrast_loss(x, labels, TAU, TAU_B, **kwargs).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("fill", [1.0, 0.5])
def test_gradcheck_bank_slots(fill):
    g = torch.Generator().manual_seed(36)
    x = torch.randn(8, 4, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0])
    slots, filled = _slots(3, 4, 4, 37, fill)

    def fn(x):
        return contrast_loss(F.normalize(x, dim=1), labels, 0.5, TAU_B, bank_slots=(slots, filled))

    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7)


def test_empty_bank_slots_add_nothing():
    feats, labels = _unit(10, 4, 38), _labels(10, 3, 39)
    slots, _ = _slots(3, 5, 4, 40, 1.0)
    empty = torch.zeros(3, 5, dtype=torch.bool)
    got = contrast_loss(feats, labels, TAU, TAU_B, bank_slots=(slots, empty))
    assert got.item() == pytest.approx(naive_loss(feats, labels, TAU, TAU_B), abs=1e-12)


@pytest.mark.parametrize("fill", [1.0, 0.6])
@pytest.mark.parametrize("chunk_elements", [13, 40])  # several column chunks per class
def test_bank_slots_in_chunks_match_naive_and_gradcheck(fill, chunk_elements):
    feats, labels = _unit(11, 5, 41), _labels(11, 4, 42)
    slots, filled = _slots(4, 9, 5, 43, fill)
    got = contrast_loss(
        feats, labels, TAU, TAU_B, bank_slots=(slots, filled), chunk_elements=chunk_elements
    )
    assert abs(got.item() - naive_loss(feats, labels, TAU, TAU_B, *_flat(slots, filled))) < 1e-9
    x = feats.clone().requires_grad_(True)

    def fn(x):
        return contrast_loss(
            F.normalize(x, dim=1),
            labels,
            0.5,
            TAU_B,
            bank_slots=(slots, filled),
            chunk_elements=chunk_elements,
        )

    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("sign", [1.0, -1.0])  # largest negative logit near +1000 / -1000
def test_bank_slots_far_from_zero_logits_match_the_flat_bank(sign):
    """Logits of about +-1000 (tau 0.001): the block keeps exp(s - m) instead of exp(s);
    value and gradient equal the flat bank's (its N x M reference block)."""
    g = torch.Generator().manual_seed(44)
    e0 = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)

    def near(v, n):
        return F.normalize(v + 0.05 * torch.randn(n, 4, generator=g, dtype=torch.float64), dim=-1)

    if sign > 0:  # each anchor close to a slot of another class: m of about +1000
        slots, filled = _slots(3, 5, 4, 45, 1.0)
        labels = torch.tensor([0, 0, 1, 1, 2, 2])
        feats = near(slots[(labels + 1) % 3, 0], 6)
    else:  # class 0 anchors opposite to every slot and to class 1: m of about -1000 for them
        slots = near(-e0, 10).view(2, 5, 4)
        filled = torch.ones(2, 5, dtype=torch.bool)
        labels = torch.tensor([0, 0, 0, 1, 1, 1])
        feats = torch.cat([near(e0, 3), near(-e0, 3)])
    grads, values = [], []
    for kwargs in (
        {"bank_slots": (slots, filled)},
        dict(zip(("bank_feats", "bank_labels"), _flat(slots, filled), strict=True)),
    ):
        x = feats.clone().requires_grad_(True)
        loss = contrast_loss(x, labels, 0.001, TAU_B, **kwargs)
        loss.backward()
        values.append(loss.item())
        grads.append(x.grad)
    assert math.isfinite(values[0]) and values[0] > 1e-3
    assert abs(values[0] - values[1]) <= 1e-9 * max(1.0, abs(values[1]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-9)


def test_bank_slots_retain_graph_backward_twice():
    feats, labels = _unit(8, 4, 46), _labels(8, 3, 47)
    slots, filled = _slots(3, 6, 4, 48, 0.8)
    x = feats.clone().requires_grad_(True)
    loss = contrast_loss(x, labels, TAU, TAU_B, bank_slots=(slots, filled))
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * first, rtol=1e-12, atol=0)


def test_bf16_memory_loss_within_1e3_of_float32():
    """A bfloat16 memory (and, as on a GPU's bf16 products, bf16-rounded anchors) against the
    float32 loss of the same unrounded data: 1,000 anchors x 19 classes x 500 slots, D 64."""
    g = torch.Generator().manual_seed(49)
    feats = F.normalize(torch.randn(1000, 64, generator=g), dim=1)
    labels = torch.randint(0, 19, (1000,), generator=g)
    slots = F.normalize(torch.randn(19, 500, 64, generator=g), dim=2)
    filled = torch.ones(19, 500, dtype=torch.bool)
    want = contrast_loss(feats, labels, TAU, TAU_B, bank_slots=(slots, filled)).item()
    for anchors in (feats, feats.bfloat16().float()):
        got = contrast_loss(anchors, labels, TAU, TAU_B, bank_slots=(slots.bfloat16(), filled))
        assert got.dtype == torch.float32
        assert abs(got.item() - want) < 1e-3 * abs(want)
    # The gradient too, to bf16's precision.
    grads = []
    for s in (slots, slots.bfloat16()):
        x = feats.clone().requires_grad_(True)
        contrast_loss(x, labels, TAU, TAU_B, bank_slots=(s, filled)).backward()
        grads.append(x.grad)
    distance = float((grads[1] - grads[0]).norm() / grads[0].norm())
    assert 1e-5 < distance < 1e-2  # bf16's rounding shows, and stays small


@pytest.mark.parametrize("mode", ["fifo", "per_image", "none"])
def test_memory_slots_are_the_storage_itself(mode):
    """slots() hands out the memory without a copy, also after moves and state-dict loads."""
    import copy

    from contrastseg.contrast import ClassMemory

    memory = ClassMemory(3, dim=4, pixel_size=5, region_mode=mode, region_size=2, num_images=4)
    memory.fill_random_(seed=3)

    def check(mem):
        slots, filled = mem.slots(dtype=None)
        assert slots.data_ptr() == mem.pixel_queue.data_ptr()
        assert filled.all() and slots.shape == (
            3,
            5 + {"fifo": 2, "per_image": 4, "none": 0}[mode],
            4,
        )
        assert torch.equal(slots[:, :5], mem.pixel_queue)
        if mode != "none":
            assert torch.equal(slots[:, 5:], mem.region_queue)
        # A push shows through the slots handed out before it.
        g = torch.Generator().manual_seed(4)
        embed = F.normalize(
            torch.randn(2, 4, 3, 3, generator=g, dtype=mem.pixel_queue.dtype), dim=1
        )
        mem.push(embed, torch.randint(0, 3, (2, 3, 3), generator=g), torch.tensor([0, 1]))
        assert torch.equal(slots[:, :5], mem.pixel_queue)
        assert mem.slots(dtype=None)[0].data_ptr() == slots.data_ptr()

    check(memory)
    moved = copy.deepcopy(memory).to(torch.float64)
    check(moved)
    other = ClassMemory(3, dim=4, pixel_size=5, region_mode=mode, region_size=2, num_images=4)
    state = {k: v.clone() for k, v in memory.state_dict().items()}
    other.load_state_dict(state, assign=True)  # queues become separate tensors: joined again
    assert torch.equal(other.slots()[0], memory.slots()[0])
    check(other)


def test_projection_head_equals_its_layers_and_gradchecks():
    """The head's forward (1x1 convolutions as batched products, a fused normalisation)
    computes F.normalize(net(x)) with the same gradients, also for an all-zero pixel."""
    from contrastseg.contrast import ProjectionHead

    torch.manual_seed(0)
    head = ProjectionHead(12, 5, hidden_channels=7).double()
    x = torch.randn(2, 12, 3, 4, dtype=torch.float64, requires_grad=True)
    want = F.normalize(head.net(x), dim=1)
    got = head(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)
    g = torch.randn_like(want)
    params = [x, *head.parameters()]
    for a, b in zip(
        torch.autograd.grad(want, params, g), torch.autograd.grad(got, params, g), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(head, (x,))
    zero = torch.zeros(1, 5, 2, 2, dtype=torch.float64, requires_grad=True)
    from contrastseg.contrast.projection import _Normalize

    gz = torch.randn(1, 5, 2, 2, dtype=torch.float64)
    (ref,) = torch.autograd.grad(F.normalize(zero, dim=1), zero, gz)
    (new,) = torch.autograd.grad(_Normalize.apply(zero), zero, gz)
    torch.testing.assert_close(new, ref, rtol=0, atol=0)


def _naive_loss_shifted(feats, labels, tau, tau_b, bank_feats=None, bank_labels=None):
    """naive_loss with each anchor's logits shifted by their maximum (exact for any size)."""
    z, y = feats.tolist(), labels.tolist()
    bz = bank_feats.tolist() if bank_feats is not None else []
    by = bank_labels.tolist() if bank_labels is not None else []
    losses = []
    for i in range(len(z)):
        cands = [(z[j], y[j]) for j in range(len(z)) if j != i] + list(zip(bz, by, strict=True))
        sims = [(sum(a * b for a, b in zip(z[i], v, strict=True)) / tau, lab) for v, lab in cands]
        top = max(s for s, _ in sims)
        pos = [s - top for s, lab in sims if lab == y[i]]
        neg = sum(math.exp(s - top) for s, lab in sims if lab != y[i])
        if pos:
            terms = [s - math.log(math.exp(s) + neg) for s in pos]
            losses.append(-(tau / tau_b) * sum(terms) / len(terms))
    return sum(losses) / len(losses) if losses else 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_in_batch_and_slots_with_logits_beyond_the_exp_range(dtype):
    """tau 0.001: logits of +-1000, beyond the range where the blocks keep exp(s); they keep
    exp(s - m) instead. Against the max-shifted loop reference, with and without a memory."""
    g = torch.Generator().manual_seed(50)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 1])
    e = torch.eye(4, dtype=torch.float64)
    # Classes 0 and 2 near e0, class 1 near -e0: the largest negative logit is near +1000 for
    # classes 0 and 2 (which compete), near -1000 for class 1.
    base = torch.stack([e[0], e[0], -e[0], -e[0], e[0], e[0], -e[0]])
    feats = F.normalize(base + 0.02 * torch.randn(7, 4, generator=g, dtype=torch.float64), dim=1)
    slots = F.normalize(
        -e[0] + 0.02 * torch.randn(3, 4, 4, generator=g, dtype=torch.float64), dim=2
    )
    filled = torch.ones(3, 4, dtype=torch.bool)
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    for bank in (None, (slots, filled)):
        got = contrast_loss(feats.to(dtype), labels, 0.001, TAU_B, bank_slots=bank)
        args = () if bank is None else _flat(*bank)
        want = _naive_loss_shifted(feats, labels, 0.001, TAU_B, *args)
        assert want > 1e-3
        assert abs(got.item() - want) <= tol * max(1.0, abs(want))
