"""The installed ``contrastseg`` script: a usage error is one ``error:`` line (at most with the
usage line and a ``--help`` hint) and exit status 2, whatever typer/click release raises it; an
unexpected exception is one line naming it and where its traceback went, exit status 1."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import contrastseg

ROOT = Path(__file__).resolve().parents[1]


def _script() -> str:
    beside = Path(sys.executable).parent / "contrastseg"
    found = str(beside) if beside.exists() else shutil.which("contrastseg")
    assert found, "the contrastseg console script is not installed"
    return found


def _run(*argv: str, **env: str) -> tuple[int, str, str]:
    done = subprocess.run(
        [_script(), *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "80", **env},
    )
    return done.returncode, done.stdout, done.stderr


USAGE_ERRORS = [
    # argv, what the error line must name
    (["trian", "configs/demo.yaml"], ["'trian'", "Did you mean 'train'"]),
    (["eval", "configs/demo.yaml"], ["--checkpoint"]),
    (["train"], ["CONFIG"]),
    (["train", "configs/demo.yaml", "--sett", "train.iters=5"], ["--sett"]),
    (["summary", "configs/demo.yaml", "--height", "abc"], ["--height", "abc"]),
    (["bench", "nosuch"], ["'nosuch'"]),
]


@pytest.mark.parametrize(("argv", "culprits"), USAGE_ERRORS, ids=lambda v: " ".join(v))
def test_usage_error_is_one_line_and_status_2(argv, culprits):
    code, out, err = _run(*argv)
    text = out + err
    lines = text.splitlines()
    assert code == 2, text
    assert "Traceback" not in text and "╭" not in text, text
    assert 1 <= len(lines) <= 3, text
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, text
    for culprit in culprits:  # typer spells argument names in lower case, click in upper
        assert culprit.lower() in errors[0].lower(), text
    others = [line for line in lines if line not in errors]
    assert all(line.startswith(("Usage:", "Try ")) for line in others), text
    assert out == "", "usage errors go to stderr"


def test_version_prints_the_version():
    code, out, err = _run("--version")
    assert code == 0, out + err
    assert out.strip() == f"contrastseg {contrastseg.__version__}"
    assert err == ""


@pytest.mark.parametrize("argv", [[], ["bench"]], ids=["bare", "bare group"])
def test_bare_command_prints_the_help_with_status_0(argv):
    code, out, err = _run(*argv)
    assert code == 0, out + err
    assert out.lstrip().startswith("Usage:"), out
    assert "Commands" in out and "--help" in out
    assert "Traceback" not in out + err and "Error" not in out + err


def test_an_error_of_several_lines_is_printed_as_one_error_line(run_cli, capsys, tmp_path):
    """Every invalid key of a config is named, on the one error line (joined with "; ")."""
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  iters: -1\n  batch_size: x\nfoo: 1\n")
    assert run_cli("config", "show", str(config)) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for culprit in ("'train.iters' = -1", "'train.batch_size' = 'x'", "unknown key 'foo'"):
        assert culprit in lines[0], lines
    assert lines[0].count(str(config)) == 3 and "; " in lines[0], lines


def test_internal_error_is_one_line_naming_it_and_the_traceback_file(
    run_cli, monkeypatch, capsys, tmp_path
):
    def broken(*args, **kwargs):
        raise ValueError("something inside broke\nsecond line")

    monkeypatch.setattr(contrastseg, "show_config", broken)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("CONTRASTSEG_TRACEBACK", raising=False)
    assert run_cli("config", "show", "configs/demo.yaml") == 1
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: internal error: ValueError: something inside broke")
    assert "CONTRASTSEG_TRACEBACK=1" in lines[0]
    written = list(tmp_path.rglob("traceback-*.txt"))
    assert len(written) == 1 and str(written[0]) in lines[0]
    assert "Traceback" in written[0].read_text() and "broken" in written[0].read_text()

    monkeypatch.setenv("CONTRASTSEG_TRACEBACK", "1")
    assert run_cli("config", "show", "configs/demo.yaml") == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ValueError" in err
