"""`data check` finds each kind of breakage planted in a fixture and names the file; training
refuses a broken pair."""

import numpy as np
import pytest
from PIL import Image

from contrastseg.config import load_config
from contrastseg.data import build_train_dataset, check_split
from contrastseg.errors import DataError
from test_cityscapes import SPLITS, make_cityscapes
from test_coco_stuff import make_10k
from test_pascal_context import make_context

CS = "gtFine/{split}/{city}/{name}_gtFine_labelIds.png"
IMG = "leftImg8bit/{split}/{city}/{name}_leftImg8bit.png"


def _path(root, pattern, split, name):
    return root / pattern.format(split=split, city=name.split("_")[0], name=name)


def _cfg(root, name="cityscapes", *extra):
    return load_config(None, [f"data.name={name}", f"data.root={root}", *extra])


def test_clean_split_reports_no_problem_and_frequencies(tmp_path):
    root = make_cityscapes(tmp_path / "cs", SPLITS)
    report = check_split(_cfg(root), "train")
    assert report.ok and report.num_samples == 3
    assert len(report.pixel_counts) == 19 and (report.pixel_counts > 0).all()
    assert report.ignored_pixels > 0
    assert abs(report.frequencies.sum() - 1.0) < 1e-9
    assert check_split(_cfg(root), "test").ok  # images only


def test_every_kind_of_breakage_is_found_and_named(tmp_path):
    frames = [("aachen", i, 19) for i in range(8)]
    root = make_cityscapes(tmp_path / "cs", {"train": frames})
    names = [f"aachen_{i:06d}_000019" for i in range(8)]
    label = lambda i: _path(root, CS, "train", names[i])  # noqa: E731
    image = lambda i: _path(root, IMG, "train", names[i])  # noqa: E731

    image(0).unlink()  # missing image
    label(1).unlink()  # missing label
    image(2).write_bytes(b"this is not a PNG file")  # unreadable
    data = label(3).read_bytes()
    label(3).write_bytes(data[: len(data) // 2])  # truncated
    Image.fromarray(np.zeros((16, 64), np.uint8)).save(label(4))  # size mismatch
    raw = np.asarray(Image.open(label(5))).copy()
    raw[:2, :2] = 40  # not a Cityscapes id
    Image.fromarray(raw).save(label(5))
    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(label(6))  # RGB label: channels
    # names[7] stays intact

    report = check_split(_cfg(root), "train")
    found = {(p.kind, p.path.name) for p in report.problems}
    assert found == {
        ("missing image", image(0).name),
        ("missing label", label(1).name),
        ("unreadable", image(2).name),
        ("truncated", label(3).name),
        ("size mismatch", label(4).name),
        ("label values", label(5).name),
        ("channels", label(6).name),
    }, report.problems
    values = next(p for p in report.problems if p.kind == "label values")
    assert "[40]" in values.detail and "4 pixel(s)" in values.detail
    assert report.num_samples == 6  # the two incomplete pairs are not samples


def test_jpeg_truncation_and_bad_mat_are_found(tmp_path):
    root = make_context(tmp_path / "VOC2010")
    jpg = root / "JPEGImages" / "2008_000003.jpg"
    jpg.write_bytes(jpg.read_bytes()[:300])
    report = check_split(_cfg(root, "pascal_context"), "train")
    assert [(p.kind, p.path.name) for p in report.problems] == [("truncated", jpg.name)]

    root, names = make_10k(tmp_path / "coco10k")
    mat = root / "annotations" / f"{names[2]}.mat"
    mat.write_bytes(mat.read_bytes()[:200])
    report = check_split(_cfg(root, "coco_stuff"), "train")
    assert [(p.kind, p.path.name) for p in report.problems] == [("unreadable", mat.name)]


def test_cli_prints_table_and_exit_status(tmp_path, run_cli, capsys):
    root = make_cityscapes(tmp_path / "cs", SPLITS)
    config = tmp_path / "cs.yaml"
    config.write_text(f"data:\n  name: cityscapes\n  root: {root}\n")
    assert run_cli("data", "check", str(config), "--workers", "2") == 0
    out = capsys.readouterr().out
    assert "cityscapes train: 3 samples checked, no problems" in out
    assert "cityscapes val: 2 samples checked, no problems" in out
    assert "road" in out and "class frequencies" in out

    bad = _path(root, CS, "val", "frankfurt_000000_000294")
    bad.write_bytes(bad.read_bytes()[:100])
    assert run_cli("data", "check", str(config), "--split", "val") == 2
    out = capsys.readouterr().out
    assert "1 problem(s)" in out and str(bad) in out and "truncated" in out


def test_training_refuses_a_broken_pair(tmp_path):
    import contrastseg

    root = make_cityscapes(tmp_path / "cs", SPLITS)
    missing = _path(root, CS, "train", "bochum_000000_000313")
    missing.unlink()
    cfg = _cfg(root, "cityscapes", f"output.root={tmp_path / 'runs'}", "train.device=cpu")
    with pytest.raises(DataError, match="bochum_000000_000313_gtFine_labelIds.png"):
        contrastseg.train(cfg, progress=False)

    make_cityscapes(root, {"train": SPLITS["train"][2:]})  # restore it
    first = _path(root, IMG, "train", "aachen_000000_000019")
    first.write_bytes(first.read_bytes()[:200])  # caught before training starts
    with pytest.raises(DataError, match="aachen_000000_000019_leftImg8bit.png"):
        build_train_dataset(cfg.data, seed=0)

    make_cityscapes(root, {"train": SPLITS["train"][:1]})
    later = _path(root, IMG, "train", "bochum_000000_000313")
    later.write_bytes(later.read_bytes()[:200])  # met mid-run
    dataset = build_train_dataset(cfg.data, seed=0)
    dataset[0]
    with pytest.raises(DataError, match="bochum_000000_000313_leftImg8bit.png"):
        dataset[2]


def test_a_folder_is_scanned_like_a_benchmark(tmp_path):
    from test_folder import _make

    root = _make(tmp_path / "d", names=("a", "b", "c"))
    (root / "masks" / "b.png").unlink()
    Image.fromarray(np.full((12, 10), 9, np.uint8)).save(root / "masks" / "c.png")
    report = check_split(_cfg(root, "folder"), "train")
    assert report.dataset == "folder" and report.num_samples == 2
    assert [(p.kind, p.path.name) for p in report.problems] == [
        ("missing label", "b.png"),
        ("label values", "c.png"),
    ]
    assert "[9]" in report.problems[1].detail and "0..2 and 255" in report.problems[1].detail
    assert report.classes == ["background", "cat", "dog"]


def test_the_generated_data_set_has_no_files_to_check():
    with pytest.raises(DataError, match="'synthetic': it is generated"):
        check_split(load_config(None, []), "train")
