"""The evaluation procedure (eval.short_side, pad_multiple, scales, flip, align_corners, fusion,
resize_back) against a plain, slow reference written here step by step after the authors'
tester (segmentor/tester.py of tfzhou/ContrastiveSeg: the val loader's short-side resize, the
collate's padding to a multiple, ``ms_test``/``ss_test``, the crop and the cubic resize back),
and, with the defaults, after contrastseg's own procedure. Every resize is a loop over output
pixels in float64; the model is a random-weight strided convolution whose logits live on a
grid four times coarser than the input, so that the upsampling of the logits matters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from contrastseg.config import EvalConfig
from contrastseg.engine.inference_modes import infer_scores
from selection import check_argmax

CLASSES = 5


class StridedNet(nn.Module):
    """Logits at stride 4 (ceil(H / 4) x ceil(W / 4)), random weights."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, CLASSES, 3, stride=2, padding=1),
        )

    def forward(self, x):
        return {"seg": self.body(x)}


# ---- resizes, one output pixel at a time ------------------------------------------------------
def bilinear(a: np.ndarray, size: tuple[int, int], align_corners: bool) -> np.ndarray:
    """(C, h, w) -> (C, H, W). Aligned corners: source = i (h - 1) / (H - 1); otherwise
    half-pixel centres, source = (i + 0.5) h / H - 0.5 clamped at 0; neighbours clamped."""
    c, h, w = a.shape
    H, W = size
    out = np.zeros((c, H, W))

    def src(i: int, n_in: int, n_out: int) -> float:
        if align_corners:
            return i * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        return max((i + 0.5) * n_in / n_out - 0.5, 0.0)

    for i in range(H):
        y = src(i, h, H)
        y0 = min(int(math.floor(y)), h - 1)
        y1, fy = min(y0 + 1, h - 1), y - y0
        for j in range(W):
            x = src(j, w, W)
            x0 = min(int(math.floor(x)), w - 1)
            x1, fx = min(x0 + 1, w - 1), x - x0
            out[:, i, j] = (1 - fy) * ((1 - fx) * a[:, y0, x0] + fx * a[:, y0, x1]) + fy * (
                (1 - fx) * a[:, y1, x0] + fx * a[:, y1, x1]
            )
    return out


def cubic_weight(d: float, a: float = -0.75) -> float:
    """Keys' cubic convolution kernel with a = -0.75 (OpenCV's INTER_CUBIC)."""
    d = abs(d)
    if d <= 1:
        return (a + 2) * d**3 - (a + 3) * d**2 + 1
    if d < 2:
        return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a
    return 0.0


def bicubic(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(C, h, w) -> (C, H, W), half-pixel centres, the 4x4 neighbours clamped to the image."""
    c, h, w = a.shape
    H, W = size
    out = np.zeros((c, H, W))
    for i in range(H):
        y = (i + 0.5) * h / H - 0.5
        y0 = math.floor(y)
        for j in range(W):
            x = (j + 0.5) * w / W - 0.5
            x0 = math.floor(x)
            for m in range(-1, 3):
                wy = cubic_weight(y - (y0 + m))
                yy = min(max(y0 + m, 0), h - 1)
                for n in range(-1, 3):
                    xx = min(max(x0 + n, 0), w - 1)
                    out[:, i, j] += wy * cubic_weight(x - (x0 + n)) * a[:, yy, xx]
    return out


def seg(model, image: np.ndarray) -> np.ndarray:
    """The network on one (3, h, w) image: its logits on the head's grid, float64."""
    with torch.no_grad():
        return model(torch.from_numpy(image)[None])["seg"][0].numpy()


# ---- the authors' tester ----------------------------------------------------------------------
def authors_tester(model, image: np.ndarray, cfg: EvalConfig) -> np.ndarray:
    """Summed logits at the label size for one normalised (3, H, W) image, the authors' way."""
    _, H, W = image.shape
    # val loader: Resize(min_side_length): size int(round(side * short / min(H, W))), cubic
    if cfg.short_side is not None:
        ratio = cfg.short_side / min(H, W)
        image = bicubic(image, (int(round(H * ratio)), int(round(W * ratio))))
    _, bh, bw = image.shape  # their meta 'border_size'
    # collate with fit_stride, pad_mode pad_right_down: zeros at the bottom and right
    ph = bh if bh % cfg.pad_multiple == 0 else bh + cfg.pad_multiple - bh % cfg.pad_multiple
    pw = bw if bw % cfg.pad_multiple == 0 else bw + cfg.pad_multiple - bw % cfg.pad_multiple
    padded = np.zeros((3, ph, pw))
    padded[:, :bh, :bw] = image
    total = np.zeros((CLASSES, ph, pw))
    for scale in cfg.scales:
        views = [False, True] if cfg.flip else [False]  # ms_test: ss_test of the flipped input
        for flipped in views:
            x = padded[:, :, ::-1].copy() if flipped else padded
            # ss_test: resize to (int(h * s), int(w * s)), aligned corners, forward, upsample
            # the logits to (h, w) with aligned corners
            xs = bilinear(x, (int(ph * scale), int(pw * scale)), align_corners=True)
            logits = bilinear(seg(model, xs), (ph, pw), align_corners=True)
            total += logits[:, :, ::-1] if flipped else logits
    # the tester: crop the padding off, cv2.resize(..., INTER_CUBIC) to the original size
    cropped = total[:, :bh, :bw]
    return cropped if (bh, bw) == (H, W) else bicubic(cropped, (H, W))


# ---- contrastseg's own procedure (the defaults) -------------------------------------------------
def own_procedure(model, image: np.ndarray, cfg: EvalConfig) -> np.ndarray:
    """Mean softmax probabilities at the image size: each scale resized with half-pixel
    centres (sizes rounded), logits upsampled to the scaled image, then to the image."""
    _, H, W = image.shape
    total = np.zeros((CLASSES, H, W))
    passes = 0
    for scale in cfg.scales:
        size = (max(1, round(H * scale)), max(1, round(W * scale)))
        xs = image if size == (H, W) else bilinear(image, size, align_corners=False)
        for flipped in [False, True] if cfg.flip else [False]:
            view = xs[:, :, ::-1].copy() if flipped else xs
            logits = bilinear(seg(model, view), size, align_corners=False)
            if size != (H, W):
                logits = bilinear(logits, (H, W), align_corners=False)
            if flipped:
                logits = logits[:, :, ::-1]
            e = np.exp(logits - logits.max(0))
            total += e / e.sum(0)
            passes += 1
    return total / passes


THEIRS = dict(align_corners=True, fusion="sum_logits")
CASES = {
    # Cityscapes: whole image at its own size, single scale
    "cityscapes-single-scale": (EvalConfig(**THEIRS), (64, 128)),
    # PASCAL-Context / COCO-Stuff: short side (520 there), padding to 8, seven scales with flip,
    # cubic resize back
    "context-multi-scale": (
        EvalConfig(
            **THEIRS,
            short_side=40,
            pad_multiple=8,
            scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0),
            flip=True,
            resize_back="bicubic",
        ),
        (30, 41),
    ),
    # Cityscapes multi-scale (no resize, no padding) at a size whose scaled sides are not
    # whole: their sizes are truncated
    "multi-scale-odd": (EvalConfig(**THEIRS, scales=(0.75, 1.0, 1.25), flip=True), (37, 53)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_authors_tester_step_by_step(case):
    cfg, (H, W) = CASES[case]
    model = StridedNet().eval()
    image = np.random.default_rng(1).normal(size=(3, H, W))
    ref = authors_tester(model.double(), image, cfg)
    got = infer_scores(model.float(), torch.from_numpy(image).float()[None], cfg)[0].numpy()
    assert got.shape == (CLASSES, H, W)
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() < 1e-4 * scale
    # the float32 procedure's class at each pixel is the float64 tester's, but where two classes
    # tie within the rounding the scores agree to; either may win on another CPU kernel
    check_argmax(got.argmax(0), ref, 2e-4 * scale, "the tester's argmax")
    # the procedure matters: contrastseg's own gives another argmax on this image
    own = infer_scores(model, torch.from_numpy(image).float()[None], EvalConfig())[0].numpy()
    assert (own.argmax(0) != ref.argmax(0)).mean() > 0.01


@pytest.mark.parametrize(
    "cfg",
    [EvalConfig(), EvalConfig(scales=(0.5, 1.0, 1.5), flip=True)],
    ids=["default", "scales-and-flip"],
)
def test_the_defaults_are_contrastseg_s_own_procedure(cfg):
    model = StridedNet().eval()
    image = np.random.default_rng(2).normal(size=(3, 29, 43))
    ref = own_procedure(model.double(), image, cfg)
    got = infer_scores(model.float(), torch.from_numpy(image).float()[None], cfg)[0].numpy()
    assert np.abs(got - ref).max() < 1e-5
    check_argmax(got.argmax(0), ref, 2e-5, "the procedure's argmax")


def test_the_slow_resizes_are_torch_s():
    """The loops above are the definitions torch implements (so the comparisons test the
    procedure, not two readings of an interpolation)."""
    a = np.random.default_rng(3).normal(size=(2, 7, 9))
    t = torch.from_numpy(a)[None]
    for size in [(13, 20), (4, 5)]:
        for corners in (True, False):
            ours = torch.nn.functional.interpolate(
                t, size=size, mode="bilinear", align_corners=corners
            )[0].numpy()
            assert np.abs(ours - bilinear(a, size, corners)).max() < 1e-12
        cubic = torch.nn.functional.interpolate(t, size=size, mode="bicubic", align_corners=False)
        assert np.abs(cubic[0].numpy() - bicubic(a, size)).max() < 1e-12
