"""Command line: parses arguments, then calls the public API. Nothing else lives here."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from contrastseg.datasets_table import MAX_IMAGE_PIXELS
from contrastseg.errors import ContrastSegError, TrainingInterrupted, one_line

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,  # main() prints one line; no rich traceback boxes
    help="Semantic segmentation with cross-image pixel contrast.",
)
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print side-by-side ratios.")
app.add_typer(bench_app, name="bench")
data_app = typer.Typer(no_args_is_help=True, help="Data set integrity checks.")
app.add_typer(data_app, name="data")
checkpoint_app = typer.Typer(no_args_is_help=True, help="Checkpoint file conversion.")
app.add_typer(checkpoint_app, name="checkpoint")
figures_app = typer.Typer(
    no_args_is_help=True,
    help="Result figures: baseline vs. ours with improved regions, t-SNE of pixel embeddings.",
)
app.add_typer(figures_app, name="figures")
config_app = typer.Typer(no_args_is_help=True, help="Experiment configs.")
app.add_typer(config_app, name="config")

Overrides = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config value, e.g. --set train.iters=200."),
]

Device = Annotated[str, typer.Option(help="cpu or cuda.")]
Amp = Annotated[str, typer.Option(help="off, bf16 or fp16.")]
Batch = Annotated[int, typer.Option(help="Batch size.")]


def _setup_logging() -> None:
    """contrastseg's own INFO lines; other libraries' only from WARNING up (e.g. the ONNX
    exporter's optimiser passes log every step at INFO)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("contrastseg").setLevel(logging.INFO)


def _print_version(value: bool) -> None:
    if value:
        from contrastseg import __version__

        typer.echo(f"contrastseg {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Semantic segmentation with cross-image pixel contrast."""


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="Experiment YAML file.")],
    overrides: Overrides = None,
    resume: Annotated[
        bool, typer.Option(help="Continue from the run's newest checkpoint.")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Train a model, checkpoint it, evaluate it on the val split."""
    from contrastseg.config import load_config

    cfg = load_config(config, overrides or [])
    if resume:  # a changed trajectory key is refused before anything is built
        from contrastseg.engine.resume import check_run_folder

        check_run_folder(cfg)
    # torch, the models and the data only once the config is known to be valid
    from contrastseg import train as run_training

    result = run_training(cfg, resume=resume, progress=progress)
    from contrastseg.rundir import median_s_per_iter

    try:
        s_iter = median_s_per_iter(result.run_dir / "metrics.jsonl")  # what report tables
    except ContrastSegError as err:  # the run is done: a damaged old record costs the timing
        logging.getLogger("contrastseg").warning("no s/iter in the summary: %s", err)
        s_iter = None
    timing = f"  s/iter: {s_iter:.3f} (median of the logged windows)" if s_iter else ""
    typer.echo(
        f"run: {result.run_dir}  iterations: {result.iteration}  "
        f"val mIoU: {100 * result.metrics['mIoU']:.2f}%{timing}"
    )


@app.command("eval")
def evaluate(
    config: Annotated[Path, typer.Argument(help="Experiment YAML file (for the data).")],
    checkpoint: Annotated[
        Path, typer.Option(help="Checkpoint file, model folder or Hub id (owner/name) to evaluate.")
    ],
    split: Annotated[str | None, typer.Option(help="Split name (default: data.val_split).")] = None,
    out: Annotated[Path | None, typer.Option(help="Where to write eval.json.")] = None,
    overrides: Overrides = None,
) -> None:
    """Evaluate a checkpoint (as the config's eval section says: whole image or sliding
    window, scales, flip); print the table, write eval.json (default: the checkpoint's run's,
    replacing it). The model is the checkpoint's: --set model.* is refused."""
    from contrastseg.config import load_config
    from contrastseg.errors import ConfigError

    model_keys = [o.split("=", 1)[0].strip() for o in overrides or []]
    model_keys = [k for k in model_keys if k == "model" or k.startswith("model.")]
    if model_keys:
        raise ConfigError(
            f"eval: --set {', '.join(model_keys)} would be ignored: the model is built from the "
            "config saved in the checkpoint; drop the model.* overrides"
        )
    cfg = load_config(config, overrides or [])
    # torch, the models and the data only once the config is known to be valid
    from contrastseg import evaluate_checkpoint
    from contrastseg.engine.inference import eval_json_path
    from contrastseg.files import check_output_file

    out = check_output_file(eval_json_path(checkpoint, out), "eval --out")
    existed = out.exists()
    metrics = evaluate_checkpoint(cfg, checkpoint, split=split, out=out)
    typer.echo(
        f"mIoU: {100 * metrics['mIoU']:.2f}%  ({'replaced' if existed else 'wrote'} {out}; "
        "--out writes elsewhere)"
    )


@app.command()
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files or folders of images.")],
    checkpoint: Annotated[
        Path | None, typer.Option(help="Checkpoint file, model folder or Hub id (owner/name).")
    ] = None,
    onnx: Annotated[
        Path | None,
        typer.Option(help="Exported MODEL.onnx (with MODEL.onnx.json), run by onnxruntime."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("predictions"),
    strict: Annotated[
        bool,
        typer.Option(
            "--strict", help="Stop at the first unreadable image (default: skip it and go on)."
        ),
    ] = False,
    skip_existing: Annotated[
        bool,
        typer.Option(
            "--skip-existing", help="Keep the outputs of images already done (rerun after a crash)."
        ),
    ] = False,
    max_pixels: Annotated[
        int,
        typer.Option(
            "--max-pixels",
            min=1,
            help="Refuse an image whose header claims more pixels (width x height), before "
            "decoding it (default 2**26 = 8192 x 8192).",
        ),
    ] = MAX_IMAGE_PIXELS,
    compile: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="With --checkpoint: infer through torch.compile (inductor). The first image "
            "compiles, a second size once more (height and width dynamic), then no more.",
        ),
    ] = False,
) -> None:
    """Colour-coded masks, overlays and label-id PNGs for images. Each file is written
    atomically; an unreadable image is skipped with a warning, and the run ends with a summary
    and, when any was skipped, one error line and exit status 2 (when every one was, the --out
    folder is not created)."""
    from contrastseg.data.fileio import pixel_limit
    from contrastseg.errors import ConfigError, DataError
    from contrastseg.files import check_output_dir

    if (checkpoint is None) == (onnx is None):
        got = "both" if checkpoint is not None else "neither"
        raise ConfigError(f"predict: give one of --checkpoint CKPT or --onnx MODEL.onnx, got {got}")
    if compile and onnx is not None:
        raise ConfigError(
            "predict: --compile applies to --checkpoint only; an --onnx model runs in "
            "onnxruntime, which torch.compile does not reach: drop --compile"
        )
    check_output_dir(out, "predict --out")  # before the model is loaded
    with pixel_limit(max_pixels):
        if onnx is not None:
            from contrastseg.onnx_predict import predict_onnx

            result = predict_onnx(onnx, images, out, strict=strict, skip_existing=skip_existing)
        else:
            from contrastseg import predict as run_predict

            result = run_predict(
                checkpoint,
                images,
                out,
                strict=strict,
                skip_existing=skip_existing,
                compile=compile,
            )
    if result.failed:
        raise DataError(
            f"predict: none of the {len(result.skipped)} input(s) could be predicted (each is "
            f"named in a warning above); nothing was written to {out}"
        )
    typer.echo(result.summary())
    if not result.ok:  # bad input, like every other: status 2 (1 means a bug)
        raise DataError(
            f"predict: {len(result.skipped)} input(s) could not be predicted (each is named in "
            f"a warning above); the other {len(result) + len(result.existing)} are in {out}"
        )


@app.command("export")
def export_model(
    checkpoint: Annotated[
        Path, typer.Argument(help="Checkpoint file, model folder or Hub id (owner/name).")
    ],
    format: Annotated[
        str,
        typer.Option(
            "--format",
            help="onnx, torchscript, torch-export (a torch.export program, .pt2) or hub (a "
            "model folder: model.safetensors, config.json, README.md).",
        ),
    ] = "onnx",
    out: Annotated[
        Path | None,
        typer.Option(
            help="Model file, or folder for hub (default: next to CKPT, .onnx, "
            ".torchscript.pt, .pt2 or NAME_model/)."
        ),
    ] = None,
    opset: Annotated[int | None, typer.Option(help="ONNX opset, 18 or newer (default 18).")] = None,
) -> None:
    """Export the inference model (no auxiliary or projection head) and its JSON sidecar, or,
    with --format hub, as a model folder (model.safetensors, config.json, README.md) that
    from_pretrained, predict and eval load. CKPT may be a checkpoint, a model folder or a Hub id."""
    from contrastseg.export import export_checkpoint, sidecar_path
    from contrastseg.files import check_output_file

    if format == "hub":
        from contrastseg.errors import ConfigError

        if opset is not None:
            raise ConfigError(f"opset {opset}: an opset applies to --format onnx only, not 'hub'")
        from contrastseg.hub import check_new_folder, default_folder, save_pretrained

        folder = check_new_folder(out if out is not None else default_folder(checkpoint))
        written = save_pretrained(checkpoint, folder)
        typer.echo(
            f"wrote {written}/ (model.safetensors, config.json, README.md); load it with "
            f"from_pretrained({str(written)!r}) or --checkpoint {written}"
        )
        return
    if out is not None:  # before the slow export: the model file and its sidecar
        check_output_file(out, "export --out")
        check_output_file(sidecar_path(out), "the sidecar of export --out")
    result = export_checkpoint(checkpoint, out, format=format, opset=opset)
    typer.echo(
        f"wrote {result.model} and {result.sidecar.name} "
        f"(max |logit - PyTorch| {result.max_abs_diff:.2g} on random inputs)"
    )


@checkpoint_app.command("upgrade")
def checkpoint_upgrade(
    old: Annotated[Path, typer.Argument(help="Checkpoint to convert (kept as it is).")],
    new: Annotated[Path, typer.Argument(help="Where to write it in the current format (new).")],
) -> None:
    """Rewrite a checkpoint in the current format: format 1 (projection head in the model) to
    2 (in the contrast module's state); an argparse.Namespace or NumPy array a script added
    becomes a dict or tensor; a file written before content digests gets one. Nothing the file
    names beyond plain data classes is imported or run."""
    from contrastseg.engine.checkpoint import FORMAT_VERSION, upgrade_file
    from contrastseg.files import check_output_file

    version = upgrade_file(old, check_output_file(new, "checkpoint upgrade NEW"))
    typer.echo(
        f"wrote {new}: format {version} -> {FORMAT_VERSION}, with a content digest "
        f"({old} unchanged)"
    )


@app.command("convert")
def convert(
    src: Annotated[Path, typer.Argument(help="Checkpoint (.pth) of the authors' released code.")],
    out: Annotated[Path, typer.Argument(help="Where to write the contrastseg file.")],
    keys: Annotated[bool, typer.Option(help="List every key's mapping.")] = False,
) -> None:
    """Convert a released ContrastiveSeg checkpoint (HRNet-W48, +OCR, DeepLabV3-R101, OCR-R101)
    to a contrastseg checkpoint, or its HRNetV2 ImageNet weights to a backbone weights file."""
    from contrastseg.convert import convert_file, format_conversion

    typer.echo(format_conversion(convert_file(src, out), keys=keys, out=out))


@app.command("models")
def models_list(
    classes: Annotated[int, typer.Option(help="Number of classes for the counts.")] = 19,
) -> None:
    """Every architecture (model.head x model.backbone.name) with its parameter count."""
    from contrastseg.models.summary import format_models, list_models

    typer.echo(format_models(list_models(classes)))


@app.command()
def summary(
    config: Annotated[Path, typer.Argument(help="Experiment YAML file (its model section).")],
    height: Annotated[
        int | None, typer.Option(help="Input height for the FLOPs (default: data.crop_size's).")
    ] = None,
    width: Annotated[
        int | None, typer.Option(help="Input width for the FLOPs (default: data.crop_size's).")
    ] = None,
    classes: Annotated[
        int | None,
        typer.Option(help="Number of classes (default: the config's data set's, read from it)."),
    ] = None,
    overrides: Overrides = None,
) -> None:
    """Parameters and FLOPs of the inference and of the training model of a config, for its
    data set's classes at its crop size (--classes, --height, --width set others)."""
    from contrastseg import load_config
    from contrastseg.models.summary import format_summary, summarize

    cfg = load_config(config, overrides or [])
    if classes is None:
        classes = _config_classes(cfg)
    size = (height or cfg.data.crop_size[0], width or cfg.data.crop_size[1])
    typer.echo(format_summary(summarize(cfg.model, classes, size)))


def _config_classes(cfg) -> int:
    """The number of classes of the config's data set (val split), from its source."""
    from contrastseg.data.build import open_source
    from contrastseg.errors import ConfigError

    try:
        return len(open_source(cfg.data, cfg.data.val_split).classes)
    except ContrastSegError as err:
        raise ConfigError(
            f"summary: the number of classes comes from the data set, which did not open "
            f"({err}); pass --classes N"
        ) from None


@app.command()
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run directories (runs/NAME).")],
    table: Annotated[str, typer.Option(help="1, 2 or all.")] = "all",
    csv: Annotated[Path | None, typer.Option(help="Also write the rows as CSV here.")] = None,
    out: Annotated[Path | None, typer.Option(help="Also write the markdown here.")] = None,
    checkpoint: Annotated[
        str,
        typer.Option(
            help="last: each run's final evaluation; best: its best periodic evaluation "
            "(checkpoints/best.pt, kept with train.eval_every)."
        ),
    ] = "last",
) -> None:
    """The supplement's Table 1 (s/iter, mIoU and gain) and Table 2 (losses) from run dirs."""
    from contrastseg.files import check_output_file
    from contrastseg.report import parse_tables, write_report
    from contrastseg.rundir import load_runs

    parse_tables(table)  # a wrong --table fails before any run is read
    for path, option in ((out, "report --out"), (csv, "report --csv")):
        if path is not None:
            check_output_file(path, option)
    typer.echo(write_report(load_runs(run_dirs, checkpoint), out, csv, table), nl=False)


@config_app.command("show")
def config_show(
    config: Annotated[Path, typer.Argument(help="Experiment YAML file.")],
    overrides: Overrides = None,
) -> None:
    """Print the fully resolved config as YAML (base file merged, --set applied, every default
    filled in), e.g. to compare two recipes with diff."""
    from contrastseg import show_config

    typer.echo(show_config(config, overrides or []), nl=False)


@bench_app.command("loss")
def bench_loss(
    batch: Annotated[list[int] | None, typer.Option(help="Batch sizes.")] = None,
    repeats: Annotated[int, typer.Option(help="Timed repeats (median).")] = 3,
    device: Device = "cpu",
) -> None:
    """Pixel-contrast loss, forward+backward: vectorised vs. a loop per image and class."""
    from contrastseg.benchmarks.contrast_loss import format_loss_benchmark, run_loss_benchmark

    kwargs = {"repeats": repeats, "device": device}
    if batch:
        kwargs["batch_sizes"] = tuple(batch)
    typer.echo(format_loss_benchmark(run_loss_benchmark(**kwargs)))


@bench_app.command("memory")
def bench_memory(
    anchors: Annotated[int, typer.Option(help="Anchors (N).")] = 1024,
    classes: Annotated[int, typer.Option(help="Classes (C).")] = 19,
    slots: Annotated[int, typer.Option(help="Memory entries per class (K).")] = 10_000,
    repeats: Annotated[int, typer.Option(help="Timed repeats (median).")] = 3,
    device: Device = "cpu",
) -> None:
    """Contrast loss against a full memory (`all`): streamed, kept and class-slot variants."""
    from contrastseg.benchmarks.memory_loss import format_memory_benchmark, run_memory_benchmark

    times = run_memory_benchmark(anchors, classes, slots, repeats=repeats, device=device)
    header = f"{anchors} anchors x {classes} classes x {slots} entries, D 256, {device}"
    typer.echo(format_memory_benchmark(times, header))


@bench_app.command("step")
def bench_step(
    config: Annotated[Path, typer.Argument(help="Experiment YAML (model and contrast settings).")],
    batch: Batch = 2,
    height: Annotated[int, typer.Option(help="Input height.")] = 256,
    width: Annotated[int, typer.Option(help="Input width.")] = 512,
    classes: Annotated[int, typer.Option(help="Number of classes.")] = 19,
    repeats: Annotated[int, typer.Option(help="Timed repeats of each (median).")] = 5,
    device: Device = "cpu",
    amp: Amp = "off",
    overrides: Overrides = None,
    breakdown: Annotated[
        bool,
        typer.Option(
            "--breakdown",
            help="Split the contrast step into its parts (ms, % of the step) with each "
            "contrast part's floor: the same products as plain library calls, same run; with "
            "a prototype classifier, its parts and their floors too.",
        ),
    ] = False,
    compile: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="Also time both steps with the model's forward compiled (train.compile), "
            "interleaved with the eager ones: s/iter side by side, compiled/eager, and the "
            "first compiled step's seconds (the compilation, not in the medians).",
        ),
    ] = False,
    compile_backend: Annotated[
        str,
        typer.Option(
            "--compile-backend",
            help="With --compile: inductor, or aot_eager / eager (debugging backends).",
        ),
    ] = "inductor",
) -> None:
    """s/iter of a train step with and without contrast, and the overhead in percent."""
    from contrastseg import load_config
    from contrastseg.config import COMPILE_BACKENDS
    from contrastseg.errors import ConfigError

    if compile_backend not in COMPILE_BACKENDS:
        raise ConfigError(
            f"bench step --compile-backend {compile_backend!r}: allowed values are "
            + ", ".join(repr(b) for b in COMPILE_BACKENDS)
        )
    if compile and breakdown:
        raise ConfigError("bench step: --compile and --breakdown cannot be combined; pick one")
    cfg = load_config(config, overrides or [])
    if breakdown:
        from contrastseg.benchmarks.breakdown import (
            check_breakdown_settings,
            format_breakdown,
            run_breakdown,
        )

        check_breakdown_settings(amp)
        result = run_breakdown(cfg, classes, batch, (height, width), repeats, device)
        typer.echo(format_breakdown(result))
        return
    from contrastseg.benchmarks.train_step import format_step_benchmark, run_step_benchmark

    row = run_step_benchmark(
        cfg,
        classes,
        batch,
        (height, width),
        repeats,
        device,
        amp,
        compile_backend=compile_backend if compile else None,
    )
    typer.echo(format_step_benchmark(row))


@bench_app.command("train")
def bench_train(
    models: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            help="Config stems: Table 1's and pspnet_resnet101, deeplabv3plus_xception71, "
            "upernet_convnext_tiny (default: all).",
        ),
    ] = None,
    config_dir: Annotated[Path, typer.Option(help="Folder of Table 1 configs.")] = Path(
        "configs/cityscapes"
    ),
    batch: Batch = 2,
    height: Annotated[int, typer.Option(help="Crop height.")] = 512,
    width: Annotated[int, typer.Option(help="Crop width.")] = 1024,
    repeats: Annotated[int, typer.Option(help="Timed repeats of each (median).")] = 5,
    device: Device = "cpu",
    amp: Amp = "off",
) -> None:
    """Table 1 timing: s/iter of each model (Table 1's, then PSPNet, DeepLabV3+ and UPerNet) with
    and without contrast, overhead, peak memory."""
    from contrastseg.benchmarks.train_step import format_table1, run_table1_benchmark

    rows = run_table1_benchmark(config_dir, models, batch, (height, width), repeats, device, amp)
    typer.echo(format_table1(rows))


@bench_app.command("losses")
def bench_losses(
    batch: Batch = 2,
    height: Annotated[int, typer.Option(help="Label height.")] = 512,
    width: Annotated[int, typer.Option(help="Label width.")] = 1024,
    classes: Annotated[int, typer.Option(help="Number of classes.")] = 19,
    stride: Annotated[int, typer.Option(help="Stride of the logits (HRNetV2: 4).")] = 4,
    repeats: Annotated[int, typer.Option(help="Timed repeats of each (median).")] = 3,
    device: Device = "cpu",
    threads: Annotated[int, typer.Option(help="CPU threads (0: torch's default).")] = 0,
) -> None:
    """Table 2 losses, forward+backward at a Cityscapes crop: ms and ratio to CE."""
    import torch

    from contrastseg.benchmarks.losses import format_losses_benchmark, run_losses_benchmark

    if threads:
        torch.set_num_threads(threads)
    result = run_losses_benchmark(batch, (height, width), classes, stride, repeats, device)
    typer.echo(format_losses_benchmark(result))


@bench_app.command("prototype")
def bench_prototype(
    batch: Batch = 2,
    height: Annotated[int, typer.Option(help="Feature grid height (HRNetV2: input / 4).")] = 64,
    width: Annotated[int, typer.Option(help="Feature grid width.")] = 64,
    classes: Annotated[int, typer.Option(help="Number of classes.")] = 19,
    channels: Annotated[int, typer.Option(help="Feature channels (HRNetV2-W48: 720).")] = 720,
    prototypes: Annotated[int, typer.Option(help="Prototypes per class.")] = 10,
    repeats: Annotated[int, typer.Option(help="Timed repeats of each (median).")] = 3,
    device: Device = "cpu",
) -> None:
    """ProtoSeg's prototype classifier: its train step batched over classes vs a loop per
    class (the released structure), same inputs, same run."""
    from contrastseg.benchmarks.prototype import bench_prototype as run
    from contrastseg.benchmarks.prototype import format_prototype_benchmark

    result = run(
        batch, (height, width), classes, channels, prototypes, repeats=repeats, device=device
    )
    typer.echo(format_prototype_benchmark(result))


@data_app.command("check")
def data_check(
    config: Annotated[Path, typer.Argument(help="Experiment YAML file (its data section).")],
    split: Annotated[
        list[str] | None,
        typer.Option(help="Split to scan (repeatable; default: data.train_split and val_split)."),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Check only the first N samples.")] = None,
    workers: Annotated[int, typer.Option(help="Threads decoding files in parallel.")] = 4,
    overrides: Overrides = None,
) -> None:
    """Read every image/label pair of a split: missing pairs, unreadable or truncated files,
    wrong channels, files over data.max_image_pixels (not decoded), size mismatches, label ids
    outside the classes; class frequencies.
    When anything is wrong, ends with one error line and exit status 2."""
    from contrastseg import load_config
    from contrastseg.data.check import check_split, format_report
    from contrastseg.errors import DataError

    cfg = load_config(config, overrides or [])
    splits = split or list(dict.fromkeys([cfg.data.train_split, cfg.data.val_split]))
    broken = []
    for name in splits:
        report = check_split(cfg, name, limit=limit, workers=workers)
        typer.echo(format_report(report))
        if not report.ok:
            broken.append(name)
    if broken:  # bad input, like every other: status 2 (1 means a bug)
        raise DataError(
            f"data check: split(s) {', '.join(broken)} of {config} have broken files (listed "
            "above with their kind and path)"
        )


@bench_app.command("data")
def bench_data(
    images: Annotated[int, typer.Option(help="Number of synthetic images to decode.")] = 8,
    workers: Annotated[
        list[int] | None, typer.Option(help="DataLoader worker counts (repeatable).")
    ] = None,
    height: Annotated[int, typer.Option(help="Image height.")] = 1024,
    width: Annotated[int, typer.Option(help="Image width.")] = 2048,
    crop_height: Annotated[int, typer.Option(help="Crop height.")] = 512,
    crop_width: Annotated[int, typer.Option(help="Crop width.")] = 1024,
    repeats: Annotated[int, typer.Option(help="Passes over the images per worker count.")] = 1,
) -> None:
    """Images/s of decode + augment at Cityscapes size, in one process and with N workers."""
    from contrastseg.benchmarks.data_loading import format_data_benchmark, run_data_benchmark

    result = run_data_benchmark(
        num_images=images,
        workers=tuple(workers) if workers else (0, 2),
        size=(height, width),
        crop=(crop_height, crop_width),
        repeats=repeats,
    )
    typer.echo(format_data_benchmark(result))


# ---------------------------------------------------------------------------- figures
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")]
SplitOpt = Annotated[str | None, typer.Option(help="Split of the data set (default: val).")]
DataRootOpt = Annotated[
    Path | None, typer.Option(help="Use this data.root instead of the checkpoint config's.")
]


@figures_app.command("compare")
def figures_compare(
    baseline: Annotated[Path, typer.Option(help="Checkpoint of the baseline.")],
    ours: Annotated[Path, typer.Option(help="Checkpoint of the model to show off.")],
    images: Annotated[
        list[Path] | None,
        typer.Argument(help="Image files or folders (default: samples --indices of the split)."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("figures"),
    indices: Annotated[
        str | None,
        typer.Option(help="Without IMAGES: samples of the split, e.g. 0-3,7 (default 0-3)."),
    ] = None,
    masks: Annotated[
        Path | None,
        typer.Option(help="With IMAGES: folder of <stem>.png masks (default: the data set's)."),
    ] = None,
    split: SplitOpt = None,
    min_area: Annotated[int, typer.Option(help="Smallest region boxed, in pixels.")] = 64,
    device: DeviceOpt = "auto",
    data_root: DataRootOpt = None,
) -> None:
    """Input | ground truth | baseline | ours, boxes where only ours is right.

    Writes <name>_compare.png and .pdf per image into --out."""
    from contrastseg.errors import DataError
    from contrastseg.files import check_output_dir
    from contrastseg.viz.compare import compare_checkpoints
    from contrastseg.viz.samples import parse_indices

    if images and indices is not None:
        raise DataError("pass either IMAGES or --indices, not both")
    check_output_dir(out, "figures compare --out")
    written = compare_checkpoints(
        baseline,
        ours,
        out,
        images=images or (),
        indices=parse_indices(indices or "0-3"),
        masks=masks,
        split=split,
        min_area=min_area,
        device=device,
        data_root=data_root,
    )
    typer.echo(f"wrote {len(written)} figures (PNG and PDF) to {out}")


@figures_app.command("embeddings")
def figures_embeddings(
    checkpoints: Annotated[list[Path], typer.Argument(help="Checkpoints, one panel each.")],
    out: Annotated[
        Path, typer.Option(help="Figure file: .png, or .pdf (writes the PNG beside it too).")
    ] = Path("figures/embeddings.png"),
    per_class: Annotated[int, typer.Option(help="Pixels sampled per class.")] = 200,
    images: Annotated[int, typer.Option(help="Number of split images to sample from.")] = 20,
    seed: Annotated[int, typer.Option(help="Seed of the pixel sampling and of t-SNE.")] = 0,
    split: SplitOpt = None,
    device: DeviceOpt = "auto",
    data_root: DataRootOpt = None,
) -> None:
    """t-SNE of pixel embeddings, one panel per checkpoint.

    Pixels are sampled per class from validation images. Checkpoints trained with contrast
    show their projection-head output, others the features the projection head would read."""
    from contrastseg.files import check_output_file
    from contrastseg.viz.embeddings import embedding_figure

    check_output_file(out, "figures embeddings --out")
    written = embedding_figure(checkpoints, out, per_class, images, seed, split, device, data_root)
    typer.echo("wrote " + ", ".join(str(p) for p in written))


def _is_click_error(err: BaseException) -> bool:
    """A click (or typer's vendored click) ``ClickException``, recognised by its class names so
    that any typer/click release qualifies, whichever module its exceptions live in."""
    names = {cls.__name__ for cls in type(err).__mro__}
    return "ClickException" in names and callable(getattr(err, "format_message", None))


def _usage_error_lines(err: BaseException) -> list[str]:
    """``error: ...`` first, then the usage line and the ``--help`` hint when known."""
    message = one_line(err.format_message())
    cause = err.__cause__
    errors = getattr(cause, "errors", None)  # typer's pydantic coercion drops the value itself
    if callable(errors):
        try:
            got = [e["input"] for e in errors() if isinstance(e.get("input"), str)]
        except Exception:  # a message without the value is still a message
            got = []
        if got and repr(got[0]) not in message:
            message += f" (got {got[0]!r})"
    lines = [f"error: {message}"]
    ctx = getattr(err, "ctx", None)
    if ctx is not None:
        try:
            lines.append(one_line(ctx.get_usage()))
            lines.append(f"Try '{ctx.command_path} {ctx.help_option_names[0]}' for help.")
        except Exception:  # the error line alone is enough
            pass
    return lines


def _os_error_line(err: OSError) -> str:
    """``PATH: reason`` of an ``OSError`` that names a path (both paths for a rename)."""
    name = str(err.filename)
    shown = name if len(name) <= 200 else f"{name[:100]}...{name[-60:]} ({len(name)} characters)"
    if err.filename2 is not None:
        shown += f" -> {err.filename2}"
    return one_line(f"{shown}: {err.strerror or type(err).__name__}")


def _error_line(err: BaseException) -> str:
    """The message of a contrastseg error as the one line after ``error:``: a message of several
    lines (every invalid key of a config, every refused key of a resumed run) has its lines
    joined with "; ", and every run of whitespace made one space."""
    lines = [one_line(line) for line in str(err).splitlines()]
    return "; ".join(line for line in lines if line) or type(err).__name__


def _internal_error(err: BaseException) -> None:
    """One line naming an unexpected exception and the file holding its traceback, exit 1.
    CONTRASTSEG_TRACEBACK=1 prints the traceback instead."""
    import os
    import tempfile
    import time
    import traceback

    text = "".join(traceback.format_exception(err))
    first = one_line(str(err).splitlines()[0]) if str(err).strip() else ""
    name = f"{type(err).__name__}: {first}" if first else type(err).__name__
    if os.environ.get("CONTRASTSEG_TRACEBACK", "") not in ("", "0"):
        sys.stderr.write(text)
        typer.secho(f"error: internal error: {name}", fg="red", err=True)
        sys.exit(1)
    try:
        folder = Path(tempfile.gettempdir()) / "contrastseg"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"traceback-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
        path.write_text(text, encoding="utf-8")
        where = f"traceback in {path}"
    except OSError:
        where = "traceback not written"
    typer.secho(
        f"error: internal error: {name} ({where}; CONTRASTSEG_TRACEBACK=1 prints it)",
        fg="red",
        err=True,
    )
    sys.exit(1)


def main() -> None:
    """Entry point. contrastseg's own errors and usage errors (whatever typer/click release
    raises them) print one ``error:`` line (a message of several lines joined with "; ") and
    exit with status 2; bare ``contrastseg`` or a bare command group prints its help and exits
    with 0; anything unexpected prints one line naming it and where its traceback was written,
    and exits with 1."""
    _setup_logging()
    try:
        code = app(standalone_mode=False)  # a command's typer.Exit(n) comes back as n here
        if isinstance(code, int) and code:
            sys.exit(code)
    except TrainingInterrupted as err:
        typer.secho(str(err), fg="yellow", err=True)
        sys.exit(128 + err.signum)
    except ContrastSegError as err:
        typer.secho(f"error: {_error_line(err)}", fg="red", err=True)
        sys.exit(2)
    except OSError as err:
        if err.filename is None:  # no path to blame: unexpected
            _internal_error(err)
        # the system refused a path the user gave or the run needs: a name too long, no
        # permission, no space left, a read-only disk
        typer.secho(f"error: {_os_error_line(err)}", fg="red", err=True)
        sys.exit(2)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as err:
        names = {cls.__name__ for cls in type(err).__mro__}
        if "NoArgsIsHelpError" in names:  # bare command: its help, as --help prints it
            typer.echo(err.format_message())
            sys.exit(0)
        if _is_click_error(err):
            lines = _usage_error_lines(err)
            typer.secho(lines[0], fg="red", err=True)
            for line in lines[1:]:
                typer.echo(line, err=True)
            code = getattr(err, "exit_code", 2)
            sys.exit(code if isinstance(code, int) and code else 2)
        if "Exit" in names and isinstance(getattr(err, "exit_code", None), int):
            sys.exit(err.exit_code)
        if "Abort" in names:
            sys.exit(130)
        _internal_error(err)
