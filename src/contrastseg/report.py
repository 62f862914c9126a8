"""The supplement's Table 1 and Table 2 rebuilt from run directories, as markdown and CSV.

Table 1 (model, backbone, sec./iter., mIoU with the gain over the CE baseline) takes the runs
whose loss is CE only or CE + pixel contrast; Table 2 (loss, type, context, backbone, mIoU)
takes every run. Runs of one row (same evaluation data set, model, backbone and loss terms; in
practice the same config with another ``train.seed``) are pooled: the row shows their mean mIoU,
the sample standard deviation and their number, and Table 1's gain is the difference of two
means. A row whose runs differ in more than the seed, or a gain whose two rows do, is marked
``†`` with a note naming the config keys that differ. Rows are grouped per evaluation data set
and ordered as in the supplement. docs/report.md describes the columns and the rules.
"""

from __future__ import annotations

import csv
import io
import statistics
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

from contrastseg.config import ExperimentConfig, flatten
from contrastseg.datasets_table import DATA_SETS
from contrastseg.errors import ContrastSegError
from contrastseg.files import atomic_write_text
from contrastseg.model_table import BACKBONES, HEADS
from contrastseg.rundir import RunRecord

__all__ = [
    "CSV_FIELDS",
    "FLAG",
    "RunGroup",
    "Table1Row",
    "Table2Row",
    "config_differences",
    "csv_rows",
    "dataset_label",
    "format_csv",
    "format_markdown",
    "group_runs",
    "loss_terms",
    "parse_tables",
    "percent",
    "table1_rows",
    "table2_rows",
    "write_report",
]

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
    "n",
    "s_per_iter",
    "miou",
    "miou_std",
    "gain",
    "baseline",
    "flag",
)
FLAG = "†"  # marks a row whose runs, or whose gain's two rows, differ in more than the seed
# Config keys that may differ between the runs of a row: the seed, and where a run was written.
SEED_KEYS = ("train.seed",)
OUTPUT_PREFIX = "output."
# Keys only the contrast term reads: a Table 1 gain compares a contrast row with a CE row.
CONTRAST_KEYS = ("loss.contrast.", "model.projection_dim", "model.projection_hidden")
# (prefix, switch): settings under ``prefix`` are unused when ``switch`` is off in every run.
SWITCHES = (
    ("loss.contrast.", "loss.contrast.enabled"),
    ("loss.contrast.memory.", "loss.contrast.memory.enabled"),
    ("loss.lovasz.", "loss.lovasz.enabled"),
    ("loss.rmi.", "loss.rmi.enabled"),
    ("loss.aaf.", "loss.aaf.enabled"),
    ("loss.ce.ohem_", "loss.ce.ohem"),
)
RUN_SEPARATOR = ";"  # between run directories in one CSV cell


def _fixed(value: Decimal | float, scale: int = 1) -> Decimal:
    """``value x scale`` rounded half-up to 2 decimals (exact: no binary rounding surprises)."""
    exact = value if isinstance(value, Decimal) else Decimal(repr(value))
    return (exact * scale).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


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
    name = DATA_SETS[d.name].display
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
    entry = BACKBONES.get(b.name)  # a timm:<model> backbone shows its own name
    name = entry.display if entry else b.name
    return name if b.is_hrnet or b.output_stride == 8 else f"{name} (OS {b.output_stride})"


def _group_key(run: RunRecord) -> tuple:
    """Sort key of (data set, model, backbone): the supplement's order of models and backbones."""
    m = run.cfg.model
    return (
        dataset_label(run.cfg, run.split),
        list(HEADS).index(m.head),
        (list(BACKBONES).index(m.backbone.name), "")
        if m.backbone.name in BACKBONES
        else (len(BACKBONES), m.backbone.name),
        m.backbone.output_stride,
    )


# ------------------------------------------------------------------ config differences
def _flatten(tree: dict[str, Any]) -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``, the values as the config file writes them."""
    return {key: _show(value) for key, value in flatten(tree).items()}


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def _unused(key: str, flats: list[dict[str, str]]) -> bool:
    """Whether ``key`` belongs to a loss term (or memory, or OHEM) every run has switched off."""
    for prefix, switch in SWITCHES:
        if key.startswith(prefix) and key != switch and all(f[switch] == "false" for f in flats):
            return True
    return False


def _compared(key: str, flats: list[dict[str, str]], skip: tuple[str, ...]) -> bool:
    if key in SEED_KEYS or key.startswith(OUTPUT_PREFIX) or key.startswith(skip):
        return False
    return not _unused(key, flats)


def config_differences(
    configs: list[ExperimentConfig],
    others: list[ExperimentConfig] | None = None,
    skip: tuple[str, ...] = (),
) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """The config keys in which runs differ, beyond ``train.seed`` and ``output.*``.

    Without ``others``: the keys that take more than one value among ``configs``, each with its
    values (in order of first appearance) and ``()``. With ``others``: the keys whose values in
    ``configs`` are not the values in ``others``, each with both. Keys starting with a prefix in
    ``skip`` are not compared, nor are the settings of a loss term (or of the memory, or of
    OHEM) that every compared run has switched off.
    """
    flats = [_flatten(c.to_dict()) for c in configs]
    other_flats = [_flatten(c.to_dict()) for c in others or []]
    every = flats + other_flats
    out: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
    for key in every[0] if every else ():
        if not _compared(key, every, skip):
            continue
        mine = tuple(dict.fromkeys(f[key] for f in flats))
        theirs = tuple(dict.fromkeys(f[key] for f in other_flats))
        if others is None and len(mine) > 1:
            out[key] = (mine, ())
        elif others is not None and set(mine) != set(theirs):
            out[key] = (mine, theirs)
    return out


# ---------------------------------------------------------------------------- groups
@dataclass(frozen=True)
class RunGroup:
    """The runs of one table row: same evaluation data set, model, backbone, output stride and
    loss terms; ordered by directory path."""

    runs: tuple[RunRecord, ...]

    @property
    def first(self) -> RunRecord:
        return self.runs[0]

    @property
    def paths(self) -> tuple[Path, ...]:
        return tuple(r.path for r in self.runs)

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def terms(self) -> tuple[str, ...]:
        return loss_terms(self.first.cfg)

    def _percents(self) -> list[Decimal]:
        """Each run's mIoU in percent, exactly (from the decimal value in eval.json)."""
        return [Decimal(repr(r.miou)) * 100 for r in self.runs]

    @property
    def miou(self) -> Decimal:
        """The mean mIoU in percent, rounded half-up to 2 decimals."""
        return _fixed(statistics.mean(self._percents()))

    @property
    def miou_std(self) -> Decimal | None:
        """The sample standard deviation (n - 1) of the runs' mIoU in percent; None for one run."""
        return _fixed(statistics.stdev(self._percents())) if self.n > 1 else None

    @property
    def s_per_iter(self) -> Decimal | None:
        """The mean over the runs with timings of their median s/iter; None when none has one."""
        times = [Decimal(repr(r.s_per_iter)) for r in self.runs if r.s_per_iter is not None]
        return _fixed(statistics.mean(times)) if times else None

    def differences(self) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
        return config_differences([r.cfg for r in self.runs])


def group_runs(runs: list[RunRecord]) -> list[RunGroup]:
    """Pool the runs into table rows; each group's runs sorted by path, groups by first path."""
    groups: dict[tuple, list[RunRecord]] = {}
    for run in runs:
        groups.setdefault((_group_key(run), loss_terms(run.cfg)), []).append(run)
    out = [RunGroup(tuple(sorted(rs, key=lambda r: str(r.path)))) for rs in groups.values()]
    return sorted(out, key=lambda g: str(g.first.path))


def _values(values: tuple[str, ...]) -> str:
    return ", ".join(values)


def _within_note(group: RunGroup, name: str) -> str | None:
    diff = group.differences()
    if not diff:
        return None
    flats = [_flatten(r.cfg.to_dict()) for r in group.runs]
    parts = []
    for key, (values, _) in diff.items():
        pairs = list(zip(group.runs, flats, strict=True))
        where = [
            f"{v} in " + ", ".join(str(r.path) for r, f in pairs if f[key] == v) for v in values
        ]
        parts.append(f"{key} ({'; '.join(where)})")
    return f"{name}: its {group.n} runs differ in more than train.seed: " + ", ".join(parts)


def _gain_note(group: RunGroup, base: RunGroup, name: str) -> str | None:
    diff = config_differences(
        [r.cfg for r in group.runs], [r.cfg for r in base.runs], skip=CONTRAST_KEYS
    )
    if not diff:
        return None
    parts = [
        f"{key} (baseline {_values(theirs)}, here {_values(mine)})"
        for key, (mine, theirs) in diff.items()
    ]
    return (
        f"{name}: the gain compares runs that differ in more than train.seed and the contrast "
        "term: " + ", ".join(parts)
    )


# ---------------------------------------------------------------------------- rows
@dataclass(frozen=True)
class Table1Row:
    dataset: str
    runs: tuple[Path, ...]
    model: str  # "DeepLabV3" or "DeepLabV3 + Ours"
    backbone: str
    s_per_iter: Decimal | None  # mean over the runs of their median s/iter
    miou: Decimal  # mean over the runs, percent, 2 decimals
    miou_std: Decimal | None  # sample standard deviation over the runs; None for one run
    gain: Decimal | None  # percentage points over the mean of ``baseline``
    baseline: tuple[Path, ...]  # the runs of the CE row the gain is taken over; () if none
    notes: tuple[str, ...] = ()  # why the row is flagged; () if it is not

    @property
    def n(self) -> int:
        return len(self.runs)


@dataclass(frozen=True)
class Table2Row:
    dataset: str
    runs: tuple[Path, ...]
    model: str
    backbone: str
    loss: str
    type: str | None  # None: the supplement's "-" (a combination of losses)
    context: str | None
    miou: Decimal
    miou_std: Decimal | None
    notes: tuple[str, ...] = ()

    @property
    def n(self) -> int:
        return len(self.runs)


def table1_rows(runs: list[RunRecord]) -> list[Table1Row]:
    """Rows of Table 1: CE-only and CE + contrast rows, each baseline before its contrast row.

    The baseline of a contrast row is the CE-only row of the same data set and split, model,
    backbone and output stride; without one the row has no gain. The gain is the difference of
    the two printed means.
    """
    groups = [g for g in group_runs(runs) if g.terms in ((), ("contrast",))]
    groups.sort(key=lambda g: (_group_key(g.first), bool(g.terms)))
    bases = {_group_key(g.first): g for g in groups if not g.terms}
    rows = []
    for group in groups:
        cfg = group.first.cfg
        contrast = bool(group.terms)
        model = HEADS[cfg.model.head] + (" + Ours" if contrast else "")
        name = f"{model}, {_backbone(cfg)}"
        base = bases.get(_group_key(group.first)) if contrast else None
        notes = [_within_note(group, name)]
        if base is not None:
            notes.append(_gain_note(group, base, name))
        rows.append(
            Table1Row(
                dataset=dataset_label(cfg, group.first.split),
                runs=group.paths,
                model=model,
                backbone=_backbone(cfg),
                s_per_iter=group.s_per_iter,
                miou=group.miou,
                miou_std=group.miou_std,
                gain=None if base is None else group.miou - base.miou,
                baseline=() if base is None else base.paths,
                notes=tuple(n for n in notes if n),
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
    """Rows of Table 2: every row of runs, grouped by data set, model and backbone, in the loss
    order."""
    groups = sorted(group_runs(runs), key=lambda g: (_group_key(g.first), _loss_order(g.terms)))
    rows = []
    for group in groups:
        cfg = group.first.cfg
        loss, kind, context = _loss_columns(group.terms)
        model, backbone = HEADS[cfg.model.head], _backbone(cfg)
        note = _within_note(group, f"{loss}, {_table2_backbone(model, backbone)}")
        rows.append(
            Table2Row(
                dataset=dataset_label(cfg, group.first.split),
                runs=group.paths,
                model=model,
                backbone=backbone,
                loss=loss,
                type=kind,
                context=context,
                miou=group.miou,
                miou_std=group.miou_std,
                notes=(note,) if note else (),
            )
        )
    return rows


# ---------------------------------------------------------------------------- markdown
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


def _miou_cell(row: Table1Row | Table2Row, gain: Decimal | None = None) -> str:
    """``81.10``; over several runs ``81.10 ± 0.25 (n=3)``; a gain ``(+1.10)`` or
    ``(n=3, +1.10)``; ``†`` when the row is flagged."""
    cell = f"{row.miou}"
    extras = []
    if row.miou_std is not None:
        cell += f" ± {row.miou_std}"
        extras.append(f"n={row.n}")
    if gain is not None:
        extras.append(_gain(gain))
    if extras:
        cell += f" ({', '.join(extras)})"
    return cell + (f" {FLAG}" if row.notes else "")


def _notes(rows: list) -> str:
    lines = [f"- {FLAG} {note}" for r in rows for note in r.notes]
    return "\n\n" + "\n".join(lines) if lines else ""


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
                _miou_cell(r, r.gain),
            ]
            for r in group
        ]
        out.append(
            f"**Table 1**: Quantitative semantic segmentation results on {dataset}.\n\n"
            + _markdown_table(["Model", "Backbone", "sec./iter.", "mIoU (%)"], cells, {2, 3})
            + _notes(group)
        )
    return out


def _table2_backbone(model: str, backbone: str) -> str:
    """The supplement's base network is HRNetV2, named by its backbone; other heads are named."""
    return backbone if model == "HRNetV2" else f"{backbone} ({model})"


def _table2_markdown(rows: list[Table2Row]) -> list[str]:
    if not rows:
        return ["**Table 2**: no runs."]
    out = []
    for dataset, group in _by_dataset(rows).items():
        cells = [
            [
                r.loss,
                r.type or "-",
                r.context or "-",
                _table2_backbone(r.model, r.backbone),
                _miou_cell(r),
            ]
            for r in group
        ]
        out.append(
            f"**Table 2**: Comparison of different loss designs on {dataset}.\n\n"
            + _markdown_table(["Loss", "Type", "Context", "Backbone", "mIoU (%)"], cells, {4})
            + _notes(group)
        )
    return out


def parse_tables(choice: str) -> tuple[str, ...]:
    """``"1"``, ``"2"`` or ``"all"`` as the tuple of tables to build."""
    if choice not in TABLE_CHOICES:
        raise ContrastSegError(f"--table {choice!r}: allowed values are 1, 2 and all")
    return TABLE_CHOICES[choice]


def format_markdown(runs: list[RunRecord], tables: str = "all") -> str:
    """The chosen tables as markdown, one captioned table per data set, each followed by the
    notes of its flagged rows."""
    parts: list[str] = []
    for table in parse_tables(tables):
        if table == "1":
            parts += _table1_markdown(table1_rows(runs))
        else:
            parts += _table2_markdown(table2_rows(runs))
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------- CSV
def _paths(paths: tuple[Path, ...]) -> str:
    return RUN_SEPARATOR.join(str(p) for p in paths)


def _common(r: Table1Row | Table2Row) -> dict[str, str]:
    return {
        "dataset": r.dataset,
        "run": _paths(r.runs),
        "backbone": r.backbone,
        "n": str(r.n),
        "miou": str(r.miou),
        "miou_std": "" if r.miou_std is None else str(r.miou_std),
        "flag": " | ".join(r.notes),
    }


def csv_rows(runs: list[RunRecord], tables: str = "all") -> list[dict[str, str]]:
    """The chosen tables' rows with :data:`CSV_FIELDS`; empty strings where a table has no
    value (the markdown's "-"). ``run`` and ``baseline`` list a row's run directories joined
    by ``;``."""
    out: list[dict[str, str]] = []
    for table in parse_tables(tables):
        if table == "1":
            for r in table1_rows(runs):
                out.append(
                    dict.fromkeys(CSV_FIELDS, "")
                    | _common(r)
                    | {
                        "table": "1",
                        "model": r.model,
                        "s_per_iter": "" if r.s_per_iter is None else str(r.s_per_iter),
                        "gain": "" if r.gain is None else _gain(r.gain),
                        "baseline": _paths(r.baseline),
                    }
                )
        else:
            for r in table2_rows(runs):
                out.append(
                    dict.fromkeys(CSV_FIELDS, "")
                    | _common(r)
                    | {
                        "table": "2",
                        "model": r.model,
                        "loss": r.loss,
                        "type": r.type or "",
                        "context": r.context or "",
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
    atomic_write_text(path, text)
