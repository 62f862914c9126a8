import numpy as np
import pytest
from PIL import Image

from contrastseg.data import FolderSource
from contrastseg.errors import DataError


def _make(root, names=("a", "b"), classes=("background", "cat", "dog"), size=(12, 10)):
    """A valid folder data set: RGB PNG images, L masks with ids < len(classes)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "splits").mkdir()
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in classes))
    for name in names:
        image = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
        mask = rng.integers(0, len(classes), size=size, dtype=np.uint8)
        Image.fromarray(image).save(root / "images" / f"{name}.png")
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")
    (root / "splits" / "train.txt").write_text("# training names\n" + "\n".join(names) + "\n\n")
    return root


def _raises(match, root, split="train", load=None):
    with pytest.raises(DataError) as info:
        ds = FolderSource(root, split)
        if load is not None:
            ds[load]
    assert match in str(info.value), str(info.value)
    return str(info.value)


def test_valid_folder_reads_back(tmp_path):
    root = _make(tmp_path / "d")
    Image.open(root / "images" / "a.png").convert("L").save(root / "images" / "a.png")
    ds = FolderSource(root, "train")
    assert ds.classes == ["background", "cat", "dog"]
    assert ds.palette.shape == (3, 3) and ds.palette.dtype == np.uint8
    assert len(ds) == 2 and ds.name(1) == "b"
    image, mask = ds[0]
    assert image.shape == (12, 10, 3) and image.dtype == np.uint8  # greyscale -> RGB
    assert np.array_equal(image[..., 0], image[..., 2])
    assert mask.shape == (12, 10) and mask.dtype == np.uint8
    assert np.array_equal(mask, np.asarray(Image.open(root / "masks" / "a.png")))


def test_jpeg_images_and_palette_masks_by_index(tmp_path):
    root = _make(tmp_path / "d", names=("a",))
    image = np.asarray(Image.open(root / "images" / "a.png"))
    (root / "images" / "a.png").unlink()
    Image.fromarray(image).save(root / "images" / "a.jpg")
    ids = np.zeros((12, 10), dtype=np.uint8)
    ids[3:, :4] = 2
    ids[0, 0] = 255
    pmask = Image.frombytes("P", (10, 12), ids.tobytes())
    pmask.putpalette([200, 10, 10] * 256)  # every index has the same colour: read indices
    pmask.save(root / "masks" / "a.png")
    img, mask = FolderSource(root, "train")[0]
    assert img.shape == (12, 10, 3)
    assert np.array_equal(mask, ids)


def test_missing_root(tmp_path):
    _raises(str(tmp_path / "nope"), tmp_path / "nope")


def test_missing_classes_file(tmp_path):
    root = _make(tmp_path / "d")
    (root / "classes.txt").unlink()
    _raises(str(root / "classes.txt"), root)


def test_missing_split_file(tmp_path):
    root = _make(tmp_path / "d")
    msg = _raises(str(root / "splits" / "val.txt"), root, split="val")
    assert "train" in msg  # lists the available splits


def test_empty_split(tmp_path):
    root = _make(tmp_path / "d")
    (root / "splits" / "train.txt").write_text("# nothing yet\n\n")
    _raises(str(root / "splits" / "train.txt"), root)


def test_listed_name_without_image_or_mask(tmp_path):
    root = _make(tmp_path / "d")
    (root / "images" / "b.png").unlink()
    msg = _raises(str(root / "images" / "b"), root)
    assert "'b'" in msg
    root2 = _make(tmp_path / "e")
    (root2 / "masks" / "a.png").unlink()
    _raises(str(root2 / "masks" / "a"), root2)


def test_unreadable_image(tmp_path):
    root = _make(tmp_path / "d")
    (root / "images" / "a.png").write_bytes(b"not a png at all")
    _raises(str(root / "images" / "a.png"), root, load=0)


def test_mask_size_differs(tmp_path):
    root = _make(tmp_path / "d")
    Image.fromarray(np.zeros((11, 10), np.uint8)).save(root / "masks" / "b.png")
    msg = _raises(str(root / "masks" / "b.png"), root, load=1)
    assert "10x11" in msg and "10x12" in msg


def test_rgb_mask_rejected(tmp_path):
    root = _make(tmp_path / "d")
    Image.fromarray(np.zeros((12, 10, 3), np.uint8)).save(root / "masks" / "a.png")
    msg = _raises(str(root / "masks" / "a.png"), root, load=0)
    assert "RGB" in msg and "single-channel" in msg


def test_label_values_out_of_range(tmp_path):
    root = _make(tmp_path / "d")
    mask = np.zeros((12, 10), np.uint8)
    mask[0, :3] = (7, 255, 3)
    Image.fromarray(mask).save(root / "masks" / "a.png")
    msg = _raises(str(root / "masks" / "a.png"), root, load=0)
    assert "[3, 7]" in msg and "255" in msg
    mask[0, :3] = (2, 255, 1)  # 255 (ignore) alone is fine
    Image.fromarray(mask).save(root / "masks" / "a.png")
    assert FolderSource(root, "train")[0][1][0, 1] == 255


def test_duplicate_names_and_ambiguous_files(tmp_path):
    root = _make(tmp_path / "d")
    (root / "splits" / "train.txt").write_text("a\nb\na\n")
    _raises("'a'", root)
    root2 = _make(tmp_path / "e")
    Image.fromarray(np.zeros((12, 10, 3), np.uint8)).save(root2 / "images" / "a.jpg")
    _raises("a.jpg", root2)


def test_extension_in_split_file_gets_a_hint(tmp_path):
    root = _make(tmp_path / "d")
    (root / "splits" / "train.txt").write_text("a.png\n")
    _raises("without the extension", root)


def test_incomplete_pairs_are_recorded_when_not_strict(tmp_path):
    root = _make(tmp_path / "d", names=("a", "b", "c"))
    (root / "images" / "b.png").unlink()
    (root / "masks" / "c.png").unlink()
    ds = FolderSource(root, "train", strict=False)
    assert len(ds) == 1 and ds.name(0) == "a" and ds.label_path(0) == root / "masks" / "a.png"
    assert [(p.kind, p.path.name) for p in ds.missing] == [
        ("missing image", "b{.png,.jpg,.jpeg,.bmp,.tif,.tiff}"),
        ("missing label", "c.png"),
    ]
    assert "add the mask or remove 'c' from the split file" in ds.missing[1].detail


def test_image_extensions_any_case_and_the_shared_list(tmp_path):
    from contrastseg.data import IMAGE_EXTENSIONS
    from contrastseg.engine.inference import expand_images

    root = _make(tmp_path / "d", names=("a", "b"))
    image = np.asarray(Image.open(root / "images" / "a.png"))
    (root / "images" / "a.png").unlink()
    Image.fromarray(image).save(root / "images" / "a.BMP")
    (root / "images" / "b.png").rename(root / "images" / "b.TIF")
    ds = FolderSource(root, "train")
    assert [p.name for p in (ds.image_path(0), ds.image_path(1))] == ["a.BMP", "b.TIF"]
    assert np.array_equal(ds[0][0], image)
    assert IMAGE_EXTENSIONS == (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
    assert sorted(p.name for p in expand_images([root / "images"])) == ["a.BMP", "b.TIF"]


def test_a_byte_order_mark_is_no_part_of_the_first_name(tmp_path):
    """Editors on Windows start UTF-8 files with a BOM: the first sample and class names are
    read without it."""
    root = _make(tmp_path / "d")
    for name in ("classes.txt", "splits/train.txt"):
        path = root / name
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    ds = FolderSource(root, "train")
    assert list(ds.classes) == ["background", "cat", "dog"]
    assert len(ds) == 2 and ds[0] is not None
