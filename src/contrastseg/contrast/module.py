"""`PixelContrast`: pixel contrast as one module to attach to any segmentation model.

It owns the projection head, the anchor sampler's settings, the class memory and the random
generator, and turns the features a model already computes into the contrast loss::

    contrast = PixelContrast(num_classes=19, in_channels=720, memory=True)
    loss = ce + 0.1 * contrast(features, logits, labels, step=it)

See docs/contrast.md for recipes with torchvision, segmentation_models_pytorch and timm models.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from contrastseg.checks import check_int
from contrastseg.contrast.bank_selection import MEMORY_SAMPLING_MODES, select_from_bank
from contrastseg.contrast.infonce import contrast_loss
from contrastseg.contrast.memory import ClassMemory
from contrastseg.contrast.projection import ProjectionHead
from contrastseg.contrast.sampling import sample_anchors
from contrastseg.errors import ConfigError
from contrastseg.precision import MEMORY_DTYPES
from contrastseg.randomness import LazyGenerator, SeededModule

if TYPE_CHECKING:
    from contrastseg.config import ContrastConfig, ModelConfig

__all__ = ["ContrastDiagnostics", "PixelContrast", "PixelContrastWarning"]


class PixelContrastWarning(UserWarning):
    """A call returned a zero loss for a reason the caller can fix (warned once per cause and
    module): the warm-up, labels that are all ignored, ``max_views`` larger than what a class
    covers on the feature grid, or ``max_samples`` smaller than the (image, class) pairs."""


@dataclass(frozen=True)
class ContrastDiagnostics:
    """What one call did: whether the loss was computed (past the warm-up), the anchors it
    sampled, and the memory's filled entries after the push (0 without a memory)."""

    active: bool
    anchors: int
    memory_filled: int
    memory_capacity: int


class PixelContrast(SeededModule):
    """Pixel contrast (supervised InfoNCE over pixel embeddings) with segment-aware hard
    anchors and an optional cross-image class memory.

    Args:
        num_classes: number of classes ``C``; labels outside ``[0, C)`` are ignored.
        in_channels: channels of the features given to :meth:`forward`; ``None``: no
            projection head, :meth:`forward` takes unit-length embeddings ``(B, dim, h, w)``
            from the caller's own head.
        dim: embedding size ``D`` (the projection head's output; 256 in the paper).
        hidden_channels: the projection head's hidden width (``None``: ``in_channels``).
        temperature, base_temperature: ``tau`` and ``tau_b``; the loss is scaled by
            ``tau / tau_b``.
        max_samples, max_views: anchors per call and per (image, class) pair (under DDP each
            process samples its own: a global batch uses up to N x ``max_samples`` anchors).
        ignore_index: label value never sampled nor stored.
        memory: keep a class memory of embeddings from earlier batches (and other processes).
        memory_size: pixel entries per class (ring buffer).
        pixels_per_image: pixels of each class each image pushes into the memory.
        region_mode, region_size: region-mean store (``"fifo"`` ring of ``region_size`` per
            class, ``"per_image"`` slot per (class, image id; needs ``num_images``) or
            ``"none"``).
        num_images: training images, for ``region_mode="per_image"``.
        memory_dtype: storage dtype of the memory (float32, float16 or bfloat16).
        memory_sampling: which memory entries each anchor sees: ``all``, ``random``,
            ``hardest`` or ``semi_hard`` (``k_pos`` positives, ``k_neg`` negatives; semi-hard
            draws among the ``semi_hard_fraction`` nearest).
        warmup_iters: calls with ``step < warmup_iters`` return a zero loss (still attached to
            the projection head, so every parameter gets a gradient and DDP needs no
            ``find_unused_parameters``), sample nothing and push nothing.
        seed: seed of the module's generator (use a different seed per process under DDP).
        process_group: the group the memory is all-gathered over (default: the world).

    ``forward(features (B, in_channels, h, w), logits (B, C, h', w'), labels (B, H, W),
    step=None, image_ids=None)`` returns the scalar loss (float32 or wider, whatever the
    autocast state). Labels are resized to the feature grid by nearest neighbour; the hard-anchor
    predictions are the argmax of ``logits`` (bilinearly resized to the grid when sizes
    differ; no gradient flows into ``logits``). The memory is read before this batch is pushed,
    and the gradient of the returned loss is that of the memory as read: it is computed during
    the call, so the push (or any later call) before ``backward()`` cannot change it.
    ``image_ids (B,)`` are needed with ``region_mode="per_image"``. Under DDP every process must
    call it at the same steps (the memory push is a collective).

    ``state_dict()`` holds the projection head, the memory and the generator state, so a run
    resumed from it draws the same anchors. At inference nothing of this module runs.

    A call that returns a zero loss for a reason the caller can fix warns once per module and
    cause (:class:`PixelContrastWarning`): the warm-up is still running; every label on the
    feature grid is ignored; no class covers more than ``max_views`` grid pixels of an image
    (the warning names the largest count, so ``max_views`` can be set below it); more (image,
    class) pairs qualify than ``max_samples`` allows one anchor each. The check runs only when
    no anchor was sampled, so it costs nothing otherwise and changes no draw.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int | None,
        *,
        dim: int = 256,
        hidden_channels: int | None = None,
        temperature: float = 0.1,
        base_temperature: float = 0.07,
        max_samples: int = 1024,
        max_views: int = 100,
        ignore_index: int = 255,
        memory: bool = False,
        memory_size: int = 5000,
        pixels_per_image: int = 10,
        region_mode: str = "fifo",
        region_size: int = 5000,
        num_images: int | None = None,
        memory_dtype: torch.dtype = torch.float32,
        memory_sampling: str = "all",
        k_pos: int = 1024,
        k_neg: int = 2048,
        semi_hard_fraction: float = 0.1,
        warmup_iters: int = 0,
        seed: int = 0,
        process_group=None,
    ) -> None:
        super().__init__()
        check_int("num_classes", num_classes, 1)
        if in_channels is not None:
            check_int("in_channels", in_channels, 1)
        check_int("dim", dim, 1)
        check_int("max_samples", max_samples, 1)
        check_int("max_views", max_views, 1)
        check_int("k_pos", k_pos, 0)
        check_int("k_neg", k_neg, 0)
        check_int("warmup_iters", warmup_iters, 0)
        for name, value in (("temperature", temperature), ("base_temperature", base_temperature)):
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and value > 0):
                raise ConfigError(f"{name}={value!r} is invalid; allowed values: numbers > 0")
        if memory_sampling not in MEMORY_SAMPLING_MODES:
            raise ConfigError(
                f"memory_sampling={memory_sampling!r} is not supported; allowed values: "
                + ", ".join(repr(m) for m in MEMORY_SAMPLING_MODES)
            )
        if not 0 < semi_hard_fraction <= 1:
            raise ConfigError(
                f"semi_hard_fraction={semi_hard_fraction!r} is invalid; allowed values: (0, 1]"
            )
        if 0 <= ignore_index < num_classes:
            raise ConfigError(
                f"ignore_index={ignore_index} is a class id (num_classes={num_classes}); "
                "allowed values: outside [0, num_classes)"
            )
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.dim = dim
        self.temperature = float(temperature)
        self.base_temperature = float(base_temperature)
        self.max_samples = max_samples
        self.max_views = max_views
        self.ignore_index = ignore_index
        self.memory_sampling = memory_sampling
        self.k_pos = k_pos
        self.k_neg = k_neg
        self.semi_hard_fraction = float(semi_hard_fraction)
        self.warmup_iters = warmup_iters
        self.projection: ProjectionHead | None = None
        if in_channels is not None:
            self.projection = ProjectionHead(in_channels, dim, hidden_channels)
        self.memory: ClassMemory | None = None
        if memory:
            self.memory = ClassMemory(
                num_classes,
                dim=dim,
                pixel_size=memory_size,
                pixels_per_image=pixels_per_image,
                region_mode=region_mode,
                region_size=region_size,
                num_images=num_images,
                dtype=memory_dtype,
                process_group=process_group,
            )
        self._rng = LazyGenerator(seed)
        self._warned: set[str] = set()  # the causes of a zero loss already warned about

    @classmethod
    def from_config(
        cls,
        contrast: ContrastConfig,
        model: ModelConfig,
        num_classes: int,
        in_channels: int,
        *,
        ignore_index: int = 255,
        seed: int = 0,
        num_images: int | None = None,
    ) -> PixelContrast:
        """The module the project's config describes (``loss.contrast`` and the projection
        head's ``model.projection_dim`` / ``model.projection_hidden``)."""
        mem = contrast.memory
        return cls(
            num_classes,
            in_channels,
            dim=model.projection_dim,
            hidden_channels=model.projection_hidden,
            temperature=contrast.temperature,
            base_temperature=contrast.base_temperature,
            max_samples=contrast.max_samples,
            max_views=contrast.max_views,
            ignore_index=ignore_index,
            memory=mem.enabled,
            memory_size=mem.pixel_size,
            pixels_per_image=mem.pixels_per_image,
            region_mode=mem.region_mode,
            region_size=mem.region_size,
            num_images=num_images,
            memory_dtype=MEMORY_DTYPES[mem.dtype],
            memory_sampling=mem.sampling,
            k_pos=mem.k_pos,
            k_neg=mem.k_neg,
            semi_hard_fraction=mem.semi_hard_fraction,
            warmup_iters=contrast.warmup_iters,
            seed=seed,
        )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, temperature={self.temperature}, "
            f"base_temperature={self.base_temperature}, max_samples={self.max_samples}, "
            f"max_views={self.max_views}, memory_sampling={self.memory_sampling!r}, "
            f"warmup_iters={self.warmup_iters}"
        )

    def active(self, step: int | None) -> bool:
        """Whether a call at ``step`` computes the loss (past the warm-up)."""
        if step is None:
            if self.warmup_iters > 0:
                raise ConfigError(
                    f"warmup_iters={self.warmup_iters}: pass step= (the 0-based training "
                    "iteration) so that the warm-up can be applied"
                )
            return True
        return step >= self.warmup_iters

    def grid_labels(self, labels: Tensor, size: tuple[int, int]) -> Tensor:
        """``labels (B, H, W)`` resized to ``size`` by nearest neighbour; non-class labels ->
        ``ignore_index``."""
        if labels.dim() != 3:
            raise ConfigError(f"labels must have shape (B, H, W); got {tuple(labels.shape)}")
        t = labels
        if tuple(t.shape[-2:]) != tuple(size):
            t = F.interpolate(t[:, None].float(), size=size, mode="nearest")[:, 0]
        t = t.long()
        return torch.where((t >= 0) & (t < self.num_classes), t, self.ignore_index)

    def forward(
        self,
        features: Tensor,
        logits: Tensor,
        labels: Tensor,
        step: int | None = None,
        image_ids: Tensor | None = None,
        return_diagnostics: bool = False,
    ) -> Tensor | tuple[Tensor, ContrastDiagnostics]:
        """The contrast loss of a batch; with ``return_diagnostics`` also a
        :class:`ContrastDiagnostics` (one host sync more)."""
        channels = self.dim if self.projection is None else self.in_channels
        if features.dim() != 4 or features.shape[1] != channels:
            what = "embeddings (B, dim" if self.projection is None else "features (B, in_channels"
            raise ConfigError(
                f"{what}={channels}, h, w) expected; got shape {tuple(features.shape)}"
            )
        embed = features if self.projection is None else self.projection(features)
        active = self.active(step)
        if not active:
            # Warm-up: no sampling, no push; the zero keeps the projection head in the graph.
            loss = 0.0 * embed.sum()
            anchors = 0
            self._warn_once(
                "warmup",
                f"step={step} < warmup_iters={self.warmup_iters}: the loss is 0 (nothing is "
                f"sampled or stored) until step {self.warmup_iters}, the warm-up asked for; "
                "pass warmup_iters=0 to start at once",
            )
        else:
            loss, anchors = self._loss(embed, logits, labels, image_ids)
        if not return_diagnostics:
            return loss
        filled = len(self.memory) if self.memory is not None else 0
        capacity = self.memory.capacity if self.memory is not None else 0
        return loss, ContrastDiagnostics(active, anchors, filled, capacity)

    def _loss(
        self, embed: Tensor, logits: Tensor, labels: Tensor, image_ids: Tensor | None
    ) -> tuple[Tensor, int]:
        B, _, h, w = embed.shape
        if logits.dim() != 4 or logits.shape[0] != B:
            raise ConfigError(f"logits must have shape ({B}, C, h', w'); got {tuple(logits.shape)}")
        if labels.dim() != 3 or labels.shape[0] != B:
            raise ConfigError(f"labels must have shape ({B}, H, W); got {tuple(labels.shape)}")
        with torch.no_grad():
            grid = self.grid_labels(labels.to(embed.device), (h, w))
            scores = logits.detach()
            if tuple(scores.shape[-2:]) != (h, w):
                scores = F.interpolate(
                    scores.float(), size=(h, w), mode="bilinear", align_corners=False
                )
            pred = scores.argmax(1)
        gen = self._rng.get(embed.device)
        feats, anchor_labels, _ = sample_anchors(
            embed, pred, grid, self.max_samples, self.max_views, self.ignore_index, gen
        )
        bank_feats = bank_labels = bank_index = bank_slots = None
        if self.memory is not None and self.memory_sampling == "all":
            bank_slots = self.memory.slots(dtype=None)  # every entry, in the memory's layout
        elif self.memory is not None:
            bank_feats, bank_labels = self.memory.bank(dtype=None)
            if bank_feats.shape[0] == 0:
                bank_feats = bank_labels = None
            elif feats.shape[0] > 0:
                bank_index = select_from_bank(
                    feats,
                    anchor_labels,
                    bank_feats,
                    bank_labels,
                    self.memory_sampling,
                    self.k_pos,
                    self.k_neg,
                    self.semi_hard_fraction,
                    generator=gen,
                )
        loss = contrast_loss(
            feats,
            anchor_labels,
            self.temperature,
            self.base_temperature,
            bank_feats,
            bank_labels,
            bank_index,
            bank_slots=bank_slots,
        )
        if self.memory is not None:
            self.memory.push(embed.detach(), grid, image_ids, generator=gen)
        if feats.shape[0] == 0:
            self._explain_no_anchors(grid)
        return loss, feats.shape[0]

    def _warn_once(self, cause: str, message: str) -> None:
        if cause not in self._warned:
            self._warned.add(cause)
            warnings.warn(f"PixelContrast: {message}", PixelContrastWarning, stacklevel=2)

    @torch.no_grad()
    def _explain_no_anchors(self, grid: Tensor) -> None:
        """Why :func:`sample_anchors` found no anchor in ``grid (B, h, w)`` (the labels on the
        feature grid), as a warning once per cause; a few host syncs, on this path only."""
        B, h, w = grid.shape
        valid = grid != self.ignore_index
        if not bool(valid.any()):
            self._warn_once(
                "ignored",
                f"no anchors: every label on the {h}x{w} feature grid is ignore_index="
                f"{self.ignore_index} or outside [0, num_classes={self.num_classes}); check the "
                "labels you pass, num_classes and ignore_index",
            )
            return
        flat = torch.where(valid, grid, self.num_classes).view(B, -1)
        counts = torch.zeros(B, self.num_classes + 1, dtype=torch.long, device=grid.device)
        counts.scatter_add_(1, flat, torch.ones_like(flat))
        counts = counts[:, : self.num_classes]
        largest = int(counts.max())
        pairs = int((counts > self.max_views).sum())
        if pairs == 0:
            self._warn_once(
                "max_views",
                f"no anchors: a class is sampled in an image only when it covers more than "
                f"max_views={self.max_views} pixels of the {h}x{w} feature grid, and the "
                f"largest covers {largest}; set max_views below {largest} (e.g. "
                f"{max(1, largest // 2)}) or feed larger inputs",
            )
        elif pairs > self.max_samples:
            self._warn_once(
                "max_samples",
                f"no anchors: {pairs} (image, class) pairs qualify but max_samples="
                f"{self.max_samples} allows less than one anchor per pair; raise max_samples "
                f"to at least {pairs}",
            )
