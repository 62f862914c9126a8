"""The training loop: SGD + poly lr, checkpoints, exact resume, logs, final evaluation."""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

from contrastseg.config import ExperimentConfig, OptimConfig, flatten, save_config
from contrastseg.config_checks import crop_warning
from contrastseg.contrast import PixelContrast
from contrastseg.data import build_eval_dataset, build_train_dataset
from contrastseg.distributed import (
    all_processes_agree,
    convert_sync_batchnorm,
    init_distributed,
    mean_over_processes,
)
from contrastseg.engine import checkpoint as ckpt
from contrastseg.engine import resume as resume_config
from contrastseg.engine.checkpoint_parts import (
    check_finite,
    check_model_parts,
    check_resume_parts,
    check_weights_fit,
)
from contrastseg.engine.compiling import compile_inference, compile_training
from contrastseg.engine.evaluator import evaluate, format_table, write_eval_json
from contrastseg.engine.progress import TrainProgress
from contrastseg.engine.runtime import environment_info, resolve_device, seed_everything
from contrastseg.engine.sampling import EpochIndexed, IterationBatchSampler
from contrastseg.engine.signals import StopSignal
from contrastseg.engine.step import sgd_step
from contrastseg.errors import (
    CheckpointError,
    ConfigError,
    TrainingError,
    TrainingInterrupted,
    one_line,
)
from contrastseg.files import atomic_write_text, parse_json
from contrastseg.losses import LossSet
from contrastseg.models import build_model
from contrastseg.precision import AMP_DTYPES

log = logging.getLogger("contrastseg")


def poly_lr(cfg: OptimConfig, it: int, total: int) -> float:
    """Learning rate at 0-based iteration ``it``: linear warm-up, then poly decay to 0."""
    if it < cfg.warmup_iters:
        ratio = cfg.warmup_ratio + (1.0 - cfg.warmup_ratio) * it / cfg.warmup_iters
        return cfg.lr * ratio
    return cfg.lr * (1.0 - it / total) ** cfg.poly_power


def model_parameter_groups(
    model: torch.nn.Module, extra: list[torch.nn.Parameter], head_lr_mult: float = 1.0
) -> list[dict]:
    """The optimiser groups of the model's parameters and ``extra`` (the contrast projection
    head): one group when ``head_lr_mult`` is 1; otherwise the backbone's parameters
    (``model.backbone``) at the base learning rate and every other one at ``lr_mult =
    head_lr_mult`` (the trainer sets each group's lr to the base lr x its ``lr_mult``)."""
    params = list(model.parameters()) + list(extra)
    if head_lr_mult == 1.0:
        return [{"params": params}]
    backbone = {id(p) for p in model.backbone.parameters()}
    return [
        {"params": [p for p in params if id(p) in backbone]},
        {"params": [p for p in params if id(p) not in backbone], "lr_mult": head_lr_mult},
    ]


def check_micro_batches(batch_size: int, grad_accum: int, world_size: int) -> None:
    """Each process's share of a step must split into ``grad_accum`` equal micro-batches."""
    if batch_size % (world_size * grad_accum):
        raise ConfigError(
            f"train.batch_size = {batch_size} does not split into {world_size} process(es) x "
            f"train.grad_accum = {grad_accum} equal micro-batches: make batch_size a multiple "
            f"of {world_size * grad_accum}"
        )


def check_pooling_batch_norm(cfg: ExperimentConfig, world_size: int) -> None:
    """Each process's micro-batch must hold 2 images or more when a head's global-pooling
    batch norm trains on it alone (several processes without ``train.sync_bn``); the config
    already refused a micro-batch of 1 over all processes."""
    m, t = cfg.model, cfg.train
    share = t.batch_size // (world_size * t.grad_accum)
    if m.pools_globally and world_size > 1 and not t.sync_bn and share < 2:
        raise ConfigError(
            f"train.batch_size = {t.batch_size} over {world_size} processes x train.grad_accum "
            f"= {t.grad_accum} leaves {share} image per process and micro-batch: model.head = "
            f"{m.head!r} has a global-pooling batch norm that needs 2; set train.sync_bn: true "
            "or a larger train.batch_size"
        )


def collate_train(items: list[dict]) -> dict:
    return {
        "image": torch.stack([it["image"] for it in items]),
        "mask": torch.stack([it["mask"] for it in items]),
        "index": torch.tensor([it["index"] for it in items]),
    }


@dataclass
class TrainResult:
    """What a run ends with: its folder, iteration and val metrics, and (rank 0) the first
    ``eval.figure_images`` val samples (``image``, ``mask``, ``pred``) with the data's palette,
    for whoever draws the prediction figure."""

    run_dir: Path
    iteration: int
    metrics: dict | None
    samples: list[dict] = field(default_factory=list)
    palette: list | None = None


class Trainer:
    """Owns the model, optimiser, loss set and data of one run directory.

    ``fit()`` trains from the current iteration to ``train.iters``, writing checkpoints every
    ``train.checkpoint_every`` iterations and at the end, then evaluates on the val split.
    """

    def __init__(self, cfg: ExperimentConfig, resume: bool = False, progress: bool = True):
        self.cfg = cfg
        self.progress = progress
        self.run_dir = cfg.run_dir
        self.ckpt_dir = self.run_dir / "checkpoints"
        # Resuming without --resume: torchrun restarted the group, or train.auto_resume.
        reason = (
            "--resume" if resume else ckpt.auto_resume_reason(cfg.train.auto_resume, self.ckpt_dir)
        )
        resume = reason is not None
        self.resume_reason = reason
        # A resumed run's config against the one it ran with so far (config.yaml and the
        # recorded changes), before anything is built: trajectory keys must not change.
        self.recorded_config, self.config_changes = (
            resume_config.check_run_folder(cfg) if resume else (None, {})
        )
        self.checkpoint_config: ExperimentConfig | None = None
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        seed_everything(cfg.train.seed, cfg.train.deterministic)
        self.device = resolve_device(cfg.train.device)
        self.dist = init_distributed(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)

        self.train_set = build_train_dataset(cfg.data, seed=cfg.train.seed)
        build_eval_dataset(cfg.data)  # a missing or empty val split stops the run before training
        if self.dist.is_main and len(self.train_set):
            first = (
                cfg.data.image_size
                if cfg.data.name == "synthetic"
                else self.train_set.source[0][0].shape[:2]
            )
            warning = crop_warning(cfg.data, tuple(first))
            if warning:
                log.warning("%s", warning)
        self.num_classes = self.train_set.num_classes
        self.class_names = list(self.train_set.classes)
        # A prototype classifier draws its own noise on each process (its seed, like pixel
        # contrast's, differs by rank); DDP starts every process from process 0's prototypes.
        model = build_model(
            cfg.model,
            self.num_classes,
            backbone_weights=not resume,
            prototype_seed=cfg.train.seed + self.dist.rank,
        )
        # Pixel contrast is attached the way any user attaches it: a PixelContrast module that
        # reads the model's training features (built right after the model, so that its
        # projection head draws the same initial weights whatever else the run builds).
        contrast = None
        if cfg.loss.contrast.enabled:
            contrast = PixelContrast.from_config(
                cfg.loss.contrast,
                cfg.model,
                self.num_classes,
                model.feature_channels,
                seed=cfg.train.seed + self.dist.rank,  # each process draws its own anchors
                num_images=len(self.train_set),
            )
        if self.dist.enabled and cfg.train.sync_bn:
            model = convert_sync_batchnorm(model, self.device.type)
            if contrast is not None:
                contrast.projection = convert_sync_batchnorm(contrast.projection, self.device.type)
        self.model = model.to(self.device)
        self.loss_set = LossSet(
            cfg.loss, self.num_classes, contrast=contrast, total_iters=cfg.train.iters
        ).to(self.device)
        # The projection head trains with the model's heads; the loss set's own parameters
        # (AAF's adaptive weights, trained by gradient ascent through a reversed gradient) join
        # as a further group with their own lr_mult.
        self.optimizer = torch.optim.SGD(
            [
                *model_parameter_groups(
                    self.model, self.loss_set.model_parameters(), cfg.optim.head_lr_mult
                ),
                *self.loss_set.optimizer_groups(),
            ],
            lr=cfg.optim.lr,
            momentum=cfg.optim.momentum,
            weight_decay=cfg.optim.weight_decay,
        )
        amp = cfg.train.amp
        self.amp_dtype = AMP_DTYPES[amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")
        if cfg.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
            if contrast is not None:
                contrast.projection.to(memory_format=torch.channels_last)
        # Batch-norm statistics that a skipped step restores (the model's and the projection
        # head's; not the contrast memory, which never stores a non-finite embedding).
        self.bn_buffers = list(self.model.buffers())
        if contrast is not None:
            self.bn_buffers += list(contrast.projection.buffers())
        forward = self.model
        self.ddp: DistributedDataParallel | None = None
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            forward = self.ddp = DistributedDataParallel(self.model, device_ids=ids)
        t = cfg.train
        self.forward = (
            compile_training(forward, t.compile_backend, t.compile_mode) if t.compile else forward
        )
        # the val evaluations' model (eval.compile: compiled, a dynamic graph for new sizes)
        e = cfg.eval
        self.eval_model = (
            compile_inference(self.model, e.compile_backend, e.compile_mode)
            if e.compile
            else self.model
        )
        check_micro_batches(cfg.train.batch_size, cfg.train.grad_accum, self.dist.world_size)
        check_pooling_batch_norm(cfg, self.dist.world_size)
        self.iteration = 0
        # {"iteration", "mIoU"} of checkpoints/best.pt, the best val evaluation so far (with
        # train.eval_every); part of every checkpoint, so a resumed run keeps comparing with it
        self.best: dict | None = None
        if resume:
            self._resume(reason)
        elif ckpt.list_checkpoints(self.ckpt_dir):
            raise CheckpointError(
                f"{self.ckpt_dir} already holds checkpoints: pass --resume to continue that run, "
                "or choose another output.name"
            )

    # --- state -----------------------------------------------------------------------------
    def state_dict(self, processes: list[dict] | None = None) -> dict:
        """The checkpoint's contents; ``processes``: every process's random state
        (:meth:`process_states`), by default this process's alone."""
        return {
            "format_version": ckpt.FORMAT_VERSION,
            "iteration": self.iteration,
            "config": self.cfg.to_dict(),
            "class_names": self.class_names,
            "palette": self.train_set.palette.tolist(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "loss": self.loss_set.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
            "processes": processes if processes is not None else [self._process_state()],
            "environment": environment_info(self.device),
            "best": self.best,
        }

    def _process_state(self) -> dict:
        """What differs between processes: the torch RNGs and the random generators
        (``*_extra_state``) of the loss set (each process draws its own anchors) and of the
        model (a prototype classifier's Gumbel noise)."""
        return {
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
            "loss": _generator_states(self.loss_set),
            "model": _generator_states(self.model),
        }

    def process_states(self) -> list[dict]:
        """Every process's :meth:`_process_state`, in rank order (a collective under DDP)."""
        mine = self._process_state()
        if not self.dist.enabled:
            return [mine]
        gathered: list = [None] * self.dist.world_size
        torch.distributed.all_gather_object(gathered, mine)
        return gathered

    def _resume(self, reason: str = "--resume") -> None:
        skipped: list[str] = []
        found = ckpt.latest_loadable(self.ckpt_dir, skipped)
        if found is None:
            fix = (
                "run the same command without --resume to start from iteration 0"
                if reason == "--resume"
                else "its files are torn or corrupt: move them away to start from iteration 0"
            )
            why = f" ({'; '.join(skipped)})" if skipped else ""
            raise CheckpointError(
                f"{reason}: no loadable checkpoint in {self.ckpt_dir}{why}; {fix}"
            )
        path, state = found
        parts = check_model_parts(path, state)
        check_resume_parts(path, state)
        check_finite(path, parts.weights)
        if self.recorded_config is None:  # no config.yaml: the checkpoint's config is the record
            self.config_changes = resume_config.check_resume_config(
                self.cfg, flatten(state["config"]), f"{path} (its config)"
            )
            self.checkpoint_config = parts.config
        if state["iteration"] > self.cfg.train.iters:
            raise ConfigError(
                f"train.iters = {self.cfg.train.iters} is below the iteration of {path}, "
                f"{state['iteration']}: resume with train.iters >= {state['iteration']}"
            )
        if state["class_names"] != self.class_names:
            raise CheckpointError(
                f"{path}: made for {len(state['class_names'])} classes {state['class_names']}, "
                f"but the data set has {self.num_classes} {self.class_names}; resume with the "
                "data set it was trained on, or start a new run (another output.name)"
            )
        check_weights_fit(path, parts.weights, self.model)
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as err:
            raise CheckpointError(f"{path}: does not fit the configured model: {err}") from err
        processes = state.get("processes") or []
        mine = {"rng": state["rng"], "loss": {}}  # process 0's, in the top-level entries
        if len(processes) == self.dist.world_size:
            mine = processes[self.dist.rank]
        elif self.dist.is_main:
            log.warning(
                "%s was written by %d process(es), this run has %d: each takes process 0's "
                "random state, so the run will not repeat an uninterrupted one exactly",
                path,
                len(processes),
                self.dist.world_size,
            )
        state["loss"].update(mine["loss"])
        # this process's generators of the model (older checkpoints have none: process 0's,
        # from the model's state_dict, stay)
        model_generators = mine.get("model") or {}
        restore = [
            ("model", lambda: self.model.load_state_dict(model_generators, strict=False)),
            ("optimizer", lambda: self.optimizer.load_state_dict(state["optimizer"])),
            ("loss", lambda: self.loss_set.load_state_dict(state["loss"])),
            (
                "scaler",
                lambda: state.get("scaler") and self.scaler.load_state_dict(state["scaler"]),
            ),
            ("rng", lambda: torch.set_rng_state(mine["rng"]["torch"])),
        ]
        for part, load in restore:
            try:
                load()
            except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as err:
                raise CheckpointError(
                    f"{path}: its {part!r} part does not fit this run: {one_line(err)[:300]}"
                ) from err
        if mine["rng"].get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(mine["rng"]["cuda"])
        self.iteration = state["iteration"]
        self.best = state.get("best")
        log.info("resumed from %s at iteration %d (%s)", path, self.iteration, reason)

    def save_checkpoint(self) -> Path:
        """Write this iteration's checkpoint (rank 0 only) and keep the newest few; every
        process calls it (the processes' random states are gathered)."""
        path = ckpt.checkpoint_path(self.ckpt_dir, self.iteration)
        processes = self.process_states()
        if self.dist.is_main:
            ckpt.atomic_save(self.state_dict(processes), path)
            ckpt.rotate(self.ckpt_dir, self.cfg.train.keep_checkpoints)
        return path

    @property
    def best_path(self) -> Path:
        """``checkpoints/best.pt``: outside the rotation (it has no iteration in its name)."""
        return self.ckpt_dir / "best.pt"

    def update_best(self, miou: float) -> bool:
        """With ``train.eval_every``: when ``miou`` beats the best so far (strictly, the first
        evaluation always), record this iteration as the best and write ``best.pt`` (rank 0;
        every process calls it, as :meth:`save_checkpoint`). Returns whether it did."""
        if not self.cfg.train.eval_every:
            return False
        if self.best is not None and not miou > self.best["mIoU"]:
            return False
        self.best = {"iteration": self.iteration, "mIoU": float(miou)}
        processes = self.process_states()
        if self.dist.is_main:
            ckpt.atomic_save(self.state_dict(processes), self.best_path)
            log.info("iteration %d: best val mIoU so far, wrote %s", self.iteration, self.best_path)
        return True

    # --- training --------------------------------------------------------------------------
    def _loader(self) -> DataLoader:
        t = self.cfg.train
        sampler = IterationBatchSampler(
            len(self.train_set),
            t.batch_size,
            t.iters,
            seed=t.seed,
            start=self.iteration,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        return DataLoader(
            EpochIndexed(self.train_set),
            batch_sampler=sampler,
            num_workers=self.cfg.data.num_workers,
            collate_fn=collate_train,
            # A private generator: creating the loader must not draw from the global RNG, or a
            # resumed run's dropout masks would shift by one draw.
            generator=torch.Generator().manual_seed(t.seed),
        )

    def train_step(self, batch: dict) -> dict[str, float]:
        """One SGD step on a batch, in ``train.grad_accum`` micro-batches; returns the loss
        terms (summed over the micro-batches: the full-batch values) as floats."""
        lr = poly_lr(self.cfg.optim, self.iteration, self.cfg.train.iters)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        dtype = next(self.model.parameters()).dtype  # float32, or float64 in exactness tests
        image = batch["image"].to(self.device, dtype=dtype, non_blocking=True)
        if self.cfg.train.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        target = batch["mask"].to(self.device, non_blocking=True)
        index = batch["index"].to(self.device)
        summed, finite = sgd_step(
            self.forward,
            self.loss_set,
            self.optimizer,
            self.scaler,
            image,
            target,
            index,
            self.iteration,
            amp_dtype=self.amp_dtype,
            grad_accum=self.cfg.train.grad_accum,
            ddp=self.ddp,
            bn_buffers=self.bn_buffers,
        )
        self.iteration += 1
        values = {k: float(v) for k, v in summed.items()}
        values["lr"] = lr
        values["skipped"] = float(not finite)
        return values

    def fit(self) -> TrainResult:
        """Train to ``train.iters``, checkpoint, evaluate; only rank 0 writes files."""
        cfg = self.cfg
        main = self.dist.is_main
        writer = metrics_file = None
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self.resume_reason is None:
                # a new run: the config of its first iterations, written once
                save_config(cfg, self.run_dir / "config.yaml")
                (self.run_dir / resume_config.CHANGES_FILE).unlink(missing_ok=True)
            elif not (self.run_dir / "config.yaml").exists() and self.checkpoint_config:
                # deleted, or never written (a checkpoint saved without fit): the config of the
                # checkpoint resumed from stands for the iterations so far
                save_config(self.checkpoint_config, self.run_dir / "config.yaml")
            if self.resume_reason is not None and self.config_changes:
                path = resume_config.record_changes(
                    self.run_dir, self.iteration, self.config_changes, self.resume_reason
                )
                log.info(
                    "from iteration %d: %s (recorded in %s)",
                    self.iteration,
                    ", ".join(
                        f"{k} {json.dumps(v['from'])} -> {json.dumps(v['to'])}"
                        for k, v in self.config_changes.items()
                    ),
                    path,
                )
            (self.run_dir / "environment.json").write_text(
                json.dumps(environment_info(self.device), indent=2)
            )
            # purge_step drops events past the checkpoint that a killed run left behind.
            writer = SummaryWriter(
                str(self.run_dir / "tensorboard"), purge_step=self.iteration or None
            )
            metrics_file = open_metrics_log(self.run_dir / "metrics.jsonl", self.iteration)
        self.model.train()
        total = cfg.train.iters
        start_iter = self.iteration
        t_last, it_last = time.perf_counter(), self.iteration
        bad_steps = 0
        stop = StopSignal()
        with stop, TrainProgress(total, self.iteration, enabled=self.progress and main) as bar:
            for batch in self._loader():
                values = self.train_step(batch)
                if values["skipped"]:
                    bad_steps += 1
                    log.warning(
                        "iteration %d: non-finite loss or gradient, step skipped (%d in a row): %s",
                        self.iteration,
                        bad_steps,
                        {k: v for k, v in values.items() if k != "skipped"},
                    )
                    if bad_steps >= cfg.train.max_bad_steps:
                        path = self.save_checkpoint()
                        raise TrainingError(
                            f"{bad_steps} consecutive non-finite steps up to iteration "
                            f"{self.iteration}; stopped. {path} holds the last good weights "
                            "(skipped steps change nothing). Lower optim.lr, use train.amp=off "
                            "or bf16, or check the data, then resume with --resume."
                        )
                else:
                    bad_steps = 0
                if self.iteration % cfg.train.log_every == 0 or self.iteration == total:
                    values = mean_over_processes(values, self.device)
                    now = time.perf_counter()
                    values["s_per_iter"] = (now - t_last) / max(1, self.iteration - it_last)
                    t_last, it_last = now, self.iteration
                    bar.window_s_per_iter = values["s_per_iter"]  # the console shows this record's
                    if main:
                        metrics_file.write(json.dumps({"iter": self.iteration, **values}) + "\n")
                        metrics_file.flush()
                        for k, v in values.items():
                            writer.add_scalar(f"train/{k}", v, self.iteration)
                    if not all(math.isfinite(v) for v in values.values()):
                        log.warning("non-finite value at iteration %d: %s", self.iteration, values)
                bar.advance(values)
                if self.iteration % cfg.train.checkpoint_every == 0 and self.iteration < total:
                    self.save_checkpoint()
                # Any process's signal stops all of them (one all-reduce under DDP).
                stopping = not all_processes_agree(stop.received is None, self.device)
                if stopping and self.iteration < total:
                    path = self.save_checkpoint()
                    raise TrainingInterrupted(stop.received or signal.SIGTERM, self.iteration, path)
                # (the last iteration's evaluation is the final one, below)
                every = cfg.train.eval_every
                if every and self.iteration % every == 0 and self.iteration < total:
                    self._evaluate(writer, final=False)
        if self.iteration > start_iter or not ckpt.list_checkpoints(self.ckpt_dir):
            self.save_checkpoint()
        metrics, samples = self._evaluate(writer, final=True)
        if main:
            writer.close()
            metrics_file.close()
        palette = self.train_set.palette.tolist()
        return TrainResult(self.run_dir, self.iteration, metrics, samples, palette)

    def _evaluate(self, writer: SummaryWriter | None, final: bool) -> tuple[dict, list[dict]]:
        """Evaluate on the val split (each process a disjoint share under DDP); returns the
        metrics and, for the final evaluation on rank 0, the samples kept for the figure."""
        cfg = self.cfg
        val = build_eval_dataset(cfg.data)
        keep = cfg.eval.figure_images if final and self.dist.is_main else 0
        metrics, samples = evaluate(
            self.eval_model,
            val,
            self.device,
            cfg.eval.batch_size,
            cfg.data.num_workers,
            keep=keep,
            eval_cfg=cfg.eval,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        self.update_best(metrics["mIoU"])  # the same metrics on every process
        if not self.dist.is_main:
            return metrics, []
        for key in ("mIoU", "pixel_acc", "mean_acc", "fwIoU"):
            writer.add_scalar(f"val/{key}", metrics[key], self.iteration)
        if not final:
            log.info("iteration %d: val mIoU %.2f%%", self.iteration, 100 * metrics["mIoU"])
            return metrics, []
        extra: dict = {"iteration": self.iteration}
        if self.best is not None:
            extra["best"] = {
                **self.best,
                "checkpoint": self.best_path.relative_to(self.run_dir).as_posix(),
            }
        write_eval_json(metrics, self.class_names, self.run_dir / "eval.json", **extra)
        print(format_table(metrics, self.class_names))
        return metrics, samples


def _generator_states(module: torch.nn.Module) -> dict:
    """The ``*_extra_state`` entries (random generators) of a module's state_dict."""
    return {k: v for k, v in module.state_dict().items() if k.endswith("_extra_state")}


def open_metrics_log(path: Path, iteration: int):
    """Open ``metrics.jsonl`` for appending, first dropping records after ``iteration`` (left by
    a run that was killed after its last checkpoint), so a resumed log has no duplicates."""
    if path.exists():
        keep, dropped = [], 0
        for raw in path.read_bytes().splitlines():
            try:  # a line cut short when the machine went down, or damaged since
                line = raw.decode("utf-8")
                record = parse_json(line)
            except (UnicodeDecodeError, ValueError):
                dropped += bool(raw.strip())
                continue
            step = record.get("iter", 0) if isinstance(record, dict) else None
            if type(step) is not int:
                dropped += 1
            elif step <= iteration:
                keep.append(line)
        if dropped:
            log.warning("%s: dropped %d line(s) that are not records of this log", path, dropped)
        atomic_write_text(path, "".join(line + "\n" for line in keep))
    return path.open("a")
