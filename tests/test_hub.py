"""Model folders (model.safetensors + config.json + README.md): a trained checkpoint ->
`export --format hub` -> `from_pretrained` gives the checkpoint's logits; `predict` and `eval`
with the folder give the checkpoint's masks and metrics; a Hub id loads from the Hugging Face
cache offline; the folder holds no pickle; damage and malformed fields are one line, status 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from contrastseg import (
    PretrainedModel,
    from_pretrained,
    load_config,
    load_trained_model,
    save_pretrained,
)
from contrastseg.config import ExperimentConfig
from contrastseg.digest import content_digest
from contrastseg.engine.pretrained import file_sha256, hub_id
from contrastseg.errors import CheckpointError, OutputError
from contrastseg.hub import folder_info, write_folder
from contrastseg.models import InferenceModel, build_model
from tiny import TINY, train_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
FILES = {"model.safetensors", "config.json", "README.md"}


def _script() -> str:
    beside = Path(sys.executable).parent / "contrastseg"
    found = str(beside) if beside.exists() else shutil.which("contrastseg")
    assert found, "the contrastseg console script is not installed"
    return found


def console(*argv: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it."""
    return subprocess.run(
        [_script(), *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "80", "OMP_NUM_THREADS": "1", **env},
    )


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A 2-iteration checkpoint trained with pixel contrast (so it holds projection and
    auxiliary weights the folder must leave out) and evaluated at its end (eval.json),
    exported through the console script; three images of odd sizes."""
    root = tmp_path_factory.mktemp("hub")
    cfg, path = train_tiny_checkpoint(
        root, "loss.contrast.enabled=true", "loss.contrast.max_views=4"
    )
    done = console("export", str(path), "--format", "hub", "--out", "model", cwd=root)
    assert done.returncode == 0, done.stderr
    images = root / "images"
    images.mkdir()
    gen = np.random.default_rng(0)
    for name, size in (("a", (40, 56)), ("b", (33, 47)), ("c", (64, 64))):
        Image.fromarray(gen.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
            images / f"{name}.png"
        )
    segmentor, cfg_ck, state = load_trained_model(path)
    return SimpleNamespace(
        root=root,
        cfg=cfg,
        checkpoint=path,
        folder=root / "model",
        images=images,
        segmentor=segmentor,
        state=state,
        export_stdout=done.stdout,
    )


def copy_folder(shared, tmp_path: Path, name: str = "m") -> Path:
    dest = tmp_path / name
    shutil.copytree(shared.folder, dest)
    return dest


def reseal(folder: Path, drop_digest: bool = False) -> None:
    """Record the current weights' SHA-256 and a new digest in config.json: an edit made on
    purpose, so that the checks behind the digest are reached."""
    info = json.loads((folder / "config.json").read_text())
    if (folder / "model.safetensors").is_file():
        info["weights"]["sha256"] = file_sha256(folder / "model.safetensors")
    info.pop("digest", None)
    if not drop_digest:
        info["digest"] = content_digest(info)
    (folder / "config.json").write_text(json.dumps(info))


# ----------------------------------------------------------------------------- round trips
def test_from_pretrained_gives_the_checkpoints_logits(shared):
    model = from_pretrained(shared.folder)
    assert isinstance(model, PretrainedModel) and not model.training
    net = InferenceModel(shared.segmentor).eval()
    gen = torch.Generator().manual_seed(0)
    for shape in ((1, 3, 64, 64), (2, 3, 48, 80), (1, 3, 37, 53)):
        x = torch.randn(shape, generator=gen)
        with torch.no_grad():
            got, ref = model(x), net(x)
        assert got.shape == (shape[0], 7, *shape[2:])
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    assert model.class_names == shared.state["class_names"]
    assert model.palette.tolist() == [list(c) for c in shared.state["palette"]]
    assert model.mean == [0.485, 0.456, 0.406] and model.std == [0.229, 0.224, 0.225]
    assert "from_pretrained('model')" in shared.export_stdout


def test_folder_holds_the_inference_weights_and_no_pickle(shared):
    assert {p.name for p in shared.folder.iterdir()} == FILES
    raw = (shared.folder / "model.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])  # safetensors: a JSON header, then raw bytes
    assert header["__metadata__"] == {"format": "pt"}
    for name in FILES:
        data = (shared.folder / name).read_bytes()
        assert not data.startswith(b"PK") and not data.startswith(b"\x80")  # no zip, no pickle
        assert b"torch._utils" not in data and b"c__builtin__" not in data
    tensors = load_file(str(shared.folder / "model.safetensors"))
    net_keys = set(InferenceModel(shared.segmentor).state_dict())
    assert set(tensors) == net_keys
    assert not [k for k in tensors if k.startswith("aux.") or "projection" in k]
    assert any(k.startswith("aux.") for k in shared.state["model"])  # the checkpoint had them
    for name, value in tensors.items():
        torch.testing.assert_close(value, shared.state["model"][name], rtol=0, atol=0)


def test_config_json_and_model_card_describe_the_model(shared):
    info = json.loads((shared.folder / "config.json").read_text())
    assert info["contrastseg_model_format"] == 1
    assert info["class_names"] == shared.state["class_names"]
    assert info["num_classes"] == 7 and len(info["palette"]) == 7
    assert info["input"]["mean"] == [0.485, 0.456, 0.406] and info["input"]["channels"] == "RGB"
    assert info["model"]["head"] == "deeplabv3"
    assert info["model"]["backbone"]["name"] == "timm:mobilenetv3_small_050"
    assert info["evaluation"]["procedure"] == shared.cfg.eval.model_dump(mode="json")
    run_eval = json.loads((shared.checkpoint.parents[1] / "eval.json").read_text())
    assert info["evaluation"]["results"]["mIoU"] == run_eval["mIoU"]
    assert info["evaluation"]["results"]["iteration"] == 2
    recipe = info["training"]["recipe"]
    assert info["training"] == {"data": "synthetic", "iterations": 2, "recipe": recipe}
    assert recipe["loss"]["contrast"]["enabled"] is True and recipe["train"]["iters"] == 2
    assert "output" not in recipe and "root" not in recipe["data"]  # the training machine's
    assert str(shared.root) not in json.dumps(info)
    assert info["weights"]["sha256"] == file_sha256(shared.folder / "model.safetensors")
    assert info["digest"] == content_digest(info)
    card = (shared.folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: contrastseg\npipeline_tag: image-segmentation\n")
    assert f"| mIoU | {100 * run_eval['mIoU']:.2f} |" in card
    assert "| 1 | striped_disc | (128, 0, 0) |" in card
    assert "pixel contrast (weight 0.1)" in card and 'from_pretrained("model")' in card


def test_predict_with_the_folder_writes_the_checkpoints_masks(shared, tmp_path):
    for source, out in ((shared.checkpoint, "ck"), (shared.folder, "folder")):
        done = console(
            "predict", str(shared.images), "--checkpoint", str(source), "--out", out, cwd=tmp_path
        )
        assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert len(names) == 9 and names == sorted(p.name for p in (tmp_path / "folder").iterdir())
    for name in names:  # the same model and code: the same pixels
        ref = np.asarray(Image.open(tmp_path / "ck" / name))
        got = np.asarray(Image.open(tmp_path / "folder" / name))
        np.testing.assert_array_equal(got, ref, err_msg=name)


def test_eval_with_the_folder_scores_as_the_checkpoint(shared, tmp_path, run_cli, capsys):
    config = tmp_path / "cfg.yaml"
    config.write_text(
        "data:\n  name: synthetic\n  image_size: [64, 64]\n  val_size: 2\n"
        "train:\n  device: cpu\neval:\n  batch_size: 2\n"
    )
    args = ["eval", str(config), "--checkpoint"]
    assert run_cli(*args, str(shared.checkpoint), "--out", str(tmp_path / "ck.json")) == 0
    os.chdir(tmp_path)  # the folder's default: eval.json in the current folder
    assert run_cli(*args, str(shared.folder)) == 0
    assert "wrote eval.json" in capsys.readouterr().out
    ck, folder = (json.loads((tmp_path / n).read_text()) for n in ("ck.json", "eval.json"))
    for key in ("mIoU", "pixel_acc", "mean_acc", "fwIoU"):
        assert folder[key] == pytest.approx(ck[key], abs=1e-12)
    assert folder["iteration"] == ck["iteration"] == 2


def test_a_folder_saves_again_and_exports(shared, tmp_path, run_cli):
    model = from_pretrained(shared.folder)
    again = model.save_pretrained(tmp_path / "again")
    first = json.loads((shared.folder / "config.json").read_text())
    second = json.loads((again / "config.json").read_text())
    assert second == first  # same weights, same content, same digest
    card = (again / "README.md").read_text()
    assert card.replace("again", "model") == (shared.folder / "README.md").read_text()
    # a model folder is a source wherever a checkpoint is: export to ONNX and to a new folder
    assert run_cli("export", str(shared.folder), "--out", str(tmp_path / "m.onnx")) == 0
    assert (tmp_path / "m.onnx").is_file() and (tmp_path / "m.onnx.json").is_file()
    assert run_cli("export", str(again), "--format", "hub", "--out", str(tmp_path / "third")) == 0
    assert json.loads((tmp_path / "third" / "config.json").read_text()) == first


def test_other_heads_and_the_prototype_classifier_round_trip(tmp_path):
    """Heads with an auxiliary head beside the decode head (PSPNet), inside it (OCR), and a
    prototype classifier (its generator state is not stored; a fresh one stands in)."""
    cases = {
        "pspnet": ["model.head=pspnet", "model.head_channels=16"],
        "ocr": [
            "model.head=ocr",
            "model.ocr_mid_channels=16",
            "model.ocr_key_channels=8",
            "model.ocr_aux_channels=16",
        ],
        "prototype": ["model.classifier=prototype", "model.prototype.num_prototypes=2"],
    }
    gen = torch.Generator().manual_seed(0)
    for name, extra in cases.items():
        cfg = load_config(None, [*TINY, *extra])
        model = build_model(cfg.model, 4, backbone_weights=False).eval()
        for p in model.parameters():  # away from the initialisation a fresh build gives
            p.data.normal_(0, 0.1, generator=gen)
        state = {"class_names": list("abcd"), "palette": [[i, i, i] for i in range(4)]}
        info = folder_info(cfg, {**state, "config": cfg.to_dict(), "iteration": 5}, None)
        from contrastseg.engine.pretrained import inference_weights

        folder = write_folder(tmp_path / name, inference_weights(model), info)
        loaded = from_pretrained(folder)
        x = torch.randn(2, 3, 64, 64, generator=gen)
        with torch.no_grad():
            torch.testing.assert_close(
                loaded(x), InferenceModel(model).eval()(x), rtol=0, atol=1e-6, msg=name
            )
        if name == "pspnet":
            assert model.aux is not None and loaded._segmentor[0].aux is None


def test_predict_of_the_model_equals_the_commands_masks(shared, tmp_path):
    model = from_pretrained(shared.folder)
    rgb = np.asarray(Image.open(shared.images / "a.png").convert("RGB"))
    done = console(
        "predict",
        str(shared.images / "a.png"),
        "--checkpoint",
        "model",
        "--out",
        str(tmp_path),
        cwd=shared.root,
    )
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(
        model.predict(rgb), np.asarray(Image.open(tmp_path / "a_labels.png"))
    )


# ----------------------------------------------------------------------------- the Hub
def fake_hub_cache(shared, cache: Path, repo: str, commit: str) -> None:
    """The Hugging Face cache's layout after a download of ``repo`` at ``commit``."""
    entry = cache / f"models--{repo.replace('/', '--')}"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    shutil.copytree(shared.folder, entry / "snapshots" / commit)


def test_a_hub_id_loads_from_the_cache_offline(shared, tmp_path):
    cache = tmp_path / "cache"
    commit = "0123456789abcdef0123456789abcdef01234567"
    fake_hub_cache(shared, cache, "someone/tiny-demo", commit)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    for source, out in (("someone/tiny-demo", "a"), (f"hf-hub:someone/tiny-demo@{commit}", "b")):
        done = console(
            "predict", str(shared.images), "--checkpoint", source, "--out", out, cwd=tmp_path, **env
        )
        assert done.returncode == 0, done.stderr
    done = console(
        "predict", str(shared.images), "--checkpoint", shared.checkpoint, "--out", "c", cwd=tmp_path
    )
    for name in ("a_labels.png", "b_labels.png", "c_labels.png"):
        ref = np.asarray(Image.open(tmp_path / "c" / name))
        for out in ("a", "b"):
            np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / out / name)), ref)
    missing = console(
        "predict",
        str(shared.images),
        "--checkpoint",
        "someone/other",
        "--out",
        "d",
        cwd=tmp_path,
        **env,
    )
    assert missing.returncode == 2 and not (tmp_path / "d").exists()
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: someone/other: no such local file")
    assert "Hugging Face Hub" in lines[0]


def test_hub_ids_are_told_from_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub_id("owner/name") == ("owner/name", None)
    assert hub_id("hf-hub:owner/name@v1.0") == ("owner/name", "v1.0")
    assert hub_id("runs/missing.pt") is None  # a missing checkpoint, reported as such
    assert hub_id("a/b/c") is None and hub_id("/abs/path") is None
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "name").mkdir()
    assert hub_id("owner/name") is None  # a local folder wins
    with pytest.raises(CheckpointError, match="not a Hub model id"):
        hub_id("hf-hub:../x")


def test_push_to_hub_uploads_the_three_files(shared, monkeypatch):
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, private, exist_ok, repo_type):
            calls.append(("create", repo_id, private, exist_ok, repo_type))

        def upload_folder(self, repo_id, folder_path, allow_patterns, commit_message):
            calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
            return SimpleNamespace(commit_url=f"https://hub.example/{repo_id}/commit/1")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = from_pretrained(shared.folder).push_to_hub("me/tiny", token="t")
    assert url == "https://hub.example/me/tiny/commit/1"
    assert calls == [
        ("token", "t"),
        ("create", "me/tiny", False, True, "model"),
        ("upload", "me/tiny", sorted(FILES)),
    ]


# ----------------------------------------------------------------------------- refusals
def one_error_line(done: SimpleNamespace, *names: str) -> str:
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert any(n in lines[0] for n in names), (names, lines[0])
    return lines[0]


@pytest.fixture
def predict_with(shared, tmp_path, run_cli, capsys):
    """``contrastseg predict`` in-process on the images with ``--checkpoint FOLDER``: its status
    and stderr; a refusal must write nothing."""

    def run(folder: Path) -> SimpleNamespace:
        capsys.readouterr()
        out = tmp_path / "P"
        code = run_cli(
            "predict", str(shared.images), "--checkpoint", str(folder), "--out", str(out)
        )
        if code != 0:
            assert not out.exists()
        return SimpleNamespace(returncode=code, stderr=capsys.readouterr().err)

    return run


def flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_byte_anywhere_is_refused_naming_the_file(shared, tmp_path, predict_with):
    """One bit of either file, at positions across the file: the weights' header, its tensor
    bytes, and config.json's keys, values, digest and whitespace."""
    for name in ("model.safetensors", "config.json"):
        size = (shared.folder / name).stat().st_size
        for i, at in enumerate(np.linspace(0, size - 1, 6).astype(int)):
            folder = copy_folder(shared, tmp_path, f"{name}-{i}")
            flip(folder / name, int(at))
            line = one_error_line(predict_with(folder), f"{folder}/{name}")
            assert "Traceback" not in line


def test_a_missing_or_malformed_part_is_one_line(shared, tmp_path, predict_with):
    def edit(key: str, value=None, remove=False):
        def change(folder: Path) -> None:
            info = json.loads((folder / "config.json").read_text())
            *parents, last = key.split(".")
            node = info
            for part in parents:
                node = node[part]
            if remove:
                node.pop(last)
            else:
                node[last] = value
            (folder / "config.json").write_text(json.dumps(info))

        return change

    cases = {
        # the digest vouches for config.json: any change to a field is caught by it
        "class_names removed": (edit("class_names", remove=True), False, "digest"),
        # after a deliberate edit (digest renewed), each field's own check
        "class_names removed, resealed": (edit("class_names", remove=True), True, "class_names"),
        "model removed": (edit("model", remove=True), True, "'model'"),
        "num_classes off": (edit("num_classes", 6), True, "num_classes = 6"),
        "palette short": (edit("palette", [[0, 0, 0]]), True, "palette"),
        "mean of two": (edit("input.mean", [0.5, 0.5]), True, "input.mean"),
        "std zero": (edit("input.std", [0.2, 0.0, 0.2]), True, "input.std"),
        "BGR": (edit("input.channels", "BGR"), True, "input.channels"),
        "head unknown": (edit("model.head", "segformer"), True, "model.head"),
        "eval mode": (
            edit("evaluation.procedure.mode", "tiles"),
            True,
            "evaluation.procedure.mode",
        ),
        "format 2": (edit("contrastseg_model_format", 2), True, "format 2"),
        "not ours": (
            edit("contrastseg_model_format", remove=True),
            True,
            "contrastseg_model_format",
        ),
        "sha malformed": (edit("weights.sha256", "abc"), True, "weights.sha256"),
        "weights elsewhere": (edit("weights.file", "other.bin"), True, "'weights'"),
        "results a list": (edit("evaluation.results", [0.5]), True, "evaluation.results"),
        "mIoU a string": (edit("evaluation.results.mIoU", "high"), True, "results.mIoU"),
        "training a list": (edit("training", [1]), True, "'training'"),
        "recipe of lists": (edit("training.recipe.loss", [1]), True, "training.recipe"),
        "classes of another model": (edit("class_names", list("abcde")), True, "model.safetensors"),
    }
    for i, (what, (change, renew, named)) in enumerate(cases.items()):
        folder = copy_folder(shared, tmp_path, f"case{i}")
        change(folder)
        if renew:
            info = json.loads((folder / "config.json").read_text())
            info.pop("digest", None)
            info["digest"] = content_digest(info)
            (folder / "config.json").write_text(json.dumps(info))
        if what == "classes of another model":  # 5 names, and num_classes and palette to match
            info = json.loads((folder / "config.json").read_text())
            info["num_classes"], info["palette"] = 5, info["palette"][:5]
            info["evaluation"]["results"] = None  # its per-class lists are of 7
            info.pop("digest")
            info["digest"] = content_digest(info)
            (folder / "config.json").write_text(json.dumps(info))
        line = one_error_line(predict_with(folder), named)
        assert str(folder) in line, (what, line)


def test_damaged_weights_and_missing_files_are_one_line(shared, tmp_path, predict_with):
    tensors = load_file(str(shared.folder / "model.safetensors"))
    first = sorted(k for k, v in tensors.items() if v.is_floating_point())[0]

    def nan(folder):
        bad = dict(tensors)
        bad[first] = torch.full_like(bad[first], float("nan"))
        save_file(bad, str(folder / "model.safetensors"))

    def dropped(folder):
        save_file(
            {k: v for k, v in tensors.items() if k != first}, str(folder / "model.safetensors")
        )

    def truncated(folder):
        path = folder / "model.safetensors"
        path.write_bytes(path.read_bytes()[:1000])

    def halved(folder):
        bad = {k: v.half() if v.is_floating_point() else v.double() for k, v in tensors.items()}
        save_file(bad, str(folder / "model.safetensors"))

    def fifo(folder):
        (folder / "config.json").unlink()
        os.mkfifo(folder / "config.json")

    cases = {
        "non-finite weights, resealed": (nan, True, "non-finite"),
        "a tensor missing, resealed": (dropped, True, "does not fit"),
        "truncated, resealed": (truncated, True, "not a readable safetensors"),
        "integer where float, resealed": (halved, True, "is torch.float64"),
        "truncated": (truncated, False, "SHA-256"),
        "no weights": (lambda f: (f / "model.safetensors").unlink(), False, "missing"),
        "no config": (lambda f: (f / "config.json").unlink(), False, "missing"),
        "config a folder": (
            lambda f: (f / "config.json").unlink() or (f / "config.json").mkdir(),
            False,
            "not a regular file",
        ),
        "config a FIFO": (fifo, False, "not a regular file"),
        "config empty": (lambda f: (f / "config.json").write_bytes(b""), False, "empty"),
        "config a list": (lambda f: (f / "config.json").write_text("[1]"), False, "not an object"),
        "config not UTF-8": (lambda f: (f / "config.json").write_bytes(b"\xff{}"), False, "UTF-8"),
    }
    for i, (what, (change, renew, named)) in enumerate(cases.items()):
        folder = copy_folder(shared, tmp_path, f"case{i}")
        change(folder)
        if renew:
            reseal(folder)
        line = one_error_line(predict_with(folder), named)
        assert str(folder) in line, (what, line)


def test_a_folder_without_its_checks_loads_with_one_notice(shared, tmp_path, caplog):
    folder = copy_folder(shared, tmp_path)
    info = json.loads((folder / "config.json").read_text())
    del info["digest"], info["weights"]["sha256"]
    (folder / "config.json").write_text(json.dumps(info))
    with caplog.at_level("WARNING", logger="contrastseg"):
        from_pretrained(folder)
        from_pretrained(folder)
    notices = [r.getMessage() for r in caplog.records if "could not be checked" in r.getMessage()]
    assert len(notices) == 1 and "'digest'" in notices[0] and "weights.sha256" in notices[0]


def test_export_refuses_a_used_folder_and_leaves_nothing_half_written(
    shared, tmp_path, monkeypatch, run_cli, capsys
):
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    assert run_cli("export", str(shared.checkpoint), "--format", "hub", "--out", str(used)) == 2
    assert "already holds files" in capsys.readouterr().err
    assert [p.name for p in used.iterdir()] == ["keep.txt"]
    assert run_cli("export", str(shared.checkpoint), "--format", "hub", "--opset", "18") == 2
    assert "opset" in capsys.readouterr().err
    with pytest.raises(OutputError, match="is a file"):
        save_pretrained(shared.checkpoint, used / "keep.txt")

    import safetensors.torch

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match="No space"):
        save_pretrained(shared.checkpoint, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["used"]  # no folder, no leftovers


def test_from_pretrained_takes_a_checkpoint_too(shared):
    model = from_pretrained(shared.checkpoint)
    assert isinstance(model.config, ExperimentConfig)
    assert model.info["evaluation"]["results"] is None  # not recorded for a bare checkpoint
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(model(x), InferenceModel(shared.segmentor).eval()(x))


def test_the_deployment_snippet_runs_and_is_shown_verbatim(tmp_path, monkeypatch):
    import runpy

    snippet = ROOT / "examples" / "hub_snippet.py"
    text = (ROOT / "docs" / "deployment.md").read_text()
    assert f"```python\n{snippet.read_text()}```" in text
    monkeypatch.chdir(tmp_path)
    names = runpy.run_path(str(snippet))
    assert {p.name for p in Path(names["folder"]).iterdir()} == FILES
    model, ids, logits = names["model"], names["ids"], names["logits"]
    assert ids.shape == (64, 96) and ids.dtype == np.uint8
    assert logits.shape == (1, len(model.class_names), 64, 96)
    # predict() is the argmax of the logits, up to pixels whose two best classes tie to rounding
    top2 = logits[0].topk(2, dim=0).values
    clear = (top2[0] - top2[1]) > 1e-5
    assert torch.equal(torch.from_numpy(ids).long()[clear], logits[0].argmax(0)[clear])
    assert clear.float().mean() > 0.9
