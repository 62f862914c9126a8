"""RMI: the released computation against a reference that follows the authors' code step by
step, the unpadded variant against a reference with loops over pixels, pooling blocks and window
positions, gradients, ignore, edge cases and float16 autocast."""

import math

import pytest
import torch
import torch.nn.functional as F

import contrastseg.losses.rmi as rmi_module
from contrastseg.config import load_config
from contrastseg.errors import ConfigError
from contrastseg.losses.rmi import rmi_loss

IGN = 255


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


# ------------------------------------------------- reference following the released code
def loop_pool(x, pool, k, pad):
    """Pooling with kernel = stride = k and ``pad`` on each side, block by block: the average
    divides by k * k (padded cells count as zeros), the maximum is over the cells inside."""
    B, C, H, W = x.shape
    oh, ow = (H + 2 * pad - k) // k + 1, (W + 2 * pad - k) // k + 1
    rows = []
    for i in range(oh):
        row = []
        for j in range(ow):
            ys = [y for y in range(i * k - pad, i * k - pad + k) if 0 <= y < H]
            xs = [x_ for x_ in range(j * k - pad, j * k - pad + k) if 0 <= x_ < W]
            block = x[:, :, ys][:, :, :, xs]
            row.append(block.sum((2, 3)) / (k * k) if pool == "avg" else block.amax((2, 3)))
        rows.append(torch.stack(row, -1))
    return torch.stack(rows, -2)


def released_rmi(logits, target, radius=3, pool="avg", pool_size=4, alpha=5e-4, wb=0.5, wr=0.5):
    """The sigmoid RMI of the authors' code (RMILoss.forward_sigmoid and rmi_lower_bound),
    step by step: labels >= C are ignored; BCE summed over labelled pixels and classes and
    divided by (labelled pixels + 1); probabilities sigmoid * mask + 1e-6; pooling padded by
    pool_size // 2; inverse, covariance, Cholesky with log(diag + 1e-8)."""
    B, C, H, W = logits.shape
    mask = target < C
    maskf = mask.to(logits.dtype)
    onehot = F.one_hot(target * mask, C).to(logits.dtype) * maskf[..., None]  # B, H, W, C
    x = logits.permute(0, 2, 3, 1)
    bce_map = -(onehot * F.logsigmoid(x) + (1 - onehot) * F.logsigmoid(-x))
    bce = (bce_map * maskf[..., None]).sum() / (maskf.sum() + 1.0)
    probs = torch.sigmoid(logits) * maskf[:, None] + 1e-6
    labels = onehot.permute(0, 3, 1, 2)
    if pool_size > 1:
        labels = loop_pool(labels, pool, pool_size, pool_size // 2)
        probs = loop_pool(probs, pool, pool_size, pool_size // 2)
    h, w = labels.shape[-2:]
    nh, nw = h - (radius - 1), w - (radius - 1)
    d = radius * radius
    la = torch.stack(
        [labels[:, :, y : y + nh, x : x + nw] for y in range(radius) for x in range(radius)], 2
    ).reshape(B, C, d, -1)
    pr = torch.stack(
        [probs[:, :, y : y + nh, x : x + nw] for y in range(radius) for x in range(radius)], 2
    ).reshape(B, C, d, -1)
    eye = torch.eye(d, dtype=torch.float64)
    la = la - la.mean(3, keepdim=True)
    la_cov = la @ la.transpose(2, 3)
    pr = pr - pr.mean(3, keepdim=True)
    pr_cov = pr @ pr.transpose(2, 3)
    pr_cov_inv = torch.inverse(pr_cov + eye * alpha)
    la_pr_cov = la @ pr.transpose(2, 3)
    appro_var = la_cov - la_pr_cov @ pr_cov_inv @ la_pr_cov.transpose(-2, -1)
    chol = torch.linalg.cholesky(appro_var + eye * alpha)
    rmi_now = 0.5 * 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1) + 1e-8).sum(-1)
    rmi = (rmi_now.mean(0) / d).sum()
    return wb * bce + wr * rmi


# --------------------------------------------- loop reference of the unpadded variant
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


# ------------------------------------------------------------------- released (default)
@pytest.mark.parametrize(
    "seed,shape,pool,pool_size,radius",
    [
        (0, (2, 3, 18, 21), "avg", 4, 3),
        (1, (2, 3, 18, 21), "max", 4, 3),
        (2, (1, 4, 17, 16), "avg", 3, 3),
        (3, (1, 4, 17, 16), "max", 3, 2),
        (4, (2, 2, 9, 11), "avg", 2, 2),
        (5, (1, 3, 7, 8), "avg", 1, 3),
    ],
)
def test_released_equals_the_authors_computation(seed, shape, pool, pool_size, radius):
    logits, target = random_case(seed, shape)
    got = rmi_loss(logits, target, radius=radius, pool=pool, pool_size=pool_size)
    ref = released_rmi(logits, target, radius, pool, pool_size)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(ref.item(), rel=1e-11)
    (g_got,) = torch.autograd.grad(got, logits)
    (g_ref,) = torch.autograd.grad(ref, logits)
    assert torch.allclose(g_got, g_ref, rtol=1e-8, atol=1e-12)


def test_released_is_the_default_and_differs_from_unpadded(monkeypatch):
    logits, target = random_case(6, (2, 3, 18, 21))
    default = rmi_loss(logits, target)
    assert default.item() == rmi_loss(logits, target, variant="released").item()
    unpadded = rmi_loss(logits, target, variant="unpadded")
    assert abs(default.item() - unpadded.item()) > 1e-3
    # each released ingredient matters: BCE over (n + 1) and the two small constants
    n = int((target != IGN).sum())
    bce_rel = rmi_loss(logits, target, bce_weight=1.0, rmi_weight=0.0)
    bce_unp = rmi_loss(logits, target, bce_weight=1.0, rmi_weight=0.0, variant="unpadded")
    assert bce_rel.item() == pytest.approx(bce_unp.item() * n / (n + 1), rel=1e-12)
    # 1e-6 on the probabilities and 1e-8 on the Cholesky diagonal: without either, the RMI
    # term leaves the reference by far more than the tolerance of the tests above
    ref = released_rmi(logits, target, wb=0.0, wr=1.0).item()
    assert rmi_loss(logits, target, bce_weight=0.0, rmi_weight=1.0).item() == pytest.approx(
        ref, rel=1e-11
    )
    for name in ("PROB_EPS", "LOGDET_EPS"):
        with monkeypatch.context() as m:
            m.setattr(rmi_module, name, 0.0)
            off = rmi_loss(logits, target, bce_weight=0.0, rmi_weight=1.0).item()
        assert abs(off - ref) > 1e-9 * abs(ref)


@pytest.mark.parametrize("pool,pool_size", [("avg", 2), ("max", 3), ("avg", 3)])
def test_released_gradcheck_float64(pool, pool_size):
    logits, target = random_case(7, (1, 2, 9, 10))
    assert torch.autograd.gradcheck(
        lambda x: rmi_loss(x, target, radius=2, pool=pool, pool_size=pool_size),
        (logits,),
        atol=1e-6,
    )


# ------------------------------------------------------------------------------- unpadded
@pytest.mark.parametrize("pool", ["avg", "max"])
def test_unpadded_equals_the_slow_reference_with_gradients(pool):
    logits, target = random_case(0)
    got = rmi_loss(logits, target, radius=3, pool=pool, pool_size=2, variant="unpadded")
    ref = slow_rmi(logits, target, 3, pool, 2)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(ref.item(), rel=1e-9)
    (g_got,) = torch.autograd.grad(got, logits)
    (g_ref,) = torch.autograd.grad(ref, logits)
    assert torch.allclose(g_got, g_ref, rtol=1e-7, atol=1e-10)


def test_unpadded_weights_radius_alpha_and_no_pooling():
    logits, target = random_case(1, (1, 2, 8, 9))
    got = rmi_loss(
        logits,
        target,
        radius=2,
        pool_size=1,
        alpha=1e-3,
        bce_weight=1.0,
        rmi_weight=2.0,
        variant="unpadded",
    )
    ref = slow_rmi(logits, target, 2, "avg", 1, 1e-3, 1.0, 2.0)
    assert got.item() == pytest.approx(ref.item(), rel=1e-9)
    only_bce = rmi_loss(logits, target, rmi_weight=0.0, variant="unpadded")
    assert only_bce.item() == pytest.approx(slow_rmi(logits, target, wr=0.0).item(), rel=1e-12)


def test_unpadded_gradcheck_float64():
    logits, target = random_case(2, (1, 2, 8, 8))
    assert torch.autograd.gradcheck(
        lambda x: rmi_loss(x, target, radius=2, pool_size=2, variant="unpadded"),
        (logits,),
        atol=1e-6,
    )


# ----------------------------------------------------------------------- both variants
@pytest.mark.parametrize("variant", ["released", "unpadded"])
def test_ignore_pixels_have_no_effect(variant):
    logits, target = random_case(3, ignore_frac=0.3)
    ign = (target == IGN)[:, None].expand_as(logits)
    loss = rmi_loss(logits, target, pool_size=2, variant=variant)
    (grad,) = torch.autograd.grad(loss, logits)
    changed = logits.detach().clone()
    changed[ign] = 6.0
    changed.requires_grad_(True)
    loss2 = rmi_loss(changed, target, pool_size=2, variant=variant)
    (grad2,) = torch.autograd.grad(loss2, changed)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-12)
    assert torch.allclose(grad[~ign], grad2[~ign], rtol=1e-9, atol=1e-12)
    assert grad[ign].abs().max() == 0


def test_edge_cases():
    logits, target = random_case(4)
    none = torch.full_like(target, IGN)
    for variant in ("released", "unpadded"):
        loss = rmi_loss(logits, none, pool_size=2, variant=variant)
        assert loss.item() == 0.0 and loss.requires_grad
        (grad,) = torch.autograd.grad(loss, logits)
        assert grad.abs().max() == 0
    one = none.clone()
    one[0, 4, 5] = 1
    loss = rmi_loss(logits, one, pool_size=2)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(released_rmi(logits, one, pool_size=2).item(), rel=1e-9)
    loss = rmi_loss(logits, one, pool_size=2, variant="unpadded")
    assert loss.item() == pytest.approx(slow_rmi(logits, one).item(), rel=1e-9)
    absent = target.clone()
    absent[absent == 2] = 0
    assert rmi_loss(logits, absent, pool_size=2).item() == pytest.approx(
        released_rmi(logits, absent, pool_size=2).item(), rel=1e-9
    )
    # a pooled map smaller than the radius: only the BCE part remains
    # released: 10 x 12 pooled by 4 with padding 2 -> 3 x 4; unpadded -> 2 x 3
    for variant, radius in (("released", 4), ("unpadded", 3)):
        small = rmi_loss(logits, target, radius=radius, pool_size=4, variant=variant)
        only_bce = rmi_loss(logits, target, rmi_weight=0.0, variant=variant)
        assert small.item() == pytest.approx(only_bce.item())


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
        ({"variant": "official"}, "variant="),
    ):
        with pytest.raises(ConfigError, match=key):
            rmi_loss(logits, target, **kwargs)
    with pytest.raises(ConfigError, match=r"loss\.rmi\.pool"):
        load_config(None, ["loss.rmi.pool=median"])
    with pytest.raises(ConfigError, match=r"loss\.rmi\.variant"):
        load_config(None, ["loss.rmi.variant=official"])
    cfg = load_config(None, ["loss.rmi.pool=max", "loss.rmi.variant=unpadded"])
    assert cfg.loss.rmi.pool == "max" and cfg.loss.rmi.variant == "unpadded"
    assert math.isclose(cfg.loss.rmi.alpha, 5e-4) and cfg.loss.rmi.radius == 3
    assert load_config(None, []).loss.rmi.variant == "released"
