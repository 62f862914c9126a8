"""The step breakdown: every part, its share of the step and, for contrast parts, its floor."""

import math

import pytest

from contrastseg.benchmarks.breakdown import (
    PARTS,
    PROTOTYPE_PARTS,
    format_breakdown,
    parts_of,
    run_breakdown,
)
from contrastseg.config import load_config

TINY_CONTRAST = [
    "model.head_channels=16",
    "model.aux_channels=8",
    "model.projection_dim=16",
    "model.projection_hidden=16",
    "loss.contrast.max_views=4",
    "loss.contrast.memory.pixel_size=40",
    "loss.contrast.memory.region_size=8",
]
WITH_FLOOR = {"projection head", "labels + sampling", "in-batch term", "memory term", "memory push"}


@pytest.mark.parametrize("sampling", ["all", "hardest"])
def test_breakdown_has_every_part_with_floors_and_shares(sampling):
    cfg = load_config(
        "configs/demo_contrast.yaml",
        [*TINY_CONTRAST, f"loss.contrast.memory.sampling={sampling}"],
    )
    result = run_breakdown(cfg, num_classes=19, batch=2, size=(64, 64), repeats=1)
    rows = result["rows"]
    assert [r["part"] for r in rows] == list(PARTS)
    assert sum(r["pct"] for r in rows) == pytest.approx(100.0, abs=1e-6)
    step_ms = result["meta"]["step_ms"]
    assert step_ms > 0
    assert sum(r["ms"] for r in rows) == pytest.approx(step_ms, rel=1e-9)
    for r in rows:
        assert r["pct"] == pytest.approx(100.0 * r["ms"] / step_ms)
        has_floor = r["part"] in WITH_FLOOR or (r["part"] == "memory read" and sampling != "all")
        assert (r["floor_ms"] is not None) == has_floor, r["part"]
        if has_floor:
            assert r["floor_ms"] > 0
            assert r["ratio"] == pytest.approx(r["ms"] / r["floor_ms"])
            assert r["floor"] != "-"
        else:
            assert r["ratio"] is None and r["floor"] == "-"
    meta = result["meta"]
    assert meta["anchors"] > 0 and meta["dim"] == 16
    assert meta["memory"] == 19 * (40 + 8) and meta["memory_sampling"] == sampling
    text = format_breakdown(result)
    lines = text.splitlines()
    assert [line.split("  ")[0].strip() for line in lines[4 : 4 + len(PARTS)]] == list(PARTS)
    assert lines[-1].startswith("step")


def test_cli_step_breakdown(run_cli, capsys):
    args = [f"--set={o}" for o in TINY_CONTRAST]
    code = run_cli(
        "bench",
        "step",
        "configs/demo_contrast.yaml",
        "--breakdown",
        "--batch",
        "2",
        "--height",
        "64",
        "--width",
        "64",
        "--repeats",
        "1",
        *args,
    )
    assert code == 0
    out = capsys.readouterr().out
    for part in PARTS:
        assert part in out
    assert "part/floor" in out
    # Without --breakdown: the side-by-side step benchmark, as before.
    size = ["--batch", "2", "--height", "64", "--width", "64", "--repeats", "1"]
    assert run_cli("bench", "step", "configs/demo_contrast.yaml", *size, *args) == 0
    assert "overhead" in capsys.readouterr().out
    assert (
        run_cli("bench", "step", "configs/demo_contrast.yaml", "--breakdown", "--amp", "bf16") != 0
    )


def test_breakdown_with_more_anchors_than_one_image_has_pixels():
    """As in the demo (8 images of 16x16 grid pixels, 440 anchors): more anchors than one
    image has grid pixels; the sampling floor still gathers distinct pixels of the batch."""
    cfg = load_config("configs/demo_contrast.yaml", [*TINY_CONTRAST, "loss.contrast.max_views=1"])
    result = run_breakdown(cfg, num_classes=8, batch=8, size=(32, 64), repeats=1)
    meta = result["meta"]
    assert meta["anchors"] > 4 * 8  # the 4x8 grid of one 32x64 image at stride 8
    sampling = next(r for r in result["rows"] if r["part"] == "labels + sampling")
    assert sampling["floor_ms"] > 0


def test_breakdown_with_a_prototype_classifier_splits_the_classifier_step():
    cfg = load_config(
        "configs/demo_contrast.yaml",
        [*TINY_CONTRAST, "model.classifier=prototype", "model.prototype.num_prototypes=3"],
    )
    parts = parts_of(cfg)
    assert parts == (PARTS[0], *PROTOTYPE_PARTS, *PARTS[1:])
    result = run_breakdown(cfg, num_classes=19, batch=2, size=(64, 64), repeats=1)
    rows = {r["part"]: r for r in result["rows"]}
    assert [r["part"] for r in result["rows"]] == list(parts)
    meta = result["meta"]
    assert sum(r["ms"] for r in rows.values()) == pytest.approx(meta["step_ms"], rel=1e-9)
    classifier = meta["classifier"]
    assert classifier["prototypes"] == 3 and classifier["classes"] == 19
    assert 0 < classifier["labelled"] <= classifier["pixels"]
    # The classifier's five rows sum to the measured classifier step.
    assert classifier["classifier_ms"] > 0
    five = sum(rows[p]["ms"] for p in PROTOTYPE_PARTS)
    assert five == pytest.approx(classifier["classifier_ms"], rel=1e-9)
    for part in PROTOTYPE_PARTS[:-1]:
        r = rows[part]
        assert math.isfinite(r["ms"]) and r["ms"] > 0, part
        assert math.isfinite(r["floor_ms"]) and r["floor_ms"] > 0, part
        assert r["ratio"] == pytest.approx(r["ms"] / r["floor_ms"])
        assert r["floor"] != "-"
    assert rows["classifier rest"]["floor_ms"] is None
    for part in WITH_FLOOR:
        assert rows[part]["floor_ms"] > 0
    lines = format_breakdown(result).splitlines()
    assert lines[2].startswith("prototype classifier:")
    assert [line.split("  ")[0].strip() for line in lines[5 : 5 + len(parts)]] == list(parts)
    assert lines[-2].startswith("classifier step") and lines[-1].startswith("step")


def test_cli_step_compiled_row(run_cli, capsys):
    """bench step --compile: the eager and the compiled step of the baseline and of contrast,
    side by side with their ratio and the first compiled step's seconds (a debugging backend
    here, to keep the test short); --compile with --breakdown, and an unknown backend, are
    refused in one line."""
    size = ["--batch", "2", "--height", "64", "--width", "64", "--repeats", "1"]
    args = [*size, *(f"--set={o}" for o in TINY_CONTRAST)]
    compiled = ["--compile", "--compile-backend", "aot_eager"]
    assert run_cli("bench", "step", "configs/demo_contrast.yaml", *args, *compiled) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("s/iter baseline") and "overhead" in lines[1]  # as without it
    header, rule, *rows = lines[3:]
    assert header.split("  ")[0] == "compiled (aot_eager)"
    for column in ("eager s/iter", "compiled s/iter", "compiled/eager", "first compiled step s"):
        assert column in header
    assert set(rule) == {"-", " "} and len(rows) == 2
    eager_baseline = float(lines[1].split()[2])
    for row, label in zip(rows, ("baseline", "+ contrast"), strict=True):
        assert row.startswith(label)
        eager, compiled_s, ratio, first = (float(v) for v in row[len(label) :].split())
        assert eager > 0 and compiled_s > 0 and first > 0
        assert ratio == pytest.approx(compiled_s / eager, abs=0.01 + 1e-3 * ratio)
    assert float(rows[0].split()[1]) == eager_baseline  # the same median as the line above
    for bad in (["--compile", "--breakdown"], ["--compile", "--compile-backend", "tvm"]):
        assert run_cli("bench", "step", "configs/demo_contrast.yaml", *args, *bad) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--" in err
