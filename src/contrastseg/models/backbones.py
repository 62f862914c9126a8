"""timm backbones that return a list of feature maps.

Dilated backbones (ResNet, MobileNets) are dilated to ``output_stride``; HRNetV2 backbones return
their four raw branches (strides 4, 8, 16, 32), not timm's classification ("incre") features.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from contrastseg.errors import CheckpointError, ConfigError
from contrastseg.model_table import BACKBONES, BackboneEntry
from contrastseg.models.hrnet_fuse import fuse_to_target_size
from contrastseg.safe_load import check_readable, first_line, load_weights_only

# ``model.backbone.name: "timm:<model>"`` takes any timm model that gives feature maps.
TIMM_PREFIX = "timm:"
# Classification-head prefixes of common timm families, dropped when weights are loaded.
_TIMM_HEAD_PREFIXES = ("fc.", "classifier.", "head.", "head_fc.", "conv_head.", "bn2.", "norm.")


def backbone_spec(name: str) -> BackboneEntry:
    """The spec of one of the project's backbone names or of ``timm:<model>``."""
    if name in BACKBONES:
        return BACKBONES[name]
    if name.startswith(TIMM_PREFIX) and len(name) > len(TIMM_PREFIX):
        timm_name = name[len(TIMM_PREFIX) :]
        return BackboneEntry(
            name, timm_name, False, _TIMM_HEAD_PREFIXES, f"timm {timm_name}", timm_name
        )
    raise ConfigError(
        f"model.backbone.name = {name!r}: allowed values are {sorted(BACKBONES)} or "
        "'timm:<model>' for any timm model with features_only (e.g. 'timm:convnext_tiny')"
    )


class TimmBackbone(nn.Module):
    """A timm feature extractor.

    ``forward(x: (B, 3, H, W)) -> list[(B, C_i, H / s_i, W / s_i)]`` with ``channels[i]`` and
    ``strides[i]``. For dilated backbones the stride of the last map is ``output_stride``; for
    HRNet the list is the four branches (strides 4, 8, 16, 32) and ``output_stride`` is unused.
    ``aux_index`` is the map the auxiliary FCN head reads (the stage before the last) and
    ``out_index`` the last one. ``variant="released"`` applies :func:`use_released_ops`.
    """

    def __init__(
        self, name: str, output_stride: int = 8, pretrained: bool = False, variant: str = "timm"
    ) -> None:
        super().__init__()
        if variant not in ("timm", "released"):
            raise ConfigError(
                f"model.backbone.variant = {variant!r}: allowed values are ['released', 'timm']"
            )
        spec = backbone_spec(name)
        self.name = name
        self.spec = spec
        self.is_hrnet = spec.hrnet
        # Multi-level: all maps are used, upsampled to the first and concatenated (HRNet's
        # branches; a timm model that cannot be dilated).
        self.multi_level = spec.hrnet
        if spec.hrnet:
            # feature_location="" returns the raw branches; index 0 (the stem) is left out.
            kwargs = {"feature_location": "", "out_indices": (1, 2, 3, 4)}
        else:
            kwargs = {"output_stride": output_stride}
        try:
            try:
                self.body = timm.create_model(
                    spec.timm_name, features_only=True, pretrained=pretrained, **kwargs
                )
            except (TypeError, ValueError, AssertionError, NotImplementedError):
                if not name.startswith(TIMM_PREFIX):
                    raise
                # No dilation in this family: keep every level at its own stride.
                self.multi_level = True
                self.body = timm.create_model(
                    spec.timm_name, features_only=True, pretrained=pretrained
                )
        except Exception as err:  # noqa: BLE001 - no network, missing cache, hub errors
            if name.startswith(TIMM_PREFIX) and not isinstance(err, CheckpointError):
                raise ConfigError(
                    f"model.backbone.name = {name!r}: timm cannot give feature maps of "
                    f"{spec.timm_name!r} ({type(err).__name__}: {err}); choose a model that "
                    "supports features_only=True (timm.list_models() names them)"
                ) from err
            if not pretrained:
                raise
            raise CheckpointError(
                f"model.backbone.pretrained: cannot get timm's ImageNet weights of "
                f"{spec.timm_name!r} ({type(err).__name__}: {err}). Download them where there "
                "is network (e.g. timm.create_model(name, pretrained=True) and save its "
                "state_dict, or the model's .safetensors file), then set "
                "model.backbone.pretrained: false and model.backbone.weights: PATH"
            ) from err
        # A backbone with a patch embedding (Swin, ...) is rebuilt without its fixed input size
        # (timm's strict_img_size=False: windows and merges pad), and the input is padded at
        # the bottom and right to a multiple of the patch size (forward).
        self.patch_size = _patch_size(self.body)
        if self.patch_size != (1, 1) and name.startswith(TIMM_PREFIX):
            kwargs = {} if self.multi_level else {"output_stride": output_stride}
            # no such option: inputs must have the size the model was built for
            with contextlib.suppress(TypeError):
                self.body = timm.create_model(
                    spec.timm_name,
                    features_only=True,
                    pretrained=pretrained,
                    strict_img_size=False,
                    **kwargs,
                )
        # timm gives some families' maps channels-last (B, h, w, C); forward makes them NCHW
        self.channels_last_output = str(getattr(self.body, "output_fmt", "NCHW")) in (
            "NHWC",
            "Format.NHWC",
        )
        self.channels: list[int] = list(self.body.feature_info.channels())
        reductions = list(self.body.feature_info.reduction())
        if self.multi_level:
            self.strides = reductions
        else:
            self.strides = [min(r, output_stride) for r in reductions]
        self.out_index = len(self.channels) - 1
        self.aux_index = len(self.channels) - 2
        self.variant = variant
        if variant == "released":
            use_released_ops(self.body)
        if spec.hrnet:
            fuse_to_target_size(self.body)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        ph, pw = self.patch_size
        if ph > 1 or pw > 1:
            x = F.pad(x, (0, (pw - x.shape[3] % pw) % pw, 0, (ph - x.shape[2] % ph) % ph))
        feats = list(self.body(x))
        if self.channels_last_output:
            feats = [f.permute(0, 3, 1, 2) for f in feats]
        return feats


def _patch_size(body: nn.Module) -> tuple[int, int]:
    """The patch size of the first timm patch embedding in ``body`` ((1, 1) when none)."""
    for module in body.modules():
        size = getattr(module, "patch_size", None)
        if hasattr(module, "strict_img_size") and size is not None:
            return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return (1, 1)


def use_released_ops(body: nn.Module) -> None:
    """Switch two parameter-free operations of a timm body to those of the authors' released
    (openseg) code, in place: HRNet's fuse layers upsample bilinearly with
    ``align_corners=True`` (timm: nearest), a ResNet stem max-pool rounds up
    (``ceil_mode=True``). Weights are unchanged; other backbones are left as they are."""
    for module in body.modules():
        if isinstance(module, nn.Upsample):
            module.mode, module.align_corners = "bilinear", True
    pool = getattr(body, "maxpool", None)
    if isinstance(pool, nn.MaxPool2d):
        pool.ceil_mode = True


def _feature_key(key: str, own: dict) -> str:
    """A classification model's key in the feature extractor's naming: timm's feature wrappers
    flatten the first level of sequential modules (``stages.0.x`` -> ``stages_0.x``, as for
    ConvNeXt and Xception)."""
    if key in own:
        return key
    first, _, rest = key.partition(".")
    index, _, tail = rest.partition(".")
    flat = f"{first}_{index}.{tail}" if index.isdigit() and tail else key
    return flat if flat in own else key


def load_backbone_weights(backbone: TimmBackbone, path: Path, strict: bool = True) -> None:
    """Load a local ``.pth``/``.pt`` or ``.safetensors`` file of timm (classification) weights.

    Keys of timm's classification head (absent from a feature extractor, e.g. ``fc.`` of ResNet,
    ``incre_modules.`` of HRNet) are dropped. With ``strict`` any other missing or unexpected
    key is an error that lists them.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model.backbone.weights: {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(check_readable(path, "backbone weights")))
        else:
            state = load_weights_only(path, what="backbone weights")
    except Exception as err:  # noqa: BLE001 - any reader failure is reported with the path
        text = first_line(err).removeprefix(f"{path}: ")
        raise CheckpointError(f"{path}: cannot read backbone weights: {text}") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    own = backbone.body.state_dict()
    state = {_feature_key(k, own): v for k, v in state.items()}
    head = backbone.spec.head_prefixes
    state = {k: v for k, v in state.items() if k in own or not k.startswith(head)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(
        k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape)
    )
    if strict and (missing or unexpected or wrong_shape):
        shapes = f"; keys of another shape: {wrong_shape[:20]}" if wrong_shape else ""
        raise CheckpointError(
            f"{path}: does not match backbone {backbone.name!r}; missing keys: {missing[:20]}"
            f"{' ...' if len(missing) > 20 else ''}; unexpected keys: {unexpected[:20]}"
            f"{' ...' if len(unexpected) > 20 else ''}{shapes}. Set model.backbone.strict: false "
            "to load what matches."
        )
    skip = set(wrong_shape)
    backbone.body.load_state_dict({k: v for k, v in state.items() if k not in skip}, strict=False)
