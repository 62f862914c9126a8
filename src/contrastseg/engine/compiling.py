"""``torch.compile`` of a model's training forward or of its inference (docs/training.md,
"Compiling").

What is compiled is the model alone (backbone, heads, classifier; under DDP the DDP wrapper).
The loss set, pixel contrast's anchor sampling (its sizes depend on the labels) and, with a
prototype classifier, the decode head's call with the labels and the prototype update
(``_head_with_labels`` in :mod:`contrastseg.models.segmentor` and ``PrototypeClassifier._learn``,
both under ``torch.compiler.disable``) run eagerly around it.

Sizes: the first call compiles a graph for its input's sizes; a call with other sizes compiles
one more graph, in which the sizes that changed are symbolic, and every later size takes it
(PyTorch's automatic dynamic shapes). Training keeps one crop size, so it compiles once;
inference over images of many sizes compiles twice. Two things still add a graph: a batch of
one image against batches of several (sizes 0 and 1 are always specialised), and, for a batch
of one image on a CPU, a convolution input that crosses 20480 values, where PyTorch switches
convolution kernels (small images against large ones).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from contrastseg.config import COMPILE_BACKENDS, COMPILE_MODES

__all__ = ["COMPILE_BACKENDS", "COMPILE_MODES", "compile_inference", "compile_training"]

F = TypeVar("F", bound=Callable)


def compile_training(forward: F, backend: str = "inductor", mode: str | None = None) -> F:
    """``forward`` (the model, maybe DDP-wrapped) compiled as ``train.compile`` compiles it."""
    return torch.compile(forward, backend=_backend(backend), mode=mode)


def compile_inference(model: F, backend: str = "inductor", mode: str | None = None) -> F:
    """``model`` compiled for inference (``eval.compile``, ``predict --compile``): a graph for
    the first size, a dynamic one for every other size. The result is called like the model
    and shares its parameters, ``eval()`` and ``train()``."""
    return torch.compile(model, backend=_backend(backend), mode=mode, dynamic=None)


def _backend(name: str) -> str:
    if name not in COMPILE_BACKENDS:  # the config validates its keys; this guards the API
        raise ValueError(f"compile backend {name!r}: allowed values are {list(COMPILE_BACKENDS)}")
    return name
