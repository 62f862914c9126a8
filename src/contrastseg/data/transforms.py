"""Joint image + mask transforms: numpy in, normalised torch tensors out.

Inputs: image (H, W, 3) uint8 RGB, mask (H, W) uint8 with 255 = ignore. Outputs: image
(3, h, w) float32 normalised with (mean, std) in [0, 1] units, mask (h, w) int64 where ignored
pixels hold ``ignore_index``. Every random number comes from the ``torch.Generator`` passed to
``__call__``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from contrastseg.data.fileio import IGNORE_INDEX
from contrastseg.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_GREY = (0.299, 0.587, 0.114)


def _stats(values: Sequence[float], what: str) -> torch.Tensor:
    t = torch.as_tensor(tuple(float(v) for v in values), dtype=torch.float32)
    if t.shape != (3,):
        raise DataError(f"{what} must have 3 values (R, G, B), got {tuple(values)!r}")
    if what == "std" and bool((t <= 0).any()):
        raise DataError(f"std values must be positive, got {tuple(values)!r}")
    return t.view(3, 1, 1)


def _check_pair(image: np.ndarray, mask: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DataError(
            f"expected an image (H, W, 3) uint8, got shape {image.shape} dtype {image.dtype}"
        )
    if mask.shape != image.shape[:2]:
        raise DataError(f"mask shape {mask.shape} does not match image shape {image.shape[:2]}")


def _to_tensors(
    image: np.ndarray, mask: np.ndarray, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, H, W) float32 in [0, 1] and (H, W) int64 with 255 mapped to ``ignore_index``."""
    _check_pair(image, mask)
    img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    msk = torch.from_numpy(np.asarray(mask).astype(np.int64))
    if ignore_index != IGNORE_INDEX:
        msk[msk == IGNORE_INDEX] = ignore_index
    return img, msk


def _source_coords(size_in: int, size_out: int) -> torch.Tensor:
    """Pixel-centre source coordinates (float64) of ``size_out`` output pixels."""
    scale = size_in / size_out
    return (torch.arange(size_out, dtype=torch.float64) + 0.5) * scale - 0.5


def _resize_bilinear(
    img: torch.Tensor, h: int, w: int, window: tuple[slice, slice] | None = None
) -> torch.Tensor:
    """Bilinear resize of (3, H, W) to (h, w), half-pixel centres (``align_corners=False``).

    With ``window = (rows, cols)`` only those output pixels are computed (the same values as
    slicing the full result). Built from gathers and element-wise ops only, so the result does
    not depend on the number of torch threads (``F.interpolate`` does, in the last bit).
    """
    rows, cols = window or (slice(None), slice(None))
    for dim, size, part in ((1, h, rows), (2, w, cols)):
        n = img.shape[dim]
        src = _source_coords(n, size)[part].clamp_(min=0.0)
        i0 = src.floor().long().clamp_(max=n - 1)
        i1 = (i0 + 1).clamp_(max=n - 1)
        frac = (src - i0).to(torch.float32)
        frac = frac.view(-1, 1) if dim == 1 else frac.view(1, -1)
        a, b = img.index_select(dim, i0), img.index_select(dim, i1)
        img = a + (b - a) * frac
    return img


def _cubic_taps(t: torch.Tensor) -> list[torch.Tensor]:
    """Weights of the 4 taps at offsets -1, 0, 1, 2 from ``floor(src)``, ``t = src -
    floor(src)``: Keys' cubic convolution with a = -0.75 (OpenCV's INTER_CUBIC, torch's
    bicubic)."""
    a = -0.75

    def near(x: torch.Tensor) -> torch.Tensor:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: torch.Tensor) -> torch.Tensor:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def _resize_bicubic(
    img: torch.Tensor, h: int, w: int, window: tuple[slice, slice] | None = None
) -> torch.Tensor:
    """Bicubic resize of (3, H, W) to (h, w), half-pixel centres, border pixels repeated (the
    taps of OpenCV's INTER_CUBIC and of ``F.interpolate(mode="bicubic",
    align_corners=False)``), clamped to [0, 1]. ``window`` as in :func:`_resize_bilinear`; built
    from gathers and element-wise ops, so the result does not depend on the thread count."""
    rows, cols = window or (slice(None), slice(None))
    for dim, size, part in ((1, h, rows), (2, w, cols)):
        n = img.shape[dim]
        src = _source_coords(n, size)[part]
        base = src.floor()
        taps = _cubic_taps(src - base)
        base = base.long()
        out = None
        for k, weight in zip(range(-1, 3), taps, strict=True):
            index = (base + k).clamp_(0, n - 1)
            weight = weight.to(torch.float32)
            weight = weight.view(-1, 1) if dim == 1 else weight.view(1, -1)
            term = img.index_select(dim, index) * weight
            out = term if out is None else out + term
        img = out
    return img.clamp_(0.0, 1.0)


_RESIZE = {"bilinear": _resize_bilinear, "bicubic": _resize_bicubic}


def _resize_nearest(
    mask: torch.Tensor, h: int, w: int, window: tuple[slice, slice] | None = None
) -> torch.Tensor:
    """Nearest resize of (H, W) sampling at pixel centres, aligned with ``_resize_bilinear``."""
    rows, cols = window or (slice(None), slice(None))
    r = (_source_coords(mask.shape[0], h)[rows] + 0.5).floor().long().clamp_(0, mask.shape[0] - 1)
    c = (_source_coords(mask.shape[1], w)[cols] + 0.5).floor().long().clamp_(0, mask.shape[1] - 1)
    return mask.index_select(0, r).index_select(1, c)


def normalize(image: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32, ``(x / 255 - mean) / std``."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise DataError(f"expected an image (H, W, 3), got shape {image.shape}")
    img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    return (img - _stats(mean, "mean")) / _stats(std, "std")


def denormalize(image: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """(3, H, W) normalised tensor -> (H, W, 3) uint8, for visualisation."""
    image = torch.as_tensor(image).detach().to("cpu", torch.float32)
    if image.ndim != 3 or image.shape[0] != 3:
        raise DataError(f"expected an image tensor (3, H, W), got shape {tuple(image.shape)}")
    out = (image * _stats(std, "std") + _stats(mean, "mean")).mul_(255.0).round_().clamp_(0, 255)
    return out.to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


class TrainTransform:
    """Random scale, pad, random crop, horizontal flip, colour jitter, normalise.

    ``crop_size`` is (height, width); the outputs are image (3, h, w) float32 and mask (h, w)
    int64 with exactly that size. The image is resized bilinearly (``interpolation="bicubic"``:
    bicubic) and the mask by nearest neighbour, both sampling at pixel centres so they stay
    aligned. Padding (bottom and right; ``pad_position="random"``: the scaled image at a random
    offset inside the crop) uses the mean colour for the image (0 after normalising) and
    ``ignore_index`` for the mask. Jitter draws brightness, contrast and saturation factors in
    ``[1 - jitter, 1 + jitter]``.

    ``short_side``: the image is first brought to that shorter side (``round(h x f)``,
    ``round(w x f)``, ``f = short_side / min(h, w)``) and the random scale applies to that size;
    both happen in one resize. ``aspect_range``: the scale ``s`` becomes ``s sqrt(a)`` for the
    width and ``s / sqrt(a)`` for the height, ``a`` uniform in the range. ``brightness_shift``
    ``v``: every channel of the scaled crop (not the padding) gets the same integer shift drawn
    uniformly from ``[-v, v]`` in 0-255 units, rounded to whole 0-255 units and clipped.
    """

    def __init__(
        self,
        crop_size: tuple[int, int],
        scale_range: tuple[float, float] = (0.5, 2.0),
        flip: bool = True,
        jitter: float = 0.2,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        ignore_index: int = IGNORE_INDEX,
        *,
        short_side: int | None = None,
        aspect_range: tuple[float, float] = (1.0, 1.0),
        brightness_shift: int = 0,
        interpolation: str = "bilinear",
        pad_position: str = "bottom_right",
    ) -> None:
        try:
            ch, cw = (int(v) for v in crop_size)
        except (TypeError, ValueError):
            raise DataError(f"crop_size must be (height, width), got {crop_size!r}") from None
        if ch < 1 or cw < 1:
            raise DataError(f"crop_size must be positive, got {crop_size!r}")
        lo, hi = (float(v) for v in scale_range)
        if not 0 < lo <= hi:
            raise DataError(f"scale_range must satisfy 0 < min <= max, got {scale_range!r}")
        if not 0.0 <= jitter <= 1.0:
            raise DataError(f"jitter must be in [0, 1] (0 disables it), got {jitter!r}")
        a_lo, a_hi = (float(v) for v in aspect_range)
        if not 0 < a_lo <= a_hi:
            raise DataError(f"aspect_range must satisfy 0 < min <= max, got {aspect_range!r}")
        if short_side is not None and int(short_side) < 1:
            raise DataError(f"short_side must be positive (or None), got {short_side!r}")
        if not 0 <= int(brightness_shift) <= 255:
            raise DataError(f"brightness_shift must be in [0, 255], got {brightness_shift!r}")
        if interpolation not in _RESIZE:
            raise DataError(
                f"interpolation must be one of {sorted(_RESIZE)}, got {interpolation!r}"
            )
        if pad_position not in ("bottom_right", "random"):
            raise DataError(
                f"pad_position must be 'bottom_right' or 'random', got {pad_position!r}"
            )
        self.short_side = None if short_side is None else int(short_side)
        self.aspect_range = (a_lo, a_hi)
        self.brightness_shift = int(brightness_shift)
        self.interpolation = interpolation
        self.pad_position = pad_position
        self.crop_size = (ch, cw)
        self.scale_range = (lo, hi)
        self.flip = bool(flip)
        self.jitter = float(jitter)
        self.mean = _stats(mean, "mean")
        self.std = _stats(std, "std")
        self.ignore_index = int(ignore_index)

    def __call__(
        self, image: np.ndarray, mask: np.ndarray, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        img, msk = _to_tensors(image, mask, self.ignore_index)
        # Fixed blocks of draws, so options never shift the other draws: the first block as it
        # always was, the second for the options added later (aspect, brightness, pad offset).
        u = torch.rand(7, generator=generator, dtype=torch.float64).tolist()
        v = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
        lo, hi = self.scale_range
        scale = lo + (hi - lo) * u[0]
        h, w = msk.shape
        bh, bw = h, w  # the size the random scale applies to
        if self.short_side is not None:
            f = self.short_side / min(h, w)
            bh, bw = max(1, round(h * f)), max(1, round(w * f))
        sh = sw = scale
        if self.aspect_range != (1.0, 1.0):
            a_lo, a_hi = self.aspect_range
            aspect = a_lo + (a_hi - a_lo) * v[0]
            sw, sh = scale * math.sqrt(aspect), scale / math.sqrt(aspect)
        nh, nw = max(1, round(bh * sh)), max(1, round(bw * sw))
        ch, cw = self.crop_size
        ph, pw = max(ch, nh), max(cw, nw)  # the scaled image padded to at least the crop
        y0 = min(int(u[1] * (ph - ch + 1)), ph - ch)
        x0 = min(int(u[2] * (pw - cw + 1)), pw - cw)
        # Resize only the part of the scaled image that the crop keeps: the same pixels as
        # resizing everything and cropping afterwards, at a fraction of the cost.
        window = (slice(y0, min(y0 + ch, nh)), slice(x0, min(x0 + cw, nw)))
        if (nh, nw) != (h, w):
            img = _RESIZE[self.interpolation](img, nh, nw, window)
            msk = _resize_nearest(msk, nh, nw, window)
        else:
            img, msk = img[:, window[0], window[1]], msk[window[0], window[1]]
        if self.brightness_shift:
            b = self.brightness_shift
            shift = min(int(v[1] * (2 * b + 1)), 2 * b) - b  # uniform in [-b, b]
            img = (img * 255.0 + shift).round_().clamp_(0.0, 255.0).div_(255.0)
        vh, vw = msk.shape
        if (vh, vw) != (ch, cw):  # the crop reaches into the padding
            oy = ox = 0  # bottom_right: the padding below and to the right
            if self.pad_position == "random":
                oy = min(int(v[2] * (ch - vh + 1)), ch - vh)
                ox = min(int(v[3] * (cw - vw + 1)), cw - vw)
            padded = self.mean.expand(3, ch, cw).clone()
            padded[:, oy : oy + vh, ox : ox + vw] = img
            img = padded
            padded_mask = torch.full((ch, cw), self.ignore_index, dtype=torch.int64)
            padded_mask[oy : oy + vh, ox : ox + vw] = msk
            msk = padded_mask
        if self.flip and u[3] < 0.5:
            img = img.flip(-1)
            msk = msk.flip(-1)

        if self.jitter > 0:
            j = self.jitter
            brightness, contrast, saturation = (1.0 - j + 2.0 * j * v for v in u[4:7])
            img = (img * brightness).clamp_(0.0, 1.0)
            grey = img[0] * _GREY[0] + img[1] * _GREY[1] + img[2] * _GREY[2]
            level = float(np.mean(grey.numpy(), dtype=np.float64))
            img = ((img - level) * contrast + level).clamp_(0.0, 1.0)
            grey = img[0] * _GREY[0] + img[1] * _GREY[1] + img[2] * _GREY[2]
            img = ((img - grey) * saturation + grey).clamp_(0.0, 1.0)

        img = (img - self.mean) / self.std
        return img.contiguous(), msk.contiguous()


class EvalTransform:
    """Normalise only: image (3, H, W) float32 and mask (H, W) int64, no resizing."""

    def __init__(
        self,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        self.mean = _stats(mean, "mean")
        self.std = _stats(std, "std")
        self.ignore_index = int(ignore_index)

    def __call__(
        self, image: np.ndarray, mask: np.ndarray, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        img, msk = _to_tensors(image, mask, self.ignore_index)
        return ((img - self.mean) / self.std).contiguous(), msk
