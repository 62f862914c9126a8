"""One SGD step: forward, the loss set, backward and the update, in micro-batches. The
trainer runs every iteration through it, and ``bench step`` times it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from torch.nn.parallel import DistributedDataParallel

from contrastseg.distributed import all_processes_agree
from contrastseg.losses import LossSet, labelled_pixels_per_process

__all__ = ["gradients_finite", "sgd_step"]


def gradients_finite(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every gradient the optimiser would apply is finite (one host sync)."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not grads:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def sgd_step(
    forward: Callable[..., dict[str, torch.Tensor]],
    loss_set: LossSet,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    image: torch.Tensor,
    target: torch.Tensor,
    index: torch.Tensor,
    iteration: int,
    *,
    amp_dtype: torch.dtype | None = None,
    grad_accum: int = 1,
    ddp: DistributedDataParallel | None = None,
    bn_buffers: Sequence[torch.Tensor] = (),
) -> tuple[dict[str, torch.Tensor], bool]:
    """One step on ``image (B, 3, H, W)``, ``target (B, H, W)``, ``index (B,)`` (on the
    model's device) at 0-based ``iteration``; the learning rate is the caller's.

    ``forward(image, labels=target)`` is the model (a :class:`~contrastseg.models.Segmentor`,
    maybe under DDP or compiled). The batch runs in ``grad_accum`` micro-batches (DDP
    all-reduces in the last one's backward only); CE is normalised by the labelled pixels of
    the whole step. A non-finite loss (on any process) or gradient skips the update and
    restores ``bn_buffers`` (the batch-norm statistics the forward pass changed). Returns the
    loss terms summed over the micro-batches (the full-batch values, detached) and whether the
    update was applied.
    """
    accum = grad_accum
    norm, fraction = None, 1.0
    if accum > 1:
        # CE of each micro-batch is divided by the labelled pixels of the whole step.
        norm = labelled_pixels_per_process(target, loss_set.ignore_index, loss_set.class_weights)
        fraction = 1.0 / accum
    optimizer.zero_grad(set_to_none=True)
    # Batch-norm running statistics change in the forward pass: a skipped step restores them.
    buffers = [b.detach().clone() for b in bn_buffers]
    summed: dict[str, torch.Tensor] = {}
    finite = True
    micro = zip(image.chunk(accum), target.chunk(accum), index.chunk(accum), strict=True)
    for m, (image_m, target_m, index_m) in enumerate(micro):
        # DDP all-reduces the gradients only in the last micro-batch's backward.
        last = m == accum - 1
        sync = nullcontext() if last or ddp is None else ddp.no_sync()
        with sync:
            with torch.autocast(
                image.device.type,
                dtype=amp_dtype or torch.float32,
                enabled=bool(amp_dtype),
            ):
                # The labels reach a prototype classifier (and are ignored otherwise).
                outputs = forward(image_m, labels=target_m)
                # Each loss casts what it needs to float32 (CE) or runs outside autocast.
                terms = loss_set(outputs, target_m, iteration, index_m, norm, fraction)
            for k, v in terms.items():
                summed[k] = summed[k] + v.detach() if k in summed else v.detach()
            finite = all_processes_agree(bool(torch.isfinite(terms["total"])), image.device)
            if not finite:
                break
            scaler.scale(terms["total"]).backward()
        del outputs, terms
    if finite:
        loss_set.sync_gradients()  # DDP: the loss's own parameters are outside DDP
        if not scaler.is_enabled():  # fp16's scaler skips non-finite steps itself
            finite = gradients_finite(optimizer)
    if finite:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for buffer, saved in zip(bn_buffers, buffers, strict=True):
                buffer.copy_(saved)
    return summed, finite
