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
