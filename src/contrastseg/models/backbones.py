"""timm backbones that return a list of feature maps, dilated to a given output stride."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from contrastseg.errors import CheckpointError, ConfigError

# Our name -> timm model name. More backbones join this table as they are added.
TIMM_NAMES = {
    "mobilenetv3_large": "mobilenetv3_large_100",
    "resnet101": "resnet101",
}


class TimmBackbone(nn.Module):
    """A timm feature extractor.

    ``forward(x: (B, 3, H, W)) -> list[(B, C_i, H / s_i, W / s_i)]`` with ``channels[i]`` and
    ``strides[i]``; the stride of the last map is ``output_stride``. ``aux_index`` is the map the
    auxiliary head reads (the stage before the last) and ``out_index`` the last one.
    """

    def __init__(self, name: str, output_stride: int = 8) -> None:
        super().__init__()
        if name not in TIMM_NAMES:
            raise ConfigError(
                f"model.backbone.name = {name!r}: allowed values are {sorted(TIMM_NAMES)}"
            )
        self.name = name
        self.body = timm.create_model(
            TIMM_NAMES[name], features_only=True, output_stride=output_stride, pretrained=False
        )
        self.channels: list[int] = list(self.body.feature_info.channels())
        self.strides: list[int] = [
            min(r, output_stride) for r in self.body.feature_info.reduction()
        ]
        self.out_index = len(self.channels) - 1
        self.aux_index = len(self.channels) - 2

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.body(x))


def load_backbone_weights(backbone: TimmBackbone, path: Path, strict: bool = True) -> None:
    """Load a local ``.pth``/``.pt`` or ``.safetensors`` file of timm (classification) weights.

    Keys of the classifier (absent from a feature extractor) are dropped. With ``strict`` any
    other missing or unexpected key is an error that lists them.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model.backbone.weights: {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any reader failure is reported with the path
        raise CheckpointError(f"{path}: cannot read backbone weights: {err}") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    own = backbone.body.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.startswith(("fc.", "classifier."))}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{path}: does not match backbone {backbone.name!r}; missing keys: {missing[:20]}"
            f"{' ...' if len(missing) > 20 else ''}; unexpected keys: {unexpected[:20]}"
            f"{' ...' if len(unexpected) > 20 else ''}. Set model.backbone.strict: false to load "
            "what matches."
        )
    backbone.body.load_state_dict(state, strict=False)
