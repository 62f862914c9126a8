"""Seeded random generators whose state travels with a module's ``state_dict``."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

__all__ = ["LazyGenerator", "SeededModule"]


class LazyGenerator:
    """A ``torch.Generator`` seeded once and created on first use on the inputs' device.

    The state can be exported with :meth:`state` (a CPU ``uint8`` tensor, empty when the
    generator was never used) and restored with :meth:`load_state`; a state loaded before the
    first use is applied when the generator is created. A state that does not fit the device
    the generator is created on (CPU state on CUDA or the reverse) is dropped with a warning and
    the generator starts from the seed. If the inputs move to another device, a new generator is
    created there from the seed.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._generator: torch.Generator | None = None
        self._pending: Tensor | None = None

    def get(self, device: torch.device | str) -> torch.Generator:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        gen = self._generator
        if gen is None or gen.device != device:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            if self._pending is not None:
                _set_state_or_warn(gen, self._pending, self.seed)
                self._pending = None
            self._generator = gen
        return gen

    def state(self) -> Tensor:
        if self._generator is not None:
            return self._generator.get_state().clone()
        if self._pending is not None:
            return self._pending.clone()
        return torch.empty(0, dtype=torch.uint8)

    def load_state(self, state: Tensor | None) -> None:
        if state is None or state.numel() == 0:
            self._generator = None
            self._pending = None
            return
        state = state.detach().to("cpu", torch.uint8).clone()
        if self._generator is None:
            self._pending = state
        else:
            _set_state_or_warn(self._generator, state, self.seed)


def _set_state_or_warn(gen: torch.Generator, state: Tensor, seed: int) -> None:
    try:
        gen.set_state(state)
    except (RuntimeError, ValueError):
        warnings.warn(
            f"random generator state of {state.numel()} bytes does not fit a generator on "
            f"{gen.device}; restarting it from seed {seed}",
            stacklevel=3,
        )
        gen.manual_seed(seed)


class SeededModule(nn.Module):
    """A module that draws from its own :class:`LazyGenerator` ``self._rng``, whose state is
    saved in ``state_dict`` (as extra state), so checkpoints resume the same random draws."""

    _rng: LazyGenerator

    def generator_state(self) -> Tensor:
        return self._rng.state()

    def get_extra_state(self) -> Tensor:
        return self._rng.state()

    def set_extra_state(self, state) -> None:
        self._rng.load_state(state)
