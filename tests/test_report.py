"""The results report: Table 1 and Table 2 rebuilt from run directories (markdown and CSV)."""

import csv
import json
import statistics
from pathlib import Path

import pytest
from typer.testing import CliRunner

from contrastseg.cli import app
from contrastseg.config import load_config, save_config
from contrastseg.errors import ContrastSegError
from contrastseg.report import FLAG, format_csv, format_markdown, percent, write_report
from contrastseg.rundir import load_run, load_runs, median_s_per_iter

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "cityscapes"

TABLE1 = """\
**Table 1**: Quantitative semantic segmentation results on Cityscapes val.

| Model            | Backbone     | sec./iter. |      mIoU (%) |
| :--------------- | :----------- | ---------: | ------------: |
| DeepLabV3        | MobileNet-V1 |       0.20 |         70.81 |
| DeepLabV3 + Ours | MobileNet-V1 |       0.30 | 70.72 (-0.09) |
| DeepLabV3        | MobileNet-V3 |       0.21 |         57.71 |
| DeepLabV3 + Ours | MobileNet-V3 |       0.31 | 59.19 (+1.48) |
| HRNetV2          | HRNetV2-W48  |       1.67 |         81.10 |
| HRNetV2 + Ours   | HRNetV2-W48  |       1.87 | 82.20 (+1.10) |
| OCR + Ours       | D-ResNet-101 |          - |         81.20 |
"""

TABLE2 = """\
**Table 2**: Comparison of different loss designs on Cityscapes val.

| Loss                     | Type         | Context | Backbone    | mIoU (%) |
| :----------------------- | :----------- | :------ | :---------- | -------: |
| Cross-Entropy Loss       | unary        | local   | HRNetV2-W48 |    78.10 |
| +AAF Loss                | pairwise     | local   | HRNetV2-W48 |    78.70 |
| +RMI Loss                | higher-order | local   | HRNetV2-W48 |    79.80 |
| +Lovász Loss             | higher-order | local   | HRNetV2-W48 |    80.30 |
| +Contrastive Loss (Ours) | pairwise     | global  | HRNetV2-W48 |    81.00 |
| +AAF + Contrastive       | -            | -       | HRNetV2-W48 |    81.00 |
| +RMI + Contrastive       | -            | -       | HRNetV2-W48 |    81.30 |
| +Lovász + Contrastive    | -            | -       | HRNetV2-W48 |    81.50 |
"""


def make_run(root: Path, config: str, miou: float, times=(), overrides=(), name=None) -> Path:
    """A run directory as training leaves it: config.yaml, metrics.jsonl, eval.json."""
    run = root / (name or Path(config).stem)
    save_config(load_config(CONFIGS / config, list(overrides)), run / "config.yaml")
    lines = [
        json.dumps({"iter": 50 * (i + 1), "ce": 0.5, "total": 0.7, "s_per_iter": t})
        for i, t in enumerate(times)
    ]
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    (run / "eval.json").write_text(json.dumps({"mIoU": miou, "pixel_acc": 0.9, "iteration": 8}))
    return run


@pytest.fixture
def table1_runs(tmp_path):
    """Table 1 runs, given out of order. Gains computed from the unrounded mIoU would differ
    from the printed ones: 59.186 - 57.714 = 1.472 and 82.204 - 81.096 = 1.108."""
    return [
        make_run(tmp_path, "ocr_resnet101_contrast.yaml", 0.812, times=[1.41]),
        make_run(tmp_path, "hrnetv2_w48_contrast.yaml", 0.82204, times=[4.0, 1.87]),
        make_run(tmp_path, "deeplabv3_mobilenetv3_contrast.yaml", 0.59186, times=[5, 0.30, 0.32]),
        make_run(tmp_path, "hrnetv2_w48_ce.yaml", 0.81096, times=[3.0, 1.66, 1.68]),
        make_run(tmp_path, "deeplabv3_mobilenetv3_ce.yaml", 0.57714, times=[9, 0.21, 0.19, 0.25]),
        make_run(tmp_path, "deeplabv3_mobilenetv1_contrast.yaml", 0.7072, times=[2.0, 0.3]),
        make_run(tmp_path, "deeplabv3_mobilenetv1_ce.yaml", 0.70805, times=[1.0, 0.2, 0.18, 0.22]),
    ]


@pytest.fixture
def table2_runs(tmp_path):
    """The eight runs of the supplement's Table 2 with its mIoU values, given reversed."""
    results = {
        "ce": 0.781,
        "aaf": 0.787,
        "rmi": 0.798,
        "lovasz": 0.803,
        "contrast": 0.81,
        "aaf_contrast": 0.81,
        "rmi_contrast": 0.813,
        "lovasz_contrast": 0.815,
    }
    runs = [
        make_run(tmp_path, f"table2/hrnetv2_w48_{loss}.yaml", miou, times=[2.0, 1.0])
        for loss, miou in results.items()
    ]
    return runs[::-1]


def test_table1_markdown_matches_the_supplement_layout(table1_runs):
    assert format_markdown(load_runs(table1_runs), "1") == TABLE1


def test_table1_does_not_depend_on_the_order_of_the_run_dirs(table1_runs):
    assert format_markdown(load_runs(table1_runs[::-1]), "1") == TABLE1


def test_table2_markdown_matches_the_supplement_layout(table2_runs):
    assert format_markdown(load_runs(table2_runs), "2") == TABLE2


def test_all_tables_are_table1_then_table2(table2_runs):
    text = format_markdown(load_runs(table2_runs), "all")
    assert text.index("**Table 1**") < text.index("**Table 2**")
    assert text.endswith(TABLE2)
    # the CE and CE + contrast runs of Table 2 are also a Table 1 pair
    assert "| HRNetV2 + Ours | HRNetV2-W48 |       1.00 | 81.00 (+2.90) |" in text


def test_csv_rows_of_table1(table1_runs, tmp_path):
    runs = load_runs(table1_runs)
    rows = list(csv.DictReader(format_csv(runs, "1").splitlines()))
    got = [(r["model"], r["backbone"], r["s_per_iter"], r["miou"], r["gain"]) for r in rows]
    assert got == [
        ("DeepLabV3", "MobileNet-V1", "0.20", "70.81", ""),
        ("DeepLabV3 + Ours", "MobileNet-V1", "0.30", "70.72", "-0.09"),
        ("DeepLabV3", "MobileNet-V3", "0.21", "57.71", ""),
        ("DeepLabV3 + Ours", "MobileNet-V3", "0.31", "59.19", "+1.48"),
        ("HRNetV2", "HRNetV2-W48", "1.67", "81.10", ""),
        ("HRNetV2 + Ours", "HRNetV2-W48", "1.87", "82.20", "+1.10"),
        ("OCR + Ours", "D-ResNet-101", "", "81.20", ""),
    ]
    assert {r["table"] for r in rows} == {"1"}
    assert {r["dataset"] for r in rows} == {"Cityscapes val"}
    assert rows[3]["run"] == str(tmp_path / "deeplabv3_mobilenetv3_contrast")
    assert rows[3]["baseline"] == str(tmp_path / "deeplabv3_mobilenetv3_ce")
    assert rows[6]["baseline"] == ""
    assert rows[0]["loss"] == rows[0]["type"] == ""


def test_csv_rows_of_table2(table2_runs):
    rows = list(csv.DictReader(format_csv(load_runs(table2_runs), "2").splitlines()))
    got = [(r["loss"], r["type"], r["context"], r["backbone"], r["miou"]) for r in rows]
    assert got[0] == ("Cross-Entropy Loss", "unary", "local", "HRNetV2-W48", "78.10")
    assert got[4] == ("+Contrastive Loss (Ours)", "pairwise", "global", "HRNetV2-W48", "81.00")
    assert got[7] == ("+Lovász + Contrastive", "", "", "HRNetV2-W48", "81.50")
    assert {r["model"] for r in rows} == {"HRNetV2"}
    assert {r["s_per_iter"] + r["gain"] + r["baseline"] for r in rows} == {""}


def test_write_report_writes_markdown_and_csv(table1_runs, tmp_path):
    md, table = tmp_path / "out" / "report.md", tmp_path / "out" / "report.csv"
    runs = load_runs(table1_runs)
    text = write_report(runs, md, table, "1")
    assert text == TABLE1 == md.read_text(encoding="utf-8")
    assert table.read_text(encoding="utf-8") == format_csv(runs, "1")


def test_gain_uses_the_printed_percentages():
    # 0.70805 is 70.80499... in binary floating point; the table rounds the decimal value
    assert str(percent(0.70805)) == "70.81"
    assert str(percent(0.59186) - percent(0.57714)) == "1.48"


def test_runs_of_one_row_are_pooled_whatever_the_argument_order(tmp_path):
    base = make_run(tmp_path, "hrnetv2_w48_ce.yaml", 0.8, times=[1, 1])
    b = make_run(tmp_path, "hrnetv2_w48_contrast.yaml", 0.81, name="b_contrast", times=[1, 2])
    a = make_run(tmp_path, "hrnetv2_w48_contrast.yaml", 0.82, name="a_contrast", times=[1, 3])
    first = format_csv(load_runs([b, base, a]), "1")
    assert first == format_csv(load_runs([a, b, base]), "1")
    rows = list(csv.DictReader(first.splitlines()))
    got = [(r["run"], r["n"], r["miou"], r["miou_std"], r["gain"], r["s_per_iter"]) for r in rows]
    assert got == [
        (str(base), "1", "80.00", "", "", "1.00"),
        # the runs of a row in path order; std of 81 and 82: sqrt(0.5) = 0.7071...
        (f"{a};{b}", "2", "81.50", "0.71", "+1.50", "2.50"),
    ]
    assert rows[1]["baseline"] == str(base) and rows[1]["flag"] == ""


def test_two_ce_runs_of_a_contrast_run_form_one_baseline(tmp_path):
    runs = [
        make_run(tmp_path, "hrnetv2_w48_ce.yaml", 0.8, name="ce_1"),
        make_run(tmp_path, "hrnetv2_w48_ce.yaml", 0.79, name="ce_2", overrides=["train.seed=3"]),
        make_run(tmp_path, "hrnetv2_w48_contrast.yaml", 0.81),
    ]
    rows = list(csv.DictReader(format_csv(load_runs(runs), "1").splitlines()))
    assert [(r["n"], r["miou"], r["gain"]) for r in rows] == [
        ("2", "79.50", ""),
        ("1", "81.00", "+1.50"),
    ]
    assert rows[1]["baseline"] == f"{runs[0]};{runs[1]}"


def test_baselines_match_only_on_the_same_data_set(tmp_path):
    runs = [
        make_run(tmp_path, "hrnetv2_w48_ce.yaml", 0.8),
        make_run(tmp_path, "hrnetv2_w48_contrast.yaml", 0.81, overrides=["data.val_split=test"]),
    ]
    text = format_markdown(load_runs(runs), "1")
    assert "on Cityscapes val." in text and "on Cityscapes test." in text
    assert "(+" not in text


def test_runs_with_other_losses_are_not_in_table1(tmp_path):
    runs = [make_run(tmp_path, "table2/hrnetv2_w48_lovasz_contrast.yaml", 0.815)]
    assert "no run fits" in format_markdown(load_runs(runs), "1")


def test_table2_names_the_model_when_it_is_not_hrnetv2(tmp_path):
    runs = [make_run(tmp_path, "deeplabv3_mobilenetv3_ce.yaml", 0.7)]
    assert "| MobileNet-V3 (DeepLabV3) |" in format_markdown(load_runs(runs), "2")


def test_missing_eval_json_names_the_file_and_the_fix(tmp_path):
    run = make_run(tmp_path, "hrnetv2_w48_ce.yaml", 0.8)
    (run / "eval.json").unlink()
    with pytest.raises(ContrastSegError, match=r"eval\.json: not found.*contrastseg eval"):
        load_run(run)


def test_eval_json_without_miou_names_the_field(tmp_path):
    run = make_run(tmp_path, "hrnetv2_w48_ce.yaml", 0.8)
    (run / "eval.json").write_text(json.dumps({"pixel_acc": 0.9}))
    with pytest.raises(ContrastSegError, match=r"eval\.json: field 'mIoU'"):
        load_run(run)


def test_missing_config_yaml_is_not_a_run_dir(tmp_path):
    with pytest.raises(ContrastSegError, match=r"config\.yaml: not found.*contrastseg train"):
        load_run(tmp_path)


def test_s_per_iter_skips_the_first_record_and_bad_lines_are_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iter": 1, "s_per_iter": 100}\n{"iter": 2}\n{"iter": 3, "s_per_iter": 2}\n')
    assert median_s_per_iter(path) == 2
    path.write_text('{"iter": 1, "s_per_iter": 100}\n')
    assert median_s_per_iter(path) is None
    path.write_text('{"iter": 1, "s_per_iter": 1}\n{"iter": 2, "s_per\n')
    with pytest.raises(ContrastSegError, match=r"metrics\.jsonl, line 2: not valid JSON"):
        median_s_per_iter(path)


def test_eval_split_decides_the_data_set(tmp_path):
    run = make_run(tmp_path, "hrnetv2_w48_ce.yaml", 0.8)
    (run / "eval.json").write_text(json.dumps({"mIoU": 0.8, "split": "test"}))
    assert "on Cityscapes test." in format_markdown(load_runs([run]), "2")


def test_cli_prints_markdown_and_writes_csv(table1_runs, tmp_path):
    out_csv = tmp_path / "t1.csv"
    args = ["report", *map(str, table1_runs), "--table", "1", "--csv", str(out_csv)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.output == TABLE1
    assert out_csv.read_text(encoding="utf-8") == format_csv(load_runs(table1_runs), "1")


def test_cli_rejects_an_unknown_table(table1_runs):
    result = CliRunner().invoke(app, ["report", str(table1_runs[0]), "--table", "3"])
    assert isinstance(result.exception, ContrastSegError)
    assert "--table '3'" in str(result.exception)


# ------------------------------------------------------------------ tables over seeds
CE_SEEDS = (0.8011, 0.8052, 0.7987)
CONTRAST_SEEDS = (0.8143, 0.8101, 0.8170)


def seed_runs(root: Path, ce=CE_SEEDS, contrast=CONTRAST_SEEDS, extra=()) -> list[Path]:
    """One CE and one contrast run per seed, the configs otherwise identical."""
    runs = []
    for config, values, times in (
        ("hrnetv2_w48_ce.yaml", ce, (1.6, 1.7, 1.8)),
        ("hrnetv2_w48_contrast.yaml", contrast, (1.9, 2.0, 1.8)),
    ):
        for seed, (miou, t) in enumerate(zip(values, times, strict=False)):
            name = f"{Path(config).stem}_seed{seed}"
            overrides = [f"train.seed={seed}", *extra]
            runs.append(
                make_run(root, config, miou, times=[9.0, t], overrides=overrides, name=name)
            )
    return runs


def cells(markdown: str) -> list[list[str]]:
    """The body rows of the markdown tables, each as its stripped cells."""
    rows = [line.strip("|").split("|") for line in markdown.splitlines() if line.startswith("|")]
    return [[c.strip() for c in r] for r in rows if not set(r[0].strip()) <= {":", "-"}]


def mean_std(values) -> tuple[str, str]:
    """Mean and sample standard deviation of the mIoU in percent, computed here in floats."""
    percents = [100 * v for v in values]
    return f"{statistics.mean(percents):.2f}", f"{statistics.stdev(percents):.2f}"


def test_seeds_are_pooled_into_mean_std_and_n(tmp_path):
    runs = load_runs(seed_runs(tmp_path))
    ce_mean, ce_std = mean_std(CE_SEEDS)
    ours_mean, ours_std = mean_std(CONTRAST_SEEDS)
    assert (ce_mean, ce_std, ours_mean, ours_std) == ("80.17", "0.33", "81.38", "0.35")
    gain = f"{float(ours_mean) - float(ce_mean):+.2f}"  # the difference of the printed means
    text = format_markdown(runs, "1")
    assert cells(text) == [
        ["Model", "Backbone", "sec./iter.", "mIoU (%)"],
        ["HRNetV2", "HRNetV2-W48", "1.70", f"{ce_mean} ± {ce_std} (n=3)"],
        ["HRNetV2 + Ours", "HRNetV2-W48", "1.90", f"{ours_mean} ± {ours_std} (n=3, {gain})"],
    ]
    assert gain == "+1.21" and FLAG not in text
    rows = list(csv.DictReader(format_csv(runs, "all").splitlines()))
    assert [(r["table"], r["n"], r["miou"], r["miou_std"], r["gain"]) for r in rows] == [
        ("1", "3", ce_mean, ce_std, ""),
        ("1", "3", ours_mean, ours_std, gain),
        ("2", "3", ce_mean, ce_std, ""),
        ("2", "3", ours_mean, ours_std, ""),
    ]
    assert rows[1]["run"].split(";") == [
        str(tmp_path / f"hrnetv2_w48_contrast_seed{i}") for i in range(3)
    ]
    assert rows[1]["baseline"].split(";") == [
        str(tmp_path / f"hrnetv2_w48_ce_seed{i}") for i in range(3)
    ]
    assert {r["flag"] for r in rows} == {""}
    table2 = cells(format_markdown(runs, "2"))
    assert table2[1][-1] == f"{ce_mean} ± {ce_std} (n=3)"
    assert table2[2][-1] == f"{ours_mean} ± {ours_std} (n=3)"


def test_a_row_whose_runs_differ_in_the_learning_rate_is_flagged(tmp_path):
    paths = seed_runs(tmp_path)
    odd = make_run(
        tmp_path,
        "hrnetv2_w48_ce.yaml",
        0.75,
        overrides=["train.seed=7", "optim.lr=0.02"],
        name="hrnetv2_w48_ce_seed7",
    )
    runs = load_runs([*paths, odd])
    text = format_markdown(runs, "1")
    table = cells(text)
    mean, std = mean_std((*CE_SEEDS, 0.75))
    assert table[1][-1] == f"{mean} ± {std} (n=4) {FLAG}"  # the odd run is pooled, and flagged
    # the contrast runs agree with each other, but their baseline now holds both rates
    assert table[2][-1].endswith(FLAG)
    notes = [line for line in text.splitlines() if line.startswith(f"- {FLAG}")]
    assert len(notes) == 2
    assert notes[0].startswith(f"- {FLAG} HRNetV2, HRNetV2-W48: its 4 runs differ")
    assert f"optim.lr (0.01 in {paths[0]}, {paths[1]}, {paths[2]}; 0.02 in {odd})" in notes[0]
    assert "train.seed (" not in notes[0] and "output.name" not in notes[0]
    assert notes[1].startswith(f"- {FLAG} HRNetV2 + Ours, HRNetV2-W48: the gain compares")
    assert notes[1].endswith("optim.lr (baseline 0.01, 0.02, here 0.01)")
    row = next(csv.DictReader(format_csv(runs, "1").splitlines()))
    assert row["n"] == "4" and "optim.lr" in row["flag"]
    assert cells(format_markdown(runs, "2"))[1][-1].endswith(FLAG)


def test_a_gain_over_a_baseline_with_another_learning_rate_is_flagged(tmp_path):
    ce = seed_runs(tmp_path, contrast=())
    ours = seed_runs(tmp_path / "lr", ce=(), extra=["optim.lr=0.02"])
    text = format_markdown(load_runs([*ce, *ours]), "1")
    table = cells(text)
    assert not table[1][-1].endswith(FLAG)  # each row's runs differ only in the seed
    assert table[2][-1].endswith(f"(n=3, +1.21) {FLAG}")
    notes = [line for line in text.splitlines() if line.startswith(f"- {FLAG}")]
    assert notes == [
        f"- {FLAG} HRNetV2 + Ours, HRNetV2-W48: the gain compares runs that differ in more than "
        "train.seed and the contrast term: optim.lr (baseline 0.01, here 0.02)"
    ]


def test_contrast_settings_output_folders_and_unused_settings_are_not_flagged(tmp_path):
    ce = seed_runs(tmp_path, contrast=(), extra=["loss.contrast.temperature=0.5"])
    ours = seed_runs(
        tmp_path / "other",
        ce=(),
        extra=[
            "loss.contrast.max_views=50",  # the treatment itself
            "model.projection_dim=128",  # read by the contrast term only
            f"output.root={tmp_path / 'elsewhere'}",  # where a run was written
            "loss.lovasz.per_image=true",  # a loss term no run uses
        ],
    )
    text = format_markdown(load_runs([*ce, *ours]), "all")
    assert FLAG not in text and "(n=3, +1.21)" in text


def test_one_run_per_row_keeps_the_supplement_layout(table1_runs):
    """Without seeds the cells are plain values: no standard deviation, no n."""
    text = format_markdown(load_runs(table1_runs), "1")
    assert "±" not in text and "n=" not in text and text == TABLE1
