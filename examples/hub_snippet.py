import numpy as np
import torch

from contrastseg import from_pretrained, load_config, save_pretrained, train

# A small run for the example; any training checkpoint will do.
cfg = load_config(
    None,
    [
        "model.backbone.name=timm:mobilenetv3_small_050",
        "model.head_channels=16",
        "data.train_size=8",
        "data.val_size=2",
        "data.image_size=[64, 96]",
        "data.crop_size=[64, 96]",
        "train.iters=2",
        "train.batch_size=4",
        "train.device=cpu",
        "output.name=hub_example",
    ],
)
run = train(cfg, progress=False)
checkpoint = run.run_dir / "checkpoints" / "iter_0000002.pt"

# model.safetensors + config.json + README.md; the run's evaluation goes into both
folder = save_pretrained(checkpoint, "models/hub_example")
model = from_pretrained(folder)  # a Hub id works too: from_pretrained("owner/name")

rgb = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
ids = model.predict(rgb)  # (64, 96) uint8 class ids, as `contrastseg predict` writes them

# or the logits of a batch, normalised with the model's own mean and std
mean, std = torch.tensor(model.mean)[:, None, None], torch.tensor(model.std)[:, None, None]
x = (torch.from_numpy(rgb).permute(2, 0, 1).float() / 255 - mean) / std
with torch.no_grad():
    logits = model(x[None])  # (1, num_classes, 64, 96)
print(folder, model.class_names, ids.shape, tuple(logits.shape))
