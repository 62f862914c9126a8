"""torch.distributed set-up from the variables torchrun exports, and small collective helpers."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank, world size and local rank (all 0/1/0 when single)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistContext:
    """Join the process group described by ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (set by
    torchrun): NCCL on CUDA, gloo on CPU. Without those variables: a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        backend = "nccl" if device_type == "cuda" else "gloo"
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if attempt is None:
            dist.init_process_group(backend)
        else:
            # torchrun keeps one store across the restarts of a group: the keys of each attempt
            # get their own prefix, so a restarted process never reads a dead one's address.
            store, _, _ = next(dist.rendezvous("env://"))
            store = dist.PrefixStore(f"attempt_{attempt}", store)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world)
    return DistContext(rank, world, local_rank)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over all processes (a no-op in a single process); returns the tensor."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def average_gradients(parameters) -> None:
    """Average the ``.grad`` of ``parameters`` over all processes, in place (a no-op in one
    process): for parameters outside a ``DistributedDataParallel`` model, called after
    ``backward()`` and before the optimiser step. Every process must call it with the same
    parameters; a parameter without a gradient is skipped (alike on every process)."""
    if not is_distributed():
        return
    world = dist.get_world_size()
    for p in parameters:
        if p.grad is not None:
            all_reduce_sum(p.grad)
            p.grad /= world


def all_processes_agree(flag: bool, device: torch.device) -> bool:
    """True only when ``flag`` holds in every process (one all-reduce under DDP)."""
    if not is_distributed():
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    all_reduce_sum(t)
    return bool(t.item() == 0)


def mean_over_processes(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average a dict of floats over processes (for logging)."""
    if not is_distributed():
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    all_reduce_sum(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist(), strict=True))


class CrossProcessBatchNorm2d(torch.nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the whole global batch, on any backend.

    torch's ``SyncBatchNorm`` only runs on accelerators; this one all-reduces the per-channel
    sums and counts, then the centred squares, through autograd-aware collectives, so it runs under
    gloo on CPUs. Optional ``drop`` and ``act`` submodules (timm's ``BatchNormAct2d``) are
    applied after normalising. Outside DDP or in eval mode it normalises like ``BatchNorm2d``.
    """

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        count = torch.full((1,), xf.numel() / c, dtype=xf.dtype, device=x.device)
        # Two passes (mean, then centred squares), as BatchNorm2d computes them.
        packed = all_reduce(torch.cat([xf.sum((0, 2, 3)), count]))
        n = packed[-1]
        mean = packed[:c] / n
        centred = xf - mean[None, :, None, None]
        var = all_reduce((centred * centred).sum((0, 2, 3))) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum
                if m is None:
                    m = 1.0 / float(self.num_batches_tracked)
                unbiased = var * n / (n - 1).clamp(min=1)
                self.running_mean.mul_(1 - m).add_(m * mean.to(self.running_mean.dtype))
                self.running_var.mul_(1 - m).add_(m * unbiased.to(self.running_var.dtype))
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._normalize(x)
        for name in ("drop", "act"):
            if name in self._modules:
                x = self._modules[name](x)
        return x


def convert_sync_batchnorm(model: torch.nn.Module, device_type: str) -> torch.nn.Module:
    """Make every 2-d batch norm (timm's norm+activation layers included) synchronise its
    statistics across processes: timm's/torch's ``SyncBatchNorm`` on CUDA,
    :class:`CrossProcessBatchNorm2d` elsewhere."""
    if device_type == "cuda":
        from timm.layers import convert_sync_batchnorm as timm_convert

        return timm_convert(model)
    for name, child in model.named_children():
        if isinstance(child, torch.nn.BatchNorm2d) and not isinstance(
            child, CrossProcessBatchNorm2d
        ):
            new = CrossProcessBatchNorm2d(
                child.num_features,
                child.eps,
                child.momentum,
                child.affine,
                child.track_running_stats,
            )
            new.load_state_dict(child.state_dict())
            for extra in ("drop", "act"):
                if isinstance(getattr(child, extra, None), torch.nn.Module):
                    new.add_module(extra, getattr(child, extra))
            new.train(child.training)
            setattr(model, name, new)
        else:
            convert_sync_batchnorm(child, device_type)
    return model
