"""The CPU kernel a run asked for is the one PyTorch uses: `make test-kernels` sets
ATEN_CPU_CAPABILITY per worker, and this proves that each worker's kernel is the one named."""

import os

import torch


def test_the_kernel_asked_for_is_the_kernel_in_use():
    in_use = torch.backends.cpu.get_cpu_capability().lower()
    asked = os.environ.get("ATEN_CPU_CAPABILITY")
    if asked:  # set by `make test-kernels` (only kernels the CPU supports) or by the user
        assert in_use == asked.lower(), (asked, in_use)
    else:
        assert in_use in {"default", "avx2", "avx512", "zvector", "sve128", "sve256", "sve512"}, (
            in_use
        )
