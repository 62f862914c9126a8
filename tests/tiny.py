"""The tiny model and data the training tests run on: a few iterations take a second or two.

The backbone is timm's MobileNetV3-Small at width 0.5 (0.4 M parameters, dilated to output
stride 8 like the project's own MobileNets): the training machinery under test does not depend
on the backbone, and a step costs about 0.4 of MobileNetV3-Large's on one CPU thread."""

TINY = [
    "data.name=synthetic",
    "model.backbone.name=timm:mobilenetv3_small_050",
    "data.image_size=[64, 64]",
    "data.crop_size=[48, 48]",
    "model.head_channels=16",
    "model.aux_channels=8",
    "model.projection_dim=16",
    "train.device=cpu",
]

# Pixel contrast with a small memory, sized for the tiny crops (a 6x6 embedding grid has few
# pixels per class, hence max_views 4): the resume and restart tests train with it.
SMALL_CONTRAST = [
    "loss.contrast.enabled=true",
    "loss.contrast.max_samples=64",
    "loss.contrast.max_views=4",
    "loss.contrast.memory.enabled=true",
    "loss.contrast.memory.pixel_size=64",
    "loss.contrast.memory.pixels_per_image=4",
    "loss.contrast.memory.region_size=32",
]


def train_tiny_checkpoint(root, *extra: str):
    """Train the tiny model for 2 iterations on 8 synthetic images into ``root/run`` (one
    checkpoint, at iteration 2, then the val evaluation on 2 images, eval.json); ``extra``
    overrides. Returns (the config, the checkpoint's path)."""
    from contrastseg import load_config, train
    from contrastseg.engine import checkpoint as ckpt

    cfg = load_config(
        None,
        [
            *TINY,
            "data.train_size=8",
            "data.val_size=2",
            "train.iters=2",
            "train.batch_size=4",
            "train.checkpoint_every=2",
            "eval.batch_size=2",
            "eval.figure_images=1",
            f"output.root={root}",
            "output.name=run",
            *extra,
        ],
    )
    result = train(cfg, progress=False)
    return cfg, ckpt.list_checkpoints(result.run_dir / "checkpoints")[-1]


def zoo_run_overrides(root, head: str, backbone: str) -> list[str]:
    """The tiny settings for a 2-iteration run of ``head`` on ``backbone`` (4 training and 2
    val images, batch 2, a log line per iteration, one checkpoint) into ``root``."""
    return [
        *TINY,
        f"model.head={head}",
        f"model.backbone.name={backbone}",
        "data.train_size=4",
        "data.val_size=2",
        "train.iters=2",
        "train.batch_size=2",
        "train.log_every=1",
        "train.checkpoint_every=2",
        "eval.batch_size=2",
        "eval.figure_images=0",
        f"output.root={root}",
    ]
