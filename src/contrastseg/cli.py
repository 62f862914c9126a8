"""Command line: parses arguments, then calls the public API. Nothing else lives here."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from contrastseg.errors import ContrastSegError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Semantic segmentation with cross-image pixel contrast.",
)
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print side-by-side ratios.")
app.add_typer(bench_app, name="bench")

Overrides = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config value, e.g. --set train.iters=200."),
]


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


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
    from contrastseg import load_config
    from contrastseg import train as run_training

    cfg = load_config(config, overrides or [])
    result = run_training(cfg, resume=resume, progress=progress)
    typer.echo(
        f"run: {result.run_dir}  iterations: {result.iteration}  "
        f"val mIoU: {100 * result.metrics['mIoU']:.2f}%"
    )


@app.command("eval")
def evaluate(
    config: Annotated[Path, typer.Argument(help="Experiment YAML file (for the data).")],
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint file to evaluate.")],
    split: Annotated[str | None, typer.Option(help="Split name (default: data.val_split).")] = None,
    out: Annotated[Path | None, typer.Option(help="Where to write eval.json.")] = None,
    overrides: Overrides = None,
) -> None:
    """Evaluate a checkpoint (single-scale, whole image); print the table, write eval.json."""
    from contrastseg import evaluate_checkpoint, load_config

    cfg = load_config(config, overrides or [])
    metrics = evaluate_checkpoint(cfg, checkpoint, split=split, out=out)
    typer.echo(f"mIoU: {100 * metrics['mIoU']:.2f}%")


@app.command()
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files or folders of images.")],
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint file.")],
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("predictions"),
) -> None:
    """Colour-coded masks, overlays and label-id PNGs for images."""
    from contrastseg import predict as run_predict

    written = run_predict(checkpoint, images, out)
    typer.echo(f"wrote {len(written)} predictions to {out}")


@bench_app.command("loss")
def bench_loss(
    batch: Annotated[list[int] | None, typer.Option(help="Batch sizes.")] = None,
    repeats: Annotated[int, typer.Option(help="Timed repeats (median).")] = 3,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
) -> None:
    """Pixel-contrast loss, forward+backward: vectorised vs. a loop per image and class."""
    from contrastseg.benchmarks.contrast_loss import format_loss_benchmark, run_loss_benchmark

    kwargs = {"repeats": repeats, "device": device}
    if batch:
        kwargs["batch_sizes"] = tuple(batch)
    typer.echo(format_loss_benchmark(run_loss_benchmark(**kwargs)))


@bench_app.command("step")
def bench_step(
    config: Annotated[Path, typer.Argument(help="Experiment YAML (model and contrast settings).")],
    batch: Annotated[int, typer.Option(help="Batch size.")] = 2,
    height: Annotated[int, typer.Option(help="Input height.")] = 256,
    width: Annotated[int, typer.Option(help="Input width.")] = 512,
    classes: Annotated[int, typer.Option(help="Number of classes.")] = 19,
    repeats: Annotated[int, typer.Option(help="Timed repeats of each (median).")] = 5,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    overrides: Overrides = None,
) -> None:
    """s/iter of a train step with and without contrast, and the overhead in percent."""
    from contrastseg import load_config
    from contrastseg.benchmarks.train_step import format_step_benchmark, run_step_benchmark

    cfg = load_config(config, overrides or [])
    row = run_step_benchmark(cfg, classes, batch, (height, width), repeats, device)
    typer.echo(format_step_benchmark(row))


def main() -> None:
    """Entry point: turns contrastseg's own errors into a one-line message and exit code 2."""
    _setup_logging()
    try:
        app(standalone_mode=False)
    except ContrastSegError as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        sys.exit(2)
    except typer.Exit as err:
        sys.exit(err.exit_code)
    except typer.Abort:
        sys.exit(130)
    except Exception as err:  # click usage errors
        import click

        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(err.exit_code)
        raise
