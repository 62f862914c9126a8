import sys

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from contrastseg import train
from contrastseg.cli import app
from contrastseg.contrast import ProjectionHead
from contrastseg.data import SyntheticShapes
from contrastseg.engine import checkpoint as ckpt
from contrastseg.errors import ContrastSegError
from contrastseg.models import build_model
from contrastseg.viz.embeddings import (
    downsample_labels,
    load_embedding_model,
    pixel_embeddings,
    sample_pixel_embeddings,
    tsne_2d,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_downsample_labels_takes_the_mode_per_cell():
    mask = np.array(
        [
            [1, 1, 2, 2, 0, 0],
            [1, 3, 2, 255, 255, 255],
            [4, 4, 5, 6, 255, 0],
            [4, 5, 6, 5, 255, 3],
        ]
    )
    # Cells of 2x2 pixels; ties go to the lowest class (5 over 6, 0 over ignore), ignore wins
    # only when it outnumbers each class (bottom right).
    assert downsample_labels(mask, (2, 3), 7).tolist() == [[1, 2, 0], [4, 5, 255]]


def test_pixels_per_class_and_seeded_determinism(tiny_cfg):
    cfg = tiny_cfg().model
    model = build_model(cfg, 7, backbone_weights=False).eval()
    head = ProjectionHead(model.feature_channels, cfg.projection_dim).eval()
    data = SyntheticShapes("val", 3, (64, 64))
    samples = [data[i] for i in range(3)]

    def draw(seed, projection=head, per_class=12):
        return sample_pixel_embeddings(
            model, samples, MEAN, STD, 7, per_class=per_class, seed=seed, projection=projection
        )

    first = draw(0)
    emb = pixel_embeddings(model, torch.zeros(1, 3, 64, 64), projection=head)
    grid = emb.shape[1:]
    labels = [downsample_labels(m, grid, 7) for _, m in samples]
    available = np.bincount(np.concatenate([g.ravel() for g in labels]), minlength=7)
    counts = np.bincount(first.labels, minlength=7)
    assert counts.tolist() == np.minimum(available, 12).tolist()
    assert (counts == 12).any() and (counts < 12).any()  # full classes and short ones
    # Each sampled pixel carries the label of its cell and a unit-length embedding.
    rows, cols = first.positions.T
    cell_labels = [labels[i][r, c] for i, r, c in zip(first.image_index, rows, cols, strict=True)]
    assert cell_labels == first.labels.tolist()
    assert first.embeddings.shape == (counts.sum(), 16)
    assert np.allclose(np.linalg.norm(first.embeddings, axis=1), 1.0, atol=1e-5)

    again = draw(0)
    for name in ("labels", "image_index", "positions", "embeddings"):
        assert np.array_equal(getattr(first, name), getattr(again, name)), name
    other = draw(1)
    assert not np.array_equal(first.positions, other.positions)
    # The pixels depend on the seed and grid only: features instead of projections, same cells.
    features = draw(0, projection=None)
    assert np.array_equal(features.positions, first.positions)
    assert features.embeddings.shape[1] != first.embeddings.shape[1]


def test_tsne_without_scikit_learn_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)
    with pytest.raises(ContrastSegError, match=r"pip install 'contrastseg\[viz\]'"):
        tsne_2d(np.zeros((10, 3), np.float32))


def test_embedding_figure_cli_with_and_without_contrast(tiny_cfg, tmp_path):
    plain = train(tiny_cfg("train.iters=2", "output.name=plain"), progress=False)
    contrast = train(
        tiny_cfg("train.iters=2", "output.name=contrast", "loss.contrast.enabled=true"),
        progress=False,
    )
    a = ckpt.list_checkpoints(plain.run_dir / "checkpoints")[-1]
    b = ckpt.list_checkpoints(contrast.run_dir / "checkpoints")[-1]
    assert load_embedding_model(a).projection is None
    em = load_embedding_model(b)
    assert em.projection is not None and em.describe(16) == "projection-head embeddings (16-d)"

    args = ["figures", "embeddings", str(a), str(b), "--per-class", "8", "--images", "2"]
    result = CliRunner().invoke(app, [*args, "--device", "cpu", "--out", str(tmp_path / "e.pdf")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "e.pdf").stat().st_size > 0
    width, height = Image.open(tmp_path / "e.png").size
    assert width > height > 0  # two panels side by side

    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "e.jpg")])
    assert isinstance(result.exception, ContrastSegError) and ".png" in str(result.exception)
