import torch
import torch.nn.functional as F

from contrastseg import build_model, load_config
from contrastseg.engine.compiling import compile_inference, compile_training

# A small model. aot_eager compiles in seconds and computes what eager computes; inductor, the
# default backend, is the one that makes a step faster, and compiles for a minute or more on a CPU.
cfg = load_config(
    None,
    [
        "model.backbone.name=timm:mobilenetv3_small_050",
        "model.head_channels=16",
        "model.aux_channels=8",
        "train.compile=true",
        "train.compile_backend=aot_eager",
    ],
)
torch.manual_seed(0)
model = build_model(cfg.model, num_classes=5, backbone_weights=False)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
images = torch.randn(2, 3, 64, 64)
labels = torch.randint(0, 5, (2, 64, 64))

# What the trainer does with train.compile: true. The losses stay outside the compiled forward.
forward = compile_training(model, cfg.train.compile_backend, cfg.train.compile_mode)
for step in range(2):
    seg = F.interpolate(forward(images, labels=labels)["seg"], size=(64, 64), mode="bilinear")
    loss = F.cross_entropy(seg, labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(f"step {step}: loss {loss.item():.4f}")

# What eval.compile: true and predict --compile do. A size other than one compiled before gets a
# graph with height and width dynamic, and every later size takes it (here at once: the model was
# compiled for 64x64 above; in a new process the first size gets a graph of its own first).
model.eval()
infer = compile_inference(model, "aot_eager")
with torch.no_grad():
    for h, w in [(304, 352), (352, 304), (321, 367)]:
        x = torch.randn(1, 3, h, w)
        diff = (infer(x)["seg"] - model(x)["seg"]).abs().max().item()
        print(f"{h}x{w}: largest difference to eager {diff:.1e}")
