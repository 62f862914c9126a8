"""`bench data`: a tiny run of the loader benchmark (reduced sizes)."""

from contrastseg.benchmarks.data_loading import format_data_benchmark, run_data_benchmark


def test_data_benchmark_tiny():
    result = run_data_benchmark(num_images=2, workers=(0,), size=(64, 128), crop=(32, 64))
    assert [row["workers"] for row in result["rows"]] == [0]
    row = result["rows"][0]
    assert row["images"] == 2 and row["images_s"] > 0
    assert result["decode_s"] > 0 and result["augment_s"] > 0
    text = format_data_benchmark(result)
    assert "128x64" in text and "64x32 crops" in text and "images/s" in text
