"""OHEM cross-entropy: a per-pixel reference, gradients, ignore and edge cases."""

import math

import pytest
import torch

from contrastseg.config import load_config
from contrastseg.errors import ConfigError
from contrastseg.losses.loss_set import LossSet
from contrastseg.losses.ohem import ohem_cross_entropy, ohem_mask
from loss_cases import IGN, logits_and_target


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def slow_ohem(logits, target, threshold, min_kept, ignore=IGN):
    """Per-pixel loop: p_true and CE of each labelled pixel; keep p < threshold or the
    min_kept lowest; mean CE over the kept pixels."""
    B, C, H, W = logits.shape
    items = []  # (p_true, ce)
    for b in range(B):
        for y in range(H):
            for x in range(W):
                lab = int(target[b, y, x])
                if lab == ignore:
                    continue
                z = logits[b, :, y, x]
                zf = z.detach().tolist()
                m = max(zf)
                lse = m + math.log(sum(math.exp(v - m) for v in zf))
                p_true = math.exp(zf[lab] - lse)
                ce = torch.logsumexp(z, 0) - z[lab]
                items.append((p_true, ce))
    if not items:
        return logits.sum() * 0, 0
    order = sorted(range(len(items)), key=lambda i: items[i][0])
    lowest = order[:min_kept]
    kept = [ce for i, (p, ce) in enumerate(items) if p < threshold or i in set(lowest)]
    return torch.stack(kept).mean(), len(kept)


def selection_margin(logits, target, threshold, min_kept, ignore=IGN) -> float:
    """How far the kept set is from changing: the smallest distance of a p_true to the
    threshold, and of the min_kept-th lowest p_true to the next. Where it exceeds the rounding
    of two code paths (float64: ~1e-15), the kept set is unique and may be compared exactly."""
    p = torch.softmax(logits.detach(), 1).gather(1, target.clamp(max=logits.shape[1] - 1)[:, None])
    p = p[:, 0][target != ignore].sort().values.tolist()
    gaps = [abs(v - threshold) for v in p]
    if 0 < min_kept < len(p):
        gaps.append(p[min_kept] - p[min_kept - 1])
    return min(gaps) if gaps else math.inf


def random_case(seed, shape=(2, 3, 4, 5), ignore_frac=0.2):
    return logits_and_target(torch.Generator().manual_seed(seed), shape, ignore_frac)


@pytest.mark.parametrize(
    "threshold,min_kept",
    [(0.7, 1), (0.7, 25), (0.2, 1), (0.2, 12), (0.7, 10**6), (1.0, 1)],
)
def test_equals_the_slow_reference_with_gradients(threshold, min_kept):
    logits, target = random_case(0)
    got = ohem_cross_entropy(logits, target, threshold, min_kept)
    ref, n_kept = slow_ohem(logits, target, threshold, min_kept)
    # the case is clear of ties: the kept set is the same on any kernel
    assert selection_margin(logits, target, threshold, min_kept) > 1e-9
    assert int(ohem_mask(logits, target, threshold, min_kept).sum()) == n_kept
    assert got.item() == pytest.approx(ref.item(), rel=1e-12)
    (g_got,) = torch.autograd.grad(got, logits)
    (g_ref,) = torch.autograd.grad(ref, logits)
    assert torch.allclose(g_got, g_ref, rtol=1e-10, atol=1e-14)


def test_min_kept_and_threshold_semantics():
    logits, target = random_case(1)
    valid = int((target != IGN).sum())
    assert int(ohem_mask(logits, target, 1e-9, 7).sum()) == 7  # the 7 hardest only
    assert int(ohem_mask(logits, target, 1e-9, 10**6).sum()) == valid  # all labelled
    assert int(ohem_mask(logits, target, 1.0, 1).sum()) == valid  # every p_true < 1


def test_gradcheck_float64():
    logits, target = random_case(2, (1, 3, 3, 4))
    assert torch.autograd.gradcheck(lambda x: ohem_cross_entropy(x, target, 0.5, 3), (logits,))


def test_ignore_pixels_have_no_effect():
    logits, target = random_case(3, ignore_frac=0.3)
    ign = (target == IGN)[:, None].expand_as(logits)
    loss = ohem_cross_entropy(logits, target, 0.5, 5)
    (grad,) = torch.autograd.grad(loss, logits)
    changed = logits.detach().clone()
    changed[ign] = -20.0  # would be the hardest pixels if they counted
    changed.requires_grad_(True)
    loss2 = ohem_cross_entropy(changed, target, 0.5, 5)
    (grad2,) = torch.autograd.grad(loss2, changed)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-12)
    assert torch.allclose(grad[~ign], grad2[~ign]) and grad[ign].abs().max() == 0


def test_edge_cases_and_loss_set():
    logits, target = random_case(4)
    none = torch.full_like(target, IGN)
    loss = ohem_cross_entropy(logits, none)
    assert loss.item() == 0.0 and loss.requires_grad
    one = none.clone()
    one[1, 2, 2] = 2
    expected = torch.logsumexp(logits[1, :, 2, 2], 0) - logits[1, 2, 2, 2]
    assert ohem_cross_entropy(logits, one, 1e-9, 100).item() == pytest.approx(expected.item())
    absent = target.clone()
    absent[absent == 2] = 1
    assert ohem_cross_entropy(logits, absent, 0.6, 4).item() == pytest.approx(
        slow_ohem(logits, absent, 0.6, 4)[0].item(), rel=1e-12
    )
    # upsampled logits, float32 under bf16 autocast
    small = torch.randn(2, 3, 2, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ohem_cross_entropy(small.to(torch.bfloat16), target)
    assert torch.isfinite(out)
    # in the loss set: "ce" is OHEM-CE on seg; the auxiliary CE stays plain
    cfg = load_config(
        None, ["loss.ce.ohem=true", "loss.ce.ohem_threshold=0.6", "loss.ce.ohem_min_kept=4"]
    )
    terms = LossSet(cfg.loss, 3)({"seg": logits, "aux": logits}, target, step=0)
    assert terms["ce"].item() == pytest.approx(slow_ohem(logits, target, 0.6, 4)[0].item())
    plain = torch.nn.functional.cross_entropy(logits, target, ignore_index=IGN)
    assert terms["aux_ce"].item() == pytest.approx(plain.item())
    for bad in ("loss.ce.ohem_threshold=0", "loss.ce.ohem_min_kept=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
            load_config(None, [bad])
    with pytest.raises(ConfigError, match="threshold"):
        ohem_mask(logits, target, threshold=1.5)
