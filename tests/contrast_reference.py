"""A plain float64 reference of one `PixelContrast` call, written with autograd and loops.

It shares no arithmetic with the library: the projection head is conv-BN-ReLU-conv followed by
``F.normalize``; the loss is the supervised InfoNCE formula over the anchors and the memory
entries, with a dense count matrix saying which entries each anchor sees; the memory is read
entry by entry from its buffers; the push is a ring buffer written one entry at a time. Only
*which* pixels are anchors and which memory entries a mining mode picks come from the
library's samplers (``sample_anchors`` on a map of pixel numbers, and ``select_from_bank``),
drawn from a copy of the module's generator, so that the reference draws what the module drew
and leaves its generator where the module leaves its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from contrastseg.contrast import sample_anchors, select_from_bank
from selection import check_bank_selection

IGNORE = 255


@dataclass
class Options:
    """The module's settings, as given to ``PixelContrast``."""

    num_classes: int
    in_channels: int | None
    dim: int
    hidden_channels: int | None = None
    temperature: float = 0.1
    base_temperature: float = 0.07
    max_samples: int = 40
    max_views: int = 6
    memory: bool = False
    memory_size: int = 5
    pixels_per_image: int = 3
    region_mode: str = "fifo"
    region_size: int = 3
    num_images: int | None = None
    memory_dtype: torch.dtype = torch.float32
    memory_sampling: str = "all"
    k_pos: int = 3
    k_neg: int = 5
    semi_hard_fraction: float = 0.5
    seed: int = 0

    def kwargs(self) -> dict:
        return dict(
            dim=self.dim,
            hidden_channels=self.hidden_channels,
            temperature=self.temperature,
            base_temperature=self.base_temperature,
            max_samples=self.max_samples,
            max_views=self.max_views,
            memory=self.memory,
            memory_size=self.memory_size,
            pixels_per_image=self.pixels_per_image,
            region_mode=self.region_mode,
            region_size=self.region_size,
            num_images=self.num_images,
            memory_dtype=self.memory_dtype,
            memory_sampling=self.memory_sampling,
            k_pos=self.k_pos,
            k_neg=self.k_neg,
            semi_hard_fraction=self.semi_hard_fraction,
            seed=self.seed,
        )


@dataclass
class ReferenceCall:
    """One reference call: the loss (a float64 graph to ``features`` and ``params``), the
    embeddings and grid labels it used, and the generator after sampling (before the push)."""

    loss: torch.Tensor
    features: torch.Tensor
    params: dict[str, torch.Tensor]
    bn_running: dict[str, torch.Tensor]
    embed: torch.Tensor
    grid: torch.Tensor
    generator: torch.Generator
    bank_index: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


PARAM_KEYS = (
    "projection.net.0.weight",
    "projection.net.1.weight",
    "projection.net.1.bias",
    "projection.net.3.weight",
    "projection.net.3.bias",
)


def generator_from(state: dict, opts: Options) -> torch.Generator:
    gen = torch.Generator()
    saved = state["_extra_state"]
    if saved.numel():
        gen.set_state(saved.clone())
    else:
        gen.manual_seed(opts.seed)
    return gen


def project(state: dict, opts: Options, features: torch.Tensor, dtype=torch.float64, params=None):
    """Projection head in float64: conv1x1 -> BN (batch statistics, running ones updated) ->
    ReLU -> conv1x1 -> F.normalize. Returns the embeddings, the parameters (new leaves from
    ``state``, or the caller's ``params``) and the running statistics after the call."""
    if opts.in_channels is None:
        return features, {}, {}
    if params is None:
        params = {k: state[k].detach().to(dtype).clone().requires_grad_(True) for k in PARAM_KEYS}
    mean = state["projection.net.1.running_mean"].to(dtype).clone()
    var = state["projection.net.1.running_var"].to(dtype).clone()
    h = F.conv2d(features, params["projection.net.0.weight"])
    h = F.batch_norm(
        h,
        mean,
        var,
        params["projection.net.1.weight"],
        params["projection.net.1.bias"],
        training=True,
        momentum=0.1,
        eps=1e-5,
    )
    h = F.conv2d(F.relu(h), params["projection.net.3.weight"], params["projection.net.3.bias"])
    running = {"projection.net.1.running_mean": mean, "projection.net.1.running_var": var}
    return F.normalize(h.to(dtype), dim=1), params, running


def grid_labels(labels: torch.Tensor, size, num_classes: int) -> torch.Tensor:
    t = labels
    if tuple(t.shape[-2:]) != tuple(size):
        t = F.interpolate(t[:, None].float(), size=size, mode="nearest")[:, 0]
    t = t.long()
    return torch.where((t >= 0) & (t < num_classes), t, IGNORE)


def memory_bank(state: dict, opts: Options) -> tuple[torch.Tensor, torch.Tensor]:
    """Every filled memory entry in the order ``ClassMemory.bank`` lists them (pixel entries
    class by class, then region entries), read one by one, widened to float64."""
    feats, labels = [], []
    pixel = state["memory.pixel_queue"]
    for c in range(opts.num_classes):
        for k in range(int(state["memory.pixel_count"][c])):
            feats.append(pixel[c, k].double())
            labels.append(c)
    if opts.region_mode == "fifo":
        region = state["memory.region_queue"]
        for c in range(opts.num_classes):
            for k in range(int(state["memory.region_count"][c])):
                feats.append(region[c, k].double())
                labels.append(c)
    elif opts.region_mode == "per_image":
        region = state["memory.region_queue"]
        filled = state["memory.region_filled"]
        for c in range(opts.num_classes):
            for k in range(filled.shape[1]):
                if bool(filled[c, k]):
                    feats.append(region[c, k].double())
                    labels.append(c)
    if not feats:
        return torch.zeros(0, opts.dim, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    return torch.stack(feats), torch.tensor(labels)


def infonce(z, y, bank, bank_labels, seen, tau, tau_b):
    """The supervised InfoNCE formula. ``seen (N, M)`` counts how often anchor ``i`` sees bank
    entry ``j`` (all ones for the whole memory). For anchor ``i`` with positives ``P(i)``
    (same label: the other anchors, then the bank) and negatives ``N(i)``:
    ``L_i = -(tau / tau_b) mean_p [s_ip - log(exp(s_ip) + sum_n exp(s_in))]``, averaged over
    the anchors with a positive."""
    n = z.shape[0]
    if n == 0:
        return z.sum() * 0
    cand = torch.cat([z, bank.to(z.dtype)])
    cand_labels = torch.cat([y, bank_labels])
    weight = torch.cat([1.0 - torch.eye(n, dtype=z.dtype), seen.to(z.dtype)], 1)  # (N, N + M)
    s = z @ cand.T / tau
    same = (y[:, None] == cand_labels[None, :]).to(z.dtype)
    pos_w = weight * same
    neg_w = weight * (1 - same)
    neg_sum = (neg_w * torch.exp(s)).sum(1, keepdim=True)
    terms = pos_w * (s - torch.log(torch.exp(s) + neg_sum))
    n_pos = pos_w.sum(1)
    has = n_pos > 0
    if not bool(has.any()):
        return z.sum() * 0
    per_anchor = -(tau / tau_b) * terms.sum(1)[has] / n_pos[has]
    return per_anchor.mean()


def reference_call(
    state: dict,
    opts: Options,
    features: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    module_index: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
    autocast: bool = False,
    params: dict[str, torch.Tensor] | None = None,
) -> ReferenceCall:
    """The loss of one call from the module's ``state`` before it. ``module_index``: the
    memory subset the module drew (used for the loss; the reference draws its own too, to move
    its generator the same way, and keeps it in ``bank_index``). ``dtype``: the reference's
    precision; ``autocast``: the projection head under CPU bfloat16 autocast (float32
    parameters), the loss outside it. ``features`` that require a gradient are used as they
    are (the loss stays attached to the caller's graph) and ``params`` replaces the projection
    head's parameters; otherwise both are new float64 leaves."""
    x = features
    if not x.requires_grad:
        x = features.detach().to(dtype).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        embed, params, running = project(state, opts, x, dtype, params)
    embed = embed.to(dtype)
    B, D, h, w = embed.shape
    grid = grid_labels(labels, (h, w), opts.num_classes)
    scores = logits.detach().float()
    if tuple(scores.shape[-2:]) != (h, w):
        scores = F.interpolate(scores, size=(h, w), mode="bilinear", align_corners=False)
    pred = scores.argmax(1)
    gen = generator_from(state, opts)
    numbers = torch.arange(B * h * w, dtype=torch.float32).view(B, 1, h, w)
    picked, y, _ = sample_anchors(
        numbers, pred, grid, opts.max_samples, opts.max_views, IGNORE, gen
    )
    flat = picked[:, 0].long()
    z = embed.permute(0, 2, 3, 1).reshape(B * h * w, D)[flat]
    bank = torch.zeros(0, D, dtype=dtype)
    bank_labels = torch.zeros(0, dtype=torch.long)
    own_index = None
    seen = torch.zeros(z.shape[0], 0)
    if opts.memory:
        bank, bank_labels = memory_bank(state, opts)
        seen = torch.ones(z.shape[0], bank.shape[0])
        if opts.memory_sampling != "all" and bank.shape[0] > 0 and z.shape[0] > 0:
            own_index = select_from_bank(
                z.detach(),
                y,
                bank,
                bank_labels,
                opts.memory_sampling,
                opts.k_pos,
                opts.k_neg,
                opts.semi_hard_fraction,
                generator=gen,
            )
            index = own_index if module_index is None else module_index
            seen = torch.zeros(z.shape[0], bank.shape[0])
            for i in range(index.shape[0]):
                for j in index[i].tolist():
                    if j >= 0:
                        seen[i, j] += 1
    loss = infonce(z, y, bank, bank_labels, seen, opts.temperature, opts.base_temperature)
    extra = {"anchors": z.detach(), "anchor_labels": y, "bank": bank, "bank_labels": bank_labels}
    return ReferenceCall(loss, x, params, running, embed.detach(), grid, gen, own_index, extra)


def local_entries(embed: torch.Tensor, grid: torch.Tensor, opts: Options, gen: torch.Generator):
    """What one process pushes: per image, per class present, up to ``pixels_per_image``
    pixels in the order of a random permutation of the batch's pixels, and the normalised
    class mean. Returns ``pixels[b][c]`` (list of (D,) tensors) and ``regions[b][c]`` (a
    (D,) tensor or None)."""
    B, D, h, w = embed.shape
    P = h * w
    perm = torch.randperm(B * P, generator=gen) if opts.memory_size > 0 else None
    pixels = [[[] for _ in range(opts.num_classes)] for _ in range(B)]
    regions = [[None] * opts.num_classes for _ in range(B)]
    for b in range(B):
        for c in range(opts.num_classes):
            where = [p for p in range(P) if int(grid[b].reshape(-1)[p]) == c]
            if not where:
                continue
            vectors = embed[b].reshape(D, P)
            regions[b][c] = F.normalize(vectors[:, where].sum(1), dim=0)
            if perm is not None:
                ranked = sorted(where, key=lambda p, b=b: int(perm[b * P + p]))
                pixels[b][c] = [vectors[:, p] for p in ranked[: opts.pixels_per_image]]
    return pixels, regions


def push(state: dict, opts: Options, entries: list, image_ids: list) -> dict:
    """The memory after writing ``entries`` (one ``(pixels, regions)`` per process, in rank
    order) one entry at a time into the rings; ``image_ids[r]`` of process ``r`` for the
    per-image store. Returns the new memory buffers (``memory.*`` keys)."""
    out = {k: v.clone() for k, v in state.items() if k.startswith("memory.")}
    store = out["memory.pixel_queue"].dtype
    C = opts.num_classes

    def ring(queue, ptr, count, c, vector):
        size = queue.shape[1]
        queue[c, int(ptr[c])] = vector.to(store)
        ptr[c] = (int(ptr[c]) + 1) % size
        count[c] = min(int(count[c]) + 1, size)

    for pixels, _ in entries:
        for b in range(len(pixels)):
            for c in range(C):
                if opts.memory_size > 0:
                    for vector in pixels[b][c]:
                        ring(
                            out["memory.pixel_queue"],
                            out["memory.pixel_ptr"],
                            out["memory.pixel_count"],
                            c,
                            vector,
                        )
    if opts.region_mode == "fifo":
        for _, regions in entries:
            for b in range(len(regions)):
                for c in range(C):
                    if regions[b][c] is not None:
                        ring(
                            out["memory.region_queue"],
                            out["memory.region_ptr"],
                            out["memory.region_count"],
                            c,
                            regions[b][c],
                        )
    elif opts.region_mode == "per_image":
        for (_, regions), ids in zip(entries, image_ids, strict=True):
            for b in range(len(regions)):
                for c in range(C):
                    if regions[b][c] is not None:
                        out["memory.region_queue"][c, ids[b]] = regions[b][c].to(store)
                        out["memory.region_filled"][c, ids[b]] = True
    return out


def check_module_selection(
    index: torch.Tensor, ref: ReferenceCall, opts: Options, eps: float, what: str
) -> None:
    """The memory subsets the module drew against the reference's float64 similarities.

    ``random`` draws its keys without reading a score, from the same generator state through
    the same function, in one process: the subsets are bit-identical by design. ``hardest``
    and ``semi_hard`` rank similarities that the module and the reference reach through
    different operations; near-ties may go either way on another kernel, so the module's
    picks are checked to be a correct selection within ``eps``, and equal to the
    reference's own picks wherever the selection's boundary is clear by more than ``eps``."""
    if opts.memory_sampling == "random":
        assert torch.equal(index, ref.bank_index), f"{what}: random memory subsets differ"
        return
    check_bank_selection(
        index,
        ref.extra["anchors"],
        ref.extra["anchor_labels"],
        ref.extra["bank"],
        ref.extra["bank_labels"],
        opts.memory_sampling,
        opts.k_pos,
        opts.k_neg,
        opts.semi_hard_fraction,
        eps,
        what,
        expected=ref.bank_index,
    )
