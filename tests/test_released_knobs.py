"""The settings of the authors' released recipes, each against a slow plain reference: CE class
weights and align_corners, the head learning-rate multiplier, the short-side resize, the
aspect-ratio jitter, the brightness shift, bicubic resizing and the random pad position."""

import math

import numpy as np
import pytest
import torch

from contrastseg import load_config
from contrastseg.data import TrainTransform
from contrastseg.data.transforms import _resize_bicubic
from contrastseg.engine.trainer import Trainer, poly_lr
from contrastseg.errors import ConfigError
from contrastseg.losses import LossSet, cross_entropy, labelled_pixels_per_process
from tiny import TINY

ZERO_MEAN, UNIT_STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------ CE
def _bilinear_loop(x, size, align_corners):
    """Bilinear resize of (C, h, w) to size, one output pixel at a time (float64)."""
    c, h, w = x.shape
    H, W = size
    out = torch.zeros(c, H, W, dtype=torch.float64)
    for i in range(H):
        for j in range(W):
            if align_corners:
                sy = i * (h - 1) / (H - 1) if H > 1 else 0.0
                sx = j * (w - 1) / (W - 1) if W > 1 else 0.0
            else:
                sy = max((i + 0.5) * h / H - 0.5, 0.0)
                sx = max((j + 0.5) * w / W - 0.5, 0.0)
            y0, x0 = min(int(math.floor(sy)), h - 1), min(int(math.floor(sx)), w - 1)
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            fy, fx = sy - y0, sx - x0
            out[:, i, j] = (
                x[:, y0, x0] * (1 - fy) * (1 - fx)
                + x[:, y0, x1] * (1 - fy) * fx
                + x[:, y1, x0] * fy * (1 - fx)
                + x[:, y1, x1] * fy * fx
            )
    return out


def _weighted_ce_loop(logits, target, weights, align_corners, ignore=255):
    """sum over labelled pixels of w[y] * -log softmax(x)[y], / sum of w[y] (float64)."""
    num = den = 0.0
    for b in range(logits.shape[0]):
        up = _bilinear_loop(logits[b].double(), tuple(target.shape[-2:]), align_corners)
        for i in range(target.shape[1]):
            for j in range(target.shape[2]):
                y = int(target[b, i, j])
                if y == ignore:
                    continue
                logp = up[:, i, j] - torch.logsumexp(up[:, i, j], 0)
                w = 1.0 if weights is None else float(weights[y])
                num += -w * float(logp[y])
                den += w
    return num / den


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_matches_the_loop_reference(align_corners, weighted):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64)
    target = torch.randint(0, 4, (2, 7, 11), generator=g)
    target[0, :2] = 255
    weights = torch.tensor([0.5, 2.0, 1.25, 0.8]) if weighted else None
    got = cross_entropy(logits, target, 255, class_weights=weights, align_corners=align_corners)
    want = _weighted_ce_loop(logits, target, weights, align_corners)
    assert float(got) == pytest.approx(want, rel=1e-9)
    # align_corners changes the value: the option is not ignored
    other = cross_entropy(
        logits, target, 255, class_weights=weights, align_corners=not align_corners
    )
    assert abs(float(other) - want) > 1e-4


def test_weighted_ce_of_micro_batches_sums_to_the_full_batch_value():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 3, 6, 6, generator=g, dtype=torch.float64)
    target = torch.randint(0, 3, (4, 6, 6), generator=g)
    target[1] = 255
    target[2, :3] = 2
    w = torch.tensor([0.3, 1.0, 2.5])
    full = cross_entropy(logits, target, class_weights=w)
    norm = labelled_pixels_per_process(target, 255, w)
    assert float(norm) == pytest.approx(float(w[target[target != 255]].sum()))
    parts = sum(
        cross_entropy(lg, tg, 255, norm, class_weights=w)
        for lg, tg in zip(logits.chunk(2), target.chunk(2), strict=True)
    )
    assert float(parts) == pytest.approx(float(full), rel=1e-12)


def test_loss_set_weights_ce_and_aux_and_checks_the_length():
    cfg = load_config(None, ["loss.ce.class_weights=[0.5, 2.0, 1.0]", "loss.ce.align_corners=true"])
    g = torch.Generator().manual_seed(2)
    out = {
        "seg": torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64),
        "aux": torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64),
    }
    target = torch.randint(0, 3, (2, 9, 9), generator=g)
    terms = LossSet(cfg.loss, 3)(out, target, 0)
    w = [0.5, 2.0, 1.0]
    assert float(terms["ce"]) == pytest.approx(_weighted_ce_loop(out["seg"], target, w, True))
    assert float(terms["aux_ce"]) == pytest.approx(_weighted_ce_loop(out["aux"], target, w, True))
    with pytest.raises(ConfigError, match=r"loss\.ce\.class_weights has 3 values .* 19 classes"):
        LossSet(cfg.loss, 19)


def test_class_weights_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"loss\.ce\.class_weights"):
        load_config(None, ["loss.ce.class_weights=[1.0, -2.0]"])
    with pytest.raises(ConfigError, match=r"loss\.ce\.class_weights and loss\.ce\.ohem"):
        load_config(None, ["loss.ce.class_weights=[1.0, 2.0]", "loss.ce.ohem=true"])


# ------------------------------------------------------------------------------ head lr
def test_head_lr_mult_scales_every_parameter_outside_the_backbone(tmp_path):
    cfg = load_config(
        None,
        [
            *TINY,
            "data.train_size=4",
            "data.val_size=2",
            "train.batch_size=2",
            "train.iters=4",
            "optim.head_lr_mult=10",
            "optim.weight_decay=0",
            "loss.contrast.enabled=true",
            "loss.contrast.max_views=4",
            "loss.contrast.max_samples=32",
            f"output.root={tmp_path}",
        ],
    )
    trainer = Trainer(cfg, progress=False)
    backbone = {id(p) for p in trainer.model.backbone.parameters()}
    projection = {id(p) for p in trainer.loss_set.contrast.parameters()}
    groups = trainer.optimizer.param_groups
    assert {id(p) for p in groups[0]["params"]} == backbone
    head = {id(p) for p in groups[1]["params"]}
    everything = {id(p) for p in trainer.model.parameters()} | projection
    assert head == everything - backbone and projection <= head and groups[1]["lr_mult"] == 10
    named = dict(trainer.model.named_parameters())
    before = {k: v.detach().clone() for k, v in named.items()}
    trainer.train_step(next(iter(trainer._loader())))
    lr = poly_lr(cfg.optim, 0, cfg.train.iters)
    assert groups[0]["lr"] == pytest.approx(lr) and groups[1]["lr"] == pytest.approx(10 * lr)
    # first SGD step, no weight decay: the update is -lr x the gradient (momentum buffer = grad)
    moved = 0
    for k, p in named.items():
        if p.grad is None:
            continue
        mult = 1.0 if id(p) in backbone else 10.0
        torch.testing.assert_close(
            p.detach() - before[k],
            -lr * mult * p.grad,
            rtol=1e-4,
            atol=2.4e-7 * float(before[k].abs().max()) + 1e-9,
        )  # atol: the float32 rounding of p - lr x grad
        moved += 1
    assert moved > 10


def test_default_head_lr_mult_keeps_one_group(tmp_path):
    cfg = load_config(
        None, [*TINY, "data.train_size=4", "data.val_size=2", f"output.root={tmp_path}"]
    )
    trainer = Trainer(cfg, progress=False)
    assert len(trainer.optimizer.param_groups) == 1


# ------------------------------------------------------------------------------ transforms
def _keys(x):
    x = abs(x)
    a = -0.75
    if x <= 1:
        return (a + 2) * x**3 - (a + 3) * x**2 + 1
    if x < 2:
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
    return 0.0


def _bicubic_loop(img, h, w):
    """Separable cubic convolution, one output value at a time, border pixels repeated."""
    c, H, W = img.shape
    x = img.double().numpy()

    def axis(n_in, n_out):
        rows = []
        for o in range(n_out):
            s = (o + 0.5) * n_in / n_out - 0.5
            f = math.floor(s)
            taps = [(min(max(f + k, 0), n_in - 1), _keys(s - (f + k))) for k in (-1, 0, 1, 2)]
            rows.append(taps)
        return rows

    ry, rx = axis(H, h), axis(W, w)
    tmp = np.zeros((c, h, W))
    for o, taps in enumerate(ry):
        for i, wt in taps:
            tmp[:, o, :] += wt * x[:, i, :]
    out = np.zeros((c, h, w))
    for o, taps in enumerate(rx):
        for j, wt in taps:
            out[:, :, o] += wt * tmp[:, :, j]
    return torch.from_numpy(np.clip(out, 0, 1)).float()


@pytest.mark.parametrize("size", [(23, 9), (7, 31), (5, 5)])
def test_bicubic_resize_matches_the_loop_reference_and_torch(size):
    img = torch.rand(3, 11, 14, generator=_gen(3))
    got = _resize_bicubic(img.clone(), *size)
    torch.testing.assert_close(got, _bicubic_loop(img, *size), rtol=0, atol=2e-6)
    torch_ref = torch.nn.functional.interpolate(
        img[None].double(), size=size, mode="bicubic", align_corners=False
    )[0].clamp(0, 1)
    torch.testing.assert_close(got, torch_ref.float(), rtol=0, atol=2e-6)
    window = (slice(1, 4), slice(2, 5))
    window_out = _resize_bicubic(img.clone(), *size, window)
    torch.testing.assert_close(window_out, got[:, window[0], window[1]], rtol=0, atol=0)


def _label_image(h, w):
    """uint8 image whose first channel encodes the row and second the column."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([yy * 2, xx * 2, np.full_like(yy, 100)], -1).astype(np.uint8)


def test_train_transform_bicubic_differs_from_bilinear_only_in_the_image():
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    mask = rng.integers(0, 5, (30, 40), dtype=np.uint8)
    kw = dict(scale_range=(1.5, 1.5), jitter=0.0, flip=False, mean=ZERO_MEAN, std=UNIT_STD)
    lin = TrainTransform((45, 60), **kw)(image, mask, _gen(0))
    cub = TrainTransform((45, 60), interpolation="bicubic", **kw)(image, mask, _gen(0))
    assert torch.equal(lin[1], cub[1])
    src = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(cub[0], _bicubic_loop(src, 45, 60), rtol=0, atol=2e-6)
    assert (lin[0] - cub[0]).abs().max() > 0.01


def _valid_extent(mask):
    """(rows, cols, top, left) of the labelled block in a padded mask."""
    ys, xs = np.nonzero(mask.numpy() != 255)
    return ys.max() - ys.min() + 1, xs.max() - xs.min() + 1, ys.min(), xs.min()


def test_short_side_and_aspect_ratio_set_the_scaled_size():
    h, w = 40, 64
    mask = np.zeros((h, w), dtype=np.uint8)
    tf = TrainTransform(
        (400, 400),
        scale_range=(0.5, 2.0),
        flip=False,
        jitter=0.0,
        short_side=52,
        aspect_range=(0.9, 1.1),
    )
    ratios = []
    for seed in range(40):
        _, out = tf(_label_image(h, w), mask, _gen(seed))
        rows, cols, top, left = _valid_extent(out)
        assert (top, left) == (0, 0)
        # reference: the draws of the transform's generator, in their documented order
        g = _gen(seed)
        u = torch.rand(7, generator=g, dtype=torch.float64).tolist()
        v = torch.rand(4, generator=g, dtype=torch.float64).tolist()
        s = 0.5 + 1.5 * u[0]
        a = 0.9 + 0.2 * v[0]
        bh, bw = 52, round(64 * 52 / 40)  # short side 52: 40x64 -> 52x83
        assert (rows, cols) == (round(bh * s / math.sqrt(a)), round(bw * s * math.sqrt(a)))
        ratios.append((cols / bw) / (rows / bh))
    assert min(ratios) < 0.93 and max(ratios) > 1.07  # the aspect ratio varies over 0.9-1.1


def test_brightness_shift_is_one_integer_per_image_in_range_and_skips_the_padding():
    h, w, b = 12, 10, 3
    rng = np.random.default_rng(5)
    image = rng.integers(20, 236, (h, w, 3), dtype=np.uint8)
    mask = np.ones((h, w), dtype=np.uint8)
    tf = TrainTransform(
        (16, 16),
        scale_range=(1.0, 1.0),
        flip=False,
        jitter=0.0,
        mean=ZERO_MEAN,
        std=UNIT_STD,
        brightness_shift=b,
    )
    counts = {}
    for seed in range(700):
        out, out_mask = tf(image, mask, _gen(seed))
        region = out[:, :h, :w] * 255
        shift = round(float(region[0, 0, 0]) - int(image[0, 0, 0]))
        assert -b <= shift <= b
        want = torch.from_numpy(image.astype(np.float64) + shift).permute(2, 0, 1)
        torch.testing.assert_close(region.double(), want, rtol=0, atol=1e-3)
        assert (out[:, h:, :] == 0).all() and (out[:, :, w:] == 0).all()  # padding untouched
        counts[shift] = counts.get(shift, 0) + 1
    assert sorted(counts) == list(range(-b, b + 1))
    assert all(abs(n / 700 - 1 / 7) < 0.05 for n in counts.values())  # uniform


def test_brightness_shift_clips_to_the_uint8_range():
    image = np.array([[[0, 128, 255]]], dtype=np.uint8).repeat(4, 0).repeat(4, 1)
    mask = np.zeros((4, 4), dtype=np.uint8)
    tf = TrainTransform(
        (4, 4),
        scale_range=(1, 1),
        flip=False,
        jitter=0,
        mean=ZERO_MEAN,
        std=UNIT_STD,
        brightness_shift=100,
    )
    seen = set()
    for seed in range(40):
        out, _ = tf(image, mask, _gen(seed))
        r, gch, bch = (out[c, 0, 0].item() * 255 for c in range(3))
        shift = round(gch) - 128
        assert round(r) == min(max(shift, 0), 255) and round(bch) == min(max(255 + shift, 0), 255)
        seen.add(shift > 0)
    assert seen == {True, False}


@pytest.mark.parametrize("position", ["bottom_right", "random"])
def test_pad_position(position):
    h, w, ch, cw = 9, 7, 13, 12
    image = _label_image(h, w)
    mask = np.full((h, w), 3, dtype=np.uint8)
    tf = TrainTransform(
        (ch, cw),
        scale_range=(1, 1),
        flip=False,
        jitter=0,
        mean=ZERO_MEAN,
        std=UNIT_STD,
        pad_position=position,
    )
    offsets = {}
    for seed in range(600):
        out, out_mask = tf(image, mask, _gen(seed))
        rows, cols, top, left = _valid_extent(out_mask)
        assert (rows, cols) == (h, w)
        block = out[:, top : top + h, left : left + w] * 255
        want = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)
        torch.testing.assert_close(block, want, rtol=0, atol=1e-3)
        offsets[(top, left)] = offsets.get((top, left), 0) + 1
    if position == "bottom_right":
        assert set(offsets) == {(0, 0)}
    else:
        cells = (ch - h + 1) * (cw - w + 1)
        assert set(offsets) == {(y, x) for y in range(ch - h + 1) for x in range(cw - w + 1)}
        assert max(offsets.values()) < 3 * 600 / cells


def test_ohem_upsamples_with_align_corners_too():
    from contrastseg.losses import ohem_cross_entropy

    g = torch.Generator().manual_seed(6)
    logits = torch.randn(1, 3, 3, 4, generator=g, dtype=torch.float64)
    target = torch.randint(0, 3, (1, 7, 9), generator=g)
    # threshold 1 keeps every labelled pixel: plain CE over all of them
    for corners in (False, True):
        got = ohem_cross_entropy(logits, target, 1.0, 1, 255, align_corners=corners)
        assert float(got) == pytest.approx(_weighted_ce_loop(logits, target, None, corners))
