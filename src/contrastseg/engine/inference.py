"""Using a trained checkpoint: evaluate it on a split, or predict masks for image files."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from contrastseg.config import DataConfig, EvalConfig, ExperimentConfig
from contrastseg.data import (
    IMAGE_EXTENSIONS,
    build_eval_dataset,
    colorize,
    load_image,
    normalize,
)
from contrastseg.engine.checkpoint import load_checkpoint
from contrastseg.engine.checkpoint_parts import (
    check_finite,
    check_model_parts,
    check_weights_fit,
)
from contrastseg.engine.compiling import compile_inference
from contrastseg.engine.evaluator import evaluate, format_table, write_eval_json
from contrastseg.engine.inference_modes import infer_scores
from contrastseg.engine.pretrained import hub_id, read_folder, resolve_folder
from contrastseg.engine.runtime import resolve_device
from contrastseg.errors import CheckpointError, DataError, one_line
from contrastseg.files import atomic_write, check_output_dir, real_path
from contrastseg.models import Segmentor, build_model

log = logging.getLogger("contrastseg")


def load_trained_model(
    path: Path, device: str | torch.device = "cpu"
) -> tuple[Segmentor, ExperimentConfig, dict]:
    """Rebuild the model of a checkpoint in eval mode (backbone, decode head, auxiliary head;
    the pixel-contrast module of a contrast run lives in ``state["loss"]``). The file is read
    safely and its digest checked (:func:`contrastseg.engine.checkpoint.load_checkpoint`); a
    missing or malformed part, weights that do not fit the model of its config, and non-finite
    weights raise ``CheckpointError`` naming the file and the part.

    ``path`` may also be a model folder (``model.safetensors`` + ``config.json``) or a Hub
    model id (``owner/name``, ``hf-hub:owner/name@rev``): :mod:`contrastseg.engine.pretrained`
    reads it (backbone and decode head; the state holds ``class_names``, ``palette``,
    ``iteration`` and the training recipe as ``config``)."""
    folder = resolve_folder(path)
    if folder is not None:
        model, cfg, state = read_folder(folder)
        device = resolve_device(str(device)) if isinstance(device, str) else device
        return model.to(device), cfg, state
    state = load_checkpoint(Path(path))
    parts = check_model_parts(path, state)
    check_finite(path, parts.weights)
    model = build_model(parts.config.model, len(parts.class_names), backbone_weights=False)
    check_weights_fit(path, parts.weights, model)
    try:
        model.load_state_dict(parts.weights)
    except RuntimeError as err:
        raise CheckpointError(
            f"{path}: weights do not fit the model of its config: {one_line(err)[:300]}"
        ) from err
    device = resolve_device(str(device)) if isinstance(device, str) else device
    return model.to(device).eval(), parts.config, state


def with_checkpoint_input(data: DataConfig, trained: DataConfig, checkpoint: Path) -> DataConfig:
    """``data`` with the checkpoint's input convention: the ``mean`` and ``std`` its model was
    trained (or converted) with, on RGB images in [0, 1] (contrastseg's only channel order; a
    converted model has the released BGR order folded into its first convolution). A config
    that says otherwise is overridden, with a one-line notice."""

    def same(a, b) -> bool:
        return all(abs(float(x) - float(y)) <= 1e-6 for x, y in zip(a, b, strict=True))

    if same(data.mean, trained.mean) and same(data.std, trained.std):
        return data
    log.warning(
        "%s: normalising with the checkpoint's data.mean=%s data.std=%s (RGB), not the "
        "config's %s %s",
        checkpoint,
        _numbers(trained.mean),
        _numbers(trained.std),
        _numbers(data.mean),
        _numbers(data.std),
    )
    return data.model_copy(update={"mean": trained.mean, "std": trained.std})


def _numbers(values) -> str:
    return "[" + ", ".join(f"{float(v):.6g}" for v in values) + "]"


def predict_ids(model: Segmentor, cfg: ExperimentConfig, rgb: np.ndarray) -> np.ndarray:
    """Single-scale whole-image prediction with a checkpoint's config ``cfg``: its input
    convention (``data.mean``, ``data.std``) and the corner alignment of its logits'
    upsampling (``eval.align_corners``); (H, W, 3) uint8 RGB -> (H, W) uint8 class ids."""
    device = next(model.parameters()).device
    x = normalize(rgb, cfg.data.mean, cfg.data.std)[None].to(device)
    scores = infer_scores(model, x, EvalConfig(align_corners=cfg.eval.align_corners))
    return scores.argmax(1)[0].to("cpu", torch.uint8).numpy()


def eval_json_path(checkpoint: Path, out: Path | None = None) -> Path:
    """Where :func:`evaluate_checkpoint` writes: ``out``, else ``eval.json`` of the run the
    checkpoint belongs to (``runs/NAME/checkpoints/X.pt`` -> ``runs/NAME/eval.json``); for a
    model folder or a Hub model id, ``eval.json`` in the current folder (a folder may be
    shared or a read-only download)."""
    if out:
        return out
    if Path(checkpoint).is_dir() or hub_id(checkpoint) is not None:
        return Path("eval.json")
    return real_path(checkpoint).parent.parent / "eval.json"


def evaluate_checkpoint(
    cfg: ExperimentConfig,
    checkpoint: Path,
    split: str | None = None,
    out: Path | None = None,
    print_table: bool = True,
    compile: bool | None = None,
) -> dict:
    """Evaluate ``checkpoint`` on a split of the data ``cfg`` describes, as ``cfg.eval`` says;
    writes ``eval.json``. Images are normalised as the checkpoint's model expects
    (:func:`with_checkpoint_input`). ``compile`` (None: ``cfg.eval.compile``): infer through
    ``torch.compile`` with ``cfg.eval.compile_backend`` and ``compile_mode``
    (:func:`contrastseg.engine.compiling.compile_inference`: a graph for the first size, a
    dynamic one for the others)."""
    model, trained, state = load_trained_model(checkpoint, cfg.train.device)
    if cfg.eval.compile if compile is None else compile:
        model = compile_inference(model, cfg.eval.compile_backend, cfg.eval.compile_mode)
    device = next(model.parameters()).device
    dataset = build_eval_dataset(with_checkpoint_input(cfg.data, trained.data, checkpoint), split)
    if list(dataset.classes) != list(state["class_names"]):
        trained = state["config"].get("data", {})
        raise CheckpointError(
            f"{checkpoint}: trained on {len(state['class_names'])} classes "
            f"{state['class_names']}, but the data set of this config (data.name = "
            f"{cfg.data.name!r}) has {len(dataset.classes)} {list(dataset.classes)}; evaluate "
            f"it on data with the classes it was trained on (its run used data.name = "
            f"{trained.get('name')!r}, data.root = {trained.get('root')!r}) or pass a "
            "checkpoint trained on these classes"
        )
    metrics, _ = evaluate(
        model, dataset, device, cfg.eval.batch_size, cfg.data.num_workers, eval_cfg=cfg.eval
    )
    out = eval_json_path(checkpoint, out)
    write_eval_json(
        metrics,
        dataset.classes,
        out,
        iteration=state["iteration"],
        checkpoint=str(checkpoint),
        split=split or cfg.data.val_split,
    )
    if print_table:
        print(format_table(metrics, list(dataset.classes)))
    return metrics


def expand_images(inputs: list[Path]) -> list[Path]:
    """Files as given, and the image files inside given folders (sorted)."""
    files, missing = _collect_images(inputs)
    if missing:
        raise DataError(f"{missing[0]}: no such file or folder")
    if not files:
        raise DataError(f"no images found in {[str(p) for p in inputs]}")
    return files


def _collect_images(inputs: list[Path]) -> tuple[list[Path], list[Path]]:
    """(image files, given paths that do not exist)."""
    files: list[Path] = []
    missing: list[Path] = []
    for p in map(Path, inputs):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.is_file():
            files.append(p)
        else:
            missing.append(p)
    return files, missing


# Written in this order, each atomically: an image whose mask exists is finished.
OUTPUT_SUFFIXES = ("_labels.png", "_overlay.png", "_mask.png")


def prediction_paths(stem: str, out_dir: Path) -> list[Path]:
    """The files ``predict`` writes for an image of stem ``stem``: labels, overlay, mask."""
    return [Path(out_dir) / f"{stem}{suffix}" for suffix in OUTPUT_SUFFIXES]


def _write_png(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def save_prediction(
    stem: str, rgb: np.ndarray, pred: np.ndarray, palette: np.ndarray, out_dir: Path, alpha: float
) -> Path:
    """Write ``<stem>_labels.png`` (class ids), ``<stem>_overlay.png`` and ``<stem>_mask.png``
    (palette colours) for an (H, W) uint8 class-id map, each atomically (a crash leaves a file
    whole or absent); returns the mask path."""
    color = colorize(pred, palette)
    overlay = (alpha * color + (1 - alpha) * rgb).round().astype(np.uint8)
    labels_path, overlay_path, mask_path = prediction_paths(stem, out_dir)
    _write_png(labels_path, pred)
    _write_png(overlay_path, overlay)
    _write_png(mask_path, color)
    return mask_path


@dataclass(frozen=True)
class Skipped:
    """An input that got no prediction, and why."""

    path: Path
    reason: str


class PredictResult(list):
    """The mask paths written (a list, in input order), plus ``skipped`` (inputs that got no
    prediction, with the reason; each was named in a warning when it was skipped) and
    ``existing`` (inputs whose three outputs were already there and were kept, with
    ``skip_existing``)."""

    def __init__(self, out_dir: Path) -> None:
        super().__init__()
        self.out_dir = Path(out_dir)
        self.skipped: list[Skipped] = []
        self.existing: list[Path] = []

    @property
    def ok(self) -> bool:
        return not self.skipped

    @property
    def failed(self) -> bool:
        """Every input was skipped: nothing written, nothing kept."""
        return bool(self.skipped) and not self and not self.existing

    def summary(self) -> str:
        """``done: 4 of 5 images (3 written to OUT, 1 already there); skipped 1 (...)``: the
        counts (the skipped inputs were each named, with the reason, in a warning)."""
        total = len(self) + len(self.existing) + len(self.skipped)
        head = f"done: {len(self) + len(self.existing)} of {total} images ({len(self)} written to "
        head += f"{self.out_dir}, {len(self.existing)} already there); skipped {len(self.skipped)}"
        return head + (" (each named in a warning above)" if self.skipped else "")


def _one_line(err: Exception, path: Path) -> str:
    text = one_line(err)
    return text.removeprefix(f"{path}: ") or type(err).__name__


def predict_files(
    images: list[Path],
    out_dir: Path,
    infer: Callable[[np.ndarray], np.ndarray],
    palette: np.ndarray,
    alpha: float = 0.5,
    strict: bool = False,
    skip_existing: bool = False,
) -> PredictResult:
    """Run ``infer`` ((H, W, 3) uint8 RGB -> (H, W) uint8 class ids) on every image of
    ``images`` (files, and the images inside folders) and write its outputs into ``out_dir``.

    An input that cannot be read or predicted (missing, corrupt, over the pixel limit of
    :func:`contrastseg.data.pixel_limit`, a size the model cannot take), or whose outputs would
    overwrite another input's (same stem), is skipped with a one-line warning and listed in the
    result's ``skipped``; with ``strict`` the first one raises ``DataError`` instead. With
    ``skip_existing`` an input whose three outputs exist is not predicted again (each output is
    written atomically, so existing files are whole). ``out_dir`` is created with the first
    output, so a run that writes nothing leaves none; a file there raises ``OutputError``.
    """
    out_dir = check_output_dir(out_dir, "predict --out")
    files, missing = _collect_images(images)
    if strict and missing:
        raise DataError(f"{missing[0]}: no such file or folder")
    if not files and not missing:
        raise DataError(f"no images found in {[str(p) for p in images]}")
    result = PredictResult(out_dir)

    def skip(path: Path, reason: str) -> None:
        log.warning("skipped %s: %s", path, reason)
        result.skipped.append(Skipped(path, reason))

    for path in missing:
        skip(path, "no such file or folder")
    owners: dict[str, Path] = {}
    for path in files:
        if path.stem in owners:
            reason = (
                f"its outputs {path.stem}_*.png would overwrite those of {owners[path.stem]}; "
                "rename one of them"
            )
            if strict:
                raise DataError(f"{path}: {reason}")
            skip(path, reason)
            continue
        owners[path.stem] = path
        if skip_existing and all(p.is_file() for p in prediction_paths(path.stem, out_dir)):
            result.existing.append(path)
            continue
        try:
            rgb = load_image(path)
            pred = infer(rgb)
        except DataError as err:
            if strict:
                raise
            skip(path, _one_line(err, path))
            continue
        except (RuntimeError, ValueError) as err:  # e.g. a size the model cannot take
            if strict:
                raise DataError(f"{path}: prediction failed: {_one_line(err, path)}") from err
            skip(path, f"prediction failed: {_one_line(err, path)}")
            continue
        result.append(save_prediction(path.stem, rgb, pred, palette, out_dir, alpha))
    return result


@torch.no_grad()
def predict(
    checkpoint: Path,
    images: list[Path],
    out_dir: Path,
    alpha: float = 0.5,
    strict: bool = False,
    skip_existing: bool = False,
    compile: bool = False,
    compile_backend: str = "inductor",
) -> PredictResult:
    """Write, per image, ``<stem>_mask.png`` (palette colours), ``<stem>_overlay.png`` and
    ``<stem>_labels.png`` (class ids) into ``out_dir``. Returns the mask paths written, with the
    inputs skipped and kept (see :func:`predict_files` for ``strict`` and ``skip_existing``).
    ``compile``: infer through ``torch.compile`` (``compile_backend``): the first image's size
    compiles a graph, a second size one with height and width dynamic that every later size
    takes (:func:`contrastseg.engine.compiling.compile_inference`)."""
    model, cfg, state = load_trained_model(checkpoint, "auto")
    if compile:
        model = compile_inference(model, compile_backend)
    palette = np.asarray(state["palette"], dtype=np.uint8)

    def infer(rgb: np.ndarray) -> np.ndarray:
        return predict_ids(model, cfg, rgb)

    return predict_files(images, out_dir, infer, palette, alpha, strict, skip_existing)
