"""Per-class memory of detached embeddings for cross-image pixel contrast.

`ClassMemory` keeps, for every class, two stores (docs/method.md, "The memory"):

* a **pixel queue**: a ring buffer of ``pixel_size`` embeddings per class. Every call to
  :meth:`ClassMemory.push` enqueues, for each image and each class the image contains, up to
  ``pixels_per_image`` pixels drawn uniformly at random among the pixels of that class. The
  class pointer advances by the number of entries written, wrapping around.
* a **region memory**: the L2-normalised mean embedding of class ``c`` in image ``n``, kept either
  as a FIFO ring of ``region_size`` per class (``"fifo"``), as one slot per (class, image id)
  (``"per_image"``, the paper's ``|C| x N x D`` store) or not at all (``"none"``).

Labels outside ``[0, num_classes)`` (the ignore label among them) are never stored.
Every piece of state is a persistent registered buffer, so ``state_dict`` / ``load_state_dict``
round-trip the memory exactly and checkpoints carry it.

Under ``torch.distributed`` with more than one process, :meth:`push` all-gathers fixed-size,
padded tensors from every rank (each rank draws its own random pixels first) and every rank then
enqueues the same gathered data in rank-major order, so all ranks hold identical memories.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from contrastseg.checks import check_int
from contrastseg.contrast.sampling import random_group_ranks
from contrastseg.errors import ConfigError
from contrastseg.randomness import LazyGenerator, SeededModule

__all__ = ["REGION_MODES", "ClassMemory"]

REGION_MODES = ("fifo", "per_image", "none")
_STORAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _distributed_world(group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


class ClassMemory(SeededModule):
    """Per-class pixel queue and region memory of detached, L2-normalised embeddings.

    Args:
        num_classes: number of classes ``C``; labels outside ``[0, C)`` are never stored.
        dim: embedding size ``D``.
        pixel_size: entries per class in the pixel ring buffer (``T``); 0 disables it.
        pixels_per_image: random pixels of each class each image pushes (``V``).
        region_mode: ``"fifo"`` (ring of ``region_size`` region means per class),
            ``"per_image"`` (one slot per class and image id; needs ``num_images`` and
            ``image_ids`` in :meth:`push`) or ``"none"``.
        region_size: entries per class of the FIFO region ring.
        num_images: number of training images (``per_image`` mode).
        dtype: storage dtype (float32 by default; float16 / bfloat16 halve the memory).
        seed: seed of the generator used when :meth:`push` gets no generator.
        process_group: process group to all-gather over (default: the world group).

    Buffers: ``pixel_queue (C, T, D)``, ``pixel_ptr (C,)``, ``pixel_count (C,)``; in ``fifo``
    mode ``region_queue (C, R, D)``, ``region_ptr (C,)``, ``region_count (C,)``; in ``per_image``
    mode ``region_queue (C, num_images, D)`` and ``region_filled (C, num_images)``. While a ring
    is not full its filled slots are ``[0, count)``. The two queues are views of one
    ``(C, T + R, D)`` storage (what :meth:`slots` returns without copying).
    """

    def __init__(
        self,
        num_classes: int,
        dim: int = 256,
        pixel_size: int = 5000,
        pixels_per_image: int = 10,
        region_mode: str = "fifo",
        region_size: int = 5000,
        num_images: int | None = None,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        process_group=None,
    ) -> None:
        super().__init__()
        check_int("num_classes", num_classes, 1)
        check_int("dim", dim, 1)
        check_int("pixel_size", pixel_size, 0)
        check_int("pixels_per_image", pixels_per_image, 1)
        if region_mode not in REGION_MODES:
            raise ConfigError(
                f"region_mode={region_mode!r} is not supported; allowed values: "
                + ", ".join(repr(m) for m in REGION_MODES)
            )
        if dtype not in _STORAGE_DTYPES:
            raise ConfigError(
                f"dtype={dtype} is not a supported memory storage dtype; allowed values: "
                "torch.float16, torch.bfloat16, torch.float32, torch.float64"
            )
        if region_mode == "fifo":
            check_int("region_size", region_size, 1)
        if region_mode == "per_image":
            if num_images is None:
                raise ConfigError(
                    "region_mode='per_image' needs num_images (the number of training images); "
                    "set num_images or use region_mode='fifo'"
                )
            check_int("num_images", num_images, 1)
        self.num_classes = int(num_classes)
        self.dim = int(dim)
        self.pixel_size = int(pixel_size)
        self.pixels_per_image = int(pixels_per_image)
        self.region_mode = region_mode
        self.region_size = int(region_size) if region_mode == "fifo" else 0
        self.num_images = int(num_images) if num_images is not None else None
        self.process_group = process_group
        self._rng = LazyGenerator(seed)

        C, D = self.num_classes, self.dim
        # One (C, pixel + region slots, D) storage; the two queues are views of it, so that
        # slots() hands the loss the whole memory without a copy.
        storage = torch.zeros(C, self.pixel_size + self.region_slots, D, dtype=dtype)
        self.register_buffer("pixel_queue", storage[:, : self.pixel_size])
        self.register_buffer("pixel_ptr", torch.zeros(C, dtype=torch.long))
        self.register_buffer("pixel_count", torch.zeros(C, dtype=torch.long))
        if region_mode == "fifo":
            self.register_buffer("region_queue", storage[:, self.pixel_size :])
            self.register_buffer("region_ptr", torch.zeros(C, dtype=torch.long))
            self.register_buffer("region_count", torch.zeros(C, dtype=torch.long))
        elif region_mode == "per_image":
            self.register_buffer("region_queue", storage[:, self.pixel_size :])
            self.register_buffer("region_filled", torch.zeros(C, self.num_images, dtype=torch.bool))
        self._storage = storage

    def _apply(self, fn, recurse=True):
        # .to(), .cuda(), .half() ... convert each buffer on its own: join the queues again.
        super()._apply(fn, recurse)
        self._storage = None
        self._joined()
        return self

    def _joined(self) -> Tensor:
        """The ``(C, K, D)`` storage whose views the pixel and region queues are; made again
        (one copy) when they no longer are (after a device or dtype move, or a state dict
        loaded with ``assign=True``)."""
        pixel = self.pixel_queue
        region = self.region_queue if self.region_mode != "none" else None
        if region is None or pixel.shape[1] == 0:
            return pixel if region is None else region
        st = self._storage
        if (
            st is not None
            and st.device == pixel.device
            and st.dtype == pixel.dtype == region.dtype
            and pixel.data_ptr() == st.data_ptr()
            and region.data_ptr() == st[:, pixel.shape[1] :].data_ptr()
            and pixel.stride() == region.stride() == st.stride()
        ):
            return st
        st = torch.cat([pixel, region], 1)
        self._buffers["pixel_queue"] = st[:, : pixel.shape[1]]
        self._buffers["region_queue"] = st[:, pixel.shape[1] :]
        self._storage = st
        return st

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, dim={self.dim}, pixel_size={self.pixel_size}, "
            f"pixels_per_image={self.pixels_per_image}, region_mode={self.region_mode!r}, "
            f"region_size={self.region_size}, num_images={self.num_images}, "
            f"dtype={self.pixel_queue.dtype}"
        )

    @torch.no_grad()
    def fill_random_(self, seed: int = 0) -> ClassMemory:
        """Fill every slot with random unit vectors: the memory as it looks once training has
        run long enough to fill it (benchmarks time that steady state, not an empty memory)."""
        g = torch.Generator().manual_seed(seed)
        queues = [self.pixel_queue] + ([self.region_queue] if self.region_mode != "none" else [])
        for queue in queues:
            if queue.numel():
                vectors = torch.randn(queue.shape, generator=g, dtype=torch.float32)
                queue.copy_(torch.nn.functional.normalize(vectors, dim=-1))
        self.pixel_count.fill_(self.pixel_size)
        self.pixel_ptr.zero_()
        if self.region_mode == "fifo":
            self.region_count.fill_(self.region_size)
            self.region_ptr.zero_()
        elif self.region_mode == "per_image":
            self.region_filled.fill_(True)
        return self

    # ------------------------------------------------------------------------------ read
    def bank(self, dtype: torch.dtype | None = torch.float32) -> tuple[Tensor, Tensor]:
        """Every filled entry: ``feats (M, D)`` and ``labels (M,)`` (int64).

        Pixel entries come first (class-major), then region entries. ``dtype=None`` keeps the
        storage dtype. The result is a copy (boolean indexing), detached from any graph.
        """
        feats, labels = [], []
        classes = torch.arange(self.num_classes, device=self.pixel_queue.device)
        slots = torch.arange(self.pixel_size, device=classes.device)
        filled = slots[None, :] < self.pixel_count[:, None]
        feats.append(self.pixel_queue[filled])
        labels.append(classes[:, None].expand_as(filled)[filled])
        if self.region_mode == "fifo":
            slots = torch.arange(self.region_size, device=classes.device)
            filled = slots[None, :] < self.region_count[:, None]
            feats.append(self.region_queue[filled])
            labels.append(classes[:, None].expand_as(filled)[filled])
        elif self.region_mode == "per_image":
            filled = self.region_filled
            feats.append(self.region_queue[filled])
            labels.append(classes[:, None].expand_as(filled)[filled])
        out = torch.cat(feats, 0)
        if dtype is not None:
            out = out.to(dtype)
        return out, torch.cat(labels, 0)

    def slots(self, dtype: torch.dtype | None = torch.float32) -> tuple[Tensor, Tensor]:
        """The memory by class: ``slots (C, K, D)`` and ``filled (C, K)`` (bool), K = pixel
        slots + region slots of a class; the filled slots hold the entries :meth:`bank` lists.

        With ``dtype=None`` (or the storage dtype) ``slots`` is the memory's own storage, not
        a copy: read it, never write to it (a later :meth:`push` changes it). Another
        ``dtype`` gives a converted copy."""
        out = self._joined()
        slot = torch.arange(self.pixel_size, device=out.device)
        filled = [slot[None, :] < self.pixel_count[:, None]]
        if self.region_mode == "fifo":
            slot = torch.arange(self.region_size, device=slot.device)
            filled.append(slot[None, :] < self.region_count[:, None])
        elif self.region_mode == "per_image":
            filled.append(self.region_filled)
        if dtype is not None:
            out = out.to(dtype)
        return out.detach(), torch.cat(filled, 1)

    @property
    def region_slots(self) -> int:
        """Region slots per class: the FIFO ring's size, one per image, or none."""
        if self.region_mode == "fifo":
            return self.region_size
        return self.num_images if self.region_mode == "per_image" else 0

    @property
    def capacity(self) -> int:
        """Number of entries the memory holds when full (pixel and region slots)."""
        return self.num_classes * (self.pixel_size + self.region_slots)

    def __len__(self) -> int:
        """Number of filled entries (a host sync)."""
        n = int(self.pixel_count.sum())
        if self.region_mode == "fifo":
            n += int(self.region_count.sum())
        elif self.region_mode == "per_image":
            n += int(self.region_filled.sum())
        return n

    # ----------------------------------------------------------------------------- write
    @torch.no_grad()
    def push(
        self,
        embed: Tensor,
        target: Tensor,
        image_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        """Enqueue a batch: ``embed (B, D, h, w)``, ``target (B, h, w)`` on the same grid.

        ``image_ids (B,)`` (int) are required in ``per_image`` region mode. ``generator`` draws
        the random pixels (the memory's own seeded generator when ``None``). Under DDP this is a
        collective call: every rank must call it at the same step.
        """
        if embed.dim() != 4 or embed.shape[1] != self.dim:
            raise ConfigError(
                f"embed must have shape (B, {self.dim}, h, w); got {tuple(embed.shape)}"
            )
        B, _, h, w = embed.shape
        if tuple(target.shape) != (B, h, w):
            raise ConfigError(
                f"target must have shape (B, h, w) = {(B, h, w)} (the embedding grid); "
                f"got {tuple(target.shape)}"
            )
        if self.region_mode == "per_image" and image_ids is None:
            raise ConfigError(
                "region_mode='per_image' needs image_ids (B,) in push(); pass the dataset "
                "indices of the images or use region_mode='fifo'"
            )
        if image_ids is not None:
            image_ids = torch.as_tensor(image_ids, device=embed.device).reshape(-1).long()
            if image_ids.numel() != B:
                raise ConfigError(f"image_ids must have {B} entries; got {image_ids.numel()}")
        if generator is None:
            generator = self._rng.get(embed.device)

        device = self.pixel_queue.device
        store = self.pixel_queue.dtype
        pix, pix_mask, reg, reg_mask = self._local_entries(embed.detach(), target, generator)
        pix, reg = pix.to(device, store), reg.to(device, store)
        pix_mask, reg_mask = pix_mask.to(device), reg_mask.to(device)
        ids = (
            image_ids.to(device)
            if image_ids is not None
            else torch.full((B,), -1, dtype=torch.long, device=device)
        )
        if _distributed_world(self.process_group) > 1:
            pix, pix_mask, reg, reg_mask, ids = self._all_gather(
                [pix, pix_mask, reg, reg_mask, ids]
            )

        if self.pixel_size > 0:
            self._enqueue_ring(self.pixel_queue, self.pixel_ptr, self.pixel_count, pix, pix_mask)
        if self.region_mode == "fifo":
            self._enqueue_ring(
                self.region_queue,
                self.region_ptr,
                self.region_count,
                reg.unsqueeze(2),
                reg_mask.unsqueeze(2),
            )
        elif self.region_mode == "per_image":
            self._write_per_image(reg, reg_mask, ids)

    def _local_entries(
        self, embed: Tensor, target: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """This rank's entries as fixed-size padded tensors.

        Returns ``pix (B, C, V, D)``, ``pix_mask (B, C, V)``, ``reg (B, C, D)`` (normalised
        region means), ``reg_mask (B, C)``; slot ``v`` of (image, class) holds the pixel of
        random rank ``v`` in that class.
        """
        B, D, h, w = embed.shape
        C, V = self.num_classes, self.pixels_per_image
        P = h * w
        device = embed.device
        work = torch.promote_types(embed.dtype, torch.float32)
        flat = embed.reshape(B, D, P).to(work)
        t = target.reshape(B, P).to(device=device, dtype=torch.long)
        valid = (t >= 0) & (t < C)
        t_safe = torch.where(valid, t, 0)

        # Region means: one-hot (B, P, C) times (B, D, P) -> (B, D, C).
        onehot = torch.zeros(B, P, C, dtype=work, device=device)
        onehot.scatter_(2, t_safe.unsqueeze(2), valid.unsqueeze(2).to(work))
        counts = onehot.sum(1)  # (B, C)
        sums = torch.bmm(flat, onehot).transpose(1, 2)  # (B, C, D)
        reg_mask = counts > 0
        reg = torch.nn.functional.normalize(sums, dim=2)

        # Up to V random pixels of every (image, class).
        pix = torch.zeros(B * C * V, D, dtype=work, device=device)
        pix_mask = torch.zeros(B * C * V, dtype=torch.bool, device=device)
        if self.pixel_size > 0:
            group = torch.arange(B, device=device)[:, None] * C + t_safe
            group = torch.where(valid, group, B * C).reshape(-1)
            order, group_sorted, rank_sorted, _ = random_group_ranks(group, B * C, generator)
            keep = (rank_sorted < V) & (group_sorted < B * C)
            chosen = order[keep]
            slot = group_sorted[keep] * V + rank_sorted[keep]
            b_idx = torch.div(chosen, P, rounding_mode="floor")
            p_idx = chosen - b_idx * P
            pix[slot] = flat[b_idx, :, p_idx]
            pix_mask[slot] = True
        # A non-finite embedding (a step the trainer will skip) never enters the memory.
        pix_mask &= torch.isfinite(pix).all(1)
        reg_mask &= torch.isfinite(reg).all(2)
        return pix.view(B, C, V, D), pix_mask.view(B, C, V), reg, reg_mask

    def _all_gather(self, tensors: list[Tensor]) -> list[Tensor]:
        """All-gather tensors whose first dimension is the batch (which may differ by rank)."""
        group = self.process_group
        world = dist.get_world_size(group)
        device = tensors[0].device
        comm = device
        if dist.get_backend(group) == "gloo" and device.type != "cpu":
            comm = torch.device("cpu")
        size = torch.tensor([tensors[0].shape[0]], dtype=torch.long, device=comm)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size, group=group)
        sizes = [int(s.item()) for s in sizes]
        bmax = max(sizes)
        out = []
        for t in tensors:
            is_bool = t.dtype == torch.bool
            x = t.to(comm)
            if is_bool:
                x = x.to(torch.uint8)
            if x.shape[0] < bmax:
                pad = x.new_zeros((bmax - x.shape[0], *x.shape[1:]))
                x = torch.cat([x, pad], 0)
            x = x.contiguous()
            bufs = [torch.empty_like(x) for _ in range(world)]
            dist.all_gather(bufs, x, group=group)
            y = torch.cat([b[:n] for b, n in zip(bufs, sizes, strict=True)], 0)
            if is_bool:
                y = y.bool()
            out.append(y.to(device))
        return out

    @staticmethod
    def _enqueue_ring(
        queue: Tensor, ptr: Tensor, count: Tensor, items: Tensor, mask: Tensor
    ) -> None:
        """Write ``items (L, C, S, D)`` where ``mask (L, C, S)`` into the per-class rings.

        For class ``c`` the valid items are written in (l, s) order at ``ptr[c]``, ``ptr[c]+1``,
        ... modulo the ring size; only the last ``size`` of them survive when more arrive at
        once, exactly as if they were written one by one. Vectorised over classes and items.
        """
        C, size, _ = queue.shape
        L, _, S = mask.shape
        m = mask.permute(1, 0, 2).reshape(C, L * S)  # per class, sequence order (l, s)
        seq = torch.cumsum(m.long(), 1) - 1
        n = m.sum(1)
        keep = m & (seq >= (n - size)[:, None])
        c_idx, j_idx = keep.nonzero(as_tuple=True)
        dest = (ptr[c_idx] + seq[c_idx, j_idx]) % size
        l_idx = torch.div(j_idx, S, rounding_mode="floor")
        s_idx = j_idx - l_idx * S
        queue[c_idx, dest] = items[l_idx, c_idx, s_idx].to(queue.dtype)
        ptr.copy_((ptr + n) % size)
        count.copy_(torch.clamp(count + n, max=size))

    def _write_per_image(self, reg: Tensor, reg_mask: Tensor, ids: Tensor) -> None:
        bad = ((ids < 0) | (ids >= self.num_images))[reg_mask.any(1)]
        if bool(bad.any()):
            raise ConfigError(
                f"image_ids must lie in [0, num_images={self.num_images}) for "
                f"region_mode='per_image'; got {ids.tolist()}"
            )
        L, C = reg_mask.shape
        j_idx, c_idx = reg_mask.nonzero(as_tuple=True)
        key = c_idx * self.num_images + ids[j_idx]
        # The same image twice in one (gathered) batch: the last one wins, as in a serial write.
        last = torch.full((C * self.num_images,), -1, dtype=torch.long, device=key.device)
        last.scatter_reduce_(0, key, j_idx, reduce="amax")
        win = last[key] == j_idx
        j_idx, c_idx = j_idx[win], c_idx[win]
        slot = ids[j_idx]
        self.region_queue[c_idx, slot] = reg[j_idx, c_idx].to(self.region_queue.dtype)
        self.region_filled[c_idx, slot] = True
