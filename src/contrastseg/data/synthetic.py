"""SyntheticShapes: the embedded default data set, rendered procedurally on demand.

A class is a shape AND a texture; neither alone decides it:

====  ================  ===============  =====================================
id    name              shape            texture
====  ================  ===============  =====================================
0     background        (anything else)
1     striped_disc      ellipse          two-colour stripes
2     checker_square    rectangle        two-colour checkerboard
3     dotted_triangle   triangle         dark dots on a plain fill
4     solid_ring        annulus          one flat colour
5     gradient_star     5-point star     linear gradient between two hues
6     noisy_cross       plus sign        strong per-pixel luminance noise
====  ================  ===============  =====================================

Each image (H, W, 3) uint8 RGB holds 3-8 objects with random size, rotation, aspect, colour,
texture period, direction and phase, drawn in random order so that later ones occlude earlier
ones. Object colours are drawn around a per-class hue, but the hue ranges of the classes
overlap, so colour alone cannot decide the class. Distractors are the same shapes with a wrong
texture (e.g. a checkered disc); they are drawn among the objects and labelled background.
The background is a smooth two-colour gradient plus low-frequency blotches, with textured
bars as clutter, and uniform per-pixel noise over the whole image.

The mask (H, W) uint8 is exact: the class of the topmost visible object, 0 elsewhere. No
pixel is marked 255 (ignore).

``difficulty`` (>= 0, default 1.0 = a mid value, 2.0 = hard) scales the hard parts only:
noise amplitude, the number of distractors and of clutter bars, the strength of background
blotches and the overlap of class hues. Objects (positions, sizes, colours before the hue
spread) do not depend on it, so changing it keeps the layouts.

Determinism: sample ``i`` of split ``s`` is a pure function of
``(seed, s, i, image_size, difficulty)``. Random draws come from ``np.random.default_rng``
seeded with ``SeedSequence([seed, crc32(s), i])``; array arithmetic uses only IEEE-exact
operations (+, -, *, /, floor, comparisons), never transcendental functions whose SIMD
implementations differ between CPUs, so the bytes are the same on every machine (for the
same NumPy random stream).
"""

from __future__ import annotations

import colorsys
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from contrastseg.data.indexing import check_index
from contrastseg.data.palettes import default_palette
from contrastseg.errors import DataError

if TYPE_CHECKING:
    from contrastseg.config import DataConfig

CLASSES: tuple[str, ...] = (
    "background",
    "striped_disc",
    "checker_square",
    "dotted_triangle",
    "solid_ring",
    "gradient_star",
    "noisy_cross",
)
_SHAPES = ("disc", "square", "triangle", "ring", "star", "cross")
_TEXTURES = ("stripes", "checker", "dots", "solid", "gradient", "noise")
# Radius multipliers that roughly equalise the pixel share of the classes.
_SIZE_SCALE = (1.0, 0.96, 1.42, 1.12, 1.52, 1.18)

_SQ5 = math.sqrt(5.0)
_C72, _S72 = (_SQ5 - 1.0) / 4.0, math.sqrt(10.0 + 2.0 * _SQ5) / 4.0
_C144, _S144 = -(_SQ5 + 1.0) / 4.0, math.sqrt(10.0 - 2.0 * _SQ5) / 4.0
# A pentagram with tips at radius 1 is the set of points outside at most one of these
# five half-planes n.x <= cos(72 deg).
_STAR_NORMALS = ((1.0, 0.0), (_C72, _S72), (_C144, _S144), (_C144, -_S144), (_C72, -_S72))
_STAR_OFFSET = _C72
_TRI_NORMALS = ((1.0, 0.0), (-0.5, math.sqrt(3.0) / 2.0), (-0.5, -math.sqrt(3.0) / 2.0))


@dataclass(frozen=True)
class _Item:
    """One shape to draw; ``label`` None means clutter (the mask is left alone)."""

    label: int | None
    shape: str
    texture: str
    cy: float
    cx: float
    r: float
    aspect: float
    rot: tuple[float, float]
    tex_rot: tuple[float, float]
    period: float
    phase: tuple[float, float]
    c1: tuple[float, float, float]
    c2: tuple[float, float, float]
    param: float
    noise_amp: float


def _unit_vector(rng: np.random.Generator) -> tuple[float, float]:
    """A uniformly distributed direction (cos, sin), by rejection (no trigonometry)."""
    while True:
        x, y = (float(v) * 2.0 - 1.0 for v in rng.random(2))
        n2 = x * x + y * y
        if 1e-4 < n2 <= 1.0:
            n = math.sqrt(n2)
            return x / n, y / n


def _rgb(h: float, s: float, v: float) -> tuple[float, float, float]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return r * 255.0, g * 255.0, b * 255.0


def _sample_item(
    rng: np.random.Generator,
    label: int | None,
    shape: str,
    texture: str,
    hue: float,
    unit: float,
    size: tuple[int, int],
    radius_range: tuple[float, float],
) -> _Item:
    """Draw the geometry and appearance of one item; always the same number of draws."""
    h, w = size
    cy = float(rng.uniform(0.05, 0.95)) * h
    cx = float(rng.uniform(0.05, 0.95)) * w
    scale = _SIZE_SCALE[_SHAPES.index(shape)] if shape in _SHAPES else 1.0
    r = float(rng.uniform(*radius_range)) * unit * scale
    aspect = float(rng.uniform(0.65, 1.0))
    rot = _unit_vector(rng)
    tex_rot = _unit_vector(rng)
    period = max(4.0, r * float(rng.uniform(0.3, 0.55)))
    phase = (float(rng.random()), float(rng.random()))
    sat, val = float(rng.uniform(0.45, 1.0)), float(rng.uniform(0.55, 1.0))
    dh, s2, v2, hg = (float(x) for x in rng.uniform((-0.08, 0.4, 0.15, 0.25), (0.08, 1, 0.45, 0.5)))
    param = float(rng.random())
    noise_amp = float(rng.uniform(45.0, 70.0))
    c1 = _rgb(hue, sat, val)
    c2 = _rgb(hue + hg, sat, val) if texture == "gradient" else _rgb(hue + dh, sat * s2, val * v2)
    return _Item(
        label, shape, texture, cy, cx, r, aspect, rot, tex_rot, period, phase, c1, c2, param,
        noise_amp,
    )  # fmt: skip


def _inside(item: _Item, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """Boolean (h, w) footprint of ``item`` for pixel offsets dy (h, 1), dx (1, w)."""
    c, s = item.rot
    u = dx * c + dy * s
    v = dy * c - dx * s
    if item.shape == "bar":
        half_width = 0.5 + 3.0 * item.param
        return (np.abs(u) <= item.r) & (np.abs(v) <= half_width)
    un = u * (1.0 / (item.r * item.aspect))
    vn = v * (1.0 / item.r)
    if item.shape in ("disc", "ring"):
        d2 = un * un + vn * vn
        if item.shape == "disc":
            return d2 <= 1.0
        inner = 0.45 + 0.2 * item.param
        return (d2 <= 1.0) & (d2 >= inner * inner)
    if item.shape == "square":
        return (np.abs(un) <= 0.9) & (np.abs(vn) <= 0.9)
    if item.shape == "cross":
        arm = 0.22 + 0.13 * item.param
        au, av = np.abs(un), np.abs(vn)
        return ((au <= 1.0) & (av <= arm)) | ((av <= 1.0) & (au <= arm))
    if item.shape == "triangle":
        out = np.ones(un.shape, dtype=bool)
        for nx, ny in _TRI_NORMALS:
            out &= un * nx + vn * ny <= 0.5
        return out
    if item.shape == "star":
        outside = np.zeros(un.shape, dtype=np.uint8)
        for nx, ny in _STAR_NORMALS:
            outside += un * nx + vn * ny > _STAR_OFFSET
        return outside <= 1
    raise AssertionError(item.shape)


def _texture(
    item: _Item, dy: np.ndarray, dx: np.ndarray, noise_rng: np.random.Generator
) -> np.ndarray:
    """Colours (h, w, 3) float32 (or a (3,) colour for flat fills) of ``item``'s texture."""
    c1 = np.asarray(item.c1, dtype=np.float32)
    c2 = np.asarray(item.c2, dtype=np.float32)
    if item.texture == "solid":
        return c1
    c, s = item.tex_rot
    p = dx * c + dy * s
    q = dy * c - dx * s
    inv = 1.0 / item.period
    if item.texture == "gradient":
        t = np.clip(p * (0.5 / item.r) + 0.5, 0.0, 1.0)
        return c1 + (c2 - c1) * t[..., None]
    if item.texture == "noise":
        shape = np.broadcast_shapes(p.shape, q.shape)
        noise = noise_rng.random(shape, dtype=np.float32) * 2.0 - 1.0
        return c1 + (noise * item.noise_amp)[..., None]
    fp = p * inv + item.phase[0]
    if item.texture == "stripes":
        sel = (np.floor(fp).astype(np.int64) & 1) == 0
    elif item.texture == "checker":
        fq = q * inv + item.phase[1]
        sel = ((np.floor(fp).astype(np.int64) + np.floor(fq).astype(np.int64)) & 1) == 0
    elif item.texture == "dots":
        fq = q * inv + item.phase[1]
        fp = fp - np.floor(fp) - 0.5
        fq = fq - np.floor(fq) - 0.5
        sel = fp * fp + fq * fq > 0.09  # dots of radius 0.3 periods
    else:
        raise AssertionError(item.texture)
    return np.where(sel[..., None], c1, c2)


def _draw(
    canvas: np.ndarray, mask: np.ndarray, item: _Item, noise_rng: np.random.Generator
) -> None:
    h, w = mask.shape
    ext = 1.45 * item.r
    y0, y1 = max(math.floor(item.cy - ext), 0), min(math.ceil(item.cy + ext), h)
    x0, x1 = max(math.floor(item.cx - ext), 0), min(math.ceil(item.cx + ext), w)
    if y0 >= y1 or x0 >= x1:
        return
    dy = (np.arange(y0, y1, dtype=np.float32) + np.float32(0.5 - item.cy))[:, None]
    dx = (np.arange(x0, x1, dtype=np.float32) + np.float32(0.5 - item.cx))[None, :]
    inside = _inside(item, dy, dx)
    if not inside.any():
        return
    colours = _texture(item, dy, dx, noise_rng)
    region = canvas[y0:y1, x0:x1]
    region[inside] = colours if colours.ndim == 1 else colours[inside]
    if item.label is not None:
        mask[y0:y1, x0:x1][inside] = item.label


def _background(rng: np.random.Generator, size: tuple[int, int], difficulty: float) -> np.ndarray:
    """Smooth gradient + low-frequency blotches, (H, W, 3) float32 in [0, 255] units."""
    h, w = size
    b1 = np.asarray(_rgb(rng.random(), rng.uniform(0.05, 0.6), rng.uniform(0.2, 0.9)), np.float32)
    b2 = np.asarray(_rgb(rng.random(), rng.uniform(0.05, 0.6), rng.uniform(0.2, 0.9)), np.float32)
    gc, gs = _unit_vector(rng)
    ys = (np.arange(h, dtype=np.float32) + np.float32(0.5 - h / 2))[:, None]
    xs = (np.arange(w, dtype=np.float32) + np.float32(0.5 - w / 2))[None, :]
    t = (xs * gc + ys * gs) * (1.0 / (abs(gc) * w + abs(gs) * h)) + 0.5
    canvas = b1 + (b2 - b1) * t[..., None]
    # Blotches: a random 4x4 grid of offsets, bilinearly interpolated to (H, W).
    grid = (rng.random((4, 4, 3), dtype=np.float32) * 2.0 - 1.0) * np.float32(
        12.0 + 18.0 * difficulty
    )
    gy = (np.arange(h, dtype=np.float32) + 0.5) * np.float32(3.0 / h)
    gx = (np.arange(w, dtype=np.float32) + 0.5) * np.float32(3.0 / w)
    iy = np.minimum(np.floor(gy).astype(np.int64), 2)
    ix = np.minimum(np.floor(gx).astype(np.int64), 2)
    fy = (gy - iy)[:, None, None]
    fx = (gx - ix)[None, :, None]
    rows = grid[iy] * (1.0 - fy) + grid[iy + 1] * fy  # (H, 4, 3)
    canvas += rows[:, ix] * (1.0 - fx) + rows[:, ix + 1] * fx
    return canvas


def render_sample(
    seed: int, split: str, index: int, image_size: tuple[int, int], difficulty: float
) -> tuple[np.ndarray, np.ndarray]:
    """Render one sample: image (H, W, 3) uint8 and mask (H, W) uint8."""
    seq = np.random.SeedSequence([seed, zlib.crc32(split.encode("utf-8")), index])
    bg_rng, obj_rng, dis_rng, noise_rng = (np.random.default_rng(s) for s in seq.spawn(4))
    size = (int(image_size[0]), int(image_size[1]))
    unit = float(min(size))
    mask = np.zeros(size, dtype=np.uint8)
    canvas = _background(bg_rng, size, difficulty)

    # Clutter: bars with a random texture, under every object.
    num_clutter = int(bg_rng.random() * (2.0 + 4.0 * difficulty))
    for _ in range(num_clutter):
        texture = _TEXTURES[int(bg_rng.integers(len(_TEXTURES)))]
        item = _sample_item(bg_rng, None, "bar", texture, bg_rng.random(), unit, size, (0.06, 0.2))
        _draw(canvas, mask, item, noise_rng)

    spread = 0.06 + 0.2 * difficulty  # half-width of each class's hue range (classes are 1/6 apart)
    items = []
    for _ in range(int(obj_rng.integers(3, 9))):
        k = int(obj_rng.integers(len(_SHAPES)))
        hue = k / 6.0 + (float(obj_rng.random()) * 2.0 - 1.0) * spread
        items.append(
            _sample_item(obj_rng, k + 1, _SHAPES[k], _TEXTURES[k], hue, unit, size, (0.13, 0.25))
        )
    num_distractors = int(dis_rng.random() * (1.0 + 3.0 * difficulty))
    for _ in range(num_distractors):
        k = int(dis_rng.integers(len(_SHAPES)))
        wrong = (k + 1 + int(dis_rng.integers(len(_TEXTURES) - 1))) % len(_TEXTURES)
        item = _sample_item(
            dis_rng, 0, _SHAPES[k], _TEXTURES[wrong], dis_rng.random(), unit, size, (0.1, 0.2)
        )
        items.insert(int(dis_rng.integers(len(items) + 1)), item)
    for item in items:
        _draw(canvas, mask, item, noise_rng)

    amp = np.float32(3.0 + 15.0 * difficulty)
    canvas += noise_rng.random((*size, 3), dtype=np.float32) * (2.0 * amp) - amp
    np.clip(canvas, 0.0, 255.0, out=canvas)
    return np.rint(canvas).astype(np.uint8), mask


class SyntheticShapes:
    """Procedural shapes data set; ``self[i]`` is (image (H, W, 3) uint8, mask (H, W) uint8)."""

    dataset = "synthetic"

    @classmethod
    def options(cls, data: DataConfig, split: str) -> dict[str, Any]:
        """The keyword arguments (besides ``split``) that a config's data section gives: the
        train split has ``data.train_size`` samples, any other ``data.val_size``."""
        return {
            "num_samples": data.train_size if split == data.train_split else data.val_size,
            "image_size": tuple(data.image_size),
            "seed": data.seed,
            "difficulty": data.difficulty,
        }

    def __init__(
        self,
        split: str,
        num_samples: int,
        image_size: tuple[int, int] = (128, 128),
        seed: int = 0,
        difficulty: float = 1.0,
    ) -> None:
        if not isinstance(split, str) or not split or any(c in split for c in "/\\\n"):
            raise DataError(f"synthetic split must be a non-empty name like 'train', got {split!r}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
            raise DataError(f"synthetic num_samples must be an integer >= 0, got {num_samples!r}")
        try:
            h, w = (int(v) for v in image_size)
        except (TypeError, ValueError):
            raise DataError(
                f"synthetic image_size must be (height, width), got {image_size!r}"
            ) from None
        if h < 8 or w < 8:
            raise DataError(f"synthetic image_size must be at least (8, 8), got {image_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise DataError(f"synthetic seed must be an integer >= 0, got {seed!r}")
        if not isinstance(difficulty, int | float) or not 0.0 <= difficulty <= 10.0:
            raise DataError(
                f"synthetic difficulty must be a number in [0, 10] (1.0 is the default), "
                f"got {difficulty!r}"
            )
        self.split = split
        self.num_samples = num_samples
        self.image_size = (h, w)
        self.seed = seed
        self.difficulty = float(difficulty)
        self.classes: list[str] = list(CLASSES)
        self.palette: np.ndarray = default_palette(len(self.classes))

    def __len__(self) -> int:
        return self.num_samples

    def _check_index(self, index: int) -> int:
        return check_index(index, self.num_samples)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        index = self._check_index(index)
        return render_sample(self.seed, self.split, index, self.image_size, self.difficulty)

    def name(self, index: int) -> str:
        """Sample name, e.g. ``train_000042``."""
        return f"{self.split}_{self._check_index(index):06d}"

    def write_to_folder(self, root: Path) -> None:
        """Write this split in the folder layout that ``FolderSource`` reads.

        Writes ``images/<name>.png``, ``masks/<name>.png``, ``splits/<split>.txt`` and
        ``classes.txt``; several splits may be written into the same ``root``.
        """
        root = Path(root)
        classes_file = root / "classes.txt"
        text = "".join(f"{c}\n" for c in self.classes)
        if classes_file.exists() and classes_file.read_text() != text:
            raise DataError(
                f"{classes_file} exists with other classes than {self.classes}; "
                f"write into an empty directory"
            )
        for sub in ("images", "masks", "splits"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        names = []
        for i in range(self.num_samples):
            image, mask = self[i]
            name = self.name(i)
            Image.fromarray(image).save(root / "images" / f"{name}.png")
            Image.fromarray(mask).save(root / "masks" / f"{name}.png")
            names.append(name)
        (root / "splits" / f"{self.split}.txt").write_text("".join(f"{n}\n" for n in names))
        classes_file.write_text(text)
