import torch
import torch.nn.functional as F
import torchvision

from contrastseg import PixelContrast
from contrastseg.data import SyntheticShapes

# A batch of 2 images of contrastseg's embedded data set (7 classes), 256x256.
data = SyntheticShapes("train", 2, (256, 256))
image = torch.stack([torch.from_numpy(data[i][0]).permute(2, 0, 1) / 255.0 for i in range(2)])
labels = torch.stack([torch.from_numpy(data[i][1]).long() for i in range(2)])
num_classes = len(data.classes)

# Your model, unchanged; a hook keeps the features its head reads (960 channels, stride 16).
model = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
    weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False
)
features = {}
model.backbone.register_forward_hook(lambda module, inputs, out: features.update(out))

# max_views: anchors per (image, class); a class must cover more grid pixels than that
# (the 16x16 grid here). The paper's warm-up would be warmup_iters=5000: a zero loss before.
contrast = PixelContrast(num_classes, in_channels=960, max_views=20, memory=True)
optimizer = torch.optim.SGD([*model.parameters(), *contrast.parameters()], lr=0.01, momentum=0.9)

for it in range(2):
    logits = model(image)["out"]
    ce = F.cross_entropy(logits, labels, ignore_index=255)
    loss_c, info = contrast(features["out"], logits, labels, step=it, return_diagnostics=True)
    loss = ce + 0.1 * loss_c  # features: what your head reads
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(f"step {it}: ce {ce.item():.3f}  contrast {loss_c.item():.3f}  anchors {info.anchors}")
