"""PixelContrast says why its loss is 0: one PixelContrastWarning per cause and module."""

import warnings

import torch
import torch.nn.functional as F

from contrastseg.contrast import PixelContrast, PixelContrastWarning


def _batch(labels: torch.Tensor, classes: int = 3, dim: int = 8):
    g = torch.Generator().manual_seed(0)
    B, h, w = labels.shape
    embed = F.normalize(torch.randn(B, dim, h, w, generator=g), dim=1).requires_grad_()
    logits = torch.randn(B, classes, h, w, generator=g)
    return embed, logits, labels


def _calls(module: PixelContrast, batch, steps) -> tuple[list[str], list[tuple[float, int]]]:
    out = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in steps:
            loss, info = module(*batch, step=step, return_diagnostics=True)
            out.append((float(loss), info.anchors))
    return [str(w.message) for w in caught if issubclass(w.category, PixelContrastWarning)], out


def _two_regions(B: int = 2) -> torch.Tensor:
    """An 8x8 grid per image: class 0 on 40 pixels, class 1 on 24."""
    labels = torch.zeros(B, 8, 8, dtype=torch.long)
    labels[:, 5:, :] = 1
    return labels


def test_max_views_larger_than_a_class_covers_is_named_once_with_the_largest_count():
    batch = _batch(_two_regions())
    module = PixelContrast(3, None, dim=8, max_views=100)
    messages, results = _calls(module, batch, [None, None, None])
    assert [anchors for _, anchors in results] == [0, 0, 0]
    assert len(messages) == 1
    assert "max_views=100" in messages[0] and "8x8 feature grid" in messages[0]
    assert "largest covers 40" in messages[0]
    # the fix it names works: below 40, class 0 is sampled
    messages, results = _calls(PixelContrast(3, None, dim=8, max_views=20), batch, [None])
    assert messages == [] and results[0][1] > 0 and results[0][0] > 0
    # another module warns again (once per module)
    messages, _ = _calls(PixelContrast(3, None, dim=8, max_views=100), batch, [None])
    assert len(messages) == 1


def test_every_label_ignored_is_named():
    labels = torch.full((2, 8, 8), 255, dtype=torch.long)
    labels[0, 0, 0] = 7  # outside [0, 3): ignored too
    messages, results = _calls(PixelContrast(3, None, dim=8, max_views=4), _batch(labels), [0, 1])
    assert results == [(0.0, 0), (0.0, 0)]
    assert len(messages) == 1 and "every label" in messages[0] and "num_classes=3" in messages[0]


def test_too_many_pairs_for_max_samples_is_named():
    labels = torch.arange(3).repeat_interleave(3)[None, :, None].expand(4, 9, 9).clone()
    # 4 images x 3 classes, 27 pixels each: 12 pairs for max_samples 5
    module = PixelContrast(3, None, dim=8, max_views=2, max_samples=5)
    messages, results = _calls(module, _batch(labels), [None])
    assert results == [(0.0, 0)]
    assert len(messages) == 1 and "12 (image, class) pairs" in messages[0]


def test_the_warm_up_is_named_once_and_the_loss_comes_after_it():
    module = PixelContrast(3, None, dim=8, max_views=20, warmup_iters=2)
    messages, results = _calls(module, _batch(_two_regions()), [0, 1, 2])
    assert [r[1] for r in results[:2]] == [0, 0] and results[2][1] > 0 and results[2][0] > 0
    assert len(messages) == 1 and "warmup_iters=2" in messages[0]


def test_no_warning_when_anchors_are_sampled():
    messages, results = _calls(
        PixelContrast(3, None, dim=8, max_views=20), _batch(_two_regions()), [None]
    )
    assert messages == [] and results[0][1] > 0
