"""Where a train step with pixel contrast spends its time, part by part.

:func:`run_breakdown` builds the step of ``bench step`` (model, losses, projection head,
sampler, full class memory, SGD) and times, interleaved in one run (so that machine noise hits
all alike), the whole step and each of its parts called on their own with the step's sizes:

* ``backbone + head``: the model's forward, its CE terms and their backward;
* ``projection head``: the head's forward and backward on the model's features;
* ``labels + sampling``: labels resized to the embedding grid, the predictions' argmax, anchor
  sampling and the backward of its gather (the dense gradient of the embeddings);
* ``in-batch term``: the loss of the anchors among themselves, forward and backward;
* ``memory read``: what the memory hands the loss (``slots()`` for ``all``; ``bank()`` and
  :func:`select_from_bank` for the mining modes);
* ``memory term``: the loss with the memory minus the in-batch term, forward and backward;
* ``memory push``: the memory update of the batch;
* ``rest``: the step minus the parts above (SGD, zeroing gradients, what the parts miss).

Next to each contrast part, its **floor**: the same arithmetic done by plain library calls at
the same sizes and dtype, timed in the same run, and the ratio part / floor. The floors:

* projection head: its two 1x1 convolutions as six plain matrix products on ``(P, d)`` rows
  (two forward, the two input gradients and the two weight gradients), ``P = B h w``;
* labels + sampling: a nearest resize of the labels, the argmax, a random permutation and a
  sort of ``P`` keys (the fewest plain calls that draw uniform pixels per group), the gather
  of the ``N`` anchors and the scatter of their gradient into a zero ``(B, D, h, w)`` tensor;
* in-batch term: ``(N x D)(D x N)`` forward and ``(N x N)(N x D)`` backward;
* memory read: none for ``all`` (the memory is read in place); for the mining modes the
  similarity product ``(N x D)(D x M)`` without gradient;
* memory term: ``(N x D)(D x M)`` forward and ``(N x M)(M x D)`` backward for ``all``; the
  gathered ``(N, k, D)`` rows and their two batched products for the mining modes;
* memory push: a random permutation and a sort of ``P`` keys, the class sums of the pixels
  (one ``scatter_add``), the gather of the pushed pixels and their row writes.

With a prototype classifier (``model.classifier: prototype``) the step's model call passes the
labels (the classifier clusters, moves its prototypes and returns PPC and PPD), and the
**classifier step** is timed too: the classifier's training call on its own input features,
and the backward of its logits (a fixed gradient) and of ``ppc_weight PPC + ppd_weight PPD``.
``backbone + head`` is then the model's part less the classifier step, which is split into
(``P`` pixels of the classifier's grid, ``P_l`` of them labelled, ``K`` classes of ``M``
prototypes, ``C`` input channels, ``D`` the embedding size):

* ``projection + cosines``: ``embed`` (the projection convolutions and the normalisations) and
  the ``(P x D)(D x K M)`` cosines, forward and backward (a fixed gradient of the cosines);
  floor: the same products as plain matrix products on ``(P, C)`` rows, ``(P x C)(C x C)``,
  ``(P x C)(C x D)``, ``(P x D)(D x K M)``, the cosines' input gradient and the four gradients
  of the convolutions;
* ``Sinkhorn + assignment``: ``PrototypeClassifier._assign`` (each pixel's own-class cosines,
  ``segment_sinkhorn``, the argmax and the Gumbel draw); floor: one ``exp`` of the ``(P_l x
  M)`` scaled scores, one ``index_add_`` of them into ``(K, M)`` per iteration and one argmax;
* ``prototype update``: ``PrototypeClassifier._update``; floor: one ``index_add_`` of the
  ``P`` rows of ``D`` and two row normalisations of ``K M x D``;
* ``PPC + PPD``: the two losses, forward and backward; floor: a ``logsumexp`` over ``(P, K M)``
  and a gather of the targets, forward and backward;
* ``classifier rest``: the classifier step minus those four (the labels on the grid, the
  logits' max and LayerNorm, the targets).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from contrastseg.benchmarks.timing import interleaved_median_ms
from contrastseg.benchmarks.train_step import block_labels, build_step
from contrastseg.config import ExperimentConfig
from contrastseg.contrast import contrast_loss, sample_anchors, select_from_bank
from contrastseg.errors import ConfigError
from contrastseg.losses import LossSet
from contrastseg.prototype import TARGET_IGNORE
from contrastseg.prototype.classifier import _prototype_losses

__all__ = ["PARTS", "PROTOTYPE_PARTS", "format_breakdown", "parts_of", "run_breakdown"]

PARTS = (
    "backbone + head",
    "projection head",
    "labels + sampling",
    "in-batch term",
    "memory read",
    "memory term",
    "memory push",
    "rest",
)
# With a prototype classifier: its parts, after "backbone + head".
PROTOTYPE_PARTS = (
    "projection + cosines",
    "Sinkhorn + assignment",
    "prototype update",
    "PPC + PPD",
    "classifier rest",
)
FLOORS = {
    "projection head": "6 products (P x d)(d x m), (P x m)(m x D) + backward",
    "labels + sampling": "resize, argmax, randperm + sort of P keys, N-row gather/scatter",
    "in-batch term": "(N x D)(D x N) + (N x N)(N x D)",
    "memory read": "none: read in place",
    "memory term": "(N x D)(D x M) + (N x M)(M x D)",
    "memory push": "randperm + sort of P keys, class sums (scatter_add), row writes",
    "projection + cosines": "(P x C)(C x C), (P x C)(C x D), (P x D)(D x KM) + backward",
    "Sinkhorn + assignment": "exp of (P_l x M), index_add_ per iteration, argmax",
    "prototype update": "index_add_ of P rows of D, 2 row normalisations (KM x D)",
    "PPC + PPD": "logsumexp over (P x KM) + gather, + backward",
}
_BIG_STEP = 10**9


def parts_of(cfg: ExperimentConfig) -> tuple[str, ...]:
    """The breakdown's rows for ``cfg``: ``PARTS``, with ``PROTOTYPE_PARTS`` after the first
    when the classifier is ``prototype``."""
    if cfg.model.classifier == "prototype":
        return (PARTS[0], *PROTOTYPE_PARTS, *PARTS[1:])
    return PARTS


def run_breakdown(
    cfg: ExperimentConfig,
    num_classes: int = 19,
    batch: int = 2,
    size: tuple[int, int] = (256, 512),
    repeats: int = 3,
    device: str = "cpu",
) -> dict:
    """Median ms of the step and of each part (:func:`parts_of`), with floors, in one
    interleaved run.

    Returns ``{"rows": [...], "meta": {...}}``. Each row: ``part``, ``ms``, ``pct`` (of the
    step; the rows sum to 100), ``floor_ms`` and ``ratio`` (``ms / floor_ms``; ``None`` where a
    part has no floor: the model's own parts, ``rest``, and ``memory read`` for ``all``) and
    ``floor`` (what the floor computes). ``meta``: the sizes (``anchors`` N, ``memory`` M,
    ``dim`` D, the grid, the head's widths), ``step_ms`` and the run's settings. The memory
    starts full; float32, no autocast. With a prototype classifier, ``meta["classifier"]``
    holds its sizes and ``classifier_ms``, the median of the classifier step (the sum of its
    five rows).
    """
    dev = torch.device(device)
    torch.manual_seed(0)
    image = torch.randn(batch, 3, *size, device=dev)
    target = block_labels(batch, *size, num_classes).to(dev)
    step, parts = build_step(cfg, num_classes, True, dev)
    model, module = parts["model"], parts["contrast"]
    memory = module.memory
    base_cfg = cfg.loss.model_copy(deep=True)
    base_cfg.contrast.enabled = False
    base_losses = LossSet(base_cfg, num_classes).to(dev)

    # The step's tensors, computed once: features, logits, embeddings, grid labels, anchors.
    proto = model.prototype_classifier
    proto_in: list[torch.Tensor] = []
    hook = None
    if proto is not None:  # the classifier's input, for its own parts
        hook = proto.register_forward_pre_hook(lambda _m, args: proto_in.append(args[0]))
    with torch.no_grad():
        out = model(image)
    if hook is not None:
        hook.remove()
    with torch.no_grad():
        features, seg = out["features"].detach(), out["seg"].detach()
        embed = module.projection(features).detach()
    B, D, h, w = embed.shape
    P = B * h * w
    gen = torch.Generator(dev).manual_seed(0)

    def labels_and_pred() -> tuple[torch.Tensor, torch.Tensor]:
        grid = module.grid_labels(target, (h, w))
        scores = seg
        if tuple(scores.shape[-2:]) != (h, w):
            scores = F.interpolate(scores.float(), (h, w), mode="bilinear", align_corners=False)
        return grid, scores.argmax(1)

    grid, pred = labels_and_pred()
    anchors, anchor_labels, _ = sample_anchors(
        embed, pred, grid, module.max_samples, module.max_views, module.ignore_index, gen
    )
    N = anchors.shape[0]
    tau, tau_b = module.temperature, module.base_temperature
    g = torch.Generator().manual_seed(1)
    grad_embed = torch.randn(embed.shape, generator=g).to(dev)
    grad_feats = torch.randn(N, D, generator=g).to(dev)

    fns: dict[str, callable] = {}

    def full_step() -> None:
        step(image, target)

    fns["step"] = full_step

    def backbone() -> None:
        model.zero_grad(set_to_none=True)
        # The labels reach a prototype classifier (and are ignored otherwise), as in the step.
        terms = base_losses(model(image, labels=target), target, step=_BIG_STEP)
        terms["total"].backward()

    fns["backbone + head"] = backbone

    # Projection head and its floor: six products on channels-last rows.
    x = features.clone().requires_grad_(True)

    def projection() -> None:
        x.grad = None
        module.projection.zero_grad(set_to_none=True)
        module.projection(x).backward(grad_embed)

    fns["projection head"] = projection
    convs = [m for m in module.projection.modules() if isinstance(m, torch.nn.Conv2d)]
    weights = [c.weight.detach().flatten(1).t().contiguous() for c in convs]  # (in, out)
    rows = features.permute(0, 2, 3, 1).reshape(P, -1).contiguous()
    grad_rows = grad_embed.permute(0, 2, 3, 1).reshape(P, -1).contiguous()

    def projection_floor() -> None:
        acts = [rows]
        for wt in weights:
            acts.append(acts[-1] @ wt)
        grad = grad_rows
        for wt, act in zip(reversed(weights), reversed(acts[:-1]), strict=True):
            act.t() @ grad  # weight gradient
            grad = grad @ wt.t()  # input gradient

    fns["projection head floor"] = projection_floor

    # Labels, argmax, sampling and the backward of its gather, and their floor.
    e = embed.clone().requires_grad_(True)

    def sampling() -> None:
        grid, pred = labels_and_pred()
        feats, _, _ = sample_anchors(
            e, pred, grid, module.max_samples, module.max_views, module.ignore_index, gen
        )
        torch.autograd.grad(feats, e, grad_feats)

    fns["labels + sampling"] = sampling
    group_key = grid.reshape(-1).clamp(max=num_classes) * P
    # N distinct pixels of the batch (N may exceed one image's h w: 8 images, 16x16 grids)
    flat = torch.randperm(P, generator=g)[:N].to(dev)
    b_idx = torch.div(flat, h * w, rounding_mode="floor")
    p_idx = flat - b_idx * (h * w)

    def sampling_floor() -> None:
        F.interpolate(target[:, None].float(), size=(h, w), mode="nearest")
        seg.argmax(1)
        perm = torch.randperm(P, generator=gen, device=dev)
        torch.sort(group_key + perm)
        embed.view(B, D, h * w)[b_idx, :, p_idx]
        out = torch.zeros(B, D, h * w, device=dev)
        out[b_idx, :, p_idx] = grad_feats

    fns["labels + sampling floor"] = sampling_floor

    # The loss: in-batch term, memory read, memory term, each with its floor.
    z = anchors.detach().clone().requires_grad_(True)

    def in_batch() -> None:
        z.grad = None
        contrast_loss(z, anchor_labels, tau, tau_b).backward()

    fns["in-batch term"] = in_batch
    zd = anchors.detach()

    def in_batch_floor() -> None:
        sim = zd @ zd.t()
        sim @ zd

    fns["in-batch term floor"] = in_batch_floor

    mode = module.memory_sampling if memory is not None else None
    capacity = memory.capacity if memory is not None else 0
    k_sel = 0
    if memory is not None:
        if mode == "all":

            def read():
                return memory.slots(dtype=None)

            def with_memory() -> None:
                z.grad = None
                contrast_loss(z, anchor_labels, tau, tau_b, bank_slots=read()).backward()

            flat = memory.slots(dtype=torch.float32)[0].reshape(-1, D)

            def memory_floor() -> None:
                sim = zd @ flat.t()
                sim @ flat

            read_floor = None
        else:
            bank_feats, bank_labels = memory.bank(dtype=None)

            def select(bf, bl):
                return select_from_bank(
                    zd,
                    anchor_labels,
                    bf,
                    bl,
                    mode,
                    module.k_pos,
                    module.k_neg,
                    module.semi_hard_fraction,
                    generator=gen,
                )

            def read():
                bf, bl = memory.bank(dtype=None)
                return select(bf, bl)

            index = select(bank_feats, bank_labels)
            k_sel = index.shape[1]

            def with_memory() -> None:
                z.grad = None
                contrast_loss(
                    z, anchor_labels, tau, tau_b, bank_feats, bank_labels, index
                ).backward()

            flat = bank_feats.float()

            def read_floor() -> None:
                with torch.no_grad():
                    zd @ flat.t()

            def memory_floor() -> None:
                rows_k = flat[index.clamp(min=0)]  # (N, k, D)
                sim = torch.bmm(rows_k, zd[:, :, None])
                torch.bmm(sim.transpose(1, 2), rows_k)

        fns["memory read"] = read
        if read_floor is not None:
            fns["memory read floor"] = read_floor
        fns["loss with memory"] = with_memory
        fns["memory term floor"] = memory_floor

        def push() -> None:
            memory.push(embed, grid, None, generator=gen)

        fns["memory push"] = push
        C, V = memory.num_classes, memory.pixels_per_image
        pushed = min(P, B * C * V)
        push_b = torch.randint(0, B, (pushed,), generator=g).to(dev)
        push_p = torch.randint(0, h * w, (pushed,), generator=g).to(dev)
        scratch = torch.zeros(pushed, D, dtype=memory.pixel_queue.dtype, device=dev)
        dest = torch.randperm(pushed, generator=g).to(dev)
        class_index = grid.reshape(B, 1, h * w).clamp(max=num_classes) % num_classes

        def push_floor() -> None:
            perm = torch.randperm(P, generator=gen, device=dev)
            torch.sort(group_key + perm)
            sums = torch.zeros(B, D, num_classes, device=dev)
            sums.scatter_add_(2, class_index.expand(B, D, h * w), embed.view(B, D, h * w))
            scratch.index_copy_(0, dest, embed.view(B, D, h * w)[push_b, :, push_p])

        fns["memory push floor"] = push_floor

    classifier = None
    if proto is not None:
        classifier = _prototype_fns(fns, proto, proto_in[0].detach(), target, cfg, g)

    names = list(fns)
    times = dict(zip(names, interleaved_median_ms(list(fns.values()), dev, repeats), strict=True))
    step_ms = times["step"]
    ms = {
        "backbone + head": times["backbone + head"],
        "projection head": times["projection head"],
        "labels + sampling": times["labels + sampling"],
        "in-batch term": times["in-batch term"],
        "memory read": times.get("memory read", 0.0),
        "memory term": times["loss with memory"] - times["in-batch term"] if memory else 0.0,
        "memory push": times.get("memory push", 0.0),
    }
    if classifier is not None:
        classifier_ms = times["classifier step"]
        ms["backbone + head"] -= classifier_ms
        for part in PROTOTYPE_PARTS[:-1]:
            ms[part] = times[part]
        ms["classifier rest"] = classifier_ms - sum(times[p] for p in PROTOTYPE_PARTS[:-1])
        classifier["classifier_ms"] = classifier_ms
    ms["rest"] = step_ms - sum(ms.values())
    rows = []
    for part in parts_of(cfg):
        floor_ms = times.get(f"{part} floor")
        floor = FLOORS.get(part, "-")
        if part == "memory read" and mode not in (None, "all"):
            floor = "(N x D)(D x M), no grad"
        if part == "memory term" and mode not in (None, "all"):
            floor = "gather (N, k, D) + two batched products"
        rows.append(
            {
                "part": part,
                "ms": ms[part],
                "pct": 100.0 * ms[part] / step_ms,
                "floor_ms": floor_ms,
                "ratio": None if floor_ms is None else ms[part] / floor_ms,
                "floor": floor if floor_ms is not None else "-",
            }
        )
    hidden = convs[0].out_channels if convs else 0
    meta = {
        "model": f"{cfg.model.head}-{cfg.model.backbone.name}",
        "batch": batch,
        "size": f"{size[0]}x{size[1]}",
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "repeats": repeats,
        "grid": f"{h}x{w}",
        "anchors": N,
        "max_views": module.max_views,
        "memory": capacity,
        "memory_sampling": mode,
        "selected": k_sel,
        "dim": D,
        "head": f"{features.shape[1]}->{hidden}->{D}",
        "step_ms": step_ms,
        "classifier": classifier,
    }
    return {"rows": rows, "meta": meta}


def _prototype_fns(
    fns: dict,
    proto,
    features: torch.Tensor,
    target: torch.Tensor,
    cfg: ExperimentConfig,
    g: torch.Generator,
) -> dict:
    """Adds to ``fns`` the prototype classifier's step, its four parts and their floors, on the
    classifier's input ``features (B, C, h, w)``; returns the classifier's sizes."""
    dev = features.device
    B, C, h, w = features.shape
    P = B * h * w
    K, M, D = proto.num_classes, proto.num_prototypes, proto.dim
    weights = (cfg.loss.prototype.ppc_weight, cfg.loss.prototype.ppd_weight)
    grad_logits = torch.randn(B, K, h, w, generator=g).to(dev)
    grad_cos = torch.randn(P, K * M, generator=g).to(dev)

    def unit_prototypes() -> torch.Tensor:
        return F.normalize(proto.prototypes, p=2.0, dim=-1).reshape(K * M, D)

    # The classifier step: the training call and the backward of its logits and losses.
    xc = features.clone().requires_grad_(True)

    def classifier_step() -> None:
        xc.grad = None
        proto.zero_grad(set_to_none=True)
        out = proto(xc, target)
        torch.autograd.backward([out.logits, out.loss(*weights)], [grad_logits, None])

    fns["classifier step"] = classifier_step

    # Projection + cosines, and their floor: the products on channels-last rows.
    xp = features.clone().requires_grad_(True)

    def projection() -> None:
        xp.grad = None
        proto.zero_grad(set_to_none=True)
        (proto.embed(xp) @ unit_prototypes().t()).backward(grad_cos)

    fns["projection + cosines"] = projection
    convs = [m for m in proto.projection.modules() if isinstance(m, torch.nn.Conv2d)]
    conv_w = [c.weight.detach().flatten(1).t().contiguous() for c in convs]  # (in, out)
    rows = features.permute(0, 2, 3, 1).reshape(P, C).contiguous()
    protos_t = unit_prototypes().detach().t().contiguous()  # (D, K M)

    def projection_floor() -> None:
        acts = [rows]
        for wt in conv_w:
            acts.append(acts[-1] @ wt)
        acts[-1] @ protos_t  # cosines
        grad = grad_cos @ protos_t.t()  # their input gradient
        for wt, act in zip(reversed(conv_w), reversed(acts[:-1]), strict=True):
            act.t() @ grad  # weight gradient
            grad = grad @ wt.t()  # input gradient

    fns["projection + cosines floor"] = projection_floor

    # What the training call computes before the three other parts, once.
    with torch.no_grad():
        embed = proto.embed(features)
        cosines = embed @ unit_prototypes().t()
        cls = proto.grid_labels(target, (h, w))
        valid = cls < K
        scores = proto.mask_norm(cosines.reshape(P, K, M).amax(2))
        correct = valid & (scores.argmax(1) == cls)
        own, nearest, moved_to = proto._assign(cosines, cls)

    def assign() -> None:
        proto._assign(cosines, cls)

    fns["Sinkhorn + assignment"] = assign
    scaled = (own[valid] / proto.sinkhorn_epsilon).contiguous()  # (P_l, M)
    labelled_cls = cls[valid]
    labelled = scaled.shape[0]

    def assign_floor() -> None:
        plan = torch.exp(scaled)
        for _ in range(proto.sinkhorn_iterations):
            torch.zeros(K, M, device=dev).index_add_(0, labelled_cls, plan)
        plan.argmax(1)

    fns["Sinkhorn + assignment floor"] = assign_floor

    slot = cls * M + moved_to

    def update() -> None:
        with torch.no_grad():
            proto._update(embed, slot, correct)

    fns["prototype update"] = update
    update_rows = torch.where(correct, slot, K * M)
    old = proto.prototypes.detach().reshape(K * M, D).clone()

    def update_floor() -> None:
        sums = torch.zeros(K * M + 1, D, device=dev).index_add_(0, update_rows, embed)
        F.normalize(old, p=2.0, dim=-1)
        F.normalize(sums[: K * M], p=2.0, dim=-1)

    fns["prototype update floor"] = update_floor

    # PPC + PPD, forward and backward, and their floor.
    target_slot = torch.where(valid, cls * M + nearest, TARGET_IGNORE)
    gather_index = target_slot.clamp_min(0)[:, None]
    c = cosines.clone().requires_grad_(True)

    def prototype_losses() -> None:
        c.grad = None
        ppc, ppd = _prototype_losses(c, target_slot, valid)
        (weights[0] * ppc + weights[1] * ppd).backward()

    fns["PPC + PPD"] = prototype_losses

    def losses_floor() -> None:
        c.grad = None
        (torch.logsumexp(c, 1).sum() - c.gather(1, gather_index).sum()).backward()

    fns["PPC + PPD floor"] = losses_floor
    return {
        "grid": f"{h}x{w}",
        "pixels": P,
        "labelled": labelled,
        "classes": K,
        "prototypes": M,
        "channels": C,
        "dim": D,
        "iterations": proto.sinkhorn_iterations,
        "assignment": proto.assignment,
    }


def format_breakdown(result: dict) -> str:
    """The rows as a table: ms, % of the step, floor ms and part / floor per part."""
    m = result["meta"]
    memory = (
        f"memory {m['memory']} entries ({m['memory_sampling']})" if m["memory"] else "no memory"
    )
    c = m.get("classifier")
    pw = max(18, *(len(r["part"]) for r in result["rows"]))
    lines = [
        f"{m['model']}  batch {m['batch']}  input {m['size']}  device {m['device']}  "
        f"median of {m['repeats']} interleaved repeats",
        f"grid {m['grid']}, {m['anchors']} anchors (max_views {m['max_views']}), {memory}, "
        f"D {m['dim']}, projection head {m['head']}",
    ]
    if c:
        lines.append(
            f"prototype classifier: grid {c['grid']}, P {c['pixels']} pixels ({c['labelled']} "
            f"labelled), K {c['classes']} x M {c['prototypes']} prototypes, C {c['channels']} "
            f"-> D {c['dim']}, {c['iterations']} Sinkhorn iterations, {c['assignment']}"
        )
    lines.append(
        f"{'part':<{pw}} {'ms':>9} {'% step':>7} {'floor ms':>9} {'part/floor':>10}  floor"
    )
    lines.append("-" * len(lines[-1]))
    for r in result["rows"]:
        floor = "-" if r["floor_ms"] is None else f"{r['floor_ms']:.1f}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(
            f"{r['part']:<{pw}} {r['ms']:>9.1f} {r['pct']:>6.1f}% {floor:>9} {ratio:>10}  "
            f"{r['floor']}"
        )
    if c:
        ms = {r["part"]: r["ms"] for r in result["rows"]}
        four = sum(ms[p] for p in PROTOTYPE_PARTS[:-1])
        lines.append(
            f"{'classifier step':<{pw}} {c['classifier_ms']:>9.1f} "
            f"{100.0 * c['classifier_ms'] / m['step_ms']:>6.1f}%  measured: its four parts "
            f"{four:.1f} + classifier rest {ms['classifier rest']:.1f}"
        )
    lines.append(f"{'step':<{pw}} {m['step_ms']:>9.1f} {100.0:>6.1f}%")
    return "\n".join(lines)


def check_breakdown_settings(amp: str) -> None:
    """The breakdown times float32 steps (its floors are float32 products)."""
    if amp != "off":
        raise ConfigError(f"--breakdown times float32 steps; got --amp {amp} (use --amp off)")
