import math

import pytest
import torch

from contrastseg.engine.metrics import ConfusionMatrix


def slow_metrics(pairs, num_classes, ignore=255):
    """Reference: counts from explicit (true, pred) pixel pairs, formulas written out."""
    conf = [[0] * num_classes for _ in range(num_classes)]
    for t, p in pairs:
        if t != ignore:
            conf[t][p] += 1
    iou, acc, freq = [], [], []
    total = sum(map(sum, conf))
    for c in range(num_classes):
        tp = conf[c][c]
        gt = sum(conf[c])
        pr = sum(conf[r][c] for r in range(num_classes))
        iou.append(tp / (gt + pr - tp) if gt + pr - tp else None)
        acc.append(tp / gt if gt else None)
        freq.append(gt / total)
    present = [v for v in iou if v is not None]
    fw = sum(f * v for f, v in zip(freq, iou, strict=True) if v is not None)
    accs = [a for a in acc if a is not None]
    return {
        "mIoU": sum(present) / len(present),
        "pixel_acc": sum(conf[c][c] for c in range(num_classes)) / total,
        "mean_acc": sum(accs) / len(accs),
        "fwIoU": fw,
        "per_class_iou": iou,
    }


def test_hand_computed_example_with_ignore_and_absent_class():
    # 4 classes; class 3 never appears in target or prediction -> excluded (None).
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 3, 0]])
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    m = cm.compute()
    # class 0: tp 1, gt 2, pred 2 (one at (1,1)) -> iou 1/3 ; ignore pixels do not count
    # class 1: tp 2, gt 2, pred 3 -> 2/3 ; class 2: tp 1, gt 2, pred 1 -> 1/2 ; class 3: absent
    assert m["per_class_iou"][:3] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert m["per_class_iou"][3] is None
    assert m["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert m["pixel_acc"] == pytest.approx(4 / 6)
    assert m["mean_acc"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert m["fwIoU"] == pytest.approx((2 / 6) * (1 / 3) + (2 / 6) * (2 / 3) + (2 / 6) * (1 / 2))


def test_class_only_predicted_has_zero_iou():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([[2, 0]]), torch.tensor([[0, 0]]))
    m = cm.compute()
    assert m["per_class_iou"] == [pytest.approx(0.5), None, 0.0]
    assert m["mIoU"] == pytest.approx(0.25)


@pytest.mark.parametrize("seed", range(5))
def test_random_maps_match_slow_reference(seed):
    g = torch.Generator().manual_seed(seed)
    n = 5
    target = torch.randint(0, n, (3, 7, 9), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.2] = 255
    pred = torch.randint(0, n, (3, 7, 9), generator=g)
    cm = ConfusionMatrix(n)
    cm.update(pred[:2], target[:2])
    cm.update(pred[2:], target[2:])  # accumulation over batches
    m = cm.compute()
    ref = slow_metrics(zip(target.flatten().tolist(), pred.flatten().tolist(), strict=True), n)
    for key in ("mIoU", "pixel_acc", "mean_acc", "fwIoU"):
        assert m[key] == pytest.approx(ref[key], abs=1e-12)
    for a, b in zip(m["per_class_iou"], ref["per_class_iou"], strict=True):
        assert (a is None and b is None) or a == pytest.approx(b)


def test_all_ignored_gives_nan_not_crash():
    cm = ConfusionMatrix(2)
    cm.update(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 255))
    assert math.isnan(cm.compute()["mIoU"])


def test_out_of_range_target_is_an_error():
    cm = ConfusionMatrix(2)
    with pytest.raises(ValueError, match="outside"):
        cm.update(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[0, 7]]))
