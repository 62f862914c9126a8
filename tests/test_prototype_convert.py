"""``contrastseg convert`` of ProtoSeg's released ``hrnet_w48_proto`` layout (HRNet_W48_Proto):
every released key lands once (``proj_head.mlp2.*``, an alias of ``proj_head.proj.*``, is
dropped), and the converted model on RGB input gives the logits of a plain re-implementation of
the released forward on BGR input, written here from the released network's description."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from contrastseg.config import ModelConfig
from contrastseg.convert import (
    ALIAS_REASON,
    GENERATOR_REASON,
    LAYOUTS,
    convert_file,
    convert_state,
    detect_layout,
    format_conversion,
    to_released,
)
from contrastseg.engine.inference import load_trained_model
from contrastseg.models import build_model
from contrastseg.models.backbones import TimmBackbone
from contrastseg.prototype import PrototypeClassifier
from test_convert import bn, conv, released_backbone
from test_released_eval import random_weight
from test_released_files import save_like_the_released_trainer

K = 19  # Cityscapes classes
M = 10  # protoseg.num_prototype
BACKBONE = "hrnetv2_w18_small"  # 240 channels instead of W48's 720: the same layout, smaller


def released_proto_shapes(c: int) -> dict[str, tuple[int, ...]]:
    """HRNet_W48_Proto's own keys on ``c`` concatenated channels."""
    proj = {
        **conv("proj_head.proj.0", c, c, 1, True),
        **conv("proj_head.proj.2", c, c, 1, True),
    }
    return (
        conv("cls_head.0", c, c, 3, True)
        | bn("cls_head.1.0", c)
        | proj
        | {k.replace("proj_head.proj.", "proj_head.mlp2."): s for k, s in proj.items()}
        | {"feat_norm.weight": (c,), "feat_norm.bias": (c,)}
        | {"mask_norm.weight": (K,), "mask_norm.bias": (K,)}
        | {"prototypes": (K, M, c)}
    )


def random_released_state(seed: int = 0) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        c = sum(TimmBackbone(BACKBONE).channels)
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    shapes = released_backbone(BACKBONE) | released_proto_shapes(c)
    for key, shape in shapes.items():
        if key.startswith("proj_head.mlp2."):
            continue  # the alias: the same tensors, below
        if key == "prototypes":
            state[key] = F.normalize(torch.randn(shape, generator=gen), dim=-1)
        else:
            state[key] = random_weight(key, shape, gen)
    for key in list(state):
        if key.startswith("proj_head.proj."):
            state[key.replace("proj_head.proj.", "proj_head.mlp2.")] = state[key]
    return state


def released_forward(state: dict[str, torch.Tensor], bgr: torch.Tensor) -> torch.Tensor:
    """HRNet_W48_Proto.forward in eval mode, without labels, from the released keys: the
    backbone's four branches (the shared HRNet code, released variant, first conv on BGR),
    concatenated with aligned corners; cls_head (3x3 conv with bias, BN, ReLU; dropout is off);
    the projection head (1x1, ReLU, 1x1) L2-normalised over the last axis of (B, C, h, w);
    rows (b h w) through feat_norm and L2 normalisation; cosines to the L2-normalised
    prototypes; the best of each class's prototypes; mask_norm; back to (B, K, h, w)."""
    body = TimmBackbone(BACKBONE, variant="released")
    body.body.load_state_dict(
        {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    )
    x = body.eval()(bgr)
    h, w = x[0].shape[-2:]
    ups = [x[0]] + [F.interpolate(f, (h, w), mode="bilinear", align_corners=True) for f in x[1:]]
    feats = torch.cat(ups, 1)
    s = state
    c = F.conv2d(feats, s["cls_head.0.weight"], s["cls_head.0.bias"], padding=1)
    c = F.batch_norm(
        c,
        s["cls_head.1.0.running_mean"],
        s["cls_head.1.0.running_var"],
        s["cls_head.1.0.weight"],
        s["cls_head.1.0.bias"],
        training=False,
    ).relu()
    c = F.conv2d(c, s["proj_head.proj.0.weight"], s["proj_head.proj.0.bias"]).relu()
    c = F.conv2d(c, s["proj_head.proj.2.weight"], s["proj_head.proj.2.bias"])
    c = F.normalize(c, p=2, dim=-1)
    b, d = c.shape[:2]
    rows = c.permute(0, 2, 3, 1).reshape(-1, d)
    rows = F.layer_norm(rows, (d,), s["feat_norm.weight"], s["feat_norm.bias"])
    rows = F.normalize(rows, p=2, dim=-1)
    protos = F.normalize(s["prototypes"], p=2, dim=-1)
    masks = torch.einsum("nd,kmd->nmk", rows, protos)
    seg = F.layer_norm(masks.amax(1), (K,), s["mask_norm.weight"], s["mask_norm.bias"])
    return seg.reshape(b, h, w, K).permute(0, 3, 1, 2)


def test_every_released_key_lands_once_and_comes_back():
    state = random_released_state()
    assert detect_layout(state).name == "hrnet_w48_proto"
    result = convert_state(state, "released.pth")
    assert (result.backbone, result.num_classes) == (BACKBONE, K)
    assert set(result.dropped) == {k for k in state if k.startswith("proj_head.mlp2.")}
    assert set(result.dropped.values()) == {ALIAS_REASON}
    assert result.filled == {"head.classifier._extra_state": GENERATOR_REASON}
    assert result.mapping["prototypes"] == "head.classifier.prototypes"
    assert result.mapping["proj_head.proj.2.weight"] == "head.classifier.projection.2.weight"
    model = build_model(ModelConfig.model_validate(result.model_config), K, backbone_weights=False)
    assert isinstance(model.head.classifier, PrototypeClassifier)
    model.load_state_dict(result.state, strict=True)
    back = to_released(result)
    kept = {k: v for k, v in state.items() if not k.startswith("proj_head.mlp2.")}
    assert back.keys() == kept.keys() and all(torch.equal(back[k], kept[k]) for k in kept)
    assert "filled 1 keys: " + GENERATOR_REASON in format_conversion(result)
    # the plain HRNet layout is still told apart (no prototypes)
    plain = {k: v for k, v in state.items() if not k.startswith(("proj_head", "feat", "mask"))}
    plain.pop("prototypes")
    plain["cls_head.3.weight"] = torch.zeros(K, 240, 1, 1)
    assert detect_layout(plain).name == "hrnet_w48"


def test_converted_model_gives_the_released_logits(tmp_path):
    torch.manual_seed(0)
    state = random_released_state(1)
    src = save_like_the_released_trainer(state, tmp_path / "hrnet_w48_proto_max_performance.pth")
    out = tmp_path / "converted.pt"
    conversion = convert_file(src, out)
    assert conversion.layout is LAYOUTS["hrnet_w48_proto"]
    model, cfg, _ = load_trained_model(out)
    assert cfg.model.classifier == "prototype" and not model.training
    rgb = torch.randn(2, 3, 67, 93, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(rgb)["seg"]
        theirs = released_forward(state, rgb.flip(1))
    assert ours.shape == theirs.shape == (2, K, 17, 24)
    assert theirs.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
