"""``torch.compile`` as a tested path: training (``train.compile``), evaluation
(``eval.compile``) and ``predict --compile`` against the eager model, and the number of graphs
Dynamo compiles (docs/training.md, "Compiling").

Backends: inductor (what users get) for the tiny model's training, its first forward included;
aot_eager (the same Dynamo graphs and AOT autograd, run by PyTorch's own operators, no code
generation, compiled in seconds) for the rest: inductor compiles HRNet's forward alone for over
a minute on a CPU, and the tiny model's inference for another 80 s.

Tolerances, float32: a compiled forward's outputs within 1e-4 (max abs; times the output's
largest magnitude where that is over 1) of the eager ones; the logged losses of each step within
a relative 1e-4; every weight and batch-norm statistic after 3 steps within 1e-4 (max abs), and
their difference under 1e-3 of how far the weights moved. HRNet trains in float64 (1e-10): in
float32 its batch norms over 2x2 maps amplify the first step's rounding differences (1e-6 of
the gradient) to 0.5-5% of the update within 3 steps, so float32 could not tell a wrong graph
from rounding.

Graph counts come from Dynamo's counters, reset before each test."""

from __future__ import annotations

import json
import re
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch._inductor.config as inductor_config
from PIL import Image
from torch._dynamo.utils import counters

from contrastseg.config import load_config
from contrastseg.engine import compiling
from contrastseg.engine import inference as inference_module
from contrastseg.engine.compiling import compile_inference
from contrastseg.engine.trainer import Trainer
from contrastseg.errors import ConfigError
from contrastseg.models import build_model
from contrastseg.prototype import PrototypeClassifier
from test_grad_accum import _float64_trainer
from tiny import SMALL_CONTRAST, TINY

ROOT = Path(__file__).parents[1]
HRNET = ["model.backbone.name=hrnetv2_w18_small", "model.head=hrnetv2"]
# Five sizes of one image (predict's batch). The second size compiles the dynamic graph: it is
# not square (a square one would make Dynamo assume height = width). All are large enough that
# every convolution input of the tiny model holds over 20480 values, the size at which PyTorch's
# CPU convolution switches kernels for a batch of one image (each side of it is a graph).
SIZES = [(304, 352), (352, 304), (321, 367), (296, 400), (384, 320)]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test counts its own graphs; inductor compiles in this process (one core each)."""
    torch._dynamo.reset()
    counters.clear()
    with inductor_config.patch(compile_threads=1):
        yield
    torch._dynamo.reset()
    counters.clear()


def graphs() -> int:
    """Graphs Dynamo compiled since the last reset (a recompilation is one more)."""
    return counters["stats"]["unique_graphs"]


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def close(want: torch.Tensor, got: torch.Tensor, tol: float = 1e-4) -> bool:
    """``got`` within ``tol`` of ``want`` (max abs), scaled by ``want``'s largest magnitude
    where that is over 1 (features reach 10 and more; logits stay near 1)."""
    return max_abs(want, got) <= tol * max(1.0, want.abs().max().item())


class Recorder:
    """Wraps a trainer's forward: the first call's outputs (detached), the graph count after
    each call, and the anchors pixel contrast drew in each step."""

    def __init__(self, trainer: Trainer) -> None:
        self.first: dict[str, torch.Tensor] = {}
        self.graphs: list[int] = []
        self.anchors: list[int] = []
        inner = trainer.forward

        def forward(*args, **kwargs):
            out = inner(*args, **kwargs)
            if not self.first:
                self.first = {k: v.detach().clone() for k, v in out.items()}
            self.graphs.append(graphs())
            return out

        trainer.forward = forward
        contrast = trainer.loss_set.contrast
        if contrast is not None:
            loss = contrast._loss

            def counted(*args, **kwargs):
                value, anchors = loss(*args, **kwargs)
                self.anchors.append(int(anchors))
                return value, anchors

            contrast._loss = counted


class Run:
    """One training run to ``train.iters`` = 3, built and fitted at once (the trainer seeds
    torch's global generator, which dropout draws from, when it is built): its first state,
    recorder, the records of metrics.jsonl, the final state_dict and val metrics."""

    def __init__(self, cfg, make=Trainer) -> None:
        trainer = make(cfg)
        self.start = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        self.record = Recorder(trainer)
        self.metrics = trainer.fit().metrics
        lines = (trainer.run_dir / "metrics.jsonl").read_text().splitlines()
        self.log = [json.loads(line) for line in lines]
        self.state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def two_runs(tiny_cfg, *overrides, compiled=(), make=Trainer) -> tuple[Run, Run]:
    """The same run eager and with the ``compiled`` overrides; both start from the same
    weights."""
    eager = Run(tiny_cfg(*overrides, "train.iters=3", "output.name=eager"), make)
    other = Run(tiny_cfg(*overrides, "train.iters=3", "output.name=compiled", *compiled), make)
    for key, value in other.start.items():
        assert torch.equal(value, eager.start[key]), key
    return eager, other


def check_losses(eager: list[dict], compiled: list[dict], rel: float) -> None:
    assert [r["iter"] for r in eager] == [r["iter"] for r in compiled] == [1, 2, 3]
    for a, b in zip(eager, compiled, strict=True):
        assert b["skipped"] == a["skipped"] == 0
        for key in ("total", "ce", "aux_ce", "contrast", "ppc", "ppd"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=rel), (a["iter"], key)


def check_weights(eager: dict, compiled: dict, start: dict, atol: float, moved: float) -> None:
    """Every floating tensor (weights and batch-norm statistics) within ``atol``, and their
    difference under ``moved`` of the distance they travelled in training (norms over all)."""
    diff, travel = 0.0, 0.0
    for key, value in eager.items():
        if not value.is_floating_point():
            continue
        assert max_abs(value, compiled[key]) <= atol, key
        diff += (value.double() - compiled[key].double()).pow(2).sum().item()
        travel += (value.double() - start[key].double()).pow(2).sum().item()
    assert travel > 0
    assert diff**0.5 <= moved * travel**0.5


# --- config ---------------------------------------------------------------------------------
def test_compile_keys_are_validated_in_one_line():
    cfg = load_config(None, ["train.compile=true", "eval.compile=true"])
    assert (cfg.train.compile_backend, cfg.train.compile_mode) == ("inductor", None)
    assert (cfg.eval.compile_backend, cfg.eval.compile_mode) == ("inductor", None)
    cfg = load_config(None, ["train.compile_backend=aot_eager", "eval.compile_mode=max-autotune"])
    assert cfg.train.compile_backend == "aot_eager" and cfg.eval.compile_mode == "max-autotune"
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.compile_backend=tvm"])
    assert "\n" not in str(err.value)
    assert "train.compile_backend" in str(err.value) and "'aot_eager'" in str(err.value)
    with pytest.raises(ConfigError, match=r"eval\.compile_mode.*'turbo'"):
        load_config(None, ["eval.compile_mode=turbo"])
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.compile_backend=eager", "train.compile_mode=max-autotune"])
    assert "\n" not in str(err.value) and "train.compile_mode" in str(err.value)
    with pytest.raises(ValueError, match="tvm"):
        compiling.compile_training(torch.nn.Identity(), "tvm")


# --- the tiny model ------------------------------------------------------------------------
def test_inductor_training_matches_eager_with_pixel_contrast(tiny_cfg):
    """Three steps through the trainer with pixel contrast (its anchors differ from step to
    step), eager against ``train.compile`` with inductor: the first forward's outputs, each
    step's losses, the final weights and statistics; one graph, compiled once."""
    eager, compiled = two_runs(tiny_cfg, *SMALL_CONTRAST, compiled=["train.compile=true"])
    first_e, first_c = eager.record.first, compiled.record.first
    assert set(first_c) == set(first_e) == {"seg", "aux", "features"}
    for key in first_e:
        assert close(first_e[key], first_c[key]), key
    check_losses(eager.log, compiled.log, rel=1e-4)
    assert all(r["contrast"] > 0 for r in compiled.log)
    check_weights(eager.state, compiled.state, eager.start, atol=1e-4, moved=1e-3)
    anchors = compiled.record.anchors
    assert len(anchors) == 3 and len(set(anchors)) > 1  # the sampled sizes changed
    assert eager.record.anchors == anchors
    assert eager.record.graphs == [0, 0, 0]
    per_step = compiled.record.graphs
    assert 1 <= per_step[0] <= 2 and per_step == per_step[:1] * 3


def test_compiled_inference_matches_eager_on_five_sizes_with_two_graphs():
    """The eval-mode model as ``predict --compile`` and ``eval.compile`` run it: five image
    sizes give the eager logits (within 1e-4) from two graphs, the first size's and a dynamic
    one for every other size. aot_eager: the graphs are Dynamo's whatever the backend (inductor
    gives the same two, and logits within 1.5e-8, in 80 s instead of 15); the training test
    above checks inductor's code for this model."""
    cfg = load_config(None, TINY)
    torch.manual_seed(0)
    model = build_model(cfg.model, 8, backbone_weights=False).eval()
    compiled = compile_inference(model, "aot_eager")
    counts = []
    with torch.no_grad():
        for h, w in SIZES:
            x = torch.randn(1, 3, h, w)
            want, got = model(x)["seg"], compiled(x)["seg"]
            assert got.shape == want.shape
            assert close(want, got), (h, w)
            counts.append(graphs())
    assert counts == [1, 2, 2, 2, 2]


# --- HRNet, aot_eager -----------------------------------------------------------------------
def test_hrnet_compiled_forward_matches_eager():
    """HRNetV2-W18-Small in eval and in training mode (aot_eager): logits and features within
    1e-4 of eager, at 64x64."""
    cfg = load_config(None, [*TINY, *HRNET])
    torch.manual_seed(0)
    model = build_model(cfg.model, 8, backbone_weights=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model.eval()(x)["seg"]
        got = compile_inference(model, "aot_eager")(x)["seg"]
    assert want.shape == (2, 8, 16, 16)
    assert close(want, got)
    model.train()
    labels = torch.randint(0, 8, (2, 64, 64))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)  # the head's dropout draws the same mask in both calls
    want = model(x, labels=labels)
    model.load_state_dict(state)  # batch-norm statistics as before the first call
    torch.manual_seed(1)
    got = compiling.compile_training(model, "aot_eager")(x, labels=labels)
    assert set(got) == set(want) == {"seg", "features"}
    for key in want:
        assert close(want[key], got[key]), key
    assert graphs() == 2  # eval and training: one graph each


def test_hrnet_training_matches_eager_in_float64(tiny_cfg):
    """Three float64 steps of HRNetV2-W18-Small with pixel contrast through the trainer, eager
    against ``train.compile`` with aot_eager: losses within a relative 1e-10, weights within
    1e-10; one graph, compiled once."""
    eager, compiled = two_runs(
        tiny_cfg,
        *HRNET,
        *SMALL_CONTRAST,
        compiled=["train.compile=true", "train.compile_backend=aot_eager"],
        make=_float64_trainer,
    )
    assert next(iter(compiled.state.values())).dtype == torch.float64
    check_losses(eager.log, compiled.log, rel=1e-10)
    check_weights(eager.state, compiled.state, eager.start, atol=1e-10, moved=1e-8)
    anchors = compiled.record.anchors
    assert eager.record.anchors == anchors and len(set(anchors)) > 1
    per_step = compiled.record.graphs
    assert 1 <= per_step[0] <= 2 and per_step == per_step[:1] * 3


# --- the prototype classifier, aot_eager ----------------------------------------------------
def test_prototype_classifier_trains_compiled_without_recompiling(tiny_cfg):
    """``model.classifier: prototype`` with pixel contrast, ``train.compile`` and
    ``eval.compile`` (aot_eager), against eager: losses (PPC and PPD included), weights and
    prototypes after 3 steps, the val metrics; the training graphs (the backbone before the
    head's eager call with the labels, the auxiliary head after it) are compiled in the first
    step only, and the val evaluation adds one graph."""
    overrides = [*SMALL_CONTRAST, "model.classifier=prototype", "model.prototype.num_prototypes=3"]
    backend = ["train.compile_backend=aot_eager", "eval.compile_backend=aot_eager"]
    eager, compiled = two_runs(
        tiny_cfg, *overrides, compiled=["train.compile=true", "eval.compile=true", *backend]
    )
    check_losses(eager.log, compiled.log, rel=1e-4)
    assert all(r["ppc"] > 0 and r["ppd"] > 0 for r in compiled.log)
    check_weights(eager.state, compiled.state, eager.start, atol=1e-4, moved=1e-3)
    protos = "head.classifier.prototypes"
    assert not torch.equal(compiled.state[protos], eager.start[protos])  # the prototypes moved
    assert max_abs(compiled.state[protos], eager.state[protos]) <= 1e-4
    per_step = compiled.record.graphs
    assert 1 <= per_step[0] <= 2 and per_step == per_step[:1] * 3
    assert graphs() == per_step[0] + 1  # the val evaluation's graph
    assert compiled.metrics["mIoU"] == pytest.approx(eager.metrics["mIoU"], abs=1e-3)


def test_prototype_classifier_compiles_in_a_users_model():
    """A compiled function calling ``PrototypeClassifier(features, labels)`` (aot_eager): the
    update and its random draws run eagerly inside it, so three calls with other labels each
    give the eager losses and prototypes from the graphs of the first call."""
    torch.manual_seed(0)
    eager = PrototypeClassifier(4, 8, num_prototypes=3, seed=1)
    compiled = PrototypeClassifier(4, 8, num_prototypes=3, seed=1)
    compiled.load_state_dict(eager.state_dict())

    def step(classifier, features, labels):
        out = classifier(features, labels)
        return out.logits.sum() + out.loss(), out.updated

    fn = torch.compile(step, backend="aot_eager")
    counts = []
    for i in range(3):
        features = torch.randn(2, 8, 6, 6)
        labels = torch.randint(0, 4, (2, 24, 24))
        labels[:, : 4 * i] = 255  # a different number of labelled pixels each call
        want, moved = step(eager, features, labels)
        got, _ = fn(compiled, features, labels)
        assert got.item() == pytest.approx(want.item(), rel=1e-5)
        assert max_abs(compiled.prototypes, eager.prototypes) <= 1e-6
        assert int(moved) > 0
        counts.append(graphs())
    assert counts[0] >= 1 and counts == counts[:1] * 3


# --- predict and eval on the command line ---------------------------------------------------
def test_predict_and_eval_compile_on_the_command_line(tmp_path, run_cli, monkeypatch, capsys):
    """``predict --compile`` infers five image sizes through the compiled model with two graphs
    and writes what eager prediction writes; ``--compile`` with ``--onnx`` is refused in one
    line; ``eval`` with ``eval.compile`` gives the eager metrics. (aot_eager: the compile call
    is spied on and given that backend, to keep the test short.)"""
    cfg = load_config(
        None, [*TINY, "data.train_size=4", "data.val_size=4", f"output.root={tmp_path}"]
    )
    checkpoint = Trainer(cfg, progress=False).save_checkpoint()
    calls = []

    def spy(model, backend="inductor", mode=None):
        calls.append(backend)
        return compile_inference(model, "aot_eager", mode)

    monkeypatch.setattr(inference_module, "compile_inference", spy)
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    images.mkdir()
    for i, (h, w) in enumerate(SIZES):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"im{i}.png")
    ck = ["--checkpoint", str(checkpoint)]
    assert run_cli("predict", str(images), *ck, "--out", str(tmp_path / "eager")) == 0
    assert calls == [] and graphs() == 0
    assert run_cli("predict", str(images), *ck, "--out", str(tmp_path / "out"), "--compile") == 0
    assert calls == ["inductor"]  # predict --compile asks for inductor
    assert 1 <= graphs() <= 2
    for i, (h, w) in enumerate(SIZES):
        got = np.asarray(Image.open(tmp_path / "out" / f"im{i}_labels.png"))
        want = np.asarray(Image.open(tmp_path / "eager" / f"im{i}_labels.png"))
        assert got.shape == want.shape == (h, w)
        assert (got == want).mean() >= 0.999  # a near tie may flip a pixel, no more
    capsys.readouterr()
    code = run_cli("predict", str(images), "--onnx", "m.onnx", "--compile")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--compile" in err and "--onnx" in err

    data = "configs/demo.yaml"
    common = ["--set=data.val_size=4", "--checkpoint", str(checkpoint)]
    assert run_cli("eval", data, *common, "--out", str(tmp_path / "eager.json")) == 0
    before = graphs()
    compiled = ["--set=eval.compile=true", "--set=eval.compile_backend=aot_eager"]
    assert run_cli("eval", data, *common, *compiled, "--out", str(tmp_path / "c.json")) == 0
    assert calls == ["inductor", "aot_eager"] and graphs() == before + 1
    want = json.loads((tmp_path / "eager.json").read_text())
    got = json.loads((tmp_path / "c.json").read_text())
    assert got["mIoU"] == pytest.approx(want["mIoU"], abs=1e-3)


# --- the docs' snippet ----------------------------------------------------------------------
def test_the_docs_show_the_compile_snippet_and_it_runs(capsys):
    """docs/training.md's "Compiling" shows examples/compile_snippet.py verbatim; it trains two
    compiled steps and infers three sizes within 1e-4 of eager, from two graphs in all: the
    training one and one dynamic graph for inference (the model's forward was compiled for
    another size already, so the first inference size is compiled dynamic at once)."""
    docs = (ROOT / "docs" / "training.md").read_text()
    section = docs.split("\n## Compiling\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert block == (ROOT / "examples" / "compile_snippet.py").read_text()
    runpy.run_path(str(ROOT / "examples" / "compile_snippet.py"))
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in printed] == [
        "step 0",
        "step 1",
        "304x352",
        "352x304",
        "321x367",
    ]
    losses = [float(line.split("loss ")[1]) for line in printed[:2]]
    assert all(0 < loss < 10 for loss in losses)
    assert all(float(line.rsplit(" ", 1)[1]) <= 1e-4 for line in printed[2:])
    assert graphs() == 2
