"""examples/prototype_snippet.py (a small model with PrototypeClassifier, two steps on random
data) runs, moves prototypes and prints one line per step and the prediction's shape."""

import runpy
from pathlib import Path

import torch

ROOT = Path(__file__).parents[1]


def test_prototype_snippet_trains_two_steps(capsys):
    names = runpy.run_path(str(ROOT / "examples" / "prototype_snippet.py"))
    out = names["out"]
    assert torch.isfinite(out.ppc) and torch.isfinite(out.ppd) and out.ppc.item() > 0
    protos = names["classifier"].prototypes
    assert torch.allclose(protos.norm(dim=-1), torch.ones(protos.shape[:2]))
    assert names["prediction"].shape == (2, 16, 16)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 3 and printed[0].startswith("step 0: ce ")
    assert sum(int(line.rsplit(" ", 1)[1]) for line in printed[:2]) > 0  # prototypes moved
