"""The memory-loss benchmark: its three variants compute the same loss; bf16 storage is close."""

from contrastseg.benchmarks.memory_loss import (
    VARIANTS,
    format_memory_benchmark,
    run_memory_benchmark,
)


def test_memory_benchmark_variants_agree_and_are_timed():
    result = run_memory_benchmark(anchors=40, classes=5, slots_per_class=30, dim=16, repeats=1)
    assert result["loss_rel_diff"] < 1e-5
    assert result["grad_max_diff"] < 1e-6
    assert 0 < result["bf16_loss_rel_diff"] < 1e-2
    assert 0 < result["bf16_grad_rel_diff"] < 5e-2
    assert all(result[name] > 0 for name in (*VARIANTS, "slots_bf16", "floor"))
    text = format_memory_benchmark(result, "header")
    assert text.splitlines()[0] == "header"
    assert [line.split()[0] for line in text.splitlines()[2:7]] == [
        *VARIANTS,
        "slots_bf16",
        "floor",
    ]
