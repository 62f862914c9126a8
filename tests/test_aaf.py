"""AAF: masks on a hand-made map, a per-pixel/per-neighbour reference, gradients, ignore,
edge cases, the adaptive weights' gradient ascent and the decay."""

import math

import pytest
import torch

from contrastseg.errors import ConfigError
from contrastseg.losses.aaf import AAFLoss, aaf_loss, aaf_masks, aaf_terms, neighbour_offsets
from loss_cases import IGN, logits_and_target


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


# ------------------------------------------------------------------ slow reference (loops)
def slow_aaf(logits, target, w_edge, w_nonedge, distances, margin, ignore=IGN):
    """Plain loops over sizes, pixels, the 8 neighbours and the classes."""
    B, C, H, W = logits.shape
    probs = torch.softmax(logits, 1)
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
                            if not (0 <= ny < H and 0 <= nx < W):
                                continue
                            yi, yj = int(target[b, y, x]), int(target[b, ny, nx])
                            if yi == ignore or yj == ignore:
                                continue
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


# ----------------------------------------------------------------------------------- masks
def test_masks_on_a_hand_made_label_map():
    t = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, IGN, 1], [2, 2, 2, 1]]])
    edge, nonedge, ignored = aaf_masks(t, 3, 1)
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
    edge2, _, ignored2 = aaf_masks(t, 3, 2)
    k2 = {o: i for i, o in enumerate(neighbour_offsets(2))}
    assert edge2[0, :, k2[(0, 2)], 0, 0].tolist() == [True, True, False]
    assert ignored2[0, k2[(2, 2)], 0, 0]
    # (1,1) at distance 2: neighbours (1,3)=1, (3,1)=2, (3,3)=1 inside, the rest outside
    assert ignored2[0, :, 1, 1].tolist() == [True, True, True, True, False, True, False, False]
    assert edge2[0, :, k2[(2, 0)], 1, 1].tolist() == [True, False, True]


def test_masks_equal_a_loop_reference_and_the_loss_counts():
    _, t, _, _ = random_case(3, (2, 3, 5, 6), ignore_frac=0.2)
    for s in (1, 2, 3):
        edge, nonedge, ignored = aaf_masks(t, 3, s)
        for b in range(2):
            for k, (dy, dx) in enumerate(neighbour_offsets(s)):
                for y in range(5):
                    for x in range(6):
                        ny, nx = y + dy, x + dx
                        inside = 0 <= ny < 5 and 0 <= nx < 6
                        ign = not inside or IGN in (int(t[b, y, x]), int(t[b, ny, nx]))
                        assert bool(ignored[b, k, y, x]) == ign
                        for c in range(3):
                            e = not ign and (int(t[b, y, x]) == c) != (int(t[b, ny, nx]) == c)
                            assert bool(edge[b, c, k, y, x]) == e
                            assert bool(nonedge[b, c, k, y, x]) == (not ign and not e)
    _, counts, _ = aaf_terms(torch.zeros(2, 3, 5, 6), t, (1, 2, 3))
    for si, s in enumerate((1, 2, 3)):
        edge, nonedge, _ = aaf_masks(t, 3, s)
        assert counts[si].tolist() == [int(edge.sum()), int(nonedge.sum())]


# ------------------------------------------------------------------------------ the loss
@pytest.mark.parametrize("seed,margin", [(0, 3.0), (1, 0.3)])
def test_loss_and_gradients_equal_the_slow_reference(seed, margin):
    logits, target, w_e, w_ne = random_case(seed)
    got = aaf_loss(logits, target, w_e, w_ne, (1, 2, 3), margin)
    ref = slow_aaf(logits, target, w_e, w_ne, (1, 2, 3), margin)
    assert got.item() == pytest.approx(ref.item(), rel=1e-10, abs=1e-12)
    g_got = torch.autograd.grad(got, (logits, w_e, w_ne))
    g_ref = torch.autograd.grad(ref, (logits, w_e, w_ne))
    for a, b in zip(g_got, g_ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)


def test_gradcheck_float64():
    logits, target, w_e, w_ne = random_case(2, (1, 3, 3, 4))
    w_e, w_ne = w_e[:, :2].detach().requires_grad_(), w_ne[:, :2].detach().requires_grad_()
    # a margin near the KLs, so that both sides of the hinge are checked
    assert torch.autograd.gradcheck(
        lambda x, a, b: aaf_loss(x, target, a, b, (1, 2), margin=0.2), (logits, w_e, w_ne)
    )


def test_ignore_pixels_have_no_effect():
    logits, target, w_e, w_ne = random_case(4, (1, 3, 5, 6), ignore_frac=0.3)
    ign = target == IGN
    assert ign.any()
    loss = aaf_loss(logits, target, w_e, w_ne)
    (grad,) = torch.autograd.grad(loss, logits)
    changed = logits.detach().clone()
    changed[ign[:, None].expand_as(changed)] = 9.0
    changed.requires_grad_(True)
    loss2 = aaf_loss(changed, target, w_e, w_ne)
    (grad2,) = torch.autograd.grad(loss2, changed)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-12)
    keep = ~ign[:, None].expand_as(grad)
    assert torch.allclose(grad[keep], grad2[keep], rtol=1e-10, atol=1e-14)
    assert grad[~keep].abs().max() == 0


def test_edge_cases_all_ignored_one_valid_pixel_absent_class():
    logits, target, w_e, w_ne = random_case(5)
    loss = aaf_loss(logits, torch.full_like(target, IGN), w_e, w_ne)
    assert loss.item() == 0.0 and loss.requires_grad
    one = torch.full_like(target, IGN)
    one[0, 2, 3] = 1  # one labelled pixel: every pair has an ignored end
    loss = aaf_loss(logits, one, w_e, w_ne)
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad.abs().max() == 0
    # class 2 absent from the labels: still equal to the reference
    absent = target.clone()
    absent[absent == 2] = 0
    logits.grad = None
    got = aaf_loss(logits, absent, w_e, w_ne)
    ref = slow_aaf(logits, absent, w_e, w_ne, (1, 2, 3), 3.0)
    assert got.item() == pytest.approx(ref.item(), rel=1e-10)


def test_upsamples_logits_and_is_finite_under_autocast():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 4, 4, 5, generator=g)
    target = torch.randint(0, 4, (2, 8, 10), generator=g)
    w = torch.full((4, 3), 1 / 3)
    up = torch.nn.functional.interpolate(logits, (8, 10), mode="bilinear", align_corners=False)
    assert aaf_loss(logits, target, w, w).item() == pytest.approx(
        aaf_loss(up, target, w, w).item(), rel=1e-6
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = logits.to(torch.bfloat16).requires_grad_(True)
        loss = AAFLoss(4)(x, target)
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
    with pytest.raises(ConfigError, match="edge_weights"):
        aaf_loss(
            torch.zeros(1, 3, 4, 4),
            torch.zeros(1, 4, 4, dtype=torch.long),
            torch.ones(3, 2),
            torch.ones(3, 3),
        )
