"""Checks of a validated config against this machine, made once when the config is loaded.

The typed config (``contrastseg.config``) checks each value and each section; what is here
needs the machine or several sections at once:

- **memory**: a few tensors that a run cannot do without, each a *lower bound* of what it
  holds (one tensor, float32, at least), compared with the machine's physical memory
  (:func:`memory_limit`). One that cannot fit is refused before anything is allocated, naming
  the key, the estimate and the limit. The estimates (docs/reliability.md):

  - the training input batch: ``b x 3 x crop_h x crop_w``, ``b`` = ``train.batch_size /
    (train.grad_accum x processes)`` (processes from torchrun's ``WORLD_SIZE``, else 1);
  - each width of the decode, auxiliary, OCR and projection heads: ``b x width x
    ceil(crop_h / s) x ceil(crop_w / s)`` at the backbone's output stride ``s``;
  - the weight of the widest convolution of the head: ``5 W^2`` (ASPP's projection of its five
    branches, DeepLabV3 and DeepLabV3+) or ``9 W^2`` (UPerNet's 3x3 FPN convolutions) for
    ``W = model.head_channels``;
  - the class memory: ``(pixel_size + region_size) x projection_dim`` per class;
  - one evaluation image: ``3 x h x w x max(eval.scales)^2``, with ``h``, ``w`` at least
    ``eval.pad_multiple`` and ``eval.short_side`` (and the synthetic data's image size);
  - one synthetic image: ``3 x data.image_size``.

- **the run folder**: ``output.root`` and the run folder must be folders where they exist.

:func:`crop_warning` says when the training crop is larger than the images (the trainer logs it
once).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from contrastseg.errors import ConfigError

# The config types are not imported (config imports this module): ``cfg`` below is an
# ExperimentConfig, ``data`` its DataConfig.
ExperimentConfig = DataConfig = Any

__all__ = [
    "check_loaded_config",
    "crop_warning",
    "format_bytes",
    "memory_estimates",
    "memory_limit",
]

_FLOAT = 4  # bytes of a float32
_MEMORY_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# The decode head's width when model.head_channels is null (config.py's comment).
_DEFAULT_HEAD_CHANNELS = {"deeplabv3plus": 256, "pspnet": 512, "upernet": 512}


def memory_limit() -> int:
    """This machine's physical memory in bytes (1 TiB where the system does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        return 1 << 40


def format_bytes(n: float) -> str:
    """``n`` bytes with a binary unit: ``12.0 TiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if n < 1024 or unit == "EiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def _processes() -> int:
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _head_width(cfg: ExperimentConfig) -> int | None:
    m = cfg.model
    if m.head in ("hrnetv2", "ocr"):
        return None  # their widths are the backbone's (and ocr_*_channels)
    if m.head_channels is not None:
        return m.head_channels
    if m.head == "deeplabv3":
        return 512 if m.head_variant == "released" else 256
    return _DEFAULT_HEAD_CHANNELS[m.head]


def memory_estimates(cfg: ExperimentConfig) -> list[tuple[str, object, str, int]]:
    """``(key, value, what, bytes)`` of each lower bound in the module's docstring."""
    out: list[tuple[str, object, str, int]] = []
    t, d, m = cfg.train, cfg.data, cfg.model
    b = max(1, t.batch_size // (t.grad_accum * _processes()))
    ch, cw = d.crop_size
    crop = list(d.crop_size)
    out.append(
        (
            "data.crop_size",
            crop,
            f"the training input batch ({b} x 3 x {ch} x {cw} float32; train.batch_size "
            f"{t.batch_size})",
            b * 3 * ch * cw * _FLOAT,
        )
    )
    stride = 4 if m.backbone.is_hrnet else m.backbone.output_stride
    gh, gw = math.ceil(ch / stride), math.ceil(cw / stride)
    widths: list[tuple[str, int]] = []
    head_width = _head_width(cfg)
    if head_width is not None:
        widths.append(("model.head_channels", head_width))
    if m.aux and m.head in ("deeplabv3", "pspnet", "deeplabv3plus"):
        widths.append(("model.aux_channels", m.aux_channels))
    if m.head == "ocr":
        widths += [
            ("model.ocr_mid_channels", m.ocr_mid_channels),
            ("model.ocr_key_channels", m.ocr_key_channels),
        ]
        if m.ocr_aux_channels is not None:
            widths.append(("model.ocr_aux_channels", m.ocr_aux_channels))
    if cfg.loss.contrast.enabled:
        widths.append(("model.projection_dim", m.projection_dim))
        if m.projection_hidden is not None:
            widths.append(("model.projection_hidden", m.projection_hidden))
    for key, width in widths:
        out.append(
            (
                key,
                width,
                f"one activation of the head ({b} x {width} x {gh} x {gw} float32 at stride "
                f"{stride}, data.crop_size {crop})",
                b * width * gh * gw * _FLOAT,
            )
        )
    if head_width is not None and m.head in ("deeplabv3", "deeplabv3plus", "upernet"):
        k = 9 if m.head == "upernet" else 5
        what = "3x3 FPN convolution" if m.head == "upernet" else "ASPP projection"
        out.append(
            (
                "model.head_channels",
                head_width,
                f"the weight of the head's {what} ({k} x {head_width}^2 float32)",
                k * head_width * head_width * _FLOAT,
            )
        )
    mem = cfg.loss.contrast.memory
    if cfg.loss.contrast.enabled and mem.enabled:
        regions = mem.region_size if mem.region_mode == "fifo" else 0
        key = (
            "loss.contrast.memory.pixel_size"
            if mem.pixel_size >= regions
            else "loss.contrast.memory.region_size"
        )
        out.append(
            (
                key,
                mem.pixel_size if key.endswith("pixel_size") else regions,
                f"the class memory of one class ((pixel_size {mem.pixel_size} + region_size "
                f"{regions}) x projection_dim {m.projection_dim} {mem.dtype})",
                (mem.pixel_size + regions) * m.projection_dim * _MEMORY_BYTES[mem.dtype],
            )
        )
    e = cfg.eval
    bounds = [(e.pad_multiple, "eval.pad_multiple", e.pad_multiple)]
    if e.short_side is not None:
        bounds.append((e.short_side, "eval.short_side", e.short_side))
    eh = ew = max(v for v, _, _ in bounds)
    key, value = max(bounds, key=lambda x: x[0])[1:]
    if d.name == "synthetic":
        ih, iw = d.image_size
        if e.short_side is not None:
            f = e.short_side / min(ih, iw)
            ih, iw = round(ih * f), round(iw * f)
        if ih * iw > eh * ew:
            key, value = "data.image_size", list(d.image_size)
        eh, ew = max(eh, ih), max(ew, iw)
        out.append(
            (
                "data.image_size",
                list(d.image_size),
                f"one synthetic image (3 x {d.image_size[0]} x {d.image_size[1]} float32)",
                3 * d.image_size[0] * d.image_size[1] * _FLOAT,
            )
        )
    scale = max(e.scales)
    if scale > 2:
        key, value = "eval.scales", list(e.scales)
    sh, sw = max(1, round(eh * scale)), max(1, round(ew * scale))
    out.append(
        (
            key,
            value,
            f"one evaluation image (3 x {sh} x {sw} float32: padded to eval.pad_multiple "
            f"{e.pad_multiple}, eval.short_side {e.short_side}, at scale {scale})",
            3 * sh * sw * _FLOAT,
        )
    )
    return out


def _check_output(cfg: ExperimentConfig) -> list[str]:
    root, run = Path(cfg.output.root), cfg.run_dir
    if root.exists() and not root.is_dir():
        return [
            f"key 'output.root' = '{root}': names an existing file, not a folder; choose a "
            "folder (it is created if missing)"
        ]
    for parent in (run, *run.parents):
        if parent == root:
            break
        if parent.exists() and not parent.is_dir():
            return [
                f"key 'output.name' = '{cfg.output.name}': {parent} is an existing file, not a "
                "folder; choose another output.name"
            ]
    return []


def check_loaded_config(cfg: ExperimentConfig, source: str) -> None:
    """Raise ConfigError (one line per problem, each naming ``source`` and the key) when the
    run folder is a file or a tensor of :func:`memory_estimates` cannot fit this machine."""
    problems = _check_output(cfg)
    limit = memory_limit()
    for key, value, what, size in memory_estimates(cfg):
        if size > limit:  # the first only: the later estimates grow with the earlier keys
            problems.append(
                f"key '{key}' = {value}: {what} needs {format_bytes(size)}, more than this "
                f"machine's memory ({format_bytes(limit)}); lower {key}"
            )
            break
    if problems:
        raise ConfigError("\n".join(f"{source}: {p}" for p in problems))


def crop_warning(data: DataConfig, image_size: tuple[int, int]) -> str | None:
    """A warning when ``data.crop_size`` is larger than training images of ``image_size`` (h,
    w) brought to ``data.short_side`` and scaled by the largest ``data.scale_range``: every
    crop is then mostly padding, computed at the cost of the full crop."""
    h, w = image_size
    if data.short_side is not None:
        f = data.short_side / min(h, w)
        h, w = round(h * f), round(w * f)
    top = data.scale_range[1]
    sh, sw = round(h * top), round(w * top)
    ch, cw = data.crop_size
    if ch <= sh and cw <= sw:
        return None
    return (
        f"data.crop_size {[ch, cw]} is larger than the training images ({h}x{w}, at most "
        f"{sh}x{sw} after data.scale_range {list(data.scale_range)}): every crop is partly "
        "padding (ignored) that costs as much as image; a crop of at most "
        f"[{min(ch, sh)}, {min(cw, sw)}] trains on the same pixels"
    )
