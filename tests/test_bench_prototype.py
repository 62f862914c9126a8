"""The prototype benchmark: the batched module and the loop over classes compute the same
thing from the same state; every part is timed; the command prints the table."""

from contrastseg.benchmarks.prototype import bench_prototype, format_prototype_benchmark

PARTS = [
    "inference",
    "train forward",
    "classifier, head given",
    "classifier + learning",
    "train step",
]


def test_prototype_benchmark_programs_agree_and_are_timed():
    result = bench_prototype(
        batch=1, grid=(6, 8), num_classes=4, in_channels=8, num_prototypes=3, repeats=1
    )
    assert [r["part"] for r in result["rows"]] == PARTS
    assert all(r["ms_batched"] > 0 and r["ms_loop"] > 0 for r in result["rows"])
    agreement = result["agreement"]
    assert agreement["prototypes_max_diff"] < 1e-6
    assert agreement["logits_max_diff"] < 1e-5
    assert agreement["ppc_diff"] < 1e-5 and agreement["ppd_diff"] < 1e-5
    lines = format_prototype_benchmark(result).splitlines()
    assert lines[0].startswith("batch 1  grid 6x8 (labels 24x32)  K 4  M 3  C 8")
    assert [line.split("  ")[0].strip() for line in lines[3:8]] == PARTS
    assert lines[-1].startswith("same state, argmax assignment")


def test_bench_prototype_command(run_cli, capsys):
    args = ["--batch", "1", "--height", "4", "--width", "4", "--classes", "3"]
    args += ["--channels", "8", "--prototypes", "2", "--repeats", "1"]
    assert run_cli("bench", "prototype", *args) == 0
    out = capsys.readouterr().out
    assert "classifier + learning" in out and "loop / batched" in out
    assert run_cli("bench", "prototype", "--repeats", "0") == 2
    assert "repeats=0 is invalid" in capsys.readouterr().err
