"""Lovasz-softmax: a reference with loops over classes and sorted errors, gradients, ignore,
edge cases and the class option read from YAML."""

import pytest
import torch
import torch.nn.functional as F

from contrastseg.config import load_config
from contrastseg.errors import ConfigError
from contrastseg.losses.loss_set import LossSet
from contrastseg.losses.lovasz import lovasz_softmax
from loss_cases import IGN, logits_and_target


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


# ------------------------------------------------------------------ slow reference (loops)
def slow_lovasz_pixels(probs, labels, classes):
    """probs: list of (C,) tensors, labels: list of ints, for the labelled pixels only.
    Returns (loss, counts) with counts False when there is no class to average over."""
    if not labels:
        return None
    C = probs[0].shape[0]
    losses = []
    for c in range(C):
        fg = [1.0 if y == c else 0.0 for y in labels]
        if classes == "present" and sum(fg) == 0:
            continue
        errors = [abs(f - p[c]) for f, p in zip(fg, probs, strict=True)]
        order = sorted(range(len(errors)), key=lambda i: -float(errors[i].detach()))
        gts = sum(fg)
        inter, union_extra = gts, 0.0
        prev_j, loss_c = 0.0, 0.0
        for i in order:
            inter -= fg[i]
            union_extra += 1.0 - fg[i]
            j = 1.0 - inter / (gts + union_extra)
            loss_c = loss_c + errors[i] * (j - prev_j)
            prev_j = j
        losses.append(loss_c)
    if not losses:
        return None
    return sum(losses) / len(losses)


def slow_lovasz(logits, target, classes="present", per_image=False, ignore=IGN):
    B, C, H, W = logits.shape
    probs = torch.softmax(logits, 1)
    groups = [[b] for b in range(B)] if per_image else [list(range(B))]
    values = []
    for group in groups:
        ps, ys = [], []
        for b in group:
            for y in range(H):
                for x in range(W):
                    if int(target[b, y, x]) != ignore:
                        ps.append(probs[b, :, y, x])
                        ys.append(int(target[b, y, x]))
        v = slow_lovasz_pixels(ps, ys, classes)
        if v is not None:
            values.append(v)
    if not values:
        return logits.sum() * 0
    return sum(values) / len(values)


def random_case(seed, shape=(2, 3, 4, 5), ignore_frac=0.2):
    return logits_and_target(torch.Generator().manual_seed(seed), shape, ignore_frac)


@pytest.mark.parametrize("classes", ["present", "all"])
@pytest.mark.parametrize("per_image", [False, True])
def test_equals_the_slow_reference_with_gradients(classes, per_image):
    logits, target = random_case(0)
    target[1, :, :3] = 0  # class 2 absent from image 1 only; class ids differ per image
    target[1, :, 3:] = 1
    got = lovasz_softmax(logits, target, classes, per_image)
    ref = slow_lovasz(logits, target, classes, per_image)
    assert got.item() == pytest.approx(ref.item(), rel=1e-12)
    (g_got,) = torch.autograd.grad(got, logits)
    (g_ref,) = torch.autograd.grad(ref, logits)
    assert torch.allclose(g_got, g_ref, rtol=1e-10, atol=1e-14)


def test_gradcheck_float64():
    logits, target = random_case(1, (2, 3, 3, 4))
    for per_image in (False, True):
        assert torch.autograd.gradcheck(
            lambda x, p=per_image: lovasz_softmax(x, target, "present", p), (logits,)
        )


def test_ignore_pixels_have_no_effect():
    logits, target = random_case(2, ignore_frac=0.3)
    ign = (target == IGN)[:, None].expand_as(logits)
    for per_image in (False, True):
        loss = lovasz_softmax(logits, target, per_image=per_image)
        (grad,) = torch.autograd.grad(loss, logits)
        changed = logits.detach().clone()
        changed[ign] = -7.0
        changed.requires_grad_(True)
        loss2 = lovasz_softmax(changed, target, per_image=per_image)
        (grad2,) = torch.autograd.grad(loss2, changed)
        assert loss2.item() == pytest.approx(loss.item(), rel=1e-12)
        assert torch.allclose(grad[~ign], grad2[~ign], rtol=1e-10, atol=1e-14)
        assert grad[ign].abs().max() == 0


def test_one_valid_pixel_all_ignored_and_an_empty_image():
    logits, target = random_case(3)
    probs = torch.softmax(logits, 1)
    one = torch.full_like(target, IGN)
    one[1, 2, 3] = 1
    # one foreground pixel of class 1: G = 1, J_1 = 1, so the loss is its error 1 - p_1
    expected = 1 - probs[1, 1, 2, 3]
    for per_image in (False, True):
        assert lovasz_softmax(logits, one, per_image=per_image).item() == pytest.approx(
            expected.item(), rel=1e-12
        )
    # "all": the absent classes add their probability at that pixel
    all_ = lovasz_softmax(logits, one, "all")
    assert all_.item() == pytest.approx(
        (expected + probs[1, 0, 2, 3] + probs[1, 2, 2, 3]).item() / 3
    )
    none = torch.full_like(target, IGN)
    for classes in ("present", "all"):
        loss = lovasz_softmax(logits, none, classes, per_image=True)
        assert loss.item() == 0.0 and loss.requires_grad
        (grad,) = torch.autograd.grad(loss, logits)
        assert grad.abs().max() == 0
    # per image: an image without labelled pixels is left out of the mean
    half = target.clone()
    half[0] = IGN
    assert lovasz_softmax(logits, half, per_image=True).item() == pytest.approx(
        lovasz_softmax(logits[1:], target[1:]).item(), rel=1e-12
    )


def test_absent_class_present_vs_all():
    logits, target = random_case(4)
    target[target == 2] = 0
    probs = torch.softmax(logits, 1)
    present = lovasz_softmax(logits, target, "present")
    all_ = lovasz_softmax(logits, target, "all")
    # the absent class's Lovasz term is its largest probability over the labelled pixels
    p2 = probs[:, 2][target != IGN].max()
    assert all_.item() == pytest.approx((2 * present.item() + p2.item()) / 3, rel=1e-12)
    assert present.item() == pytest.approx(slow_lovasz(logits, target).item(), rel=1e-12)


def test_upsampling_and_autocast():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 4, 3, 5, generator=g)
    target = torch.randint(0, 4, (2, 6, 10), generator=g)
    up = F.interpolate(logits, (6, 10), mode="bilinear", align_corners=False)
    assert lovasz_softmax(logits, target).item() == pytest.approx(
        lovasz_softmax(up, target).item(), rel=1e-6
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = lovasz_softmax(logits.to(torch.bfloat16), target)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_class_option_from_yaml_is_compared_by_value(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        'loss:\n  lovasz:\n    enabled: true\n    classes: "all"\n    per_image: true\n'
    )
    cfg = load_config(path)
    assert cfg.loss.lovasz.classes == "all"
    logits, target = random_case(6)
    target[target == 2] = 0  # so that "all" and "present" differ
    terms = LossSet(cfg.loss, 3)({"seg": logits}, target, step=0)
    assert terms["lovasz"].item() == pytest.approx(
        slow_lovasz(logits, target, "all", per_image=True).item(), rel=1e-12
    )
    # a string built at run time (not the interned literal) works the same
    built = "".join(["pre", "sent"])
    assert lovasz_softmax(logits, target, built).item() == pytest.approx(
        lovasz_softmax(logits, target, "present").item()
    )
    path.write_text("loss:\n  lovasz:\n    classes: some\n")
    with pytest.raises(ConfigError, match=r"loss\.lovasz\.classes"):
        load_config(path)
    with pytest.raises(ConfigError, match="classes='some'"):
        lovasz_softmax(logits, target, "some")
