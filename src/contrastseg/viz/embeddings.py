"""t-SNE of pixel embeddings: does a model group the pixels of a class together?

Pixels are sampled on the embedding grid (the stride of the decode head's input, e.g. 1/8 of
the image), a fixed number per class, from the first validation images; each grid cell's label
is the most frequent label of the image pixels it covers. For a checkpoint trained with pixel
contrast the embedding is the projection head's output (unit length); for one trained without,
it is the map the projection head would read, the decode head's input, L2-normalised over
channels so that both live on the unit sphere. scikit-learn (``pip install
'contrastseg[viz]'``) computes the t-SNE.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from contrastseg.config import ExperimentConfig
from contrastseg.contrast import ProjectionHead
from contrastseg.data import normalize
from contrastseg.errors import CheckpointError, ContrastSegError, DataError
from contrastseg.models import Segmentor
from contrastseg.viz.samples import open_split
from contrastseg.viz.save import legend_columns, save_figure

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PixelSample:
    """Sampled pixels: ``embeddings`` (N, D) float32, ``labels`` (N,) class ids,
    ``image_index`` (N,) index of the image, ``positions`` (N, 2) (row, col) on its
    embedding grid. Sorted by (label, image_index, row, col)."""

    embeddings: np.ndarray
    labels: np.ndarray
    image_index: np.ndarray
    positions: np.ndarray


@dataclass(frozen=True)
class EmbeddingModel:
    """A checkpoint's model in eval mode and, for a model trained with pixel contrast, its
    projection head (``None`` otherwise: the embeddings are then the decode head's input
    features)."""

    model: Segmentor
    cfg: ExperimentConfig
    state: dict
    projection: ProjectionHead | None

    def describe(self, dim: int) -> str:
        """Which embedding a panel shows, e.g. ``projection-head embeddings (256-d)``."""
        if self.projection is not None:
            return f"projection-head embeddings ({dim}-d)"
        return f"decode-head input features ({dim}-d, no projection head)"


def load_embedding_model(path: Path, device: str | torch.device = "cpu") -> EmbeddingModel:
    """Rebuild a checkpoint's model and, when it was trained with pixel contrast, the
    projection head of its contrast module (``contrast.projection.*`` in the loss state), in
    eval mode."""
    from contrastseg.engine.inference import load_trained_model

    model, cfg, state = load_trained_model(Path(path), device)
    prefix = "contrast.projection."
    weights = {
        k[len(prefix) :]: v for k, v in state.get("loss", {}).items() if k.startswith(prefix)
    }
    projection = None
    if weights:
        m = cfg.model
        projection = ProjectionHead(model.feature_channels, m.projection_dim, m.projection_hidden)
        projection.load_state_dict(weights)
        projection = projection.to(next(model.parameters()).device).eval()
    return EmbeddingModel(model, cfg, state, projection)


@torch.no_grad()
def pixel_embeddings(
    model: Segmentor, x: torch.Tensor, projection: ProjectionHead | None
) -> torch.Tensor:
    """(1, 3, H, W) normalised image -> (D, h, w) unit-length pixel embeddings on the grid of
    the decode head's input: the projection head's output, or that input L2-normalised."""
    features = model.head(model.backbone(x))["features"]
    out = projection(features) if projection is not None else F.normalize(features, p=2, dim=1)
    return out[0].float()


def downsample_labels(
    mask: np.ndarray, size: tuple[int, int], num_classes: int, ignore_index: int = 255
) -> np.ndarray:
    """Mode downsampling: (H, W) class ids -> (h, w) int64, each cell the most frequent label
    of the pixels it covers (ties: the lowest class id; ignore only if it outnumbers each
    class). Row ``r`` of the image falls in cell row ``r * h // H`` (columns alike)."""
    mask = np.asarray(mask).astype(np.int64)
    (H, W), (h, w) = mask.shape, size
    if h > H or w > W:
        raise DataError(f"cannot downsample a {H}x{W} mask to a larger grid {h}x{w}")
    mask = np.where(mask == ignore_index, num_classes, mask)
    if (mask < 0).any() or (mask > num_classes).any():
        raise DataError(f"mask values outside 0..{num_classes - 1} and {ignore_index} (ignore)")
    cell = (np.arange(H) * h // H)[:, None] * w + (np.arange(W) * w // W)[None, :]
    counts = np.bincount(
        (cell * (num_classes + 1) + mask).ravel(), minlength=h * w * (num_classes + 1)
    )
    mode = counts.reshape(h * w, num_classes + 1).argmax(1)
    return np.where(mode == num_classes, ignore_index, mode).reshape(h, w)


def sample_pixel_embeddings(
    model: Segmentor,
    samples: Iterable[tuple[np.ndarray, np.ndarray]],
    mean: Sequence[float],
    std: Sequence[float],
    num_classes: int,
    per_class: int = 200,
    seed: int = 0,
    projection: ProjectionHead | None = None,
    ignore_index: int = 255,
) -> PixelSample:
    """Up to ``per_class`` grid pixels of each class, uniformly at random without replacement
    over all the images of ``samples`` ((H, W, 3) uint8 image, (H, W) mask pairs).

    Each grid cell of image ``i`` gets a key from ``np.random.default_rng([seed, i])``; a class
    keeps its ``per_class`` cells with the smallest keys. So the pixels chosen depend only on
    ``seed``, the labels and the grid size, and models with the same grid get the same pixels.
    """
    if per_class < 1:
        raise ContrastSegError(f"per_class must be >= 1, got {per_class}")
    device = next(model.parameters()).device
    # Per class: keys (n,), where (n, 3) = (image, row, col), embeddings (n, D).
    kept: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for i, (image, mask) in enumerate(samples):
        emb = pixel_embeddings(model, normalize(image, mean, std)[None].to(device), projection)
        d, h, w = emb.shape
        labels = downsample_labels(mask, (h, w), num_classes, ignore_index).ravel()
        keys = np.random.default_rng([seed, i]).random(h * w)
        flat = emb.reshape(d, h * w).T.cpu().numpy()
        for c in np.unique(labels[labels != ignore_index]).tolist():
            cells = np.nonzero(labels == c)[0]
            where = np.stack([np.full(len(cells), i), cells // w, cells % w], 1)
            new = (keys[cells], where, flat[cells])
            if c in kept:
                new = tuple(np.concatenate(p) for p in zip(kept[c], new, strict=True))
            smallest = np.argsort(new[0], kind="stable")[:per_class]
            kept[c] = tuple(p[smallest] for p in new)
    if not kept:
        raise DataError("the images hold no labelled pixels to sample embeddings from")
    short = {c: len(v[0]) for c, v in kept.items() if len(v[0]) < per_class}
    if short:
        log.info("fewer pixels than per_class=%d for classes %s", per_class, short)
    classes = sorted(kept)
    labels = np.concatenate([np.full(len(kept[c][0]), c, dtype=np.int64) for c in classes])
    where = np.concatenate([kept[c][1] for c in classes]).astype(np.int64)
    emb = np.concatenate([kept[c][2] for c in classes]).astype(np.float32)
    order = np.lexsort((where[:, 2], where[:, 1], where[:, 0], labels))
    return PixelSample(emb[order], labels[order], where[order, 0], where[order, 1:])


def tsne_2d(x: np.ndarray, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """(N, D) -> (N, 2) t-SNE coordinates (scikit-learn, PCA initialisation, seeded)."""
    try:
        from sklearn.manifold import TSNE
    except ImportError as err:
        raise ContrastSegError(
            "t-SNE figures need scikit-learn: pip install 'contrastseg[viz]'"
        ) from err
    n = len(x)
    if n < 5:
        raise DataError(f"t-SNE needs at least 5 pixels, got {n}; use more images or per-class")
    perplexity = min(perplexity, (n - 1) / 3)
    tsne = TSNE(2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)
    return tsne.fit_transform(np.asarray(x, dtype=np.float32))


def make_embedding_figure(
    panels: Sequence[tuple[np.ndarray, np.ndarray, str]],
    palette: np.ndarray,
    class_names: Sequence[str],
):
    """A ``Figure`` with one scatter panel per ``(points (N, 2), labels (N,), title)``, points
    coloured by class with ``palette`` (C, 3) uint8, and one legend of ``class_names``."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    palette = np.asarray(palette, dtype=np.float64) / 255.0
    fig = Figure(figsize=(4.6 * len(panels), 5.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels), squeeze=False)[0])
    present: set[int] = set()
    for ax, (points, labels, title) in zip(axes, panels, strict=True):
        ax.scatter(points[:, 0], points[:, 1], c=palette[labels], s=5, alpha=0.8, linewidths=0)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        present |= set(np.unique(labels).tolist())
    handles = [
        Line2D([], [], ls="", marker="o", ms=6, color=palette[c], label=class_names[c])
        for c in sorted(present)
    ]
    ncol = legend_columns([p.get_label() for p in handles], 4.6 * len(panels))
    fig.legend(handles=handles, loc="outside lower center", ncol=ncol, frameon=False, fontsize=9)
    return fig


def _figure_suffixes(out: Path) -> tuple[str, ...]:
    suffix = out.suffix.lower()
    if suffix == ".png":
        return (".png",)
    if suffix == ".pdf":
        return (".png", ".pdf")
    raise ContrastSegError(
        f"--out {out}: end the file name with .png (PNG only) or .pdf (PNG and PDF)"
    )


def embedding_figure(
    checkpoints: Sequence[Path],
    out: Path,
    per_class: int = 200,
    num_images: int = 20,
    seed: int = 0,
    split: str | None = None,
    device: str = "auto",
    data_root: Path | None = None,
) -> list[Path]:
    """t-SNE panels of the pixel embeddings of each checkpoint, side by side, written to
    ``out`` (``.png``; ``.pdf`` writes a PNG beside it too). Pixels come from the first
    ``num_images`` images of ``split`` (default: the val split) of each checkpoint's data set.
    Returns the paths written."""
    out = Path(out)
    suffixes = _figure_suffixes(out)
    if not checkpoints:
        raise ContrastSegError("name at least one checkpoint")
    panels, class_names, palette = [], None, None
    for path in checkpoints:
        em = load_embedding_model(Path(path), device)
        names = list(em.state["class_names"])
        if class_names is None:
            class_names, palette = names, np.asarray(em.state["palette"], dtype=np.uint8)
        elif names != class_names:
            raise CheckpointError(
                f"{path} has classes {names} but {checkpoints[0]} has {class_names}; one "
                f"figure needs checkpoints of one data set"
            )
        data = em.cfg.data
        if data_root is not None:
            data = data.model_copy(update={"root": data_root})
        source = open_split(data, split)
        count = min(num_images, len(source))
        sample = sample_pixel_embeddings(
            em.model, (source[i] for i in range(count)), data.mean, data.std, len(names),
            per_class, seed, em.projection,
        )  # fmt: skip
        points = tsne_2d(sample.embeddings, seed)
        what = em.describe(sample.embeddings.shape[1])
        title = f"{em.cfg.output.name} (iter {em.state['iteration']})\n{what}"
        panels.append((points, sample.labels, title))
        log.info("%s: %d pixels from %d images", path, len(sample.labels), count)
    fig = make_embedding_figure(panels, palette, class_names)
    return save_figure(fig, out.parent / out.stem, suffixes)
