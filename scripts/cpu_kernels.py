"""Print the x86 CPU kernels PyTorch can run on this machine, one per line, best last.

PyTorch picks its vectorised kernels (``default``, ``avx2``, ``avx512``) at start-up from the
CPU, or from ``ATEN_CPU_CAPABILITY`` when that names a kernel the CPU supports. A kernel counts
here when a fresh interpreter asked for it reports it back. ``--others`` leaves out the one
PyTorch picks by itself (the kernel a plain test run already uses).

    python scripts/cpu_kernels.py            # e.g. "default avx2 avx512"
    python scripts/cpu_kernels.py --others   # e.g. "default avx2"
"""

from __future__ import annotations

import os
import subprocess
import sys

KERNELS = ("default", "avx2", "avx512")
PROBE = "import torch; print(torch.backends.cpu.get_cpu_capability())"


def probe(kernel: str | None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if kernel is not None:
        env["ATEN_CPU_CAPABILITY"] = kernel
    return subprocess.Popen(
        [sys.executable, "-c", PROBE], env=env, stdout=subprocess.PIPE, text=True
    )


def reported(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(
            f"error: the probe of PyTorch's CPU kernel failed (status {proc.returncode})"
        )
    return out.strip().lower()


def main(argv: list[str]) -> int:
    if argv not in ([], ["--others"]):
        print("usage: python scripts/cpu_kernels.py [--others]", file=sys.stderr)
        return 2
    probes = {k: probe(k) for k in (None, *KERNELS)}  # the interpreters start side by side
    answers = {k: reported(p) for k, p in probes.items()}
    best = answers[None]
    kernels = [k for k in KERNELS if answers[k] == k]
    if argv == ["--others"]:
        kernels = [k for k in kernels if k != best]
    print(" ".join(kernels))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
