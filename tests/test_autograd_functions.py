"""Every hand-written backward of the project reads only what it saved with
``ctx.save_for_backward``: an in-place change between forward and backward raises autograd's
error instead of giving a wrong gradient, and state written after forward (the contrast
memory) cannot reach a gradient."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import torch
import torch.nn.functional as F

import contrastseg
from contrastseg.contrast import PixelContrast, contrast_loss, sample_anchors
from contrastseg.contrast.projection import ProjectionHead
from contrastseg.losses.aaf import AAFLoss, _AAFMaps, reverse_grad


def _project_functions() -> set[str]:
    """Names of every ``torch.autograd.Function`` defined in the package."""
    for info in pkgutil.walk_packages(contrastseg.__path__, "contrastseg."):
        if not info.name.endswith("__main__"):  # that one runs the command line
            importlib.import_module(info.name)
    found, todo = set(), list(torch.autograd.Function.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__.startswith("contrastseg."):
            found.add(f"{cls.__module__}.{cls.__qualname__}")
    return found


def _tensors_in(value, depth: int = 0) -> list[str]:
    """Paths of tensors reachable from ``value`` through containers and object attributes."""
    if depth > 4:
        return []
    if isinstance(value, torch.Tensor):
        return ["<tensor>"]
    items = []
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, (list, tuple, set)):
        items = list(enumerate(value))
    elif hasattr(value, "__dict__") and not isinstance(value, type):
        items = list(vars(value).items())
    return [f"{k}.{p}" for k, v in items for p in _tensors_in(v, depth + 1)]


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=1)


def _exercise_normalize():
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    head = ProjectionHead(4, 3).double()
    return head(x)


def _exercise_gather():
    embed = _unit(2, 3, 6, 6).requires_grad_(True)
    target = torch.zeros(2, 6, 6, dtype=torch.long)
    target[:, 3:] = 1
    feats, _, _ = sample_anchors(embed, target.flip(1), target, 20, 4)
    return feats


def _exercise_contrast():
    z = _unit(12, 5).requires_grad_(True)
    labels = torch.arange(12) % 3
    bank = _unit(9, 5, seed=1)
    return contrast_loss(z, labels, 0.1, 0.07, bank, torch.arange(9) % 3)


def _exercise_aaf():
    loss = AAFLoss(3, decay_steps=10)
    logits = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    loss.double()
    target = torch.randint(0, 3, (2, 8, 8))
    acc = loss(logits, target, 0)
    node = acc.grad_fn
    # the AAF maps' node sits a few steps up the graph of the weighted sum
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n is None or n in seen:
            continue
        seen.add(n)
        if type(n).__name__ == "_AAFMapsBackward":
            return n
        todo.extend(f for f, _ in n.next_functions)
    raise AssertionError("no _AAFMaps node in the AAF loss graph")


def _exercise_reverse():
    return reverse_grad(torch.randn(3, requires_grad=True))


EXERCISES = {
    "contrastseg.contrast.projection._Normalize": _exercise_normalize,
    "contrastseg.contrast.sampling._GatherPixels": _exercise_gather,
    "contrastseg.contrast.infonce._ContrastFunction": _exercise_contrast,
    "contrastseg.losses.aaf._AAFMaps": _exercise_aaf,
    "contrastseg.losses.aaf._ReverseGrad": _exercise_reverse,
}


def test_every_autograd_function_has_an_exercise():
    """A new hand-written backward must be added here (and so to the check below)."""
    assert _project_functions() == set(EXERCISES)


@pytest.mark.parametrize("name", sorted(EXERCISES))
def test_backward_keeps_no_tensor_outside_save_for_backward(name):
    out = EXERCISES[name]()
    node = out if not isinstance(out, torch.Tensor) else out.grad_fn
    assert type(node).__name__ == name.rsplit(".", 1)[1] + "Backward"
    assert _tensors_in(vars(node)) == [], f"{name} keeps tensors outside save_for_backward"


def test_in_place_change_of_the_embeddings_before_backward_raises():
    """The projection head's normalisation saved its output: writing into it before backward
    is refused."""
    head = ProjectionHead(4, 3).double()
    embed = head(torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True))
    loss = (embed * torch.arange(3.0, dtype=torch.float64)[:, None, None]).sum()
    embed.mul_(2.0)  # deliberate
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_in_place_change_of_aaf_probabilities_before_backward_raises():
    """The AAF maps saved their input probabilities: writing into them before backward is
    refused."""
    logits = torch.randn(2, 6, 8, 8, dtype=torch.float64, requires_grad=True)
    probs = logits.sigmoid().clamp(1e-4, 1.0)
    labels = torch.randint(0, 3, (2, 8, 8))
    valid = torch.ones(2, 8, 8, dtype=torch.bool)
    acc, _ = _AAFMaps.apply(probs, labels, valid, (1,), 3.0, True)
    probs.mul_(0.5)  # deliberate
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        acc.sum().backward()


def test_memory_written_between_forward_and_backward_does_not_change_the_gradient():
    """Writing every memory entry after the call (not through ``push``) leaves the gradient
    of the earlier loss unchanged: backward reads nothing from the memory."""
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 3, (2, 2, 2), generator=g).repeat_interleave(4, 1)
    labels = labels.repeat_interleave(4, 2)
    embed = _unit(2, 6, 8, 8, seed=4)
    logits = torch.randn(2, 3, 8, 8, generator=g)
    grads = []
    for overwrite in (False, True):
        module = PixelContrast(3, None, dim=6, max_views=4, memory=True, memory_size=8)
        module.memory.fill_random_(5)
        features = embed.clone().requires_grad_(True)
        loss = module(features, logits, labels)
        if overwrite:
            with torch.no_grad():
                module.memory.pixel_queue.mul_(-1.0)
                module.memory.region_queue.mul_(-1.0)
        loss.backward()
        grads.append(features.grad)
    assert grads[0].abs().max() > 0
    assert torch.equal(grads[0], grads[1])
