"""A run folder's own files read back (`report`, `train --resume`) after they were damaged: one
line naming the file and the line, status 2, never a traceback; a path the system refuses is one
line naming it."""

import json

import pytest

from contrastseg.config import load_config, save_config
from contrastseg.engine.trainer import open_metrics_log
from tiny import TINY


@pytest.fixture
def run(tmp_path):
    """A run folder as `train` leaves it: config.yaml, eval.json, metrics.jsonl."""
    folder = tmp_path / "runs" / "run"
    folder.mkdir(parents=True)
    save_config(
        load_config(None, [*TINY, f"output.root={tmp_path / 'runs'}"]), folder / "config.yaml"
    )
    (folder / "eval.json").write_text(json.dumps({"mIoU": 0.5, "split": "val"}))
    records = [{"iter": i, "loss": 1.0 / i, "s_per_iter": 0.5} for i in range(1, 5)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def _refused(run_cli, capsys, argv, *needles):
    assert run_cli(*argv) == 2, argv
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err and "internal error" not in err, err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def test_the_intact_run_reports(run, run_cli, capsys):
    assert run_cli("report", str(run)) == 0
    assert "50.00" in capsys.readouterr().out


@pytest.mark.parametrize(
    "damage, needle",
    [
        (b"\xff\xfe" + b'{"mIoU": 0.5}', "not UTF-8 text (byte 0)"),
        (b"[" * 100_000 + b"]" * 100_000, "nest too deep"),
        (b'{"mIoU": 0.5', "not valid JSON"),
        (b'{"mIoU": "half"}', "field 'mIoU' must be a number"),
        # a malformed entry is refused even where the command reads the final evaluation
        (b'{"mIoU": 0.5, "best": 5}', "field 'best' must be null or"),
        (b'{"mIoU": 0.5, "best": {"mIoU": NaN}}', "field 'best' must be null or"),
    ],
)
def test_a_damaged_eval_json_is_one_line(run, run_cli, capsys, damage, needle):
    (run / "eval.json").write_bytes(damage)
    _refused(run_cli, capsys, ("report", str(run)), "eval.json", needle)


@pytest.mark.parametrize(
    "line, needle",
    [
        (b"\xff\xfe{}", "line 5: not UTF-8 text"),
        (b"[" * 100_000 + b"]" * 100_000, "line 5: not valid JSON here (its values nest too deep)"),
        (b"[]", "line 5: a JSON list, not a record"),
        (b'{"s_per_iter": "fast"}', "line 5: field 's_per_iter' must be a finite number"),
    ],
)
def test_a_damaged_metrics_log_is_one_line(run, run_cli, capsys, line, needle):
    with (run / "metrics.jsonl").open("ab") as f:
        f.write(line + b"\n")
    _refused(run_cli, capsys, ("report", str(run)), "metrics.jsonl", needle)


def test_an_empty_config_is_not_taken_for_the_defaults(run, run_cli, capsys):
    (run / "config.yaml").write_bytes(b"")
    _refused(run_cli, capsys, ("report", str(run)), "config.yaml: empty")


def test_resume_drops_damaged_log_lines_with_a_warning(run, caplog):
    """The metrics log is appended to by a resumed run: lines that are not records (cut short
    by a crash, not UTF-8, not objects, no integer iteration) are dropped with one warning
    naming the file and their number; the records up to the checkpoint's iteration stay."""
    with (run / "metrics.jsonl").open("ab") as f:
        f.write(b"\xff\xfe{}\n[]\n" + b"[" * 100_000 + b"\n" + b'{"iter": "7"}\n{"iter": 9')
    with caplog.at_level("WARNING"), open_metrics_log(run / "metrics.jsonl", 3) as log:
        log.write("")
    kept = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in kept] == [1, 2, 3]
    notes = [r.getMessage() for r in caplog.records if "metrics.jsonl" in r.getMessage()]
    assert len(notes) == 1 and "dropped 5 line(s)" in notes[0], notes


def test_a_path_the_system_refuses_is_one_line_naming_it(tmp_path, run_cli, capsys):
    """A name longer than the file system allows reaches an OSError deep in a command: one
    line with the (shortened) path and the system's reason, status 2."""
    long = str(tmp_path / ("y" * 300))
    line = _refused(run_cli, capsys, ("report", long), "File name too long")
    assert "yyy" in line and len(line) < 400, line
