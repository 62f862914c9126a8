"""Confusion matrix accumulated on the device, and the segmentation metrics derived from it."""

from __future__ import annotations

import math

import torch


class ConfusionMatrix:
    """``mat[t, p]`` counts pixels of true class t predicted as p; ignore pixels are skipped."""

    def __init__(
        self, num_classes: int, device: torch.device | str = "cpu", ignore_index: int = 255
    ):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred, target: (..., H, W) int64 of the same shape."""
        if pred.shape != target.shape:
            raise ValueError(
                f"prediction shape {tuple(pred.shape)} != target {tuple(target.shape)}"
            )
        n = self.num_classes
        valid = target != self.ignore_index
        t = target[valid].to(torch.int64)
        p = pred[valid].to(torch.int64)
        if t.numel() and (int(t.max()) >= n or int(t.min()) < 0):
            raise ValueError(
                f"target holds class ids outside [0, {n}) other than {self.ignore_index}"
            )
        self.mat += torch.bincount(t * n + p, minlength=n * n).reshape(n, n)

    def compute(self) -> dict:
        return metrics_from_confusion(self.mat)


def metrics_from_confusion(mat: torch.Tensor) -> dict:
    """mIoU, per-class IoU, pixel accuracy, mean accuracy and frequency-weighted IoU.

    A class with no ground-truth and no predicted pixel has IoU NaN (reported as ``None``) and is
    left out of the means; a class never present in the ground truth is left out of the mean
    accuracy. Values are fractions in [0, 1].
    """
    m = mat.double().cpu()
    tp = m.diag()
    gt = m.sum(1)
    pred = m.sum(0)
    union = gt + pred - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, math.nan))
    total = gt.sum()
    present = ~torch.isnan(iou)
    freq = gt / total if total > 0 else torch.zeros_like(gt)
    fw = (freq[present] * iou[present]).sum().item() if total > 0 else math.nan
    return {
        "mIoU": iou[present].mean().item() if present.any() else math.nan,
        "pixel_acc": (tp.sum() / total).item() if total > 0 else math.nan,
        "mean_acc": acc[~torch.isnan(acc)].mean().item() if (~torch.isnan(acc)).any() else math.nan,
        "fwIoU": fw,
        "per_class_iou": [None if math.isnan(v) else v for v in iou.tolist()],
        "per_class_acc": [None if math.isnan(v) else v for v in acc.tolist()],
    }
