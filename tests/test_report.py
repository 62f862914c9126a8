"""The results report: Table 1 and Table 2 rebuilt from run directories (markdown and CSV)."""

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from contrastseg.cli import app
from contrastseg.config import load_config, save_config
from contrastseg.errors import ContrastSegError
from contrastseg.report import format_csv, format_markdown, percent, write_report
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


def test_contrast_runs_of_one_baseline_are_ordered_by_run_dir(tmp_path):
    base = make_run(tmp_path, "hrnetv2_w48_ce.yaml", 0.8, times=[1, 1])
    b = make_run(tmp_path, "hrnetv2_w48_contrast.yaml", 0.81, name="b_contrast", times=[1, 2])
    a = make_run(tmp_path, "hrnetv2_w48_contrast.yaml", 0.82, name="a_contrast", times=[1, 3])
    first = format_csv(load_runs([b, base, a]), "1")
    assert first == format_csv(load_runs([a, b, base]), "1")
    rows = list(csv.DictReader(first.splitlines()))
    assert [(Path(r["run"]).name, r["gain"]) for r in rows] == [
        ("hrnetv2_w48_ce", ""),
        ("a_contrast", "+2.00"),
        ("b_contrast", "+1.00"),
    ]


def test_two_baselines_for_one_contrast_run_is_an_error(tmp_path):
    runs = [
        make_run(tmp_path, "hrnetv2_w48_ce.yaml", 0.8, name="ce_1"),
        make_run(tmp_path, "hrnetv2_w48_ce.yaml", 0.79, name="ce_2"),
        make_run(tmp_path, "hrnetv2_w48_contrast.yaml", 0.81),
    ]
    with pytest.raises(ContrastSegError, match="ce_1 and .*ce_2 are both CE-only runs"):
        format_markdown(load_runs(runs), "1")


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
