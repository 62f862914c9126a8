"""The tiny model and data the training tests run on: a few iterations take a second or two."""

TINY = [
    "data.name=synthetic",
    "data.image_size=[64, 64]",
    "data.crop_size=[48, 48]",
    "model.head_channels=16",
    "model.aux_channels=8",
    "model.projection_dim=16",
    "train.device=cpu",
]
