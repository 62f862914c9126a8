import numpy as np
import pytest
import torch

from contrastseg.data import EvalTransform, TrainTransform, default_palette, denormalize, normalize
from contrastseg.errors import DataError

ZERO_MEAN, UNIT_STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _encoded(mask, palette):
    """An image whose colours encode the mask; output value = palette / 255."""
    return palette[mask]


def _palette(n):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(n, 3), dtype=np.uint8)


def test_alignment_without_scaling_is_exact_per_pixel():
    rng = np.random.default_rng(1)
    palette = _palette(20)
    mask = rng.integers(0, 20, size=(37, 45), dtype=np.uint8)
    padded = np.full((37, 48), 255, dtype=np.int64)
    padded[:, :45] = mask
    windows = [padded[y : y + 32] for y in range(6)]
    windows += [w[:, ::-1] for w in windows]
    tf = TrainTransform((32, 48), scale_range=(1.0, 1.0), jitter=0.0, mean=ZERO_MEAN, std=UNIT_STD)
    table = torch.from_numpy(palette).float() / 255.0
    used = set()
    for seed in range(30):
        image, out_mask = tf(_encoded(mask, palette), mask, _gen(seed))
        valid = out_mask != 255
        expected = table[out_mask[valid]].T
        torch.testing.assert_close(image[:, valid], expected, rtol=0, atol=1e-6)
        # The mask is a crop of the padded mask or of its mirror image.
        hits = [k for k, w in enumerate(windows) if np.array_equal(out_mask.numpy(), w)]
        assert len(hits) == 1
        used.add(hits[0])
    assert len(used) >= 6  # several offsets, flipped and not


def test_alignment_with_scaling_on_block_masks():
    rng = np.random.default_rng(2)
    palette = _palette(12)
    blocks = rng.integers(0, 12, size=(8, 10), dtype=np.uint8)
    mask = np.kron(blocks, np.ones((8, 8), dtype=np.uint8))  # 64 x 80
    tf = TrainTransform((56, 56), scale_range=(0.6, 1.8), jitter=0.0, mean=ZERO_MEAN, std=UNIT_STD)
    table = torch.from_numpy(palette).float() / 255.0
    for seed in range(25):
        image, out_mask = tf(_encoded(mask, palette), mask, _gen(seed))
        assert image.shape == (3, 56, 56) and out_mask.shape == (56, 56)
        # Pixels whose 3x3 neighbourhood has one valid label are not mixed by interpolation.
        m = out_mask.float()[None, None]
        same = (
            torch.nn.functional.max_pool2d(m, 3, 1, 1)
            == -torch.nn.functional.max_pool2d(-m, 3, 1, 1)
        )[0, 0]
        interior = same & (out_mask != 255)
        interior[0, :] = interior[-1, :] = interior[:, 0] = interior[:, -1] = False
        assert interior.sum() > 200
        expected = table[out_mask[interior]].T
        torch.testing.assert_close(image[:, interior], expected, rtol=0, atol=1e-4)


def test_padding_is_ignore_and_mean_coloured():
    mask = np.zeros((10, 12), dtype=np.uint8)
    image = np.full((10, 12, 3), 200, dtype=np.uint8)
    tf = TrainTransform((40, 40), scale_range=(1.0, 1.0), flip=False, jitter=0.0)
    img, out = tf(image, mask, _gen(0))
    assert img.shape == (3, 40, 40) and out.shape == (40, 40)
    assert out.dtype == torch.int64 and img.dtype == torch.float32
    assert (out == 0).sum() == 120 and (out == 255).sum() == 40 * 40 - 120
    assert torch.allclose(img[:, out == 255], torch.zeros(1), atol=1e-6)
    tf7 = TrainTransform((40, 40), scale_range=(1.0, 1.0), jitter=0.0, ignore_index=7)
    mask[0, 0] = 255
    _, out7 = tf7(image, mask, _gen(0))
    assert (out7 == 7).sum() == 40 * 40 - 119 and (out7 == 255).sum() == 0


def test_flip_happens_about_half_the_time():
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[:, :8] = 1
    tf = TrainTransform((16, 16), scale_range=(1.0, 1.0), jitter=0.0)
    flipped = sum(
        int(tf(np.zeros((16, 16, 3), np.uint8), mask, _gen(s))[1][0, 0] == 0) for s in range(200)
    )
    assert 70 <= flipped <= 130
    no_flip = TrainTransform((16, 16), scale_range=(1.0, 1.0), flip=False, jitter=0.0)
    assert all(
        no_flip(np.zeros((16, 16, 3), np.uint8), mask, _gen(s))[1][0, 0] == 1 for s in range(30)
    )


def test_same_seed_same_output_and_seeds_differ():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, size=(50, 60, 3), dtype=np.uint8)
    mask = rng.integers(0, 5, size=(50, 60), dtype=np.uint8)
    tf = TrainTransform((32, 32), jitter=0.3)
    a = tf(image, mask, _gen(11))
    b = tf(image, mask, _gen(11))
    c = tf(image, mask, _gen(12))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_jitter_changes_image_not_mask():
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)
    mask = rng.integers(0, 5, size=(24, 24), dtype=np.uint8)
    plain = TrainTransform((24, 24), scale_range=(1.0, 1.0), jitter=0.0)
    jit = TrainTransform((24, 24), scale_range=(1.0, 1.0), jitter=0.5)
    a, b = plain(image, mask, _gen(5)), jit(image, mask, _gen(5))
    assert torch.equal(a[1], b[1])
    assert not torch.allclose(a[0], b[0])


def test_eval_transform_and_denormalize_round_trip():
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    mask = rng.integers(0, 3, size=(20, 30), dtype=np.uint8)
    img, out = EvalTransform()(image, mask)
    assert img.shape == (3, 20, 30) and out.dtype == torch.int64
    assert np.array_equal(out.numpy(), mask)
    assert np.array_equal(denormalize(img), image)
    assert torch.allclose(normalize(image), img)
    assert np.array_equal(default_palette(3)[0], [0, 0, 0])


def test_invalid_arguments():
    with pytest.raises(DataError):
        TrainTransform((0, 10))
    with pytest.raises(DataError):
        TrainTransform((10, 10), scale_range=(2.0, 1.0))
    with pytest.raises(DataError):
        TrainTransform((10, 10), std=(1.0, 0.0, 1.0))
    with pytest.raises(DataError, match="does not match"):
        EvalTransform()(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5), np.uint8))
