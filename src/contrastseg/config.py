"""The typed experiment config: one object, validated once when it is loaded.

A YAML file may name one ``base:`` file (relative to itself); its keys are merged over the base
recursively. The base itself may not have a ``base:``. Overrides from the command line
(``--set train.iters=200``) are applied last and parsed as YAML scalars.
"""

from __future__ import annotations

import difflib
import stat
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from contrastseg.config_checks import check_loaded_config
from contrastseg.datasets_table import DATA_SET_NAMES, DATA_SETS, MAX_IMAGE_PIXELS
from contrastseg.errors import ConfigError
from contrastseg.files import atomic_write_text
from contrastseg.model_table import BACKBONE_NAMES
from contrastseg.yaml_io import load_yaml_text, read_yaml_file

#: torch.compile backends a config may name: inductor generates kernels; aot_eager (the
#: forward and backward graphs traced, then run by PyTorch's own operators) and eager (the
#: graph captured only) are for debugging, and the tests use them.
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
#: inductor's modes (null in a config: inductor's default mode).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_compile_mode(section: str, backend: str, mode: str | None) -> None:
    """A compile mode is inductor's: refused with another backend (``ValueError`` naming
    ``<section>.compile_mode``)."""
    if mode is not None and backend != "inductor":
        raise ValueError(
            f"{section}.compile_mode = {mode!r} is a mode of the inductor backend; "
            f"{section}.compile_backend = {backend!r} takes none: leave compile_mode null"
        )


class _Section(BaseModel):
    # allow_inf_nan=False: every float field, and every float inside a tuple, refuses NaN and
    # +-inf ("Input should be a finite number"), so a new field is covered without a validator.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(_Section):
    """Where the images come from and how they are augmented."""

    # synthetic: the embedded data set; folder: a user's folder (data/folder.py); the four
    # benchmarks in their publishers' layouts under data.root (docs/datasets.md). The allowed
    # names are the rows of contrastseg/datasets_table.py.
    name: Literal[DATA_SET_NAMES] = "synthetic"  # type: ignore[valid-type]
    root: Path | None = None
    train_split: str = "train"
    val_split: str = "val"
    # cityscapes only: labels from gtCoarse instead of gtFine (needed for split train_extra)
    cityscapes_coarse: bool = False
    # coco_stuff only: the 10k release (9k train / 1k test) or the 164k one (COCO 2017)
    coco_split: Literal["10k", "164k"] = "10k"
    # camvid only: false: 11 classes, void (PNG value 11) ignored; true: void is a 12th class,
    # trained and scored (the authors' configs/camvid/H_48_D_4.json)
    camvid_void_class: bool = False
    # synthetic only: the data set is a pure function of (seed, split, index)
    seed: int = Field(0, ge=0, lt=2**63)
    train_size: int = Field(1000, ge=1)
    val_size: int = Field(100, ge=1)
    image_size: tuple[int, int] = (128, 128)
    difficulty: float = Field(1.0, ge=0.0)
    # augmentation
    crop_size: tuple[int, int] = (128, 128)
    scale_range: tuple[float, float] = (0.5, 2.0)
    flip: bool = True
    jitter: float = Field(0.2, ge=0.0, le=1.0)
    # Training only (docs/training.md, "Augmentation"). short_side: first resize the image so
    # that its shorter side has this length (null: no resize); aspect_range: the random scale's
    # aspect ratio a (width scaled by s sqrt(a), height by s / sqrt(a)); brightness_shift: add
    # randint[-v, v] (uint8 units) to every channel, always (0: off); interpolation: of the
    # image's resize (labels: nearest); pad_position: where a crop larger than the scaled image
    # places it (bottom_right: padding at the bottom and right; random: at a random offset).
    short_side: int | None = Field(None, ge=8)
    aspect_range: tuple[float, float] = (1.0, 1.0)
    brightness_shift: int = Field(0, ge=0, le=255)
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    pad_position: Literal["bottom_right", "random"] = "bottom_right"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    num_workers: int = Field(0, ge=0)
    # An image or label file whose header claims more pixels (width x height) is refused before
    # it is decoded (a decompression bomb). The default, 2**26 (8192 x 8192), admits every
    # supported data set and camera photos up to 61 MP (datasets_table.MAX_IMAGE_PIXELS).
    max_image_pixels: int = Field(MAX_IMAGE_PIXELS, gt=0)

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if DATA_SETS[self.name].reads_root and self.root is None:
            raise ValueError(f"data.root is required when data.name is {self.name!r}")
        if not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(
                f"data.scale_range must satisfy 0 < min <= max, got {self.scale_range}"
            )
        if not 0 < self.aspect_range[0] <= self.aspect_range[1]:
            raise ValueError(
                f"data.aspect_range must satisfy 0 < min <= max, got {self.aspect_range}"
            )
        if min(self.crop_size) < 8 or min(self.image_size) < 8:
            raise ValueError("data.crop_size and data.image_size must be at least 8x8")
        if min(self.std) <= 0:
            raise ValueError(f"data.std must be positive, got {self.std}")
        return self


class BackboneConfig(_Section):
    """The feature extractor (timm, random init unless ``pretrained`` or ``weights``).

    ``resnet101_deep`` is the paper's D-ResNet-101 (deep stem of three 3x3 convolutions);
    ``hrnetv2_*`` return their four branches at strides 4-32 and ignore dilation, so
    ``output_stride`` must stay 8 for them. ``pretrained: true`` asks timm for ImageNet weights
    (needs network); ``weights: PATH`` loads a local ``.pth``/``.safetensors`` file of timm's
    layout; a key mismatch stops the run unless ``strict: false``.
    """

    # One of BACKBONE_NAMES, or "timm:<model>" for any timm model with features_only
    # (dilated to output_stride where timm supports it, else all levels concatenated).
    name: str = "mobilenetv3_large"
    output_stride: Literal[8, 16, 32] = 8
    pretrained: bool = False
    weights: Path | None = None
    strict: bool = True
    # timm: timm's modules as they are. released: two parameter-free operations as in the
    # authors' released code, so that its checkpoints give its logits: HRNet's fuse layers
    # upsample bilinearly (align_corners=True) instead of nearest, and ResNet's stem max-pool
    # rounds its output size up (ceil_mode=True: 129x257 stride-8 maps for a 1024x2048 image).
    variant: Literal["timm", "released"] = "timm"

    @property
    def is_hrnet(self) -> bool:
        return self.name.startswith("hrnet")

    @field_validator("name")
    @classmethod
    def _known_name(cls, name: str) -> str:
        if name in BACKBONE_NAMES or (name.startswith("timm:") and len(name) > len("timm:")):
            return name
        raise ValueError(
            f"model.backbone.name = {name!r}: allowed values are {list(BACKBONE_NAMES)} or "
            "'timm:<model>' for any timm model with features_only (e.g. 'timm:convnext_tiny')"
        )

    @model_validator(mode="after")
    def _check(self) -> BackboneConfig:
        if self.pretrained and self.weights is not None:
            raise ValueError(
                "model.backbone.pretrained and model.backbone.weights are exclusive: set one"
            )
        if self.is_hrnet and self.output_stride != 8:
            raise ValueError(
                f"model.backbone.output_stride = {self.output_stride}: {self.name} keeps its "
                "native strides 4-32 (no dilation); leave output_stride at 8"
            )
        return self


class PrototypeConfig(_Section):
    """ProtoSeg's prototype classifier (docs/prototypes.md), used when ``model.classifier`` is
    ``prototype``. The defaults are the released Cityscapes recipe's
    (``configs/cityscapes/H_48_D_4_proto.json``: 10 prototypes per class, momentum 0.999, 3
    Sinkhorn iterations at epsilon 0.05, Gumbel assignment, width-normalised projection)."""

    num_prototypes: int = Field(10, ge=1)
    momentum: float = Field(0.999, ge=0.0, le=1.0)
    sinkhorn_iterations: int = Field(3, ge=0)
    sinkhorn_epsilon: float = Field(0.05, gt=0.0)
    # gumbel: the released draw (the Sinkhorn plan's argmax plus Gumbel noise) picks the
    # prototype a pixel moves; argmax: the plan's argmax, the same prototype as the target
    assignment: Literal["gumbel", "argmax"] = "gumbel"
    # width: the released projection head's L2 normalisation over the map's last axis;
    # channel: over the embedding's channels
    projection_norm: Literal["width", "channel"] = "width"
    update_prototypes: bool = True


class ModelConfig(_Section):
    """Backbone + decode head (+ auxiliary head, + projection head in training)."""

    backbone: BackboneConfig = BackboneConfig()
    # deeplabv3: ASPP on the last stage of a dilated backbone (+ FCN auxiliary head);
    # hrnetv2: the four HRNet branches concatenated at stride 4 (no auxiliary head);
    # ocr: object-contextual representations (its soft-object-region head is the auxiliary);
    # pspnet: pyramid pooling on the last stage of a dilated backbone (+ FCN auxiliary head);
    # deeplabv3plus: ASPP on the last stage (output stride 16 unless set) and a decoder with
    # the stride-4 stage; upernet: pyramid pooling + FPN over all stages, fused at stride 4
    # (output stride 32 unless set: the backbone is not dilated). docs/models.md.
    head: Literal["deeplabv3", "hrnetv2", "ocr", "pspnet", "deeplabv3plus", "upernet"] = "deeplabv3"
    # released: the layer layout of the authors' released code (docs/models.md); compact: the
    # lighter layout (1x1 ASPP projection, 1x1 HRNetV2 head, no conv biases before BN).
    head_variant: Literal["released", "compact"] = "released"
    # Width of the decode head; null: deeplabv3: 512 for the released layout, 256 for the
    # compact one; pspnet and upernet: 512; deeplabv3plus: 256 (ASPP and decoder). Not used by
    # hrnetv2 and ocr.
    head_channels: int | None = Field(None, ge=8)
    # deeplabv3 and deeplabv3plus; deeplabv3plus without a value: 6/12/18 at output stride 16,
    # scaled by 16 / output stride (12/24/36 at 8)
    aspp_rates: tuple[int, int, int] = (12, 24, 36)
    # pspnet and upernet: the bins of the pyramid pooling
    ppm_bins: tuple[int, ...] = (1, 2, 3, 6)
    aux: bool = True  # the FCN auxiliary head of deeplabv3 (hrnetv2 has none; ocr always has one)
    aux_channels: int = Field(256, ge=8)
    # before the classifier of the compact deeplabv3 and FCN heads and of the released hrnetv2
    # head (the released deeplabv3 and FCN heads have none; OCR uses ocr_dropout)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    projection_dim: int = Field(256, ge=2)
    # Hidden width of the projection head; null: the features' width (d -> d, docs/method.md,
    # "Model outputs").
    projection_hidden: int | None = Field(None, ge=1)
    # OCR: pixel representation and augmented-representation channels, key channels of the
    # pixel-region relation, and the soft-object-region head's channels (None: 512 on a dilated
    # backbone, the channels of the branch concatenation on HRNet (720 for W48), as in the OCR
    # code).
    ocr_mid_channels: int = Field(512, ge=8)
    ocr_key_channels: int = Field(256, ge=8)
    ocr_aux_channels: int | None = Field(None, ge=8)
    ocr_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    # The decode head's final classifier: conv (a 1x1 convolution) or prototype (ProtoSeg's
    # nearest-prototype classifier on the map the conv would read, configured by
    # model.prototype; its PPC and PPD losses are weighted by loss.prototype). Auxiliary heads
    # keep their conv.
    classifier: Literal["conv", "prototype"] = "conv"
    prototype: PrototypeConfig = PrototypeConfig()

    @property
    def pools_globally(self) -> bool:
        """Whether a branch of the head pools the whole map to 1x1 before a batch norm (ASPP's
        image pooling, a pyramid-pooling bin of 1): in training that batch norm needs 2 images
        or more per micro-batch."""
        return self.head in ("deeplabv3", "deeplabv3plus") or (
            self.head in ("pspnet", "upernet") and 1 in self.ppm_bins
        )

    @model_validator(mode="before")
    @classmethod
    def _head_defaults(cls, data: Any) -> Any:
        """deeplabv3plus: output stride 16, ASPP rates 6/12/18 x 16 / stride and no auxiliary
        head unless given; upernet: output stride 32 (an undilated backbone) unless given, HRNet
        excepted."""
        if not isinstance(data, dict) or data.get("head") not in ("deeplabv3plus", "upernet"):
            return data
        data = dict(data)
        backbone = data.get("backbone", {})
        if isinstance(backbone, BackboneConfig):
            given = "output_stride" in backbone.model_fields_set
            name, stride = backbone.name, backbone.output_stride
        elif isinstance(backbone, dict):
            given = "output_stride" in backbone
            name = str(backbone.get("name", BackboneConfig.model_fields["name"].default))
            stride = backbone.get("output_stride")
        else:
            return data
        if not given and not name.startswith("hrnet"):
            stride = 16 if data["head"] == "deeplabv3plus" else 32
            if isinstance(backbone, BackboneConfig):
                data["backbone"] = backbone.model_copy(update={"output_stride": stride})
            else:
                data["backbone"] = {**backbone, "output_stride": stride}
        if data["head"] == "deeplabv3plus":
            data.setdefault("aux", False)  # the reference has no auxiliary head
            if "aspp_rates" not in data and stride in (8, 16, 32):
                data["aspp_rates"] = tuple(r * 16 // stride for r in (6, 12, 18))
        return data

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if min(self.aspp_rates) < 1:
            raise ValueError(
                f"model.aspp_rates must be dilation rates >= 1, got {list(self.aspp_rates)}"
            )
        bins = self.ppm_bins
        if not bins or min(bins) < 1 or len(set(bins)) != len(bins):
            raise ValueError(f"model.ppm_bins must be distinct integers >= 1, got {bins}")
        name = self.backbone.name
        if name.startswith("timm:"):  # checked when the backbone is built
            return self
        if self.head == "hrnetv2" and not self.backbone.is_hrnet:
            raise ValueError(
                f"model.head = 'hrnetv2' needs an HRNet backbone (model.backbone.name: "
                f"hrnetv2_w48 or hrnetv2_w18_small), got model.backbone.name = {name!r}"
            )
        if self.head == "deeplabv3" and self.backbone.is_hrnet:
            raise ValueError(
                f"model.head = 'deeplabv3' needs a dilated backbone, got model.backbone.name = "
                f"{name!r}; use model.head: hrnetv2 or ocr with HRNet"
            )
        if self.head in ("pspnet", "deeplabv3plus") and self.backbone.is_hrnet:
            raise ValueError(
                f"model.head = {self.head!r} needs a dilatable backbone, got "
                f"model.backbone.name = {name!r}; use model.head: upernet, hrnetv2 or ocr with "
                "HRNet"
            )
        return self


class CrossEntropyConfig(_Section):
    weight: float = Field(1.0, ge=0.0)
    aux_weight: float = Field(0.4, ge=0.0)
    # OHEM on the main head (the auxiliary CE stays plain): keep the labelled pixels whose
    # probability of the true class is below ohem_threshold, and at least ohem_min_kept of them
    ohem: bool = False
    ohem_threshold: float = Field(0.7, gt=0.0, le=1.0)
    ohem_min_kept: int = Field(100000, ge=1)
    # One weight per class (null: unweighted): the CE of a pixel of class c is multiplied by
    # class_weights[c] and the sum divided by the sum of the weights of the labelled pixels (the
    # weighted mean of torch's cross_entropy); applies to the auxiliary CE too.
    class_weights: tuple[float, ...] | None = None
    # Bilinear upsampling of the logits to the label size, for the CE terms
    align_corners: bool = False

    @model_validator(mode="after")
    def _check(self) -> CrossEntropyConfig:
        w = self.class_weights
        if w is not None:
            if not w or min(w) < 0 or max(w) <= 0:
                raise ValueError(
                    "loss.ce.class_weights must be non-negative numbers, not all 0 (one per "
                    f"class), got {w}"
                )
            if self.ohem:
                raise ValueError(
                    "loss.ce.class_weights and loss.ce.ohem cannot be combined: set one of them"
                )
        return self


class MemoryConfig(_Section):
    enabled: bool = False
    pixel_size: int = Field(5000, ge=0)  # 0: no pixel queue (region means only)
    pixels_per_image: int = Field(10, ge=1)
    region_mode: Literal["fifo", "per_image", "none"] = "fifo"
    region_size: int = Field(5000, ge=1)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    sampling: Literal["all", "random", "hardest", "semi_hard"] = "all"
    k_pos: int = Field(1024, ge=0)  # 0: no memory positives (the in-batch ones remain)
    k_neg: int = Field(2048, ge=0)
    semi_hard_fraction: float = Field(0.1, gt=0.0, le=1.0)


class ContrastConfig(_Section):
    enabled: bool = False
    weight: float = Field(0.1, ge=0.0)
    warmup_iters: int = Field(0, ge=0)
    temperature: float = Field(0.1, gt=0.0)
    base_temperature: float = Field(0.07, gt=0.0)
    max_samples: int = Field(1024, ge=1)
    max_views: int = Field(100, ge=1)
    memory: MemoryConfig = MemoryConfig()


class LovaszConfig(_Section):
    """Lovasz-softmax (docs/losses.md): mean over the classes present (or all), per batch or
    averaged over images."""

    enabled: bool = False
    weight: float = Field(1.0, ge=0.0)
    warmup_iters: int = Field(0, ge=0)
    per_image: bool = False
    classes: Literal["present", "all"] = "present"


class RMIConfig(_Section):
    """Region mutual information (docs/losses.md); the term is bce_weight x BCE + rmi_weight x
    RMI. Pooling: kernel = stride = pool_size (1: none). variant: released (the authors' code:
    pooling padded by pool_size // 2, BCE over labelled pixels + 1, small constants) or
    unpadded (no padding, BCE over labelled pixels, no constants)."""

    enabled: bool = False
    weight: float = Field(1.0, ge=0.0)
    warmup_iters: int = Field(0, ge=0)
    radius: int = Field(3, ge=1, le=10)
    pool: Literal["avg", "max"] = "avg"
    pool_size: int = Field(4, ge=1)
    alpha: float = Field(5e-4, gt=0.0)
    bce_weight: float = Field(0.5, ge=0.0)
    rmi_weight: float = Field(0.5, ge=0.0)
    variant: Literal["released", "unpadded"] = "released"


class AAFConfig(_Section):
    """Adaptive affinity fields (docs/losses.md). The adaptive (classes x distances) weights are
    trained by gradient ascent with the model's SGD (learning rate x lr_mult, no weight decay);
    the loss decays as 10^(-step / decay_steps), decay_steps = train.iters when null."""

    enabled: bool = False
    weight: float = Field(1.0, ge=0.0)
    warmup_iters: int = Field(0, ge=0)
    distances: tuple[int, ...] = (1, 2, 3)
    margin: float = Field(3.0, ge=0.0)
    # initial weights of the distances (after the softmax), the same for every class and for
    # edge and non-edge; null: uniform
    init_weights: tuple[float, ...] | None = None
    decay_steps: int | None = Field(None, ge=1)
    lr_mult: float = Field(1.0, ge=0.0)
    # released: labels shrunk to the logits' grid (nearest) and the loss computed there, a pair
    # dropped when either side of the centre is ignored or outside (the authors' code);
    # upsampled: logits upsampled to the label size, a pair dropped with an ignored end
    variant: Literal["released", "upsampled"] = "released"

    @model_validator(mode="after")
    def _check(self) -> AAFConfig:
        d = self.distances
        if not d or min(d) < 1 or len(set(d)) != len(d):
            raise ValueError(f"loss.aaf.distances must be distinct integers >= 1, got {d}")
        w = self.init_weights
        if w is not None and (len(w) != len(d) or min(w) <= 0):
            raise ValueError(
                f"loss.aaf.init_weights must be {len(d)} positive numbers (one per distance), "
                f"got {w}"
            )
        return self


class PrototypeLossConfig(_Section):
    """The weights of the prototype classifier's two losses (used with ``model.classifier:
    prototype``): the released Cityscapes recipe's 0.01 (PPC) and 0.001 (PPD)."""

    ppc_weight: float = Field(0.01, ge=0.0)
    ppd_weight: float = Field(0.001, ge=0.0)


class LossConfig(_Section):
    ce: CrossEntropyConfig = CrossEntropyConfig()
    contrast: ContrastConfig = ContrastConfig()
    prototype: PrototypeLossConfig = PrototypeLossConfig()
    lovasz: LovaszConfig = LovaszConfig()
    rmi: RMIConfig = RMIConfig()
    aaf: AAFConfig = AAFConfig()


class OptimConfig(_Section):
    """SGD with poly learning-rate decay and optional linear warm-up."""

    lr: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    poly_power: float = Field(0.9, ge=0.0)
    warmup_iters: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.1, gt=0.0, le=1.0)
    # Learning rate of every parameter outside the backbone (decode and auxiliary heads, the
    # contrast projection head) = lr x head_lr_mult; the backbone's is lr.
    head_lr_mult: float = Field(1.0, gt=0.0)


class TrainConfig(_Section):
    iters: int = Field(1000, ge=1)
    batch_size: int = Field(8, ge=1)  # images per optimiser step, over all processes
    grad_accum: int = Field(1, ge=1)  # micro-batches per step: batch_size / (world x grad_accum)
    seed: int = Field(0, ge=0, lt=2**63)
    device: str = "auto"
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    # Evaluate on the val split every eval_every iterations (0: only at the end); the
    # checkpoint of the best val mIoU so far, the final evaluation included, is kept as
    # checkpoints/best.pt (never rotated away) and named in eval.json ("best").
    eval_every: int = Field(0, ge=0)
    deterministic: bool = False
    threads: int = Field(0, ge=0)
    amp: Literal["off", "bf16", "fp16"] = "off"
    sync_bn: bool = True  # SyncBatchNorm under DDP
    max_bad_steps: int = Field(5, ge=1)  # consecutive non-finite steps before stopping
    channels_last: bool = False
    # torch.compile of the model's training forward (the losses, pixel-contrast sampling and
    # the prototype update run eagerly; docs/training.md, "Compiling"). compile_backend:
    # inductor (generated kernels, what speeds a step up); aot_eager and eager are debugging
    # backends (no code generation: they find graph breaks and recompilations in seconds, and
    # the tests use them). compile_mode: inductor's mode (null: its default).
    compile: bool = False
    compile_backend: Literal[COMPILE_BACKENDS] = "inductor"  # type: ignore[valid-type]
    compile_mode: Literal[COMPILE_MODES] | None = None  # type: ignore[valid-type]
    # Resume from the run folder's newest loadable checkpoint without --resume (a fresh folder
    # starts from iteration 0). Under torchrun a restarted group always does.
    auto_resume: bool = False

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        check_compile_mode("train", self.compile_backend, self.compile_mode)
        return self


class EvalConfig(_Section):
    """How validation images are inferred: whole or sliding window, at scales, with flip."""

    batch_size: int = Field(8, ge=1)
    mode: Literal["whole", "slide"] = "whole"
    crop_size: tuple[int, int] = (512, 1024)
    stride: tuple[int, int] = (341, 682)
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    # The steps of a test procedure (docs/training.md, "Evaluation"); the defaults are
    # contrastseg's own, the released recipes set the authors' tester.
    align_corners: bool = False  # bilinear resizes of the scales and of the logits
    fusion: Literal["mean_prob", "sum_logits"] = "mean_prob"  # scales and flip combined
    short_side: int | None = Field(None, ge=1)  # image resized to this short side first
    pad_multiple: int = Field(1, ge=1)  # then padded bottom/right to a multiple of this
    resize_back: Literal["bilinear", "bicubic"] = "bilinear"  # scores back to the label size
    # torch.compile of the model's inference (contrastseg eval, and a training run's val
    # evaluations), with dynamic height and width: images of any size share one graph
    # (docs/training.md, "Compiling"); backend and mode as train.compile_backend/compile_mode.
    compile: bool = False
    compile_backend: Literal[COMPILE_BACKENDS] = "inductor"  # type: ignore[valid-type]
    compile_mode: Literal[COMPILE_MODES] | None = None  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"eval.scales must be positive numbers, got {self.scales}")
        if min(self.stride) < 1 or min(self.crop_size) < 1:
            raise ValueError("eval.crop_size and eval.stride must be positive")
        if any(s > c for s, c in zip(self.stride, self.crop_size, strict=True)):
            raise ValueError(
                f"eval.stride {self.stride} larger than eval.crop_size {self.crop_size} "
                "would leave pixels uncovered"
            )
        check_compile_mode("eval", self.compile_backend, self.compile_mode)
        return self

    figure_images: int = Field(4, ge=0)


class OutputConfig(_Section):
    # root must be a folder (created if missing); the run folder is root/name. Where they exist
    # they are checked when the config is loaded (config_checks.py).
    root: Path = Path("runs")
    name: str = "run"

    @field_validator("name")
    @classmethod
    def _folder_name(cls, name: str) -> str:
        parts = Path(name).parts
        if not name.strip() or "\0" in name or Path(name).is_absolute() or ".." in parts:
            raise ValueError(
                f"output.name = {name!r}: must name a folder inside output.root (not empty, "
                "not absolute, no '..')"
            )
        return name


class ExperimentConfig(_Section):
    """Everything a run needs. Built by :func:`load_config`, never mutated by the engine."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="after")
    def _check(self) -> ExperimentConfig:
        # A head with a global-pooling branch (ASPP's image pooling; PPM's bin 1) normalises a
        # 1x1 map: batch norm in training needs more than one value per channel, so more than
        # one image per micro-batch (the statistics are over the micro-batch of all processes
        # with train.sync_bn; the trainer checks each process's share without it).
        m, t = self.model, self.train
        if m.pools_globally and t.batch_size // t.grad_accum < 2:
            raise ValueError(
                f"train.batch_size = {t.batch_size} with train.grad_accum = {t.grad_accum}: "
                f"model.head = {m.head!r} has a global-pooling branch whose batch norm needs "
                "at least 2 images per micro-batch in training; use train.batch_size >= "
                f"{2 * t.grad_accum} (or a head without it: hrnetv2, ocr)"
            )
        return self

    @property
    def run_dir(self) -> Path:
        return self.output.root / self.output.name

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A config tree by dotted key: ``{"train": {"iters": 5}}`` -> ``{"train.iters": 5}``
    (lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        mode = path.stat().st_mode  # follows links; a loop or an over-long name is an OSError
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, ValueError) as err:  # ValueError: a NUL byte in the path
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise ConfigError(f"{path}: cannot be read as a config file: {reason}") from None
    if stat.S_ISDIR(mode):
        inside = [p for p in sorted(path.glob("*.yaml")) if not p.name.startswith("_")]
        example = f", e.g. {inside[0]}" if inside else ""
        raise ConfigError(f"{path}: is a folder, not a config file; give a YAML file{example}")
    if not stat.S_ISREG(mode):  # a FIFO would block the read, a device never end
        raise ConfigError(
            f"{path}: is not a regular file (a FIFO, socket or device), not a config file"
        )
    # UTF-8 only, with limits on size, nesting and alias expansion (contrastseg/yaml_io.py)
    data = read_yaml_file(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _apply_override(tree: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.iters=200")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r}: empty key component in {key!r}")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = load_yaml_text(raw, f"override {item!r}")


def _allowed(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Names of the keys allowed at ``loc`` (for unknown-key messages)."""
    current: Any = model
    for part in loc[:-1]:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = field.annotation
    return sorted(getattr(current, "model_fields", None) or [])


def _expected_form(loc: tuple[Any, ...], value: Any) -> str:
    """For a list-valued key (a tuple field such as ``data.crop_size``), the form it expects:
    ``"; expected a list of 2 ints like [96, 96]"``; ``""`` for other keys."""
    import types
    import typing

    field, current = None, ExperimentConfig
    for part in loc:
        if isinstance(part, int):  # an item of the list: the list's field
            break
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return ""
        current = field.annotation
    if field is None:
        return ""
    annotation = field.annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = rest[0] if len(rest) == 1 else None
    args = typing.get_args(annotation) if typing.get_origin(annotation) is tuple else ()
    kinds = {a for a in args if a is not Ellipsis}
    if len(kinds) != 1 or not isinstance(next(iter(kinds)), type):
        return ""
    kind = next(iter(kinds))
    default = field.default if isinstance(field.default, tuple) else None
    if Ellipsis in args:
        example = list(default) if default else None
        return f"; expected a list of {kind.__name__}s" + (f" like {example}" if example else "")
    scalar = isinstance(value, kind) and not isinstance(value, bool)
    example = [value] * len(args) if scalar else list(default) if default else None
    like = f" like {example}" if example else ""
    return f"; expected a list of {len(args)} {kind.__name__}s{like}"


def _format_errors(source: str, err: ValidationError) -> str:
    lines = []
    items: set[tuple] = set()
    for e in err.errors():
        loc = tuple(e["loc"])
        if loc and isinstance(loc[-1], int):  # one line per list, naming its first bad item
            if (loc[:-1], e["type"]) in items:
                continue
            items.add((loc[:-1], e["type"]))
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = _allowed(ExperimentConfig, loc)
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            lines.append(
                f"{source}: unknown key '{key}' ({hint}allowed here: {', '.join(allowed)})"
            )
        else:
            value = e.get("input")
            msg = e["msg"]
            if e["type"] == "value_error":  # our validators' messages name the key and value
                lines.append(f"{source}: {msg.removeprefix('Value error, ')}")
                continue
            if e["type"] == "literal_error":
                msg = msg.replace("Input should be", "allowed values are")
            if e["type"] != "finite_number":  # the form is right, the number is not
                msg += _expected_form(loc, value)
            lines.append(f"{source}: key '{key}' = {value!r}: {msg}")
    return "\n".join(lines)


def validate_config(tree: Any, source: str) -> ExperimentConfig:
    """``tree`` (a YAML file's or a checkpoint's nested dict) as a typed config; ``ConfigError``
    naming ``source``, each bad key, its value and the allowed values or form otherwise."""
    if not isinstance(tree, dict):
        raise ConfigError(
            f"{source}: a config is a mapping of sections, not a {type(tree).__name__}"
        )
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(source, err)) from None


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> ExperimentConfig:
    """Load, merge and validate an experiment config.

    Args:
        path: YAML file, or None for the defaults.
        overrides: ``"a.b=value"`` strings applied after the file.
    Raises:
        ConfigError: naming the file, the key and the allowed values.
    """
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        tree = _read_yaml(path)
        base = tree.pop("base", None)
        if base is not None:
            if not isinstance(base, str) or not base:
                raise ConfigError(
                    f"{path}: key 'base' = {base!r}: expected the name of a YAML file (relative "
                    "to this one)"
                )
            # as written (links not followed): a refusal names the path the config gives
            base_path = (path.parent / base).absolute()
            base_tree = _read_yaml(base_path)
            if "base" in base_tree:
                raise ConfigError(
                    f"{base_path}: a base config may not itself have 'base:' (one level only)"
                )
            tree = _merge(base_tree, tree)
    for item in overrides:
        _apply_override(tree, item)
    where = source + (" (with --set overrides)" if overrides else "")
    cfg = validate_config(tree, where)
    # the run folder and the memory a run cannot do without, against this machine
    check_loaded_config(cfg, where)
    return cfg


class _Dumper(yaml.SafeDumper):
    """Lists of numbers and strings on one line (``crop_size: [512, 1024]``)."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flat = all(isinstance(v, int | float | str | bool) or v is None for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flat)


_Dumper.add_representer(list, _represent_list)


def format_config(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML: every key, defaults filled in, in the order of the
    sections (what ``contrastseg config show`` prints and ``save_config`` writes)."""
    return yaml.dump(cfg.to_dict(), Dumper=_Dumper, sort_keys=False, width=1 << 20)


def show_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """:func:`load_config` then :func:`format_config`: the YAML of the fully resolved config,
    so that two recipes compare with ``diff``."""
    return format_config(load_config(path, overrides))


def save_config(cfg: ExperimentConfig, path: Path) -> None:
    """Write the resolved config as YAML."""
    atomic_write_text(path, format_config(cfg))
