"""`PrototypeClassifier`'s contract: argument checks, the prototypes a seeded buffer, the
state_dict resuming the same draws, what each mode returns, half precision, and the inference
path exported to ONNX (opset 18, dynamic batch, height and width) and TorchScript."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import contrastseg
from contrastseg.errors import ConfigError
from contrastseg.prototype import (
    PPC_WEIGHT,
    PPD_WEIGHT,
    TARGET_IGNORE,
    PrototypeClassifier,
    PrototypeOutput,
    segment_sinkhorn,
)

K, C, M = 4, 6, 3


def data(seed: int, b: int = 2, size=(6, 8)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, C, *size, generator=g)
    labels = torch.randint(0, K + 1, (b, 2 * size[0], 2 * size[1]), generator=g)
    labels[labels == K] = 255
    return x, labels


def test_public_name():
    assert contrastseg.PrototypeClassifier is PrototypeClassifier
    assert "PrototypeClassifier" in contrastseg.__all__


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_classes": 0}, "num_classes=0 is invalid; allowed values: integers >= 1"),
        ({"in_channels": True}, "in_channels=True is invalid"),
        ({"num_prototypes": 0}, "num_prototypes=0 is invalid"),
        ({"dim": 2.0}, "dim=2.0 is invalid"),
        ({"sinkhorn_iterations": -1}, "sinkhorn_iterations=-1 is invalid"),
        ({"momentum": 1.5}, "momentum=1.5 is invalid; allowed values: numbers in [0, 1]"),
        ({"momentum": float("nan")}, "momentum=nan is invalid"),
        ({"sinkhorn_epsilon": 0}, "sinkhorn_epsilon=0 is invalid; allowed values: numbers > 0"),
        ({"gumbel_tau": -1.0}, "gumbel_tau=-1.0 is invalid"),
        ({"assignment": "soft"}, "assignment='soft' is not supported; allowed values: 'gumbel'"),
        ({"projection_norm": "pixel"}, "projection_norm='pixel' is not supported"),
        ({"update_prototypes": 1}, "update_prototypes=1 is invalid; allowed values: True, False"),
        ({"seed": -1}, "seed=-1 is invalid"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, message):
    args = {"num_classes": K, "in_channels": C, **kwargs}
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        PrototypeClassifier(**args)


def test_bad_inputs_name_the_expected_shape():
    module = PrototypeClassifier(K, C, M)
    with pytest.raises(ConfigError, match=r"features \(B, in_channels=6, h, w\) expected"):
        module(torch.randn(2, C + 1, 4, 4))
    with pytest.raises(ConfigError, match=r"labels must have shape \(2, H, W\)"):
        module(torch.randn(2, C, 4, 4), torch.zeros(2, 1, 8, 8, dtype=torch.long))


def test_prototypes_are_a_seeded_buffer_not_a_parameter():
    module = PrototypeClassifier(K, C, M, dim=5, seed=3)
    expected = torch.empty(K, M, 5)
    torch.nn.init.trunc_normal_(expected, std=0.02, generator=torch.Generator().manual_seed(3))
    assert torch.equal(module.prototypes, expected)
    assert torch.equal(PrototypeClassifier(K, C, M, dim=5, seed=3).prototypes, expected)
    assert not torch.equal(PrototypeClassifier(K, C, M, dim=5, seed=4).prototypes, expected)
    assert "prototypes" in dict(module.named_buffers())
    assert all(p is not module.prototypes for p in module.parameters())
    assert set(module.state_dict()) == {
        "projection.0.weight",
        "projection.0.bias",
        "projection.2.weight",
        "projection.2.bias",
        "feat_norm.weight",
        "feat_norm.bias",
        "mask_norm.weight",
        "mask_norm.bias",
        "prototypes",
        "_extra_state",
    }
    assert module.double().prototypes.dtype == torch.float64


def test_state_dict_resumes_the_same_prototypes_and_draws():
    module = PrototypeClassifier(K, C, M, seed=5)
    x0, y0 = data(0)
    x1, y1 = data(1)
    module(x0, y0)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    assert state["_extra_state"].numel() > 0  # the generator was used
    module(x1, y1)
    resumed = PrototypeClassifier(K, C, M, seed=99)
    resumed.load_state_dict(state)
    out = resumed(x1, y1)
    assert torch.equal(resumed.prototypes, module.prototypes)
    assert torch.equal(resumed.generator_state(), module.generator_state())
    assert int(out.updated) > 0


def test_modes_return_logits_or_the_training_output():
    module = PrototypeClassifier(K, C, M)
    x, labels = data(2)
    before = module.prototypes.clone()
    logits = module(x)  # training, no labels (the release's warm-up): logits only
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, K, 6, 8)
    assert torch.equal(module.prototypes, before)
    assert torch.equal(module.eval()(x, labels), logits)  # inference ignores labels
    assert torch.equal(module.prototypes, before)
    out = module.train()(x, labels)
    assert isinstance(out, PrototypeOutput)
    assert torch.equal(out.logits, logits)
    assert out.proto_logits.shape == (2 * 6 * 8, K * M)
    assert out.target.dtype == torch.long and out.target.shape == (2 * 6 * 8,)
    valid = out.target != TARGET_IGNORE
    assert int(valid.sum()) == int(out.labelled) > 0
    assert int(out.correct) <= int(out.labelled)
    assert not torch.equal(module.prototypes, before)
    assert torch.allclose(module.prototypes.norm(dim=-1), torch.ones(K, M))
    torch.testing.assert_close(out.loss(), PPC_WEIGHT * out.ppc + PPD_WEIGHT * out.ppd)
    torch.testing.assert_close(out.loss(1.0, 2.0), out.ppc + 2.0 * out.ppd)


def test_no_update_keeps_the_prototypes_and_the_targets():
    x, labels = data(3)
    frozen = PrototypeClassifier(K, C, M, update_prototypes=False)
    moving = PrototypeClassifier(K, C, M)
    moving.load_state_dict(frozen.state_dict())
    before = frozen.prototypes.clone()
    a, b = frozen(x, labels), moving(x, labels)
    assert torch.equal(frozen.prototypes, before) and int(a.updated) == 0
    assert torch.equal(a.target, b.target)


def test_assign_and_update_are_the_training_call_split_in_its_parts():
    """``_assign`` (Sinkhorn + assignment) and ``_update`` called on their own, as the step
    breakdown times them, give the training call's targets and moved prototypes."""
    x, labels = data(4)
    whole = PrototypeClassifier(K, C, M, seed=3)
    parts = PrototypeClassifier(K, C, M, seed=3)
    parts.load_state_dict(whole.state_dict())
    out = whole(x, labels)
    with torch.no_grad():
        embed = parts.embed(x)
        protos = F.normalize(parts.prototypes, dim=-1).reshape(K * M, C)
        cosines = embed @ protos.t()
        cls = parts.grid_labels(labels, (6, 8))
        own, nearest, moved_to = parts._assign(cosines, cls)
        scores = parts.mask_norm(cosines.reshape(-1, K, M).amax(2))
        correct = (cls < K) & (scores.argmax(1) == cls)
        parts._update(embed, cls * M + moved_to, correct)
    assert own.shape == (2 * 6 * 8, M)
    assert torch.equal(torch.where(cls < K, cls * M + nearest, TARGET_IGNORE), out.target)
    assert torch.equal(parts.prototypes, whole.prototypes)
    assert torch.equal(parts.generator_state(), whole.generator_state())


def test_a_non_finite_feature_moves_no_prototype():
    module = PrototypeClassifier(K, C, M)
    x, labels = data(7)
    x[0, :, 2, 3] = float("nan")
    before = module.prototypes.clone()
    out = module(x, labels)
    assert int(out.updated) == 0
    torch.testing.assert_close(module.prototypes, F.normalize(before, dim=-1))
    out = module(data(8)[0], labels)  # the next finite step moves them again
    assert int(out.updated) > 0 and torch.isfinite(module.prototypes).all()


@pytest.mark.parametrize("assignment", ["gumbel", "argmax"])
def test_half_precision_steps_are_finite(assignment):
    x, labels = data(4)
    module = PrototypeClassifier(K, C, M, assignment=assignment)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x, labels)
    assert torch.isfinite(out.ppc) and torch.isfinite(out.ppd)
    assert torch.isfinite(module.prototypes).all()
    assert module.prototypes.dtype == torch.float32


def test_sinkhorn_stays_finite_where_exp_x_over_epsilon_overflows_float16():
    # cos > 0.05 * log(65504) ~ 0.55 overflows exp(x / 0.05) in float16.
    x = torch.tensor([[0.9, 0.2, 0.7], [0.95, 0.6, 0.1]], dtype=torch.float16)
    assert torch.isinf(torch.exp(x / 0.05)).any()
    plan = segment_sinkhorn(x, torch.zeros(2, dtype=torch.long), 1)
    assert torch.isfinite(plan).all()
    ref = segment_sinkhorn(x.double(), torch.zeros(2, dtype=torch.long), 1)
    torch.testing.assert_close(plan.double(), ref, atol=2e-3, rtol=0)


def _export_inputs():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, C, 6, 8, generator=g), torch.randn(1, C, 9, 5, generator=g)]


@pytest.mark.parametrize("norm", ["width", "channel"])
def test_torchscript_script_and_trace_match(norm, tmp_path):
    module = PrototypeClassifier(K, C, M, projection_norm=norm).eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+.* is deprecated")
        scripted = torch.jit.script(module)
        traced = torch.jit.trace(module, _export_inputs()[0], check_trace=False)
        torch.jit.save(scripted, str(tmp_path / "m.pt"))
        loaded = torch.jit.load(str(tmp_path / "m.pt"))
    with torch.no_grad():
        for x in _export_inputs():
            want = module(x)
            for other in (scripted, traced, loaded):
                torch.testing.assert_close(other(x), want, atol=1e-5, rtol=1e-5)


def test_onnx_export_opset_18_matches_at_two_sizes(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    module = PrototypeClassifier(K, C, M).eval()
    x0, y0 = data(6)
    module.train()(x0, y0)  # prototypes moved once
    module.eval()
    dims = {
        0: torch.export.Dim("batch", min=1),
        2: torch.export.Dim("height", min=2),
        3: torch.export.Dim("width", min=2),
    }
    program = torch.onnx.export(
        module,
        (_export_inputs()[0],),
        None,
        input_names=["features"],
        output_names=["logits"],
        dynamic_shapes=(dims,),
        opset_version=18,
        dynamo=True,
        verbose=False,
    )
    assert {o.domain: o.version for o in program.model_proto.opset_import}[""] == 18
    path = tmp_path / "proto.onnx"
    program.save(path, external_data=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for x in _export_inputs():
        got = session.run(["logits"], {"features": x.numpy()})[0]
        with torch.no_grad():
            want = module(x).numpy()
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_logits_are_the_best_cosine_per_class_then_layer_norm():
    module = PrototypeClassifier(K, C, M, projection_norm="channel").double().eval()
    x = torch.randn(1, C, 3, 4, dtype=torch.float64)
    head = module.projection(x)
    embed = F.normalize(head, dim=1).permute(0, 2, 3, 1).reshape(-1, module.dim)
    embed = F.normalize(module.feat_norm(embed), dim=-1)
    protos = F.normalize(module.prototypes, dim=-1)
    scores = torch.einsum("nd,kmd->nkm", embed, protos).amax(2)
    want = module.mask_norm(scores).reshape(1, 3, 4, K).permute(0, 3, 1, 2)
    torch.testing.assert_close(module(x), want, atol=1e-12, rtol=0)
