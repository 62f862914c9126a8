"""AAF: the released computation against a reference that follows the authors' code step by
step, masks on a hand-made map, a per-pixel/per-neighbour loop reference, the label shrinking,
gradients, ignore, edge cases, the adaptive weights' gradient ascent and the decay."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from contrastseg.config import load_config
from contrastseg.errors import ConfigError
from contrastseg.losses.aaf import (
    AAFLoss,
    aaf_loss,
    aaf_masks,
    aaf_terms,
    neighbour_offsets,
    shrink_labels,
)
from loss_cases import IGN, logits_and_target


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


# ------------------------------------------------- reference following the released code
def released_aaf(logits, target, w_edge, w_nonedge, distances, margin):
    """The authors' AAF, step by step in channels-last layout: labels shrunk to the output grid
    (label_shrink: nearest, no corner alignment, float32 scale), then per size s
    ignores_from_label (ignore map padded with True; a pair is ignored with the centre, the
    neighbour or the opposite pixel), edges_from_label (one-hot labels padded with 255),
    eightcorner_activation (probabilities padded with 0), clipped Bernoulli KL, hinge, the
    centre's class weight, and the means over the kept edge and non-edge entries."""
    B, C, h, w = logits.shape
    H, W = target.shape[1:]
    rows = [min(int(np.float32(i) * (np.float32(H) / np.float32(h))), H - 1) for i in range(h)]
    cols = [min(int(np.float32(j) * (np.float32(W) / np.float32(w))), W - 1) for j in range(w)]
    labels = target[:, rows][:, :, cols]  # B, h, w
    one_hot = (labels[..., None] == torch.arange(C)).to(logits.dtype)  # 255 -> all zeros
    probs = torch.softmax(logits, 1).permute(0, 2, 3, 1)  # B, h, w, C
    total = logits.sum() * 0
    for si, s in enumerate(distances):
        ignore = labels > C - 1
        ignore_pad = F.pad(ignore, (s, s, s, s), value=True)
        groups = []
        for st_y in range(2 * s, -1, -s):
            for st_x in range(2 * s, -1, -s):
                if st_y == s and st_x == s:
                    continue
                groups.append(ignore_pad[:, st_y : st_y + h, st_x : st_x + w] | ignore)
        ig = 0
        for st_y in range(0, 2 * s + 1, s):
            for st_x in range(0, 2 * s + 1, s):
                if st_y == s and st_x == s:
                    continue
                groups[ig] = ignore_pad[:, st_y : st_y + h, st_x : st_x + w] | groups[ig]
                ig += 1
        not_ignore = ~torch.stack(groups, -1)[:, :, :, None, :]  # B, h, w, 1, 8
        lab_pad = F.pad(one_hot.permute(0, 3, 1, 2), (s, s, s, s), value=255.0)
        lab_pad = lab_pad.permute(0, 2, 3, 1)
        edges = []
        for st_y in range(0, 2 * s + 1, s):
            for st_x in range(0, 2 * s + 1, s):
                if st_y == s and st_x == s:
                    continue
                edges.append(lab_pad[:, st_y : st_y + h, st_x : st_x + w] != one_hot)
        edge = torch.stack(edges, -1) & not_ignore  # B, h, w, C, 8
        not_edge = ~edge & not_ignore
        prob_pad = F.pad(probs.permute(0, 3, 1, 2), (s, s, s, s), value=0.0).permute(0, 2, 3, 1)
        paired = []
        for st_y in range(0, 2 * s + 1, s):
            for st_x in range(0, 2 * s + 1, s):
                if st_y == s and st_x == s:
                    continue
                paired.append(prob_pad[:, st_y : st_y + h, st_x : st_x + w])
        probs_paired = torch.stack(paired, -1)
        centre = probs[..., None]
        neg = (1 - centre).clamp(1e-4, 1.0)
        neg_paired = (1 - probs_paired).clamp(1e-4, 1.0)
        pc = centre.clamp(1e-4, 1.0)
        pp = probs_paired.clamp(1e-4, 1.0)
        kldiv = pp * torch.log(pp / pc) + neg_paired * torch.log(neg_paired / neg)
        edge_loss = torch.clamp(margin - kldiv, min=0.0)
        not_edge_loss = kldiv
        oh = one_hot[..., None]  # B, h, w, C, 1
        we = (w_edge[:, si][:, None] * oh).sum(3, keepdim=True)  # B, h, w, 1, 1
        wne = (w_nonedge[:, si][:, None] * oh).sum(3, keepdim=True)
        edge_loss = (edge_loss * we)[edge]
        not_edge_loss = (not_edge_loss * wne)[not_edge]
        for entries in (edge_loss, not_edge_loss):
            if entries.numel():  # the authors' mean of no entry is NaN; 0 here
                total = total + entries.mean()
    return total


# --------------------------------------------------------------- loop reference (one grid)
def slow_aaf(logits, target, w_edge, w_nonedge, distances, margin, both_sides, ignore=IGN):
    """Plain loops over sizes, pixels, the 8 neighbours and the classes, on the grid of the
    logits and labels (same size); with ``both_sides`` a pair is also dropped when the pixel at
    the opposite offset is ignored or outside."""
    B, C, H, W = logits.shape
    probs = torch.softmax(logits, 1)

    def labelled(b, y, x):
        return 0 <= y < H and 0 <= x < W and int(target[b, y, x]) != ignore

    total = logits.sum() * 0
    for si, s in enumerate(distances):
        edge_terms, nonedge_terms = [], []
        for b in range(B):
            for y in range(H):
                for x in range(W):
                    for dy in (-s, 0, s):
                        for dx in (-s, 0, s):
                            if dy == 0 and dx == 0:
                                continue
                            ny, nx = y + dy, x + dx
                            if not (labelled(b, y, x) and labelled(b, ny, nx)):
                                continue
                            if both_sides and not labelled(b, y - dy, x - dx):
                                continue
                            yi, yj = int(target[b, y, x]), int(target[b, ny, nx])
                            for c in range(C):
                                pi = probs[b, c, y, x].clamp(1e-4, 1.0)
                                pj = probs[b, c, ny, nx].clamp(1e-4, 1.0)
                                qi = (1 - probs[b, c, y, x]).clamp(1e-4, 1.0)
                                qj = (1 - probs[b, c, ny, nx]).clamp(1e-4, 1.0)
                                kl = pj * torch.log(pj / pi) + qj * torch.log(qj / qi)
                                if (yi == c) != (yj == c):
                                    edge_terms.append(w_edge[yi, si] * torch.relu(margin - kl))
                                else:
                                    nonedge_terms.append(w_nonedge[yi, si] * kl)
        for terms in (edge_terms, nonedge_terms):
            if terms:
                total = total + torch.stack(terms).mean()
    return total


def random_case(seed, shape=(1, 3, 4, 5), ignore_frac=0.15):
    g = torch.Generator().manual_seed(seed)
    logits, target = logits_and_target(g, shape, ignore_frac)
    C = shape[1]
    S = 3
    w_e = torch.rand(C, S, generator=g, dtype=torch.float64).requires_grad_(True)
    w_ne = torch.rand(C, S, generator=g, dtype=torch.float64).requires_grad_(True)
    return logits, target, w_e, w_ne


def strided_case(seed, shape, label_size, ignore_frac=0.15):
    """Logits ``shape`` and labels of ``label_size`` (larger, blocky, some ignored)."""
    logits, _, w_e, w_ne = random_case(seed, shape, ignore_frac)
    g = torch.Generator().manual_seed(100 + seed)
    B, C = shape[:2]
    H, W = label_size
    coarse = torch.randint(0, C, (B, 1, (H + 1) // 2, (W + 1) // 2), generator=g).double()
    target = F.interpolate(coarse, (H, W), mode="nearest")[:, 0].long()
    target[torch.rand(B, H, W, generator=g) < ignore_frac] = IGN
    return logits, target, w_e, w_ne


# ----------------------------------------------------------------- released (default)
@pytest.mark.parametrize(
    "seed,shape,label_size,margin",
    [
        (0, (2, 3, 5, 6), (20, 24), 3.0),  # stride 4
        (1, (1, 4, 6, 7), (13, 22), 0.3),  # non-integer scales
        (2, (1, 3, 5, 5), (5, 5), 0.5),  # the same grid: labels unchanged
    ],
)
def test_released_equals_the_authors_computation(seed, shape, label_size, margin):
    logits, target, w_e, w_ne = strided_case(seed, shape, label_size)
    got = aaf_loss(logits, target, w_e, w_ne, (1, 2, 3), margin)
    ref = released_aaf(logits, target, w_e, w_ne, (1, 2, 3), margin)
    assert got.item() == pytest.approx(ref.item(), rel=1e-10, abs=1e-12)
    g_got = torch.autograd.grad(got, (logits, w_e, w_ne))
    g_ref = torch.autograd.grad(ref, (logits, w_e, w_ne))
    for a, b in zip(g_got, g_ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)
    # the module's default is the released computation
    module = AAFLoss(shape[1], margin=margin).double()
    with torch.no_grad():
        module.edge_logits.copy_(w_e.log())
        module.nonedge_logits.copy_(w_ne.log())
        e, ne = module.weights()
        expected = released_aaf(logits, target, e, ne, (1, 2, 3), margin)
        assert module(logits, target).item() == pytest.approx(expected.item(), rel=1e-10)


def test_released_is_the_loss_on_the_shrunk_labels_and_differs_from_upsampled():
    logits, target, w_e, w_ne = strided_case(3, (2, 3, 6, 8), (24, 32))
    small = shrink_labels(target, (6, 8))
    # the label at the top-left pixel of each 4 x 4 cell
    assert torch.equal(small, target[:, ::4, ::4])
    got = aaf_loss(logits, target, w_e, w_ne).item()
    assert got == pytest.approx(aaf_loss(logits, small, w_e, w_ne).item(), rel=1e-12)
    assert got == pytest.approx(
        slow_aaf(logits, small, w_e, w_ne, (1, 2, 3), 3.0, both_sides=True).item(), rel=1e-10
    )
    upsampled = aaf_loss(logits, target, w_e, w_ne, variant="upsampled").item()
    assert abs(got - upsampled) > 1e-3


def test_shrink_labels_is_nearest_without_corner_alignment():
    g = torch.Generator().manual_seed(8)
    t = torch.randint(0, 19, (2, 26, 77), generator=g)
    out = shrink_labels(t, (22, 13))
    # input index min(floor(i * float32(n_in / n_out)), n_in - 1), in float32 as TensorFlow 1
    rows = [min(int(np.float32(i) * (np.float32(26) / np.float32(22))), 25) for i in range(22)]
    cols = [min(int(np.float32(j) * (np.float32(77) / np.float32(13))), 76) for j in range(13)]
    assert rows[11] == 12  # float32 rounding: 11 * 26 / 22 = 13 exactly
    assert torch.equal(out, t[:, rows][:, :, cols])
    ref = F.interpolate(t[:, None].double(), (22, 13), mode="nearest")[:, 0].long()
    assert torch.equal(out, ref)
    assert shrink_labels(t, (26, 77)) is t


@pytest.mark.parametrize("label_size", [(6, 8), (12, 15)])
def test_released_gradcheck_float64(label_size):
    logits, target, w_e, w_ne = strided_case(4, (1, 3, 3, 4), label_size)
    w_e, w_ne = w_e[:, :2].detach().requires_grad_(), w_ne[:, :2].detach().requires_grad_()
    # a margin near the KLs, so that both sides of the hinge are checked
    assert torch.autograd.gradcheck(
        lambda x, a, b: aaf_loss(x, target, a, b, (1, 2), margin=0.2), (logits, w_e, w_ne)
    )


# ----------------------------------------------------------------------------------- masks
def test_masks_on_a_hand_made_label_map():
    t = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, IGN, 1], [2, 2, 2, 1]]])
    edge, nonedge, ignored = aaf_masks(t, 3, 1, both_sides=False)
    assert edge.shape == nonedge.shape == (1, 3, 8, 4, 4) and ignored.shape == (1, 8, 4, 4)
    k = {o: i for i, o in enumerate(neighbour_offsets(1))}
    # (0,0) -> right (0,1): both 0: a non-edge of every class
    assert not ignored[0, k[(0, 1)], 0, 0]
    assert nonedge[0, :, k[(0, 1)], 0, 0].tolist() == [True, True, True]
    assert not edge[0, :, k[(0, 1)], 0, 0].any()
    # (0,1) -> right (0,2): 0 vs 1: an edge of classes 0 and 1, a non-edge of class 2
    assert edge[0, :, k[(0, 1)], 0, 1].tolist() == [True, True, False]
    assert nonedge[0, :, k[(0, 1)], 0, 1].tolist() == [False, False, True]
    # (1,0) -> down (2,0): 0 vs 2
    assert edge[0, :, k[(1, 0)], 1, 0].tolist() == [True, False, True]
    # outside the image: (0,0) up-left, (3,3) down-right
    assert ignored[0, k[(-1, -1)], 0, 0] and ignored[0, k[(1, 1)], 3, 3]
    # the ignore pixel (2,2): as neighbour of (1,1) and as centre
    assert ignored[0, k[(1, 1)], 1, 1] and ignored[0, :, 2, 2].all()
    # ignored pairs are neither edge nor non-edge; every kept pair is exactly one per class
    assert not (edge | nonedge)[:, :, ignored[0]].any()
    assert torch.equal(edge ^ nonedge, ~ignored[:, None].expand_as(edge))
    # distance 2: (0,0) -> (0,2) = 1: edge of 0 and 1; (0,0) -> (2,2) = ignore
    edge2, _, ignored2 = aaf_masks(t, 3, 2, both_sides=False)
    k2 = {o: i for i, o in enumerate(neighbour_offsets(2))}
    assert edge2[0, :, k2[(0, 2)], 0, 0].tolist() == [True, True, False]
    assert ignored2[0, k2[(2, 2)], 0, 0]
    # (1,1) at distance 2: neighbours (1,3)=1, (3,1)=2, (3,3)=1 inside, the rest outside
    assert ignored2[0, :, 1, 1].tolist() == [True, True, True, True, False, True, False, False]
    assert edge2[0, :, k2[(2, 0)], 1, 1].tolist() == [True, False, True]

    # both sides (the released rule; the default): the pixel opposite the neighbour counts too
    edge_b, _, ignored_b = aaf_masks(t, 3, 1)
    # (1,1) -> right (1,2) = 1, opposite (1,0) = 0 labelled: kept, an edge of 0 and 1
    assert not ignored_b[0, k[(0, 1)], 1, 1]
    assert edge_b[0, :, k[(0, 1)], 1, 1].tolist() == [True, True, False]
    # (1,1) -> up-left (0,0): opposite (2,2) is ignored: dropped (kept one-sided)
    assert ignored_b[0, k[(-1, -1)], 1, 1] and not ignored[0, k[(-1, -1)], 1, 1]
    # (0,0) -> right (0,1): opposite (0,-1) is outside: dropped (kept one-sided)
    assert ignored_b[0, k[(0, 1)], 0, 0]
    # (0,1) -> right (0,2): opposite (0,0) inside: kept
    assert not ignored_b[0, k[(0, 1)], 0, 1]
    # in the first and last rows every pair with a vertical step is dropped, and likewise in
    # the first and last columns every pair with a horizontal step
    offsets = neighbour_offsets(1)
    vertical = [i for i, (dy, _) in enumerate(offsets) if dy != 0]
    horizontal = [i for i, (_, dx) in enumerate(offsets) if dx != 0]
    assert ignored_b[0, vertical][:, [0, 3]].all()
    assert ignored_b[0, horizontal][:, :, [0, 3]].all()
    # distance 2 on a 4 x 4 map: i - 2 and i + 2 never both inside: nothing kept
    assert aaf_masks(t, 3, 2)[2].all()


@pytest.mark.parametrize("both_sides", [True, False])
def test_masks_equal_a_loop_reference_and_the_loss_counts(both_sides):
    _, t, _, _ = random_case(3, (2, 3, 7, 8), ignore_frac=0.2)

    def labelled(b, y, x):
        return 0 <= y < 7 and 0 <= x < 8 and int(t[b, y, x]) != IGN

    for s in (1, 2, 3):
        edge, nonedge, ignored = aaf_masks(t, 3, s, both_sides=both_sides)
        for b in range(2):
            for k, (dy, dx) in enumerate(neighbour_offsets(s)):
                for y in range(7):
                    for x in range(8):
                        ny, nx = y + dy, x + dx
                        ign = not (labelled(b, y, x) and labelled(b, ny, nx))
                        ign = ign or (both_sides and not labelled(b, y - dy, x - dx))
                        assert bool(ignored[b, k, y, x]) == ign
                        for c in range(3):
                            e = not ign and (int(t[b, y, x]) == c) != (int(t[b, ny, nx]) == c)
                            assert bool(edge[b, c, k, y, x]) == e
                            assert bool(nonedge[b, c, k, y, x]) == (not ign and not e)
    variant = "released" if both_sides else "upsampled"
    _, counts, _ = aaf_terms(torch.zeros(2, 3, 7, 8), t, (1, 2, 3), variant=variant)
    for si, s in enumerate((1, 2, 3)):
        edge, nonedge, _ = aaf_masks(t, 3, s, both_sides=both_sides)
        assert counts[si].tolist() == [int(edge.sum()), int(nonedge.sum())]


# ----------------------------------------------------------------- the loss, one grid
@pytest.mark.parametrize(
    "seed,margin,variant",
    [(0, 3.0, "released"), (1, 0.3, "released"), (0, 3.0, "upsampled"), (1, 0.3, "upsampled")],
)
def test_loss_and_gradients_equal_the_slow_reference(seed, margin, variant):
    logits, target, w_e, w_ne = random_case(seed, (1, 3, 6, 7))
    got = aaf_loss(logits, target, w_e, w_ne, (1, 2, 3), margin, variant=variant)
    ref = slow_aaf(logits, target, w_e, w_ne, (1, 2, 3), margin, variant == "released")
    assert got.item() == pytest.approx(ref.item(), rel=1e-10, abs=1e-12)
    g_got = torch.autograd.grad(got, (logits, w_e, w_ne))
    g_ref = torch.autograd.grad(ref, (logits, w_e, w_ne))
    for a, b in zip(g_got, g_ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)


def test_upsampled_gradcheck_float64():
    logits, target, w_e, w_ne = random_case(2, (1, 3, 3, 4))
    w_e, w_ne = w_e[:, :2].detach().requires_grad_(), w_ne[:, :2].detach().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, a, b: aaf_loss(x, target, a, b, (1, 2), margin=0.2, variant="upsampled"),
        (logits, w_e, w_ne),
    )


@pytest.mark.parametrize("variant", ["released", "upsampled"])
def test_ignore_pixels_have_no_effect(variant):
    logits, target, w_e, w_ne = random_case(4, (1, 3, 5, 6), ignore_frac=0.3)
    ign = target == IGN
    assert ign.any()
    loss = aaf_loss(logits, target, w_e, w_ne, variant=variant)
    (grad,) = torch.autograd.grad(loss, logits)
    changed = logits.detach().clone()
    changed[ign[:, None].expand_as(changed)] = 9.0
    changed.requires_grad_(True)
    loss2 = aaf_loss(changed, target, w_e, w_ne, variant=variant)
    (grad2,) = torch.autograd.grad(loss2, changed)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-12)
    keep = ~ign[:, None].expand_as(grad)
    assert torch.allclose(grad[keep], grad2[keep], rtol=1e-10, atol=1e-14)
    assert grad[~keep].abs().max() == 0


@pytest.mark.parametrize("variant", ["released", "upsampled"])
def test_edge_cases_all_ignored_one_valid_pixel_absent_class(variant):
    logits, target, w_e, w_ne = random_case(5, (1, 3, 5, 6))
    loss = aaf_loss(logits, torch.full_like(target, IGN), w_e, w_ne, variant=variant)
    assert loss.item() == 0.0 and loss.requires_grad
    one = torch.full_like(target, IGN)
    one[0, 2, 3] = 1  # one labelled pixel: every pair has an ignored end
    loss = aaf_loss(logits, one, w_e, w_ne, variant=variant)
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad.abs().max() == 0
    # class 2 absent from the labels: still equal to the reference
    absent = target.clone()
    absent[absent == 2] = 0
    logits.grad = None
    got = aaf_loss(logits, absent, w_e, w_ne, variant=variant)
    ref = slow_aaf(logits, absent, w_e, w_ne, (1, 2, 3), 3.0, variant == "released")
    assert got.item() == pytest.approx(ref.item(), rel=1e-10)


def test_upsampled_upsamples_logits_and_both_are_finite_under_autocast():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 4, 4, 5, generator=g)
    target = torch.randint(0, 4, (2, 8, 10), generator=g)
    w = torch.full((4, 3), 1 / 3)
    up = F.interpolate(logits, (8, 10), mode="bilinear", align_corners=False)
    assert aaf_loss(logits, target, w, w, variant="upsampled").item() == pytest.approx(
        aaf_loss(up, target, w, w, variant="upsampled").item(), rel=1e-6
    )
    for variant in ("released", "upsampled"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x = logits.to(torch.bfloat16).requires_grad_(True)
            loss = AAFLoss(4, variant=variant)(x, target)
        loss.backward()
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        assert torch.isfinite(x.grad.float()).all()


# ------------------------------------------------------------------- the adaptive weights
def test_module_weights_ascend_the_loss_and_decay():
    logits, target, _, _ = random_case(7, (2, 3, 6, 7))
    logits = logits.detach()
    module = AAFLoss(3, decay_steps=100).double()
    w_e, w_ne = module.weights()
    assert torch.allclose(w_e, torch.full((3, 3), 1 / 3, dtype=torch.float64))
    loss0 = module(logits, target)
    assert loss0.item() == pytest.approx(aaf_loss(logits, target, w_e, w_ne).item(), rel=1e-12)
    # the gradient the module's parameters receive is the opposite of d loss / d logits
    e = module.edge_logits.detach().clone().requires_grad_(True)
    ne = module.nonedge_logits.detach().clone().requires_grad_(True)
    (ge, gne) = torch.autograd.grad(aaf_loss(logits, target, e.softmax(1), ne.softmax(1)), (e, ne))
    loss0.backward()
    assert torch.allclose(module.edge_logits.grad, -ge) and torch.allclose(
        module.nonedge_logits.grad, -gne
    )
    # so a descent step of SGD on them increases the loss
    opt = torch.optim.SGD(module.parameters(), lr=5.0)
    opt.step()
    with torch.no_grad():
        loss1 = module(logits, target)
    assert loss1.item() > loss0.item()
    # decay 10^(-step / steps)
    with torch.no_grad():
        assert module(logits, target, step=50).item() == pytest.approx(
            loss1.item() * 10 ** (-0.5), rel=1e-12
        )
        assert module.decay(100) == pytest.approx(0.1)
    # the weights are part of the state dict
    state = module.state_dict()
    fresh = AAFLoss(3, decay_steps=100).double()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.edge_logits, module.edge_logits)


def test_module_init_weights_and_bad_arguments():
    module = AAFLoss(2, distances=(1, 2), init_weights=(3.0, 1.0))
    w_e, _ = module.weights()
    assert torch.allclose(w_e, torch.tensor([[0.75, 0.25], [0.75, 0.25]]))
    assert math.isclose(module.decay(10**6), 1.0)  # no decay without decay_steps
    assert module.variant == "released"
    for kwargs in (
        {"distances": (0,)},
        {"distances": (1, 1)},
        {"init_weights": (1.0,)},
        {"init_weights": (1.0, -1.0, 1.0)},
        {"margin": -1.0},
        {"decay_steps": 0},
    ):
        with pytest.raises(ConfigError):
            AAFLoss(3, **kwargs)
    with pytest.raises(ConfigError, match="variant="):
        AAFLoss(3, variant="label_size")
    with pytest.raises(ConfigError, match="variant="):
        aaf_loss(
            torch.zeros(1, 3, 4, 4),
            torch.zeros(1, 4, 4, dtype=torch.long),
            torch.ones(3, 3),
            torch.ones(3, 3),
            variant="official",
        )
    with pytest.raises(ConfigError, match="edge_weights"):
        aaf_loss(
            torch.zeros(1, 3, 4, 4),
            torch.zeros(1, 4, 4, dtype=torch.long),
            torch.ones(3, 2),
            torch.ones(3, 3),
        )
    with pytest.raises(ConfigError, match=r"loss\.aaf\.variant"):
        load_config(None, ["loss.aaf.variant=official"])
    assert load_config(None, []).loss.aaf.variant == "released"
    assert load_config(None, ["loss.aaf.variant=upsampled"]).loss.aaf.variant == "upsampled"
