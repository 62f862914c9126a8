"""``contrastseg figures ...``: the command line of the result figures (arguments only)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

figures_app = typer.Typer(
    no_args_is_help=True,
    help="Result figures: baseline vs. ours with improved regions, t-SNE of pixel embeddings.",
)

DeviceOpt = Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")]
SplitOpt = Annotated[str | None, typer.Option(help="Split of the data set (default: val).")]
DataRootOpt = Annotated[
    Path | None, typer.Option(help="Use this data.root instead of the checkpoint config's.")
]


@figures_app.command("compare")
def compare(
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
    from contrastseg.viz.compare import compare_checkpoints
    from contrastseg.viz.samples import parse_indices

    if images and indices is not None:
        raise DataError("pass either IMAGES or --indices, not both")
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
def embeddings(
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
    from contrastseg.viz.embeddings import embedding_figure

    written = embedding_figure(checkpoints, out, per_class, images, seed, split, device, data_root)
    typer.echo("wrote " + ", ".join(str(p) for p in written))
