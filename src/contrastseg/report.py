"""The supplement's Table 1 and Table 2 rebuilt from run directories, as markdown and CSV.

Table 1 (model, backbone, sec./iter., mIoU with the gain over the CE baseline) takes the runs
whose loss is CE only or CE + pixel contrast; Table 2 (loss, type, context, backbone, mIoU)
takes every run. Rows are grouped per evaluation data set and ordered as in the supplement.
docs/report.md describes the columns and how baselines are matched.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

from contrastseg.config import ExperimentConfig
from contrastseg.errors import ContrastSegError
from contrastseg.rundir import RunRecord

__all__ = [
    "CSV_FIELDS",
    "Table1Row",
    "Table2Row",
    "csv_rows",
    "dataset_label",
    "format_csv",
    "format_markdown",
    "loss_terms",
    "parse_tables",
    "percent",
    "table1_rows",
    "table2_rows",
    "write_report",
]

MODELS = {"deeplabv3": "DeepLabV3", "hrnetv2": "HRNetV2", "ocr": "OCR"}
BACKBONES = {
    "mobilenetv1": "MobileNet-V1",
    "mobilenetv2": "MobileNet-V2",
    "mobilenetv3_large": "MobileNet-V3",
    "resnet101": "ResNet-101",
    "resnet101_deep": "D-ResNet-101",
    "hrnetv2_w18_small": "HRNetV2-W18-Small",
    "hrnetv2_w48": "HRNetV2-W48",
}
DATASETS = {
    "cityscapes": "Cityscapes",
    "pascal_context": "PASCAL-Context",
    "coco_stuff": "COCO-Stuff",
    "camvid": "CamVid",
    "folder": "folder",
    "synthetic": "synthetic",
}
# Loss terms beyond CE, in the order of the supplement's Table 2 rows.
EXTRA_TERMS = ("aaf", "rmi", "lovasz", "contrast")
TERM_NAMES = {"aaf": "AAF", "rmi": "RMI", "lovasz": "Lovász", "contrast": "Contrastive"}
# (type, context) columns of Table 2
TERM_KINDS = {
    "aaf": ("pairwise", "local"),
    "rmi": ("higher-order", "local"),
    "lovasz": ("higher-order", "local"),
    "contrast": ("pairwise", "global"),
}
TABLE_CHOICES = {"1": ("1",), "2": ("2",), "all": ("1", "2")}
CSV_FIELDS = (
    "table",
    "dataset",
    "run",
    "model",
    "backbone",
    "loss",
    "type",
    "context",
    "s_per_iter",
    "miou",
    "gain",
    "baseline",
)


@dataclass(frozen=True)
class Table1Row:
    dataset: str
    run: Path
    model: str  # "DeepLabV3" or "DeepLabV3 + Ours"
    backbone: str
    s_per_iter: Decimal | None
    miou: Decimal  # percent, 2 decimals
    gain: Decimal | None  # percentage points over ``baseline``
    baseline: Path | None


@dataclass(frozen=True)
class Table2Row:
    dataset: str
    run: Path
    model: str
    backbone: str
    loss: str
    type: str | None  # None: the supplement's "-" (a combination of losses)
    context: str | None
    miou: Decimal


def _fixed(value: float, scale: int = 1) -> Decimal:
    """``value x scale`` rounded half-up to 2 decimals (exact: no binary rounding surprises)."""
    return (Decimal(repr(value)) * scale).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def percent(fraction: float) -> Decimal:
    """An mIoU fraction as the percent the tables print (2 decimals, half-up)."""
    return _fixed(fraction, 100)


def loss_terms(cfg: ExperimentConfig) -> tuple[str, ...]:
    """The loss terms besides CE that a run trained with (enabled and weight > 0)."""
    return tuple(
        t for t in EXTRA_TERMS if getattr(cfg.loss, t).enabled and getattr(cfg.loss, t).weight > 0
    )


def dataset_label(cfg: ExperimentConfig, split: str) -> str:
    """The evaluation data set and split, e.g. ``Cityscapes val``; runs match only within one."""
    d = cfg.data
    name = DATASETS[d.name]
    if d.name == "coco_stuff":
        name = f"{name}-{d.coco_split}"
    elif d.name == "folder":
        name = f"folder {d.root}"
    label = f"{name} {split}"
    if d.name == "cityscapes" and d.cityscapes_coarse:
        label += " (gtCoarse)"
    elif d.name == "synthetic":
        h, w = d.image_size
        label += f" (seed {d.seed}, difficulty {d.difficulty:g}, {d.val_size} images of {h}x{w})"
    return label


def _backbone(cfg: ExperimentConfig) -> str:
    b = cfg.model.backbone
    name = BACKBONES[b.name]
    return name if b.is_hrnet or b.output_stride == 8 else f"{name} (OS {b.output_stride})"


def _group_key(run: RunRecord) -> tuple:
    """Sort key of (data set, model, backbone): the supplement's order of models and backbones."""
    m = run.cfg.model
    return (
        dataset_label(run.cfg, run.split),
        list(MODELS).index(m.head),
        list(BACKBONES).index(m.backbone.name),
        m.backbone.output_stride,
    )


def table1_rows(runs: list[RunRecord]) -> list[Table1Row]:
    """Rows of Table 1: CE-only and CE + contrast runs, each baseline before its contrast runs.

    The baseline of a contrast run is the CE-only run with the same data set and split, model,
    backbone and output stride; without one the row has no gain, with two it is an error.
    """
    eligible = [r for r in runs if loss_terms(r.cfg) in ((), ("contrast",))]
    eligible.sort(key=lambda r: (_group_key(r), bool(loss_terms(r.cfg)), str(r.path)))
    rows = []
    for run in eligible:
        contrast = bool(loss_terms(run.cfg))
        base = None
        if contrast:
            bases = [
                r for r in eligible if not loss_terms(r.cfg) and _group_key(r) == _group_key(run)
            ]
            if len(bases) > 1:
                raise ContrastSegError(
                    f"{bases[0].path} and {bases[1].path} are both CE-only runs of "
                    f"{MODELS[run.cfg.model.head]} on {_backbone(run.cfg)} "
                    f"({dataset_label(run.cfg, run.split)}), so the gain of {run.path} is "
                    "ambiguous; pass only one of them"
                )
            base = bases[0] if bases else None
        miou = percent(run.miou)
        model = MODELS[run.cfg.model.head]
        rows.append(
            Table1Row(
                dataset=dataset_label(run.cfg, run.split),
                run=run.path,
                model=f"{model} + Ours" if contrast else model,
                backbone=_backbone(run.cfg),
                s_per_iter=None if run.s_per_iter is None else _fixed(run.s_per_iter),
                miou=miou,
                gain=None if base is None else miou - percent(base.miou),
                baseline=None if base is None else base.path,
            )
        )
    return rows


def _loss_columns(terms: tuple[str, ...]) -> tuple[str, str | None, str | None]:
    """(loss, type, context) as the supplement names them; combinations have no type/context."""
    if not terms:
        return "Cross-Entropy Loss", "unary", "local"
    if terms == ("contrast",):
        return "+Contrastive Loss (Ours)", *TERM_KINDS["contrast"]
    if len(terms) == 1:
        return f"+{TERM_NAMES[terms[0]]} Loss", *TERM_KINDS[terms[0]]
    return "+" + " + ".join(TERM_NAMES[t] for t in terms), None, None


def _loss_order(terms: tuple[str, ...]) -> tuple:
    """CE; single losses (AAF, RMI, Lovász, contrast); other combinations; X + contrast."""
    indices = tuple(EXTRA_TERMS.index(t) for t in terms)
    return ("contrast" in terms and len(terms) > 1, len(terms), indices)


def table2_rows(runs: list[RunRecord]) -> list[Table2Row]:
    """Rows of Table 2: every run, grouped by data set, model and backbone, in the loss order."""
    ordered = sorted(
        runs, key=lambda r: (_group_key(r), _loss_order(loss_terms(r.cfg)), str(r.path))
    )
    rows = []
    for run in ordered:
        loss, kind, context = _loss_columns(loss_terms(run.cfg))
        rows.append(
            Table2Row(
                dataset=dataset_label(run.cfg, run.split),
                run=run.path,
                model=MODELS[run.cfg.model.head],
                backbone=_backbone(run.cfg),
                loss=loss,
                type=kind,
                context=context,
                miou=percent(run.miou),
            )
        )
    return rows


def _markdown_table(header: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = [
        ("-" * (w - 1) + ":") if i in right else (":" + "-" * (w - 1)) for i, w in enumerate(widths)
    ]
    return "\n".join([line(header), line(rule), *(line(r) for r in rows)])


def _by_dataset(rows: list) -> dict[str, list]:
    groups: dict[str, list] = {}
    for row in rows:
        groups.setdefault(row.dataset, []).append(row)
    return groups


def _gain(gain: Decimal) -> str:
    return f"{gain:+.2f}"


def _table1_markdown(rows: list[Table1Row]) -> list[str]:
    if not rows:
        return ["**Table 1**: no run fits (it takes CE-only runs and CE + contrast runs)."]
    out = []
    for dataset, group in _by_dataset(rows).items():
        cells = [
            [
                r.model,
                r.backbone,
                "-" if r.s_per_iter is None else f"{r.s_per_iter}",
                f"{r.miou}" + ("" if r.gain is None else f" ({_gain(r.gain)})"),
            ]
            for r in group
        ]
        out.append(
            f"**Table 1**: Quantitative semantic segmentation results on {dataset}.\n\n"
            + _markdown_table(["Model", "Backbone", "sec./iter.", "mIoU (%)"], cells, {2, 3})
        )
    return out


def _table2_backbone(row: Table2Row) -> str:
    """The supplement's base network is HRNetV2, named by its backbone; other heads are named."""
    return row.backbone if row.model == "HRNetV2" else f"{row.backbone} ({row.model})"


def _table2_markdown(rows: list[Table2Row]) -> list[str]:
    if not rows:
        return ["**Table 2**: no runs."]
    out = []
    for dataset, group in _by_dataset(rows).items():
        cells = [
            [r.loss, r.type or "-", r.context or "-", _table2_backbone(r), f"{r.miou}"]
            for r in group
        ]
        out.append(
            f"**Table 2**: Comparison of different loss designs on {dataset}.\n\n"
            + _markdown_table(["Loss", "Type", "Context", "Backbone", "mIoU (%)"], cells, {4})
        )
    return out


def parse_tables(choice: str) -> tuple[str, ...]:
    """``"1"``, ``"2"`` or ``"all"`` as the tuple of tables to build."""
    if choice not in TABLE_CHOICES:
        raise ContrastSegError(f"--table {choice!r}: allowed values are 1, 2 and all")
    return TABLE_CHOICES[choice]


def format_markdown(runs: list[RunRecord], tables: str = "all") -> str:
    """The chosen tables as markdown, one captioned table per data set."""
    parts: list[str] = []
    for table in parse_tables(tables):
        if table == "1":
            parts += _table1_markdown(table1_rows(runs))
        else:
            parts += _table2_markdown(table2_rows(runs))
    return "\n\n".join(parts) + "\n"


def csv_rows(runs: list[RunRecord], tables: str = "all") -> list[dict[str, str]]:
    """The chosen tables' rows with :data:`CSV_FIELDS`; empty strings where a table has no
    value (the markdown's "-")."""
    out: list[dict[str, str]] = []
    for table in parse_tables(tables):
        if table == "1":
            for r in table1_rows(runs):
                out.append(
                    dict.fromkeys(CSV_FIELDS, "")
                    | {
                        "table": "1",
                        "dataset": r.dataset,
                        "run": str(r.run),
                        "model": r.model,
                        "backbone": r.backbone,
                        "s_per_iter": "" if r.s_per_iter is None else str(r.s_per_iter),
                        "miou": str(r.miou),
                        "gain": "" if r.gain is None else _gain(r.gain),
                        "baseline": "" if r.baseline is None else str(r.baseline),
                    }
                )
        else:
            for r in table2_rows(runs):
                out.append(
                    dict.fromkeys(CSV_FIELDS, "")
                    | {
                        "table": "2",
                        "dataset": r.dataset,
                        "run": str(r.run),
                        "model": r.model,
                        "backbone": r.backbone,
                        "loss": r.loss,
                        "type": r.type or "",
                        "context": r.context or "",
                        "miou": str(r.miou),
                    }
                )
    return out


def format_csv(runs: list[RunRecord], tables: str = "all") -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_rows(runs, tables))
    return buf.getvalue()


def write_report(
    runs: list[RunRecord],
    out_md: Path | None = None,
    out_csv: Path | None = None,
    tables: str = "all",
) -> str:
    """Build the chosen tables; write markdown to ``out_md`` and CSV to ``out_csv`` where given.

    Returns the markdown.
    """
    markdown = format_markdown(runs, tables)
    if out_md is not None:
        _write(Path(out_md), markdown)
    if out_csv is not None:
        _write(Path(out_csv), format_csv(runs, tables))
    return markdown


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
