"""The README's PixelContrast program is examples/readme_snippet.py, and it trains with anchors
and a nonzero contrast loss."""

import re
import runpy
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_readme_shows_the_example_file_verbatim():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Pixel contrast in your own model", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert block == (ROOT / "examples" / "readme_snippet.py").read_text()


def test_readme_program_gives_a_nonzero_loss_with_anchors(capsys):
    names = runpy.run_path(str(ROOT / "examples" / "readme_snippet.py"))
    assert names["info"].active and names["info"].anchors > 0
    assert names["loss_c"].item() > 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 and all("anchors 0" not in line for line in printed)
