"""CUDA checks that the CPU test suite cannot make: each prints PASS or FAIL with its numbers.

Run by scripts/gpu_check.sh on a machine with a GPU; exits 1 when any check fails.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from contrastseg.benchmarks.timing import interleaved_median_ms
from contrastseg.benchmarks.train_step import block_labels, build_step
from contrastseg.config import load_config
from contrastseg.contrast import PixelContrast, contrast_loss, sample_anchors
from contrastseg.engine.metrics import ConfusionMatrix

FAILED: list[str] = []


def check(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def contrast_cuda_equals_cpu() -> None:
    g = torch.Generator().manual_seed(0)
    embed = F.normalize(torch.randn(2, 32, 32, 64, generator=g, dtype=torch.float64), dim=1)
    target = block_labels(2, 32, 64, 19, seed=1)
    pred = torch.where(torch.rand(target.shape, generator=g) < 0.2, (target + 1) % 19, target)
    feats, labels, _ = sample_anchors(embed, pred, target, 1024, 20, generator=g)
    bank = F.normalize(torch.randn(3000, 32, generator=g, dtype=torch.float64), dim=1)
    bank_labels = torch.randint(0, 19, (3000,), generator=g)
    cpu = contrast_loss(feats, labels, 0.1, 0.07, bank, bank_labels)
    gpu = contrast_loss(feats.cuda(), labels.cuda(), 0.1, 0.07, bank.cuda(), bank_labels.cuda())
    err = abs(cpu.item() - gpu.item())
    check("contrast loss CUDA == CPU (float64, with bank)", err < 1e-9, f"|diff| = {err:.2e}")


def contrast_under_autocast() -> None:
    for dtype in (torch.bfloat16, torch.float16):
        loss_fn = PixelContrast(
            19, None, memory=True, memory_size=2000, region_size=500, memory_sampling="semi_hard"
        ).cuda()
        embed = F.normalize(torch.randn(2, 256, 128, 256, device="cuda"), dim=1).requires_grad_()
        seg = torch.randn(2, 19, 128, 256, device="cuda")
        target = block_labels(2, 512, 1024, 19).cuda()
        values = []
        for _ in range(3):
            with torch.autocast("cuda", dtype=dtype):
                loss = loss_fn(embed.to(dtype), seg.to(dtype), target)
            loss.backward()
            values.append(loss.item())
        finite = all(torch.isfinite(torch.tensor(values))) and torch.isfinite(embed.grad).all()
        check(
            f"contrast loss + memory under {dtype} autocast",
            bool(finite) and loss.dtype == torch.float32 and min(values) > 0,
            f"losses {[round(v, 4) for v in values]}, dtype {loss.dtype}",
        )


def confusion_cuda_equals_cpu() -> None:
    g = torch.Generator().manual_seed(3)
    target = torch.randint(0, 19, (4, 256, 512), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.1] = 255
    pred = torch.randint(0, 19, (4, 256, 512), generator=g)
    a, b = ConfusionMatrix(19), ConfusionMatrix(19, "cuda")
    a.update(pred, target)
    b.update(pred.cuda(), target.cuda())
    check("confusion matrix CUDA == CPU", torch.equal(a.mat, b.mat.cpu()), "exact")


def contrast_slots_cuda_equals_cpu() -> None:
    """The class-slot memory term (chunked product, exp(s) kept, one backward product) on
    CUDA against the CPU, float64, a partly filled memory; also beyond the exp range."""
    g = torch.Generator().manual_seed(5)
    feats = F.normalize(torch.randn(300, 32, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 19, (300,), generator=g)
    slots = F.normalize(torch.randn(19, 200, 32, generator=g, dtype=torch.float64), dim=2)
    filled = torch.rand(19, 200, generator=g) < 0.8
    for tau in (0.1, 0.001):
        out = []
        for dev in ("cpu", "cuda"):
            x = feats.to(dev).requires_grad_(True)
            bank = (slots.to(dev), filled.to(dev))
            loss = contrast_loss(x, labels.to(dev), tau, 0.07, bank_slots=bank)
            loss.backward()
            out.append((loss.item(), x.grad.cpu()))
        err = abs(out[0][0] - out[1][0])
        gerr = float((out[0][1] - out[1][1]).abs().max())
        check(
            f"class-slot memory term CUDA == CPU (float64, tau {tau})",
            err < 1e-9 * max(1.0, abs(out[0][0])) and gerr < 1e-9,
            f"|diff| = {err:.2e}, gradient {gerr:.2e}",
        )


def bf16_memory_term() -> None:
    """bf16 memory (bf16 products, float32 accumulation) against float32 at the Cityscapes
    size (1,024 anchors x 19 x 10,000 x 256): loss within 1e-3 relative; times side by side."""
    g = torch.Generator().manual_seed(6)
    feats = F.normalize(torch.randn(1024, 256, generator=g), dim=1).cuda()
    labels = torch.randint(0, 19, (1024,), generator=g).cuda()
    slots = F.normalize(torch.randn(19, 10_000, 256, generator=g), dim=2).cuda()
    filled = torch.ones(19, 10_000, dtype=torch.bool, device="cuda")
    half = slots.bfloat16()
    results = {}

    def run(bank):
        x = feats.clone().requires_grad_(True)
        loss = contrast_loss(x, labels, 0.1, 0.07, bank_slots=(bank, filled))
        loss.backward()
        return loss.item(), x.grad

    for name, bank in (("float32", slots), ("bf16", half)):
        results[name] = run(bank)
    rel = abs(results["bf16"][0] - results["float32"][0]) / abs(results["float32"][0])
    grad = float((results["bf16"][1] - results["float32"][1]).norm() / results["float32"][1].norm())
    ms = interleaved_median_ms(
        [
            lambda: run(slots),
            lambda: run(half),
            lambda: (feats @ slots.view(-1, 256).t()) @ slots.view(-1, 256),
        ],
        torch.device("cuda"),
        10,
    )
    check(
        "bf16 memory term within 1e-3 of float32 (1024 x 19 x 10000 x 256)",
        rel < 1e-3 and grad < 1e-2,
        f"loss {rel:.1e} relative, gradient {grad:.1e}; ms float32 {ms[0]:.1f}, bf16 "
        f"{ms[1]:.1f}, float32 products alone {ms[2]:.1f}",
    )


def amp_train_steps(stem: str, amp: str, steps: int = 3) -> None:
    cfg = load_config(
        f"configs/cityscapes/{stem}_contrast.yaml", ["model.backbone.pretrained=false"]
    )
    _, parts = build_step(cfg, 19, True, torch.device("cuda"), "off")  # memory full
    model, losses = parts["model"], parts["losses"]
    optim = torch.optim.SGD(
        list(model.parameters()) + losses.model_parameters(), lr=0.01, momentum=0.9
    )
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    image = torch.randn(2, 3, 512, 1024, device="cuda")
    target = block_labels(2, 512, 1024, 19).cuda()
    torch.cuda.reset_peak_memory_stats()
    values = []
    t0 = time.perf_counter()
    for _ in range(steps):
        with torch.autocast("cuda", dtype=dtype):
            terms = losses(model(image), target, step=10**9)
        optim.zero_grad(set_to_none=True)
        scaler.scale(terms["total"]).backward()
        scaler.step(optim)
        scaler.update()
        values.append({k: round(v.item(), 4) for k, v in terms.items()})
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    finite = all(torch.isfinite(torch.tensor(list(v.values()))).all() for v in values)
    peak = torch.cuda.max_memory_allocated() / 2**30
    check(
        f"{amp} train steps {stem} + contrast (memory full), 2x512x1024",
        bool(finite) and values[-1].get("contrast", 0.0) > 0,
        f"last terms {values[-1]}, {seconds:.3f} s/step incl. warm-up, peak {peak:.2f} GiB",
    )
    del model, losses, optim, parts
    torch.cuda.empty_cache()


def main() -> int:
    if not torch.cuda.is_available():
        print("FAIL no CUDA device")
        return 1
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    contrast_cuda_equals_cpu()
    contrast_slots_cuda_equals_cpu()
    bf16_memory_term()
    contrast_under_autocast()
    confusion_cuda_equals_cpu()
    for stem in ("hrnetv2_w48", "deeplabv3_resnet101"):
        for amp in ("bf16", "fp16"):
            amp_train_steps(stem, amp)
    print(f"{len(FAILED)} failed: {FAILED}" if FAILED else "all GPU checks passed", flush=True)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
