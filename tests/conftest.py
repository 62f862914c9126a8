import os
import sys

import pytest
import torch

from contrastseg import cli
from contrastseg.config import load_config
from numerics import NUMERIC_FILES, NUMERIC_TESTS
from tiny import TINY

# Under pytest-xdist each worker takes one core: one thread each, so that workers do not
# contend for the cores (tests that compare two runs make both in the same worker).
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2


def pytest_collection_modifyitems(items):
    for item in items:
        path = item.nodeid.split("::")[0].rsplit("/", 1)[-1]
        test = f"{path}::{item.originalname}"
        if path in NUMERIC_FILES or test in NUMERIC_TESTS:
            item.add_marker(pytest.mark.numerics)


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(THREADS)


@pytest.fixture
def tiny_cfg(tmp_path):
    """A tiny, fast training config on the synthetic data set, writing into tmp_path."""

    def make(*overrides: str):
        return load_config(
            None,
            [
                *TINY,
                "data.train_size=16",
                "data.val_size=6",
                "train.iters=6",
                "train.batch_size=4",
                "train.log_every=1",
                "train.checkpoint_every=3",
                "train.keep_checkpoints=5",
                "train.deterministic=true",
                "eval.batch_size=3",
                "eval.figure_images=2",
                f"output.root={tmp_path}",
                "output.name=run",
                *overrides,
            ],
        )

    return make


@pytest.fixture
def run_cli(monkeypatch):
    """Run the command line in-process: ``run_cli("eval", ...)`` -> its exit status."""

    def run(*argv: str) -> int:
        monkeypatch.setattr(sys, "argv", ["contrastseg", *argv])
        try:
            cli.main()
        except SystemExit as exc:
            return exc.code
        return 0

    return run
