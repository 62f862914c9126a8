"""Checkpoints of the authors' released code (ContrastiveSeg, built on openseg) -> contrastseg.

Two kinds of file are read:

- a trained segmenter (``{"state_dict": ..., "config_dict": ...}``, keys possibly prefixed by
  ``module.``) of one of the layouts in :data:`LAYOUTS`: HRNet-W48 (``hrnet_w48`` /
  ``hrnet_w48_contrast``), HRNet-W48 + OCR (``hrnet_w48_ocr`` / ``hrnet_w48_ocr_contrast``),
  DeepLabV3 on the deep-stem ResNet-101 (``deeplab_v3`` / ``deeplab_v3_contrast``) and OCR on it
  (``spatial_ocrnet``), and ProtoSeg's HRNet-W48 with the prototype classifier
  (``hrnet_w48_proto``, tfzhou/ProtoSeg). It becomes a contrastseg checkpoint that
  :func:`contrastseg.engine.inference.load_trained_model` loads (``contrastseg eval``, ``predict``,
  ``export``), with the released head and backbone variants, so the model gives the released
  model's logits;
- the HRNetV2-W48 ImageNet weights their training starts from
  (``hrnetv2_w48_imagenet_pretrained.pth``). It becomes a backbone weights file for
  ``model.backbone.weights``.

Every key of the source is mapped to one key of the contrastseg model or dropped with a reason
(the projection head of a "+ contrast" model: training only; the ImageNet classifier), every key
of the contrastseg model is filled exactly once, and every shape is checked. The released
segmenters read BGR images; the converted model reads contrastseg's RGB images, so the input
channels of the first convolution are reversed, and the converted checkpoint records the
released normalisation in RGB order (:attr:`Layout.mean`, :attr:`Layout.std`), which ``eval``,
``predict``, ``figures`` and the Python API use whatever the config says, and the released
tester's upsampling of the logits (``eval.align_corners: true``), which ``predict`` uses.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from contrastseg.digest import sealed
from contrastseg.errors import CheckpointError
from contrastseg.files import atomic_write, check_output_file
from contrastseg.safe_load import first_line, load_weights_only

# The ``format_version`` of the contrastseg checkpoints written here; the one that
# contrastseg.engine.checkpoint reads (a test checks that the two agree).
CHECKPOINT_FORMAT = 2

PROJECTION_REASON = "training only: the projection head of pixel contrast (inference never runs it)"
IMAGENET_REASON = "ImageNet classification head: not part of the segmentation backbone"
COUNTER_REASON = "absent from the source: batch-norm update counter, set to 0 (unused in eval)"
GENERATOR_REASON = (
    "absent from the source: the prototype classifier's random generator, empty (it starts "
    "from its seed)"
)
ALIAS_REASON = (
    "the same tensors as proj_head.proj (the released ProjectionHead names its layers twice: "
    "proj = mlp2)"
)
# Released normalisations (openseg configs), as contrastseg's (x / 255 - mean) / std on RGB.
# H_48_D_4.json: BGR, div 255, mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225) per B, G, R.
HRNET_MEAN = (0.406, 0.456, 0.485)
HRNET_STD = (0.225, 0.224, 0.229)
# R_101_D_8.json: BGR, div 1, mean (102.9801, 115.9465, 122.7717) per B, G, R, std 1.
RESNET_MEAN = (122.7717 / 255, 115.9465 / 255, 102.9801 / 255)
RESNET_STD = (1 / 255, 1 / 255, 1 / 255)

Rules = tuple[tuple[str, str], ...]


def _bn_relu(src: str, dst: str) -> Rules:
    """openseg's conv + ``BNReLU`` (``Sequential(BN, ReLU)``) -> our ``conv_bn_relu``."""
    return ((f"{src}.0.", f"{dst}.0."), (f"{src}.1.0.", f"{dst}.1."))


def _ocr_block(src: str) -> Rules:
    """``SpatialOCR_Module`` -> :class:`contrastseg.models.ocr.OCRHead`'s relation/augment."""
    att = f"{src}.object_context_block"
    rules: list[tuple[str, str]] = []
    for name, ours in (("f_pixel", "query"), ("f_object", "key")):
        rules += _bn_relu(f"{att}.{name}", f"head.relation.{ours}.0")
        rules += [
            (f"{att}.{name}.2.", f"head.relation.{ours}.1.0."),
            (f"{att}.{name}.3.0.", f"head.relation.{ours}.1.1."),
        ]
    rules += _bn_relu(f"{att}.f_down", "head.relation.value")
    rules += _bn_relu(f"{att}.f_up", "head.relation.out")
    rules += _bn_relu(f"{src}.conv_bn_dropout", "head.augment")
    return tuple(rules)


HRNET_BACKBONE: Rules = (("backbone.", "backbone.body."),)
# openseg's deep-stem ResNet ``resinit`` -> timm's ``resnet101s`` stem
RESNET_BACKBONE: Rules = (
    ("backbone.resinit.conv1.", "backbone.body.conv1.0."),
    ("backbone.resinit.bn1.", "backbone.body.conv1.1."),
    ("backbone.resinit.conv2.", "backbone.body.conv1.3."),
    ("backbone.resinit.bn2.", "backbone.body.conv1.4."),
    ("backbone.resinit.conv3.", "backbone.body.conv1.6."),
    ("backbone.resinit.bn3.", "backbone.body.bn1."),
    ("backbone.", "backbone.body."),
)


@dataclass(frozen=True)
class Layout:
    """One released network and how its keys become contrastseg's.

    ``rules``: (released prefix, contrastseg prefix) pairs of module paths (longest prefix
    wins); ``dropped``: (released prefix, reason); ``signature``: keys that identify the layout;
    ``classifier``: the released key whose first dimension is the number of classes;
    ``backbones``: contrastseg backbone names it may have (tried in order); ``model``: the
    contrastseg model config without the backbone name; ``first_conv``: contrastseg key of the
    first convolution (input channels reversed: BGR -> RGB), None to keep them.
    """

    name: str
    description: str
    rules: Rules
    signature: tuple[str, ...]
    classifier: str
    backbones: tuple[str, ...]
    model: dict[str, Any] = field(default_factory=dict)
    dropped: tuple[tuple[str, str], ...] = ()
    first_conv: str | None = None
    mean: tuple[float, float, float] = HRNET_MEAN
    std: tuple[float, float, float] = HRNET_STD
    backbone_only: bool = False


_HRNET_HEAD: Rules = (
    *_bn_relu("cls_head", "head.block"),
    ("cls_head.3.", "head.classifier."),
)
_HRNET_OCR_HEAD: Rules = (
    *_bn_relu("aux_head", "head.aux_head.0"),
    ("aux_head.2.", "head.aux_head.2."),
    *_bn_relu("conv3x3", "head.pixel"),
    *_ocr_block("ocr_distri_head"),
    ("cls_head.", "head.classifier."),
)
_RESNET_OCR_HEAD: Rules = (
    *_bn_relu("dsn_head", "head.aux_head.0"),
    ("dsn_head.3.", "head.aux_head.2."),
    *_bn_relu("conv_3x3", "head.pixel"),
    *_ocr_block("spatial_ocr_head"),
    ("head.", "head.classifier."),
)
_DEEPLAB_HEAD: Rules = (
    *_bn_relu("decoder.layer_dsn", "aux.block"),
    ("decoder.layer_dsn.2.", "aux.classifier."),
    *(r for i in range(4) for r in _bn_relu(f"decoder.layer_aspp.b{i}", f"head.aspp.branches.{i}")),
    ("decoder.layer_aspp.b4.1.", "head.aspp.branches.4.proj.0."),
    ("decoder.layer_aspp.b4.2.0.", "head.aspp.branches.4.proj.1."),
    *_bn_relu("decoder.layer_aspp.project", "head.aspp.project"),
    ("decoder.refine.0.", "head.bottleneck.0."),
    ("decoder.refine.1.", "head.bottleneck.1."),
    ("decoder.refine.2.", "head.classifier."),
)
_PROJECTION = (("proj_head.", PROJECTION_REASON),)
# HRNet_W48_Proto (tfzhou/ProtoSeg): cls_head without its classifier, then the prototype
# classifier (PrototypeClassifier keeps the released names of its parts).
_HRNET_PROTO_HEAD: Rules = (
    *_bn_relu("cls_head", "head.block"),
    ("proj_head.proj.", "head.classifier.projection."),
    ("feat_norm.", "head.classifier.feat_norm."),
    ("mask_norm.", "head.classifier.mask_norm."),
    ("prototypes", "head.classifier.prototypes"),
)
# The model section of the released OCR heads (HRNet-W48-OCR and SpatialOCRNet alike).
_OCR_MODEL = {
    "head": "ocr",
    "head_variant": "released",
    "ocr_mid_channels": 512,
    "ocr_key_channels": 256,
    "ocr_dropout": 0.05,
}
_HRNET_BACKBONES = ("hrnetv2_w48", "hrnetv2_w18_small")
_RELEASED_BACKBONE = {"variant": "released", "pretrained": False, "output_stride": 8}

LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout(
            "hrnet_w48",
            "HRNet_W48 / HRNet_W48_CONTRAST (lib/models/nets/hrnet.py): HRNetV2 branches "
            "concatenated at stride 4, cls_head (3x3 conv, BN-ReLU, dropout, 1x1 classifier)",
            HRNET_BACKBONE + _HRNET_HEAD,
            signature=("backbone.stage4.0.fuse_layers.0.1.0.weight", "cls_head.0.weight"),
            classifier="cls_head.3.weight",
            backbones=_HRNET_BACKBONES,
            model={"head": "hrnetv2", "head_variant": "released", "dropout": 0.1},
            dropped=_PROJECTION,
            first_conv="backbone.body.conv1.weight",
        ),
        Layout(
            "hrnet_w48_proto",
            "HRNet_W48_Proto (tfzhou/ProtoSeg lib/models/nets/hrnet.py): cls_head (3x3 conv, "
            "BN-ReLU, dropout) of the concatenated HRNetV2 branches, then the prototype "
            "classifier (projection, feat_norm, 10 prototypes per class, mask_norm)",
            HRNET_BACKBONE + _HRNET_PROTO_HEAD,
            signature=(
                "backbone.stage4.0.fuse_layers.0.1.0.weight",
                "cls_head.0.weight",
                "prototypes",
            ),
            classifier="mask_norm.weight",
            backbones=_HRNET_BACKBONES,
            model={
                "head": "hrnetv2",
                "head_variant": "released",
                "dropout": 0.1,
                "classifier": "prototype",
                "prototype": {"num_prototypes": 10},
            },
            dropped=(("proj_head.mlp2.", ALIAS_REASON),),
            first_conv="backbone.body.conv1.weight",
        ),
        Layout(
            "hrnet_w48_ocr",
            "HRNet_W48_OCR / HRNet_W48_OCR_CONTRAST (lib/models/nets/hrnet.py): OCR on the "
            "concatenated HRNetV2 branches",
            HRNET_BACKBONE + _HRNET_OCR_HEAD,
            signature=("backbone.stage4.0.fuse_layers.0.1.0.weight", "ocr_distri_head."),
            classifier="cls_head.weight",
            backbones=_HRNET_BACKBONES,
            model=_OCR_MODEL,
            dropped=_PROJECTION,
            first_conv="backbone.body.conv1.weight",
        ),
        Layout(
            "deeplab_v3",
            "DeepLabV3 / DeepLabV3Contrast (lib/models/nets/deeplab.py) on "
            "deepbase_resnet101_dilated8: DeepLabHead (ASPP 512, layer_dsn auxiliary head)",
            RESNET_BACKBONE + _DEEPLAB_HEAD,
            signature=("backbone.resinit.conv1.weight", "decoder.layer_aspp.b0.0.weight"),
            classifier="decoder.refine.2.weight",
            backbones=("resnet101_deep",),
            model={
                "head": "deeplabv3",
                "head_variant": "released",
                "aspp_rates": [12, 24, 36],
                "aux": True,
            },
            dropped=_PROJECTION,
            first_conv="backbone.body.conv1.0.weight",
            mean=RESNET_MEAN,
            std=RESNET_STD,
        ),
        Layout(
            "spatial_ocrnet",
            "SpatialOCRNet (lib/models/nets/ocrnet.py) on deepbase_resnet101_dilated8: OCR, "
            "dsn_head on layer 3",
            RESNET_BACKBONE + _RESNET_OCR_HEAD,
            signature=("backbone.resinit.conv1.weight", "spatial_ocr_head."),
            classifier="head.weight",
            backbones=("resnet101_deep",),
            model=_OCR_MODEL,
            dropped=_PROJECTION,
            first_conv="backbone.body.conv1.0.weight",
            mean=RESNET_MEAN,
            std=RESNET_STD,
        ),
        Layout(
            "hrnet_imagenet",
            "HRNetV2 ImageNet classifier (hrnetv2_w48_imagenet_pretrained.pth, the weights the "
            "released training starts from): backbone weights only",
            (("", ""),),
            signature=("stage4.0.fuse_layers.0.1.0.weight", "conv1.weight"),
            classifier="",
            backbones=_HRNET_BACKBONES,
            dropped=(
                ("incre_modules.", IMAGENET_REASON),
                ("downsamp_modules.", IMAGENET_REASON),
                ("final_layer.", IMAGENET_REASON),
                ("classifier.", IMAGENET_REASON),
            ),
            backbone_only=True,
        ),
    )
}


@dataclass
class Conversion:
    """The result of a conversion: ``state`` (contrastseg keys -> tensors), ``mapping``
    (released key -> contrastseg key), ``dropped`` (released key -> reason), ``filled``
    (contrastseg key -> reason, for keys the source lacks), the layout and the contrastseg
    model config (``None`` for backbone weights)."""

    layout: Layout
    backbone: str
    num_classes: int
    state: dict[str, torch.Tensor]
    mapping: dict[str, str]
    dropped: dict[str, str]
    filled: dict[str, str]
    model_config: dict[str, Any] | None


def read_released(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a released ``.pth`` file: read with ``weights_only=True`` (NumPy
    scalars and dtypes allowed: the released trainer stores its mIoU, a ``numpy.float64``, in
    ``config_dict``), taken from ``state_dict`` (or ``model``) when wrapped, ``module.``
    prefixes removed."""
    path = Path(path)
    try:
        obj = load_weights_only(path, what="PyTorch checkpoint")
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - a global beyond the allow-list
        raise CheckpointError(
            f"{path}: refused: reading it with weights_only=True needs more than tensors, "
            f"numbers, strings, NumPy scalars, lists and dicts ({_refused(err)})"
        ) from None
    return unwrap(obj, str(path))


def _refused(err: Exception) -> str:
    """The line of torch's weights_only message that names what was refused."""
    for line in str(err).splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error: ")
        if line.startswith(("Unsupported", "Trying to load unsupported")):
            return line.rstrip(".")
    return first_line(err)


def unwrap(obj: Any, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """``obj`` (a loaded released file) -> its flat state dict without ``module.`` prefixes."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{where}: no state dict (a mapping of names to tensors) in it")
    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{where}: key {key!r} holds a {type(value).__name__}, not a tensor; expected a "
                "state dict, or a dict with one under 'state_dict'"
            )
        state[key[len("module.") :] if key.startswith("module.") else key] = value
    return state


def detect_layout(state: Mapping[str, torch.Tensor], where: str = "checkpoint") -> Layout:
    """The :data:`LAYOUTS` entry whose signature keys the state dict has (a signature ending in
    ``.`` matches any key under it; of two that match, the one whose signature holds the
    other's: ``hrnet_w48_proto`` over ``hrnet_w48``); an unknown layout raises
    CheckpointError."""
    keys = list(state)

    def has(sig: str) -> bool:
        return any(k.startswith(sig) for k in keys) if sig.endswith(".") else sig in state

    found = [lay for lay in LAYOUTS.values() if all(has(s) for s in lay.signature)]
    found = [
        lay
        for lay in found
        if not any(set(lay.signature) < set(other.signature) for other in found)
    ]
    if len(found) != 1:
        raise CheckpointError(
            f"{where}: unknown checkpoint layout ({len(keys)} keys, e.g. {keys[:6]}); "
            "contrastseg converts the released "
            + ", ".join(f"{n} ({' + '.join(lay.signature)})" for n, lay in LAYOUTS.items())
        )
    return found[0]


def _rename(key: str, rules: Rules) -> str | None:
    best = None
    for src, dst in rules:
        if key.startswith(src) and (best is None or len(src) > len(best[0])):
            best = (src, dst)
    return None if best is None else best[1] + key[len(best[0]) :]


def _reason(key: str, dropped: tuple[tuple[str, str], ...]) -> str | None:
    return next((reason for prefix, reason in dropped if key.startswith(prefix)), None)


def model_config(layout: Layout, backbone: str) -> dict[str, Any]:
    """The contrastseg ``model`` section of a converted segmenter."""
    return {**layout.model, "backbone": {"name": backbone, **_RELEASED_BACKBONE}}


def target_shapes(layout: Layout, backbone: str, num_classes: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the contrastseg model (or backbone body) a layout converts to, from a
    model built on the ``meta`` device (no memory, no weights)."""
    from contrastseg.config import ModelConfig
    from contrastseg.models import build_model
    from contrastseg.models.backbones import TimmBackbone

    with torch.device("meta"):
        if layout.backbone_only:
            module: torch.nn.Module = TimmBackbone(backbone).body
        else:
            cfg = ModelConfig.model_validate(model_config(layout, backbone))
            module = build_model(cfg, num_classes, backbone_weights=False)
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _flip_input(tensor: torch.Tensor) -> torch.Tensor:
    """Reverse the input channels of a (out, 3, k, k) convolution: BGR <-> RGB."""
    return tensor.flip(1).contiguous()


def convert_state(
    state: Mapping[str, torch.Tensor], where: str = "checkpoint", layout: Layout | None = None
) -> Conversion:
    """A released state dict -> the contrastseg one (see the module docstring).

    Raises CheckpointError naming ``where`` and the keys when a source key is neither mapped
    nor dropped, a contrastseg key is not filled or filled twice, or a shape differs.
    """
    layout = layout or detect_layout(state, where)
    num_classes = 0 if layout.backbone_only else _num_classes(state, layout, where)
    mapping: dict[str, str] = {}
    dropped: dict[str, str] = {}
    unknown: list[str] = []
    for key in state:
        reason = _reason(key, layout.dropped)
        if reason is not None:
            dropped[key] = reason
            continue
        target = _rename(key, layout.rules)
        if target is None:
            unknown.append(key)
        else:
            mapping[key] = target
    if unknown:
        raise CheckpointError(
            f"{where}: {len(unknown)} keys of the {layout.name} layout have no contrastseg "
            f"counterpart: {unknown[:10]}"
        )
    twice: dict[str, list[str]] = {}
    for src, dst in mapping.items():
        twice.setdefault(dst, []).append(src)
    clashes = {dst: srcs for dst, srcs in twice.items() if len(srcs) > 1}
    if clashes:
        raise CheckpointError(f"{where}: keys mapped onto the same contrastseg key: {clashes}")
    errors: list[str] = []
    for backbone in layout.backbones:
        shapes = target_shapes(layout, backbone, num_classes)
        problems = _match(state, mapping, shapes)
        if not problems:
            break
        errors.append(f"as {backbone}: {problems}")
    else:
        raise CheckpointError(
            f"{where}: does not fit the {layout.name} layout; " + "; ".join(errors)
        )
    out = {dst: state[src] for src, dst in mapping.items()}
    filled = {}
    # only batch-norm counters and generator states (checked in _match)
    for key in sorted(set(shapes) - set(out)):
        if key.endswith("_extra_state"):
            out[key] = torch.empty(0, dtype=torch.uint8)
            filled[key] = GENERATOR_REASON
        else:
            out[key] = torch.zeros((), dtype=torch.long)
            filled[key] = COUNTER_REASON
    if layout.first_conv is not None:
        out[layout.first_conv] = _flip_input(out[layout.first_conv])
    out = {k: out[k].contiguous() for k in shapes}  # the model's own order
    cfg = None if layout.backbone_only else model_config(layout, backbone)
    return Conversion(layout, backbone, num_classes, out, mapping, dropped, filled, cfg)


def _num_classes(state: Mapping[str, torch.Tensor], layout: Layout, where: str) -> int:
    weight = state.get(layout.classifier)
    if weight is None or weight.dim() not in (1, 4):
        raise CheckpointError(
            f"{where}: the {layout.name} layout's classifier {layout.classifier!r} is missing "
            "or not a convolution (or, for prototypes, a layer norm) weight"
        )
    return int(weight.shape[0])


def _match(
    state: Mapping[str, torch.Tensor], mapping: dict[str, str], shapes: dict[str, tuple[int, ...]]
) -> str:
    """'' when ``mapping`` fills every key of ``shapes`` with a tensor of its shape (batch-norm
    counters and generator states may be absent), else what is wrong."""
    extra = sorted(dst for dst in mapping.values() if dst not in shapes)
    missing = sorted(
        k
        for k in set(shapes) - set(mapping.values())
        if not k.endswith(("num_batches_tracked", "_extra_state"))
    )
    wrong = sorted(
        f"{src} {tuple(state[src].shape)} -> {dst} {shapes[dst]}"
        for src, dst in mapping.items()
        if dst in shapes and tuple(state[src].shape) != shapes[dst]
    )
    parts = []
    if extra:
        parts.append(f"{len(extra)} keys the model lacks, e.g. {extra[:5]}")
    if missing:
        parts.append(f"{len(missing)} model keys not filled, e.g. {missing[:5]}")
    if wrong:
        parts.append(f"{len(wrong)} shapes differ, e.g. {wrong[:3]}")
    return "; ".join(parts)


def to_released(conversion: Conversion) -> dict[str, torch.Tensor]:
    """Back-conversion: the contrastseg state of ``conversion`` in the released key names
    (the dropped keys excepted; filled batch-norm counters left out; input channels back in
    BGR order)."""
    inverse = {dst: src for src, dst in conversion.mapping.items()}
    first = conversion.layout.first_conv
    out = {}
    for key, value in conversion.state.items():
        if key in conversion.filled:
            continue
        out[inverse[key]] = _flip_input(value) if key == first else value
    return out


def checkpoint_dict(
    model_state: dict[str, torch.Tensor],
    config: dict[str, Any],
    class_names: list[str],
    palette: list[list[int]],
    iteration: int = 0,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A contrastseg checkpoint holding only a model (what ``load_trained_model`` reads): the
    one place where a converted checkpoint's layout is written down."""
    return {
        "format_version": CHECKPOINT_FORMAT,
        "iteration": iteration,
        "config": config,
        "class_names": list(class_names),
        "palette": palette,
        "model": model_state,
        "loss": {},
        "converted_from": source or {},
    }


def experiment_config(conversion: Conversion) -> dict[str, Any]:
    """The experiment config of a converted Cityscapes segmenter: the model of the layout, the
    released normalisation (RGB order) and the released tester's single-scale procedure
    (logits upsampled with aligned corners; scales and flip combined by summed logits)."""
    from contrastseg.config import ExperimentConfig

    layout = conversion.layout
    cfg = ExperimentConfig.model_validate(
        {
            "data": {
                "name": "cityscapes",
                "root": "data/cityscapes",
                "mean": list(layout.mean),
                "std": list(layout.std),
            },
            "model": conversion.model_config,
            "eval": {"align_corners": True, "fusion": "sum_logits"},
            "output": {"name": f"released_{layout.name}"},
        }
    )
    return cfg.to_dict()


def eval_overrides(layout: Layout) -> list[str]:
    """``--set`` values of the released normalisation (a converted checkpoint records it, and
    evaluation uses it without them)."""
    mean = ",".join(f"{v:.6g}" for v in layout.mean)
    std = ",".join(f"{v:.6g}" for v in layout.std)
    return [f"data.mean=[{mean}]", f"data.std=[{std}]"]


def convert_file(src: Path, out: Path) -> Conversion:
    """Convert the released file ``src``; write a contrastseg checkpoint (segmenters) or a
    backbone weights file (ImageNet weights) to ``out`` (refused at once when ``out`` is a folder
    or lies under a file)."""
    src, out = Path(src), check_output_file(out, "convert OUT")
    conversion = convert_state(read_released(src), str(src))
    if conversion.layout.backbone_only:
        payload: dict[str, Any] = conversion.state
    else:
        if conversion.num_classes != 19:
            raise CheckpointError(
                f"{src}: a {conversion.layout.name} model with {conversion.num_classes} classes; "
                "contrastseg converts the released Cityscapes models (19 classes)"
            )
        from contrastseg.data.cityscapes import cityscapes_classes, cityscapes_palette

        payload = checkpoint_dict(
            conversion.state,
            experiment_config(conversion),
            cityscapes_classes(),
            cityscapes_palette().tolist(),
            source={
                "file": src.name,
                "layout": conversion.layout.name,
                "dropped": sorted(set(conversion.dropped.values())),
                "dropped_keys": len(conversion.dropped),
            },
        )
        payload = sealed(payload)  # the content digest every checkpoint carries

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(payload, f)

    atomic_write(out, save)
    return conversion


def format_conversion(conversion: Conversion, keys: bool = False, out: Path | None = None) -> str:
    """A summary (layout, counts, dropped prefixes with reasons, how to use ``out``); every
    key with ``keys``."""
    lay = conversion.layout
    lines = [
        f"layout: {lay.name} ({lay.description})",
        f"contrastseg backbone: {conversion.backbone}"
        + ("" if lay.backbone_only else f", {conversion.num_classes} classes"),
        f"mapped: {len(conversion.mapping)} keys; dropped: {len(conversion.dropped)}; "
        f"filled: {len(conversion.filled)}",
    ]
    for prefix, reason in lay.dropped:
        n = sum(k.startswith(prefix) for k in conversion.dropped)
        if n:
            lines.append(f"  dropped {prefix}* ({n} keys): {reason}")
    for reason in sorted(set(conversion.filled.values())):
        n = sum(why == reason for why in conversion.filled.values())
        lines.append(f"  filled {n} keys: {reason}")
    if lay.first_conv is not None:
        lines.append(f"  {lay.first_conv}: input channels reversed (released BGR -> RGB)")
    if keys:
        lines += [f"  {src} -> {dst}" for src, dst in conversion.mapping.items()]
        lines += [f"  {src} dropped: {why}" for src, why in conversion.dropped.items()]
        lines += [f"  {dst} filled: {why}" for dst, why in conversion.filled.items()]
    if out is not None and lay.backbone_only:
        lines.append(
            f"wrote {out}: use it with --set model.backbone.name={conversion.backbone} "
            f"--set model.backbone.pretrained=false --set model.backbone.weights={out}"
        )
    elif out is not None:
        mean, std = (", ".join(f"{v:.4g}" for v in t) for t in (lay.mean, lay.std))
        lines.append(
            f"wrote {out}; it records the released normalisation (RGB mean {mean}, std {std}), "
            f"which eval and predict use: contrastseg eval CONFIG --checkpoint {out} (with a "
            "released config, e.g. configs/cityscapes/released/, for the released tester)"
        )
    return "\n".join(lines)
