"""Test-time inference: whole image or sliding window, at scales, with horizontal flip, and the
steps of a test procedure around them (short-side resize, padding, fusion, resize back).

One image batch goes through, in this order (``eval`` section of the config):

1. ``short_side``: the image is resized so that its short side has this length (interpolation
   ``resize_back``, sizes rounded), else kept;
2. ``pad_multiple``: padded at the bottom and right with zeros (the mean colour after
   normalisation) to a multiple of this;
3. for each of ``scales`` the padded image is resized bilinearly, inferred whole or by sliding
   window (``mode``), and with ``flip`` also mirrored, inferred and mirrored back; the logits
   are upsampled bilinearly to the padded size;
4. ``fusion``: the passes are combined as the mean of their softmax probabilities
   (``mean_prob``) or the sum of their logits (``sum_logits``);
5. the padding is cropped off and the scores resized to the label size (``resize_back``).

``align_corners`` chooses the bilinear convention of step 3. ``False`` (contrastseg's own):
half-pixel centres, scaled sizes rounded, logits upsampled to the scaled input and then to the
padded size. ``True`` (the authors' tester): corners aligned, scaled sizes truncated
(``int(H * s)``), logits upsampled once, from the head's grid straight to the padded size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from contrastseg.config import EvalConfig


def _up(t: torch.Tensor, size: tuple[int, int], align_corners: bool) -> torch.Tensor:
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    return F.interpolate(t, size=size, mode="bilinear", align_corners=align_corners)


def _logits(model, x: torch.Tensor, size=None, align_corners: bool = False) -> torch.Tensor:
    """Eval-mode logits of ``x`` (B, 3, h, w) upsampled to ``size`` (default: (h, w)).

    Half-pixel convention: to (h, w) first, then to ``size``; aligned corners: one upsampling
    from the head's grid to ``size``."""
    seg = model(x)["seg"]
    size = tuple(size or x.shape[-2:])
    if align_corners:
        return _up(seg, size, True)
    return _up(_up(seg, tuple(x.shape[-2:]), False), size, False)


def _starts(size: int, crop: int, stride: int) -> list[int]:
    """Window origins covering ``[0, size)``; the last window is aligned to the end."""
    if size <= crop:
        return [0]
    n = math.ceil((size - crop) / stride) + 1
    return sorted({min(i * stride, size - crop) for i in range(n)})


def slide_logits(
    model,
    x: torch.Tensor,
    crop: tuple[int, int],
    stride: tuple[int, int],
    align_corners: bool = False,
) -> torch.Tensor:
    """Sliding-window logits, averaged where windows overlap: (B, 3, H, W) -> (B, C, H, W).

    Windows of ``crop`` (clipped to the image) start every ``stride`` pixels; the last window in
    each direction ends at the image border, so every pixel is covered at least once.
    """
    B, _, H, W = x.shape
    ch, cw = min(crop[0], H), min(crop[1], W)
    total = None
    count = x.new_zeros(1, 1, H, W)
    for top in _starts(H, ch, stride[0]):
        for left in _starts(W, cw, stride[1]):
            window = x[:, :, top : top + ch, left : left + cw]
            out = _logits(model, window, align_corners=align_corners)
            if total is None:
                total = x.new_zeros(B, out.shape[1], H, W)
            total[:, :, top : top + ch, left : left + cw] += out
            count[:, :, top : top + ch, left : left + cw] += 1
    return total / count


def short_side_size(h: int, w: int, short_side: int) -> tuple[int, int]:
    """(h, w) scaled so that the shorter side is ``short_side`` (sizes rounded)."""
    ratio = short_side / min(h, w)
    return max(1, round(h * ratio)), max(1, round(w * ratio))


def scaled_size(h: int, w: int, scale: float, align_corners: bool) -> tuple[int, int]:
    """The input size at ``scale``: truncated with aligned corners (the authors' tester),
    rounded otherwise; at least 1."""
    cut = math.floor if align_corners else round
    return max(1, int(cut(h * scale))), max(1, int(cut(w * scale)))


def _pass(model, view: torch.Tensor, size: tuple[int, int], cfg: EvalConfig) -> torch.Tensor:
    """Logits of one view (whole or sliding window) at ``size``."""
    if cfg.mode == "slide":
        logits = slide_logits(
            model, view, tuple(cfg.crop_size), tuple(cfg.stride), cfg.align_corners
        )
        return _up(logits, size, cfg.align_corners)
    return _logits(model, view, size, cfg.align_corners)


@torch.no_grad()
def infer_scores(model, x: torch.Tensor, cfg: EvalConfig) -> torch.Tensor:
    """Class scores at the input (label) size, (B, 3, H, W) -> (B, C, H, W), float32: mean
    probabilities (``fusion: mean_prob``) or summed logits (``sum_logits``); the argmax over
    classes is the prediction. The steps are those of the module docstring."""
    H, W = x.shape[-2:]
    back = cfg.resize_back
    if cfg.short_side is not None:
        size = short_side_size(H, W, cfg.short_side)
        if size != (H, W):
            x = F.interpolate(x, size=size, mode=back, align_corners=False)
    h, w = x.shape[-2:]
    m = cfg.pad_multiple
    if h % m or w % m:
        x = F.pad(x, (0, -w % m, 0, -h % m))
    ph, pw = x.shape[-2:]
    acc = None
    passes = 0
    for scale in cfg.scales:
        size = scaled_size(ph, pw, scale, cfg.align_corners)
        xs = x if size == (ph, pw) else _up(x, size, cfg.align_corners)
        views = [(xs, False), (xs.flip(-1), True)] if cfg.flip else [(xs, False)]
        for view, flipped in views:
            logits = _pass(model, view, (ph, pw), cfg).float()
            if flipped:
                logits = logits.flip(-1)
            score = logits.softmax(1) if cfg.fusion == "mean_prob" else logits
            acc = score if acc is None else acc + score
            passes += 1
    if cfg.fusion == "mean_prob":
        acc = acc / passes
    acc = acc[..., :h, :w]
    if (h, w) != (H, W):
        acc = F.interpolate(acc, size=(H, W), mode=back, align_corners=False)
    return acc
