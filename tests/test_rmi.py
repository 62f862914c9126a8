"""RMI: a reference with loops over pixels, pooling blocks and window positions, gradients,
ignore, edge cases and float16 autocast."""

import math

import pytest
import torch
import torch.nn.functional as F

from contrastseg.config import load_config
from contrastseg.errors import ConfigError
from contrastseg.losses.rmi import rmi_loss

IGN = 255


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


# ------------------------------------------------------------------ slow reference (loops)
def slow_rmi(logits, target, radius=3, pool="avg", pool_size=2, alpha=5e-4, wb=0.5, wr=0.5):
    B, C, H, W = logits.shape
    # BCE: per labelled pixel, summed over the classes; mean over labelled pixels
    bce_terms = []
    for b in range(B):
        for y in range(H):
            for x in range(W):
                lab = int(target[b, y, x])
                if lab == IGN:
                    continue
                s = 0
                for c in range(C):
                    p = torch.sigmoid(logits[b, c, y, x])
                    s = s - (torch.log(p) if lab == c else torch.log(1 - p))
                bce_terms.append(s)
    bce = torch.stack(bce_terms).mean() if bce_terms else logits.sum() * 0
    # pooled maps, block by block
    h, w = H // pool_size, W // pool_size
    d = radius * radius
    rmi = 0
    for c in range(C):
        per_image = []
        for b in range(B):
            Y = [[0.0] * w for _ in range(h)]
            P = [[0.0] * w for _ in range(h)]
            for i in range(h):
                for j in range(w):
                    ys, ps = [], []
                    for u in range(pool_size):
                        for v in range(pool_size):
                            yy, xx = i * pool_size + u, j * pool_size + v
                            valid = int(target[b, yy, xx]) != IGN
                            ys.append(float(valid and int(target[b, yy, xx]) == c))
                            ps.append(torch.sigmoid(logits[b, c, yy, xx]) * float(valid))
                    if pool == "avg":
                        Y[i][j] = sum(ys) / len(ys)
                        P[i][j] = torch.stack(ps).mean()
                    else:
                        Y[i][j] = max(ys)
                        P[i][j] = torch.stack(ps).max()
            # one d-vector per window position
            yv, pv = [], []
            for i in range(h - radius + 1):
                for j in range(w - radius + 1):
                    yv.append([Y[i + u][j + v] for u in range(radius) for v in range(radius)])
                    pv.append(
                        torch.stack([P[i + u][j + v] for u in range(radius) for v in range(radius)])
                    )
            Yn = torch.tensor(yv, dtype=torch.float64)  # (n, d)
            Pn = torch.stack(pv).to(torch.float64)
            Yn = Yn - Yn.mean(0)
            Pn = Pn - Pn.mean(0)
            s_y, s_p, s_yp = Yn.T @ Yn, Pn.T @ Pn, Yn.T @ Pn
            eye = torch.eye(d, dtype=torch.float64)
            M = s_y - s_yp @ torch.linalg.inv(s_p + alpha * eye) @ s_yp.T
            per_image.append(0.5 * torch.logdet(M + alpha * eye) / d)
        rmi = rmi + torch.stack(per_image).mean()
    return wb * bce + wr * rmi


def random_case(seed, shape=(2, 3, 10, 12), ignore_frac=0.15):
    g = torch.Generator().manual_seed(seed)
    B, C, H, W = shape
    logits = (2 * torch.randn(shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    # blocky labels so that the pooled one-hot maps are not constant
    coarse = torch.randint(0, C, (B, 1, H // 2, W // 3), generator=g).float()
    target = F.interpolate(coarse, (H, W), mode="nearest")[:, 0].long()
    target[torch.rand(B, H, W, generator=g) < ignore_frac] = IGN
    return logits, target


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_equals_the_slow_reference_with_gradients(pool):
    logits, target = random_case(0)
    got = rmi_loss(logits, target, radius=3, pool=pool, pool_size=2)
    ref = slow_rmi(logits, target, 3, pool, 2)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(ref.item(), rel=1e-9)
    (g_got,) = torch.autograd.grad(got, logits)
    (g_ref,) = torch.autograd.grad(ref, logits)
    assert torch.allclose(g_got, g_ref, rtol=1e-7, atol=1e-10)


def test_weights_radius_alpha_and_no_pooling():
    logits, target = random_case(1, (1, 2, 8, 9))
    got = rmi_loss(
        logits, target, radius=2, pool_size=1, alpha=1e-3, bce_weight=1.0, rmi_weight=2.0
    )
    ref = slow_rmi(logits, target, 2, "avg", 1, 1e-3, 1.0, 2.0)
    assert got.item() == pytest.approx(ref.item(), rel=1e-9)
    only_bce = rmi_loss(logits, target, rmi_weight=0.0)
    assert only_bce.item() == pytest.approx(slow_rmi(logits, target, wr=0.0).item(), rel=1e-12)


def test_gradcheck_float64():
    logits, target = random_case(2, (1, 2, 8, 8))
    assert torch.autograd.gradcheck(
        lambda x: rmi_loss(x, target, radius=2, pool_size=2), (logits,), atol=1e-6
    )


def test_ignore_pixels_have_no_effect():
    logits, target = random_case(3, ignore_frac=0.3)
    ign = (target == IGN)[:, None].expand_as(logits)
    loss = rmi_loss(logits, target, pool_size=2)
    (grad,) = torch.autograd.grad(loss, logits)
    changed = logits.detach().clone()
    changed[ign] = 6.0
    changed.requires_grad_(True)
    loss2 = rmi_loss(changed, target, pool_size=2)
    (grad2,) = torch.autograd.grad(loss2, changed)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-12)
    assert torch.allclose(grad[~ign], grad2[~ign], rtol=1e-9, atol=1e-12)
    assert grad[ign].abs().max() == 0


def test_edge_cases():
    logits, target = random_case(4)
    none = torch.full_like(target, IGN)
    loss = rmi_loss(logits, none, pool_size=2)
    assert loss.item() == 0.0 and loss.requires_grad
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad.abs().max() == 0
    one = none.clone()
    one[0, 4, 5] = 1
    loss = rmi_loss(logits, one, pool_size=2)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(slow_rmi(logits, one).item(), rel=1e-9)
    absent = target.clone()
    absent[absent == 2] = 0
    assert rmi_loss(logits, absent, pool_size=2).item() == pytest.approx(
        slow_rmi(logits, absent).item(), rel=1e-9
    )
    # a pooled map smaller than the radius: only the BCE part remains
    small = rmi_loss(logits, target, radius=3, pool_size=4)  # 10x12 -> 2x3 < 3
    assert small.item() == pytest.approx(rmi_loss(logits, target, rmi_weight=0.0).item())


def test_finite_under_float16_autocast():
    g = torch.Generator().manual_seed(5)
    conv = torch.nn.Conv2d(3, 4, 1)
    image = torch.randn(2, 3, 8, 16, generator=g)
    target = torch.randint(0, 4, (2, 32, 64), generator=g)
    target[:, :4] = IGN
    with torch.autocast("cpu", dtype=torch.float16):
        logits = conv(image) * 30  # large half-precision logits: saturated sigmoids
        assert logits.dtype == torch.float16
        loss = rmi_loss(logits, target)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in conv.parameters())


def test_bad_options():
    logits, target = random_case(6, (1, 2, 8, 8))
    for kwargs, key in (
        ({"pool": "median"}, "pool="),
        ({"radius": 0}, "radius="),
        ({"pool_size": 0}, "pool_size="),
        ({"alpha": 0.0}, "alpha="),
    ):
        with pytest.raises(ConfigError, match=key):
            rmi_loss(logits, target, **kwargs)
    with pytest.raises(ConfigError, match=r"loss\.rmi\.pool"):
        load_config(None, ["loss.rmi.pool=median"])
    cfg = load_config(None, ["loss.rmi.pool=max"])  # a YAML string, compared by value
    assert cfg.loss.rmi.pool == "max"
    assert math.isclose(cfg.loss.rmi.alpha, 5e-4) and cfg.loss.rmi.radius == 3
