"""The contrast loss against a full class memory (``all`` sampling), three ways, side by side.

* ``streamed``: the bank as a flat ``(M, D)`` list, similarities recomputed in each of the
  loss's three passes (``cache_bytes=0``): four products with the memory, bounded memory.
* ``kept``: the same flat bank, similarities kept between passes: two products.
* ``slots``: the memory in its own ``(C, K, D)`` layout (what training uses): one product in
  forward, whose chunks are exponentiated and summed while in cache, and one in backward.

All three compute the same loss (the tests check it against a loop reference). ``slots_bf16``
is ``slots`` with the memory stored in bfloat16 (products accumulated in float32; on GPUs as
bf16 tensor-core products): its loss is compared with float32's, not required equal. Next to them,
the ``floor``: the two plain products the loss cannot do without, ``(N x D)(D x M)`` and
``(N x M)(M x D)``, timed in the same run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from contrastseg.benchmarks.timing import interleaved_median_ms
from contrastseg.contrast import contrast_loss

VARIANTS = ("streamed", "kept", "slots")


def run_memory_benchmark(
    anchors: int = 1024,
    classes: int = 19,
    slots_per_class: int = 10_000,
    dim: int = 256,
    repeats: int = 3,
    device: str = "cpu",
) -> dict[str, float]:
    """Median ms of forward + backward of each variant on random unit vectors."""
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    feats = F.normalize(torch.randn(anchors, dim, generator=g), dim=1).to(dev)
    labels = torch.randint(0, classes, (anchors,), generator=g).to(dev)
    slots = F.normalize(torch.randn(classes, slots_per_class, dim, generator=g), dim=2).to(dev)
    filled = torch.ones(classes, slots_per_class, dtype=torch.bool, device=dev)
    flat = slots.reshape(-1, dim)
    flat_labels = torch.arange(classes, device=dev).repeat_interleave(slots_per_class)
    kwargs = {
        "streamed": {"bank_feats": flat, "bank_labels": flat_labels, "cache_bytes": 0},
        "kept": {"bank_feats": flat, "bank_labels": flat_labels, "cache_bytes": 1 << 40},
        "slots": {"bank_slots": (slots, filled), "cache_bytes": 1 << 40},
        "slots_bf16": {"bank_slots": (slots.bfloat16(), filled), "cache_bytes": 1 << 40},
    }

    def floor() -> None:
        sim = feats @ flat.t()
        sim @ flat

    def step(name: str) -> tuple[float, torch.Tensor]:
        x = feats.clone().requires_grad_(True)
        loss = contrast_loss(x, labels, 0.1, 0.07, **kwargs[name])
        loss.backward()
        return loss.item(), x.grad

    # The variants must agree before their times mean anything.
    results = [step(name) for name in VARIANTS]
    spread = max(abs(v - results[0][0]) for v, _ in results) / abs(results[0][0])
    grad_spread = max(float((g - results[0][1]).abs().max()) for _, g in results)
    bf16_loss, bf16_grad = step("slots_bf16")
    names = (*VARIANTS, "slots_bf16")
    fns = [lambda n=n: step(n) for n in names] + [floor]
    times = interleaved_median_ms(fns, dev, repeats)
    return {
        **dict(zip((*names, "floor"), times, strict=True)),
        "loss_rel_diff": spread,
        "grad_max_diff": grad_spread,
        "bf16_loss_rel_diff": abs(bf16_loss - results[0][0]) / abs(results[0][0]),
        "bf16_grad_rel_diff": float((bf16_grad - results[0][1]).norm() / results[0][1].norm()),
    }


def format_memory_benchmark(result: dict[str, float], header: str) -> str:
    base, floor = result["streamed"], result["floor"]
    lines = [header, "variant     ms fwd+bwd  speedup vs streamed  / floor"]
    lines += [
        f"{name:<10} {result[name]:>12.1f}  {base / result[name]:>8.2f}x  "
        f"{result[name] / floor:>14.2f}x"
        for name in (*VARIANTS, "slots_bf16")
    ]
    lines.append(f"{'floor':<10} {floor:>12.1f}  (the two float32 products alone)")
    lines.append(
        f"same loss: relative difference {result['loss_rel_diff']:.1e}, "
        f"largest gradient difference {result['grad_max_diff']:.1e}; bf16 memory: loss "
        f"{result['bf16_loss_rel_diff']:.1e} relative, gradient "
        f"{result['bf16_grad_rel_diff']:.1e} (relative norm)"
    )
    return "\n".join(lines)
