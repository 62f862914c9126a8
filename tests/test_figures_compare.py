import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from contrastseg import train
from contrastseg.cli import app
from contrastseg.data import SyntheticShapes, default_palette
from contrastseg.engine import checkpoint as ckpt
from contrastseg.errors import CheckpointError, DataError
from contrastseg.viz.compare import (
    improved_regions,
    make_compare_figure,
    merge_overlapping,
    save_compare_figure,
)
from contrastseg.viz.components import component_boxes, label_components


def scene():
    """Target all background (0) except where noted; baseline and ours start equal to it."""
    h, w = 10, 18
    target = np.zeros((h, w), np.uint8)
    base, ours = target.copy(), target.copy()
    base[1:4, 1:4] = 2  # A: 3x3, ours right -> box (1, 1, 4, 4)
    base[9, 0] = 2  # a lone pixel: area 1 < min_area, dropped
    base[5:9, 6] = 2  # C1, an L: box (6, 5, 10, 9) ...
    base[8, 6:10] = 2
    base[4:6, 8:12] = 2  # ... C2, not touching C1: box (8, 4, 12, 6), overlaps C1's box
    base[6:8, 13:15] = 2  # two 2x2 blocks meeting at a corner: one 8-connected
    base[8:10, 15:17] = 2  # component of 8 pixels -> box (13, 6, 17, 10)
    target[1:4, 10:14] = 255  # ignored: baseline differs, ours "equals" 255, never counts
    ours[1:4, 10:14] = 255
    target[1:4, 6:9] = 2  # both wrong (next to C2): not counted, C2's box stays put
    base[1:4, 6:9], ours[1:4, 6:9] = 1, 3
    ours[0, 15:18] = 4  # ours wrong, baseline right: not counted
    return target, base, ours


def test_improved_regions_exact_boxes():
    target, base, ours = scene()
    boxes = improved_regions(target, base, ours, min_area=5)
    assert boxes == [(1, 1, 4, 4), (6, 4, 12, 9), (13, 6, 17, 10)]
    # A lower threshold keeps the lone pixel; each corner block alone (4 px) would not pass 5.
    assert (0, 9, 1, 10) in improved_regions(target, base, ours, min_area=1)
    assert improved_regions(target, base, base) == []
    with pytest.raises(DataError, match="shapes"):
        improved_regions(target, base[:, :5], ours)


def test_merge_needs_repeated_passes_and_keeps_touching_boxes_apart():
    # c overlaps only the union of a and b; d touches that union along an edge.
    a, b, c, d = (0, 0, 4, 4), (3, 3, 6, 6), (5, 0, 8, 2), (8, 0, 9, 1)
    assert merge_overlapping([c, d, b, a]) == [(0, 0, 8, 6), (8, 0, 9, 1)]


def test_label_components_connectivity_and_order():
    mask = np.array([[1, 0, 0, 1], [0, 1, 0, 1], [0, 0, 0, 0], [1, 1, 0, 0]], bool)
    labels, n = label_components(mask, connectivity=4)
    assert n == 4 and labels[0, 0] == 1 and labels[0, 3] == 2 and labels[1, 1] == 3
    labels, n = label_components(mask, connectivity=8)
    assert n == 3 and labels[1, 1] == 1 and labels[3, 0] == labels[3, 1] == 3
    areas, boxes = component_boxes(labels, n)
    assert areas.tolist() == [2, 2, 2]
    assert boxes.tolist() == [[0, 0, 2, 2], [3, 0, 4, 2], [0, 3, 2, 4]]


def test_compare_figure_has_four_panels_and_writes_png_and_pdf(tmp_path):
    target, base, ours = scene()
    image = np.random.default_rng(0).integers(0, 255, (*target.shape, 3), dtype=np.uint8)
    palette = default_palette(5)
    boxes = improved_regions(target, base, ours, min_area=5)
    fig = make_compare_figure(image, target, base, ours, palette, boxes, list("abcde"))
    assert len(fig.axes) == 4
    png, pdf = save_compare_figure(tmp_path / "x.y", image, target, base, ours, palette, boxes)
    assert (png.name, pdf.name) == ("x.y.png", "x.y.pdf")
    assert pdf.stat().st_size > 0
    width, height = Image.open(png).size
    assert width > 0 and height > 0


def test_compare_cli_end_to_end(tiny_cfg, tmp_path):
    base = train(tiny_cfg("train.iters=2", "output.name=base"), progress=False)
    ours = train(
        tiny_cfg("train.iters=2", "output.name=ours", "loss.contrast.enabled=true"), progress=False
    )
    a = str(ckpt.list_checkpoints(base.run_dir / "checkpoints")[-1])
    b = str(ckpt.list_checkpoints(ours.run_dir / "checkpoints")[-1])
    runner = CliRunner()
    args = ["figures", "compare", "--baseline", a, "--ours", b, "--device", "cpu"]

    out = tmp_path / "split"
    result = runner.invoke(app, [*args, "--indices", "0,2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"val_00000{i}_compare.{s}" for i in (0, 2) for s in ("pdf", "png")]

    # Image files with a folder of masks.
    files, masks = tmp_path / "images", tmp_path / "masks"
    files.mkdir()
    masks.mkdir()
    image, mask = SyntheticShapes("val", 6, (64, 64))[3]
    Image.fromarray(image).save(files / "street.png")
    Image.fromarray(mask).save(masks / "street.png")
    out = tmp_path / "files"
    result = runner.invoke(app, [*args, str(files), "--masks", str(masks), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "street_compare.png").is_file() and (out / "street_compare.pdf").is_file()

    # The synthetic data set has no files to find the masks of images on disk.
    result = runner.invoke(app, [*args, str(files), "--out", str(out)])
    assert isinstance(result.exception, DataError) and "--masks" in str(result.exception)
    result = runner.invoke(app, [*args, "--indices", "0-9", "--out", str(out)])
    assert isinstance(result.exception, DataError) and "6 samples" in str(result.exception)

    # Checkpoints of other classes are refused.
    state = torch.load(b, map_location="cpu", weights_only=False)
    state["class_names"] = ["sky", *state["class_names"][1:]]
    other = tmp_path / "other.pt"
    ckpt.atomic_save(state, other)
    args = ["figures", "compare", "--baseline", a, "--ours", str(other), "--device", "cpu"]
    result = runner.invoke(app, [*args, "--out", str(out)])
    assert isinstance(result.exception, CheckpointError)
    assert "classes" in str(result.exception)
