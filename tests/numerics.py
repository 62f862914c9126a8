"""The numerics-sensitive tests (docs/testing.md): float parity of pixel contrast, the losses,
sampling, the memory, metrics, the evaluation procedures and an export comparison. tests/conftest.py
marks them ``numerics``; `make test` runs them under every CPU kernel the machine has, the others
once. ``python tests/numerics.py`` prints the files that hold them (the Makefile's paths)."""

NUMERIC_FILES = {
    "test_cpu_kernel.py",
    "test_contrast_parity.py",
    "test_prototype_parity.py",
    "test_pixel_contrast.py",
    "test_contrast_module.py",
    "test_autograd_functions.py",
    "test_sampling.py",
    "test_memory.py",
    "test_selection_checks.py",
    "test_lovasz.py",
    "test_rmi.py",
    "test_ohem.py",
    "test_aaf.py",
    "test_loss_set.py",
    "test_metrics.py",
    "test_test_procedure.py",
    "test_inference_modes.py",
    "test_released_eval.py",
}
# Single tests of other files: "file::test function".
NUMERIC_TESTS = {
    "test_export.py::test_torchscript_matches_pytorch_at_two_sizes",
    "test_export.py::test_check_at_export_catches_fixed_shapes_and_drift",
}

if __name__ == "__main__":
    files = NUMERIC_FILES | {name.split("::")[0] for name in NUMERIC_TESTS}
    print(" ".join(f"tests/{name}" for name in sorted(files)))
