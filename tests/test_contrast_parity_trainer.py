"""The project's trainer with pixel contrast and a memory against a training loop written here
around the plain float64 reference: two SGD steps end with the same weights, batch-norm
statistics, memory and generator."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from contrast_reference import PARAM_KEYS, Options, local_entries, push, reference_call
from contrastseg.engine.trainer import Trainer, collate_train
from test_grad_accum import _float64_trainer

CONTRAST = [
    # HRNetV2-W18-Small: plain convolutions, fast in float64 (depthwise ones are not)
    "model.backbone.name=hrnetv2_w18_small",
    "model.head=hrnetv2",
    "model.dropout=0.0",
    "optim.warmup_iters=0",
    "loss.contrast.enabled=true",
    "loss.contrast.weight=0.1",
    "loss.contrast.warmup_iters=0",
    "loss.contrast.max_samples=64",
    "loss.contrast.max_views=4",
    "loss.contrast.memory.enabled=true",
    "loss.contrast.memory.pixel_size=6",  # four images push up to 16 per class: it wraps
    "loss.contrast.memory.pixels_per_image=4",
    "loss.contrast.memory.region_size=3",
]


def _options(trainer: Trainer) -> Options:
    cfg = trainer.cfg
    c, mem = cfg.loss.contrast, cfg.loss.contrast.memory
    module = trainer.loss_set.contrast
    return Options(
        num_classes=trainer.num_classes,
        in_channels=module.in_channels,
        dim=module.dim,
        temperature=c.temperature,
        base_temperature=c.base_temperature,
        max_samples=c.max_samples,
        max_views=c.max_views,
        memory=True,
        memory_size=mem.pixel_size,
        pixels_per_image=mem.pixels_per_image,
        region_mode=mem.region_mode,
        region_size=mem.region_size,
        memory_sampling=mem.sampling,
        seed=cfg.train.seed,
    )


@pytest.mark.parametrize("sampling", ["all"])
def test_two_trainer_steps_equal_a_loop_around_the_reference(tiny_cfg, sampling):
    trainer = _float64_trainer(
        tiny_cfg(*CONTRAST, f"loss.contrast.memory.sampling={sampling}", "train.iters=10")
    )
    cfg = trainer.cfg
    opts = _options(trainer)
    model = copy.deepcopy(trainer.model)
    state = {k: v.clone() for k, v in trainer.loss_set.contrast.state_dict().items()}
    head = {k: state[k].clone().requires_grad_(True) for k in PARAM_KEYS}
    optimizer = torch.optim.SGD(
        [*model.parameters(), *head.values()],
        lr=cfg.optim.lr,
        momentum=cfg.optim.momentum,
        weight_decay=cfg.optim.weight_decay,
    )
    batches = [
        collate_train([{**trainer.train_set[i], "index": i} for i in ids])
        for ids in ([0, 3, 5, 9], [1, 2, 7, 11])
    ]

    for step, batch in enumerate(batches):
        values = trainer.train_step(batch)
        assert values["skipped"] == 0.0 and values["contrast"] > 0

        # The loop: poly learning rate, CE + weight x contrast, plain SGD.
        for group in optimizer.param_groups:
            group["lr"] = cfg.optim.lr * (1 - step / cfg.train.iters) ** cfg.optim.poly_power
        image = batch["image"].to(torch.float64)
        target = batch["mask"]
        model.train()
        out = model(image)

        up = F.interpolate(out["seg"], size=target.shape[-2:], mode="bilinear")
        assert "aux" not in out  # HRNetV2 has no auxiliary head
        ref = reference_call(state, opts, out["features"], out["seg"].detach(), target, params=head)
        total = F.cross_entropy(up, target, ignore_index=255)
        total = total + cfg.loss.contrast.weight * ref.loss
        assert values["contrast"] == pytest.approx(ref.loss.item(), rel=1e-9)
        assert values["total"] == pytest.approx(total.item(), rel=1e-9)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        # The module's state after the call: memory push, generator, running statistics.
        entries = local_entries(ref.embed, ref.grid, opts, ref.generator)
        state.update(push(state, opts, [entries], [batch["index"].tolist()]))
        state["_extra_state"] = ref.generator.get_state()
        state.update({k: v.detach() for k, v in ref.bn_running.items()})

    for key, value in trainer.model.state_dict().items():
        want = model.state_dict()[key]
        torch.testing.assert_close(value, want, rtol=1e-9, atol=1e-12, msg=key)
    module_state = trainer.loss_set.contrast.state_dict()
    for key in PARAM_KEYS:
        torch.testing.assert_close(module_state[key], head[key].detach(), rtol=1e-9, atol=1e-12)
    for key, want in state.items():
        if key.endswith("num_batches_tracked") or key in PARAM_KEYS:
            continue
        got = module_state[key]
        if want.dtype.is_floating_point:
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=key)
        else:
            assert torch.equal(got, want), key
    # The pixel rings of several classes filled and wrapped within the two steps.
    assert int((trainer.loss_set.contrast.memory.pixel_count == 6).sum()) >= 3
