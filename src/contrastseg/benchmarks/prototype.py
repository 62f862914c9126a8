"""Benchmark of :class:`~contrastseg.prototype.PrototypeClassifier`'s batched training step
against the released structure, a Python loop over classes.

:func:`loop_prototype_step` follows the released ProtoSeg code's structure with the module's
own weights: cosines as an ``einsum`` to the ``(N, M, K)`` masks and a second product for the
prototype logits, then for every class a boolean selection of its pixels (a host sync), a
Sinkhorn-Knopp on its ``n_k x M`` block, a Gumbel draw for its pixels, a masked product for the
prototype sums and a momentum update of its prototypes (another host sync), the targets written
class after class. :func:`run_prototype_benchmark` times, interleaved in one run, with the same
inputs:

* ``inference``: the module in eval mode (head, product, max, LayerNorms), the floor the
  training calls add to;
* ``train forward``: the training call without gradient (logits, targets, losses, prototype
  update), batched vs loop;
* ``classifier, head given``: the module in eval mode with the projection head's output
  computed beforehand (``embed`` returns it): the prototype product, the max and the
  LayerNorm, the floor of the next row;
* ``classifier + learning``: the training call without gradient, head given: the same plus
  the clustering, the update and the losses, the part where the two programs differ;
* ``train step``: the training call and the backward of ``logits.sum() + ppc + ppd``.

It also runs both once with ``assignment="argmax"`` (no random draw) from the same state and
reports the largest difference of the prototypes and of the losses, so that the two timed
programs are known to compute the same thing.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor

from contrastseg.benchmarks.timing import aligned_table, interleaved_median_ms
from contrastseg.benchmarks.train_step import block_labels
from contrastseg.checks import check_int
from contrastseg.prototype import PrototypeClassifier

__all__ = ["bench_prototype", "format_prototype_benchmark", "loop_prototype_step"]


def _class_sinkhorn(scores: Tensor, iterations: int, epsilon: float) -> Tensor:
    """One class's plan ``(n, M)``, the transpose of the released ``M x n`` iteration."""
    plan = torch.exp(scores / epsilon).t()
    m, n = plan.shape
    plan = plan / plan.sum()
    for _ in range(iterations):
        plan = plan / plan.sum(1, keepdim=True) / m
        plan = plan / plan.sum(0, keepdim=True) / n
    return (plan * n).t()


def loop_prototype_step(
    module: PrototypeClassifier,
    features: Tensor,
    labels: Tensor,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The module's training call written as the released code is: a loop over classes.

    Updates ``module.prototypes`` in place (no DDP average) and returns ``(logits, ppc, ppd)``.
    With ``module.assignment == "gumbel"`` each class draws its own Gumbel noise from
    ``generator``; labels outside ``[0, K)`` are ignored.
    """
    B, _, h, w = features.shape
    K, M, D = module.prototypes.shape
    embed = module.embed(features)
    protos = F.normalize(module.prototypes, dim=-1).to(embed.dtype)
    masks = torch.einsum("nd,kmd->nmk", embed, protos)
    scores = module.mask_norm(masks.amax(1))
    logits = scores.reshape(B, h, w, K).permute(0, 3, 1, 2)
    proto_logits = embed @ protos.reshape(K * M, D).t()
    with torch.no_grad():
        gt = F.interpolate(labels[:, None].float(), size=(h, w), mode="nearest").reshape(-1)
        gt = torch.where((gt >= 0) & (gt < K), gt, -1).long()
        correct = gt == scores.argmax(1)
        target = gt.clone()
        new = protos.clone()
        for k in range(K):
            pixels = gt == k
            init = (
                masks[..., k][pixels].detach().to(torch.promote_types(masks.dtype, torch.float32))
            )
            if init.shape[0] == 0:
                continue
            plan = _class_sinkhorn(init, module.sinkhorn_iterations, module.sinkhorn_epsilon)
            nearest = plan.argmax(1)
            if module.assignment == "gumbel":
                noise = torch.empty_like(plan).exponential_(generator=generator)
                q = F.one_hot((plan - noise.log()).argmax(1), M).to(plan.dtype)
            else:
                q = F.one_hot(nearest, M).to(plan.dtype)
            keep = correct[pixels][:, None].to(plan.dtype)
            q = q * keep
            sums = q.t() @ (embed[pixels].detach().to(plan.dtype) * keep)
            counts = q.sum(0)
            if counts.sum() > 0:
                moved = counts != 0
                mean = F.normalize(sums, dim=-1).to(new.dtype)
                m = module.momentum
                new[k, moved] = m * new[k, moved] + (1 - m) * mean[moved]
            target[pixels] = nearest + M * k
        module.prototypes.copy_(F.normalize(new, dim=-1))
    valid = target >= 0
    ppc = F.cross_entropy(proto_logits, target, ignore_index=-1)
    own = proto_logits[valid].gather(1, target[valid][:, None])
    ppd = (1 - own).pow(2).mean()
    return logits, ppc, ppd


def _agreement(module: PrototypeClassifier, features: Tensor, labels: Tensor) -> dict:
    """Largest differences of the two programs from the same state (``assignment="argmax"``)."""
    batched = copy.deepcopy(module)
    batched.assignment = "argmax"
    loop = copy.deepcopy(batched)
    with torch.no_grad():
        out = batched(features, labels)
        logits, ppc, ppd = loop_prototype_step(loop, features, labels)
    return {
        "prototypes_max_diff": float((batched.prototypes - loop.prototypes).abs().max()),
        "logits_max_diff": float((out.logits - logits).abs().max()),
        "ppc_diff": abs(float(out.ppc - ppc)),
        "ppd_diff": abs(float(out.ppd - ppd)),
    }


def bench_prototype(
    batch: int = 2,
    grid: tuple[int, int] = (64, 64),
    num_classes: int = 19,
    in_channels: int = 720,
    num_prototypes: int = 10,
    stride: int = 4,
    repeats: int = 3,
    device: str | torch.device = "cpu",
    assignment: str = "gumbel",
    seed: int = 0,
) -> dict:
    """Median ms of the batched module and of :func:`loop_prototype_step` (HRNetV2-W48 sizes by
    default: 720 channels, 19 classes, 10 prototypes each, a 64 x 64 grid of 256 x 256 labels).

    Returns ``{"rows": [...], "agreement": {...}, "meta": {...}}``; each row has ``part``,
    ``ms_batched``, ``ms_loop`` and ``speedup`` (loop / batched; the two floors, ``inference``
    and ``classifier, head given``, have the module's time in both)."""
    for name, value in (
        ("batch", batch),
        ("height", grid[0]),
        ("width", grid[1]),
        ("stride", stride),
        ("repeats", repeats),
    ):
        check_int(name, value, 1)
    device = torch.device(device)
    h, w = grid
    torch.manual_seed(seed)
    module = PrototypeClassifier(
        num_classes, in_channels, num_prototypes, assignment=assignment, seed=seed
    ).to(device)
    loop_module = copy.deepcopy(module)
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, in_channels, h, w, generator=g).to(device)
    labels = block_labels(batch, stride * h, stride * w, num_classes, seed).to(device)
    agreement = _agreement(module, features, labels)
    loop_gen = torch.Generator(device=device).manual_seed(seed)
    inference = copy.deepcopy(module).eval()
    x = features.clone().requires_grad_(True)

    def infer():
        with torch.no_grad():
            inference(features)

    def forward_batched():
        with torch.no_grad():
            module(features, labels)

    def forward_loop():
        with torch.no_grad():
            loop_prototype_step(loop_module, features, labels, loop_gen)

    with torch.no_grad():
        cached = module.embed(features)
    head_free = copy.deepcopy(module)
    head_free_loop = copy.deepcopy(loop_module)
    for m in (head_free, head_free_loop):
        m.embed = lambda _features, cached=cached: cached

    head_free_eval = copy.deepcopy(head_free).eval()

    def classify():
        with torch.no_grad():
            head_free_eval(features)

    def learn_batched():
        with torch.no_grad():
            head_free(features, labels)

    def learn_loop():
        with torch.no_grad():
            loop_prototype_step(head_free_loop, features, labels, loop_gen)

    def step_batched():
        out = module(x, labels)
        (out.logits.sum() + out.ppc + out.ppd).backward()
        x.grad = None
        module.zero_grad(set_to_none=True)

    def step_loop():
        logits, ppc, ppd = loop_prototype_step(loop_module, x, labels, loop_gen)
        (logits.sum() + ppc + ppd).backward()
        x.grad = None
        loop_module.zero_grad(set_to_none=True)

    fns = [infer, forward_batched, forward_loop, classify, learn_batched, learn_loop]
    fns += [step_batched, step_loop]
    ms = interleaved_median_ms(fns, device, repeats)
    ms_infer, ms_fwd, ms_fwd_loop, ms_classify, ms_learn, ms_learn_loop, ms_step, ms_step_loop = ms

    def row(part, batched, loop):
        return {
            "part": part,
            "ms_batched": batched,
            "ms_loop": loop,
            "speedup": loop / batched if batched > 0 else float("inf"),
        }

    rows = [
        row("inference", ms_infer, ms_infer),
        row("train forward", ms_fwd, ms_fwd_loop),
        row("classifier, head given", ms_classify, ms_classify),
        row("classifier + learning", ms_learn, ms_learn_loop),
        row("train step", ms_step, ms_step_loop),
    ]
    meta = {
        "batch": batch,
        "grid": f"{h}x{w}",
        "labels": f"{stride * h}x{stride * w}",
        "classes": num_classes,
        "prototypes": num_prototypes,
        "channels": in_channels,
        "assignment": assignment,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "repeats": repeats,
    }
    return {"rows": rows, "agreement": agreement, "meta": meta}


def format_prototype_benchmark(result: dict) -> str:
    """A header line, an aligned table of the rows and the agreement line."""
    m = result["meta"]
    header_line = (
        f"batch {m['batch']}  grid {m['grid']} (labels {m['labels']})  K {m['classes']}  "
        f"M {m['prototypes']}  C {m['channels']}  {m['assignment']}  {m['device']}  "
        f"threads {m['threads']}  median of {m['repeats']}"
    )
    header = ("part", "batched ms", "loop ms", "loop / batched")
    body = [
        (
            r["part"],
            f"{r['ms_batched']:.1f}",
            f"{r['ms_loop']:.1f}",
            f"{r['speedup']:.2f}x",
        )
        for r in result["rows"]
    ]
    lines = aligned_table(header, body)
    a = result["agreement"]
    agreement = (
        "same state, argmax assignment: max |prototypes diff| "
        f"{a['prototypes_max_diff']:.1e}, |PPC diff| {a['ppc_diff']:.1e}, "
        f"|PPD diff| {a['ppd_diff']:.1e}"
    )
    return "\n".join([header_line, *lines, agreement])
