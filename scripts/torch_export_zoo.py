"""Export architectures of the zoo to torch.export programs (.pt2) and print one table row each.

Each model is built from a config (random weights: no download, no checkpoint) and written by
the writer ``contrastseg export --format torch-export`` runs (:func:`contrastseg.export.
write_model`) into a temporary folder: exported, saved, loaded back and compared with PyTorch on
the export check's input shapes. A row gives the sizes the program accepts, the number of
run-time checks it carries, the largest |program - PyTorch| logit, the file's size and the
seconds taken; a model the exporter refuses gets the one-line refusal instead.

    python scripts/torch_export_zoo.py configs/cityscapes/*_ce.yaml
    python scripts/torch_export_zoo.py timm:swin_tiny_patch4_window7_224,upernet

An argument is a config file or ``BACKBONE,HEAD`` (the model section's defaults otherwise).
Runs on the CPU with one thread (``--threads N`` for more).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from contrastseg.config import ModelConfig, load_config
from contrastseg.errors import ContrastSegError
from contrastseg.export import write_model
from contrastseg.models import InferenceModel, build_model


def model_config(arg: str) -> tuple[str, ModelConfig]:
    if arg.endswith((".yaml", ".yml")):
        return arg, load_config(arg, ["model.backbone.pretrained=false"]).model
    backbone, head = arg.split(",")
    cfg = {"backbone": {"name": backbone, "pretrained": False}, "head": head}
    return arg, ModelConfig.model_validate(cfg)


def row(name: str, cfg: ModelConfig, folder: Path) -> str:
    torch.manual_seed(0)
    net = InferenceModel(build_model(cfg, 19, backbone_weights=False)).eval()
    model = f"{cfg.head} on {cfg.backbone.name}"
    start = time.perf_counter()
    out = folder / "model.pt2"
    try:
        written = write_model(net, out, "torch-export", model=model)
    except ContrastSegError as err:
        return f"| {name} | {model} | {cfg.classifier} | no | {err} |"
    seconds = time.perf_counter() - start
    sizes = written.sizes
    side = f"{sizes['height']['min']}x{sizes['width']['min']}"
    steps = {sizes["height"]["step"], sizes["width"]["step"]}
    if steps != {1}:
        side += f", steps {sizes['height']['step']}x{sizes['width']['step']}"
    megabytes = out.stat().st_size / 2**20
    out.unlink()
    return (
        f"| {name} | {model} | {cfg.classifier} | yes | from {side}, batch from "
        f"{sizes['batch']['min']} | {len(sizes['runtime_checks'])} | {written.max_abs_diff:.2g} "
        f"| {megabytes:.0f} MB | {seconds:.0f} s |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="config files or BACKBONE,HEAD")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        "| model | head on backbone | classifier | exports | accepted sizes | run-time checks "
        "| max abs diff | file | time |"
    )
    print("|---|---|---|---|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for arg in args.models:
            name, cfg = model_config(arg)
            print(row(name, cfg, Path(tmp)), flush=True)


if __name__ == "__main__":
    main()
