import torch
import torch.nn.functional as F
from torch import nn

from contrastseg import PrototypeClassifier

torch.manual_seed(0)
num_classes, channels = 5, 32
images = torch.randn(2, 3, 64, 64)
labels = torch.randint(0, num_classes, (2, 64, 64))
labels[:, :8] = 255  # ignored

# Your model up to the features its classifier reads (here stride 4, 32 channels).
backbone = nn.Sequential(
    nn.Conv2d(3, channels, 3, stride=2, padding=1),
    nn.BatchNorm2d(channels),
    nn.ReLU(),
    nn.Conv2d(channels, channels, 3, stride=2, padding=1),
    nn.BatchNorm2d(channels),
    nn.ReLU(),
)
# The prototype classifier takes the place of the last 1x1 convolution: 4 prototypes a class.
classifier = PrototypeClassifier(num_classes, in_channels=channels, num_prototypes=4)
params = [*backbone.parameters(), *classifier.parameters()]  # the prototypes are a buffer
optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)

for step in range(2):
    out = classifier(backbone(images), labels)  # training: logits, PPC, PPD; prototypes moved
    logits = F.interpolate(out.logits, size=(64, 64), mode="bilinear", align_corners=True)
    ce = F.cross_entropy(logits, labels, ignore_index=255)
    loss = ce + out.loss()  # + 0.01 PPC + 0.001 PPD, the released weights
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(
        f"step {step}: ce {ce.item():.3f}  ppc {out.ppc.item():.3f}  ppd {out.ppd.item():.3f}  "
        f"prototypes moved {int(out.updated)}"
    )

backbone.eval()
classifier.eval()
with torch.no_grad():
    prediction = classifier(backbone(images)).argmax(1)  # inference: the logits only
print(f"prediction {tuple(prediction.shape)} on the 16x16 feature grid")
