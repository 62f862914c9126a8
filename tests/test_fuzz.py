"""The fuzz suite (docs/fuzzing.md): Hypothesis mutates configs, checkpoints (their structure
and their bytes), pickle payloads, images, label maps, split lists, command lines and special
files (FIFOs, symlink loops, folders, paths with newlines, output paths that cannot be written,
records claiming huge sizes), and runs the real commands on them (tests/fuzzing.py runs each in
a forked child and classifies the outcome). Every case must end in ``ok`` or ``refused``.

``FUZZ_EXAMPLES`` scales the number of cases (default 6: the subset `make test` runs);
``make fuzz`` runs over a thousand and writes a table (scripts/fuzz_table.py).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

import fuzzing
from contrastseg.datasets_table import MAX_IMAGE_PIXELS
from fuzzing import Case, Family, call_in_child, fuzz_settings

CLASSES = ("background", "cat", "dog")
NAMES = ("a", "b", "c", "d")
SIZE = (12, 10)  # height, width of the fixture's images and masks
TRAIN = ["--no-progress"]
SLOW = 60.0  # time limit of a case that trains or evaluates, seconds
FAST = 30.0


# ----------------------------------------------------------------------------- the fixture
@dataclass
class Base:
    """Made once per pytest worker: a folder data set, its config and a trained checkpoint."""

    root: Path
    data: Path  # images/, masks/, splits/{train,val}.txt, classes.txt
    config: Path  # cfg.yaml: data.root 'data' (relative: a case copies the data beside it)
    tree: dict  # the config as a nested dict
    run: Path  # runs/run of the training: config.yaml, checkpoints/iter_000000{1,2}.pt
    ck: Path  # the checkpoint of iteration 2
    info: dict  # fuzzing.checkpoint_info of ck

    def copy_data(self, work: Path) -> None:
        shutil.copytree(self.data, work / "data")
        shutil.copy(self.config, work / "cfg.yaml")

    def copy_ck(self, work: Path, name: str = "ck.pt") -> Path:
        shutil.copy(self.ck, work / name)
        return work / name

    def copy_run(self, work: Path) -> Path:
        """The run folder (for --resume) with only iteration 1's checkpoint."""
        dest = work / "runs" / "run"
        shutil.copytree(self.run, dest, ignore=shutil.ignore_patterns("tensorboard"))
        (dest / "checkpoints" / "iter_0000002.pt").unlink()
        return dest


def _make_data(root: Path) -> None:
    rng = np.random.default_rng(0)
    for sub in ("images", "masks", "splits"):
        (root / sub).mkdir(parents=True)
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in CLASSES))
    for name in NAMES:
        image = rng.integers(0, 256, size=(*SIZE, 3), dtype=np.uint8)
        mask = rng.integers(0, len(CLASSES), size=SIZE, dtype=np.uint8)
        Image.fromarray(image).save(root / "images" / f"{name}.png")
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")
    (root / "splits" / "train.txt").write_text("".join(f"{n}\n" for n in NAMES))
    (root / "splits" / "val.txt").write_text("a\nb\n")


def _config_tree() -> dict:
    from contrastseg.config import load_config
    from tiny import TINY

    tiny = [o for o in TINY if not o.startswith(("data.", "model.backbone.name"))]
    cfg = load_config(
        None,
        [
            *tiny,
            "model.backbone.name=timm:mobilenetv3_small_050",
            "data.name=folder",
            "data.root=data",
            "data.crop_size=[8, 8]",
            "train.iters=2",
            "train.batch_size=2",
            "train.log_every=1",
            "train.checkpoint_every=1",
            "eval.batch_size=2",
            "eval.figure_images=0",
            "output.root=runs",
            "output.name=run",
        ],
    )
    return cfg.to_dict()


@pytest.fixture(scope="session")
def base(tmp_path_factory) -> Base:
    root = tmp_path_factory.mktemp("fuzz-base")
    fuzzing.preload()
    _make_data(root / "data")
    tree = _config_tree()
    config = root / "cfg.yaml"
    config.write_text(yaml.safe_dump(tree, sort_keys=False))
    run = fuzzing.run_cli(["train", "cfg.yaml", *TRAIN], root, root / "aux", timeout=300)
    assert run.status == 0, run.stdout + run.stderr
    ck = root / "runs" / "run" / "checkpoints" / "iter_0000002.pt"
    info = call_in_child(fuzzing.checkpoint_info, str(ck))
    shutil.rmtree(root / "aux")
    return Base(root, root / "data", config, tree, root / "runs" / "run", ck, info)


def family(name: str, tmp_path: Path) -> Family:
    return Family(name, tmp_path)


# ----------------------------------------------------------------------------- validators
def valid_config_show(work: Path, run: fuzzing.Run) -> str | None:
    try:
        tree = yaml.safe_load(run.stdout)
    except yaml.YAMLError as err:
        return f"config show printed no YAML: {err}"
    sections = {"data", "model", "loss", "optim", "train", "eval", "output"}
    if not isinstance(tree, dict) or set(tree) != sections:
        return f"config show printed {str(tree)[:100]}, not the config's sections"
    return None


def _miou(path: Path) -> str | None:
    try:
        value = json.loads(path.read_text())["mIoU"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{path.name}: no mIoU ({err})"
    if not isinstance(value, float | int) or not math.isfinite(value) or not 0 <= value <= 1:
        return f"{path.name}: mIoU {value!r}"
    return None


def valid_eval(work: Path, run: fuzzing.Run) -> str | None:
    return _miou(work / "e.json")


def valid_train(work: Path, run: fuzzing.Run) -> str | None:
    checkpoints = sorted((work / "runs" / "run" / "checkpoints").glob("iter_*.pt"))
    if not checkpoints:
        return "no checkpoint written"
    if "run: " not in run.stdout:
        return "no summary line"
    return _miou(work / "runs" / "run" / "eval.json")


def valid_predict(stems: dict[str, tuple[int, int] | None]):
    """Each stem's three outputs in P/, the labels of the image's size (when known) and of
    class ids only."""

    def check(work: Path, run: fuzzing.Run) -> str | None:
        for stem, size in stems.items():
            paths = [
                work / "P" / f"{stem}{s}" for s in ("_labels.png", "_overlay.png", "_mask.png")
            ]
            if not all(p.is_file() for p in paths):
                return f"outputs of {stem} missing"
            labels = np.asarray(Image.open(paths[0]))
            if size is not None and labels.shape != size:
                return f"{stem}_labels.png is {labels.shape}, the image {size}"
            if labels.max() >= len(CLASSES):
                return f"{stem}_labels.png holds {labels.max()}"
        return None

    return check


def valid_export(work: Path, run: fuzzing.Run) -> str | None:
    model, sidecar = work / "m.ts.pt", work / "m.ts.pt.json"
    if not model.is_file() or not sidecar.is_file():
        return "model or sidecar missing"
    try:
        json.loads(sidecar.read_text())
    except ValueError as err:
        return f"sidecar not JSON: {err}"
    return None


def valid_upgrade(work: Path, run: fuzzing.Run) -> str | None:
    return call_in_child(fuzzing.upgraded_problem, str(work / "new.pt"), str(work / "ck.pt"))


def valid_data_check(work: Path, run: fuzzing.Run) -> str | None:
    if "no problems" not in run.stdout or "problem(s)" in run.stdout:
        return "the report lists problems"
    return None


# ----------------------------------------------------------------------------- commands
def ck_commands(ck: str, cfg: str = "cfg.yaml") -> dict[str, dict]:
    """The commands that read a checkpoint ``ck`` (a path in the case folder), each with its
    arguments, outputs, validator and time limit."""
    return {
        "eval": dict(
            argv=["eval", cfg, "--checkpoint", ck, "--out", "e.json"],
            outputs=("e.json",),
            validate=valid_eval,
            timeout=SLOW,
        ),
        "predict": dict(
            argv=["predict", "--checkpoint", ck, "img.png", "--out", "P", "--strict"],
            outputs=("P/*",),
            validate=valid_predict({"img": SIZE}),
            timeout=SLOW,
        ),
        "export": dict(
            argv=["export", ck, "--format", "torchscript", "--out", "m.ts.pt"],
            outputs=("m.ts.pt", "m.ts.pt.json"),
            validate=valid_export,
            timeout=SLOW,
        ),
        "upgrade": dict(
            argv=["checkpoint", "upgrade", ck, "new.pt"],
            outputs=("new.pt",),
            validate=valid_upgrade,
            timeout=FAST,
        ),
    }


RESUME = dict(
    argv=["train", "cfg.yaml", "--resume", *TRAIN, "--set", "train.iters=3"],
    outputs=("runs/run/checkpoints/iter_0000003.pt",),
    may_leave=("runs",),
    inputs_may_change=("runs/*",),
    validate=valid_train,
    timeout=SLOW,
)
NEWEST = "runs/run/checkpoints/iter_0000002.pt"


def write_image(path: Path) -> None:
    """A valid 12x10 RGB PNG (predict's input in the checkpoint families), whatever the name's
    extension (a special name may have none)."""
    Image.fromarray(np.full((*SIZE, 3), 90, np.uint8)).save(path, format="PNG")


# ----------------------------------------------------------------------------- 1. configs
def leaves(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, value) of every leaf of a nested dict (lists are leaves)."""
    out = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out += leaves(value, dotted + ".")
        else:
            out.append((dotted, value))
    return out


NON_FINITE = [math.nan, math.inf, -math.inf]
VALUES = [
    *NON_FINITE,
    1e308,
    -1e308,
    5e-324,
    -1,
    0,
    1,
    -5,
    2**31,
    2**63,
    2**64,
    10**30,
    0.5,
    -0.5,
    "",
    "abc",
    "ü✓ 漢字",
    None,
    True,
    False,
    [],
    {},
    [1, 2],
    [0, 0],
    [-1, -1],
    [10**6, 10**6],
    [1, 2, 3],
    ["a"],
    {"x": 1},
    "x" * 10_000,
    "../../etc/passwd",
    "/dev/zero",
    "nan",
    "1e5",
    "a\\nb",
]
# YAML source put where a value goes: name -> (text, expectation)
RAW_VALUES = {
    "a list of 100,000 zeros": ("[" + ", ".join(["0"] * 100_000) + "]", "refuse"),
    "a list nested 65 deep": ("[" * 65 + "]" * 65, "refuse"),
    "a list nested 50,000 deep": ("[" * 50_000 + "]" * 50_000, "refuse"),
    "a mapping nested 100 deep": ("{a: " * 100 + "1" + "}" * 100, "refuse"),
    "an alias bomb (9^9)": (
        "[&a0 [1,1,1,1,1,1,1,1,1], "
        + ", ".join(f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9))
        + "]",
        "refuse",
    ),
    "a !!python/object/apply:os.system tag": (
        "!!python/object/apply:os.system ['touch MARKER']",
        "refuse",
    ),
    "a !!python/name:os.system tag": ("!!python/name:os.system", "refuse"),
    "a !!python/object/new:builtins.exec tag": (
        "!!python/object/new:builtins.exec [\"open('MARKER', 'w').close()\"]",
        "refuse",
    ),
    "a !!binary value": ("!!binary aGVsbG8=", "either"),
    "a timestamp": ("2001-12-14t21:59:43.10-05:00", "either"),
    "a !!set": ("!!set {a, b}", "either"),
    "an integer of 5,000 digits": ("9" * 5_000, "either"),
    "a string of 500,000 characters": ("x" * 500_000, "either"),
    "~ (null)": ("~", "either"),
    "an undefined alias": ("*nowhere", "refuse"),
}
PLACEHOLDER = "@@RAW@@"


@st.composite
def tree_mutation(draw, tree: dict, new: dict) -> tuple[str, str, list[str], str | None]:
    """Mutate the nested dict ``new`` (a copy of ``tree``) once: (what, expectation, the keys
    named, raw YAML to put where the placeholder is)."""
    items = leaves(tree)
    kind = draw(st.sampled_from(["delete", "rename", "add", "set", "set", "set", "raw", "raw"]))
    if kind == "add":
        section = draw(
            st.sampled_from(["", *sorted(k for k, v in tree.items() if isinstance(v, dict))])
        )
        node = new.get(section) if section else new
        if not isinstance(node, dict):
            node, section = new, ""
        key = draw(st.sampled_from(["extra", "iters", "Data", "x" * 300, "ü", "1", "null"]))
        if key in node:
            key += "_"
        node[key] = 1
        dotted = f"{section}.{key}" if section else key
        return f"unknown key {dotted!r:.40} added", "refuse", [dotted], None
    dotted, _ = draw(st.sampled_from(items))
    if kind in ("delete", "rename") and "." in dotted and draw(st.booleans()):
        dotted = dotted.rsplit(".", 1)[0]  # a whole section
    *parents, last = dotted.split(".")
    node = new
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or last not in node:
        return f"key {dotted} (already changed) left as it is", "either", [], None
    if kind == "delete":
        del node[last]
        return f"key {dotted} deleted", "either", [dotted], None
    if kind == "rename":
        renamed = draw(st.sampled_from([last + "_", last.upper(), last[:-1] or "x", "ü"]))
        node[renamed] = node.pop(last)
        return (
            f"key {dotted} renamed to {renamed}",
            "refuse",
            [dotted, ".".join([*parents, renamed])],
            None,
        )
    if kind == "set":
        value = draw(st.sampled_from(VALUES))
        node[last] = value
        bad = isinstance(value, float) and not math.isfinite(value)
        return f"{dotted} set to {value!r:.60}", "refuse" if bad else "either", [dotted], None
    name = draw(st.sampled_from(sorted(RAW_VALUES)))
    raw, expect = RAW_VALUES[name]
    node[last] = PLACEHOLDER
    return f"{dotted} set to {name}", expect, [dotted], raw


TEXT_OPS = [
    "bom",
    "utf-16",
    "utf-32",
    "bad byte",
    "nul",
    "tab",
    "crlf",
    "truncate",
    "empty",
    "garbage",
    "duplicate line",
    "top-level list",
    "scalar",
    "two documents",
    "too large",
    "only a comment",
    "base",
    "unicode spaces",
]


@st.composite
def config_mutations(draw, tree: dict):
    """(description, file bytes, expectation, culprit keys) of a mutated config: one to three
    changes of its keys and values, or of its text and bytes, or both."""
    new = json.loads(json.dumps(tree))  # a deep copy
    whats: list[str] = []
    expects: list[str] = []
    keys: list[str] = []
    raw = None
    mode = draw(st.sampled_from(["tree", "tree", "text", "both"]))
    if mode != "text":
        for _ in range(draw(st.integers(1, 3))):
            what, expect, named, value = draw(tree_mutation(tree, new))
            if value is not None and raw is not None:
                continue  # one raw value per file
            raw = value if value is not None else raw
            whats.append(what)
            expects.append(expect)
            keys += named
    text = yaml.safe_dump(new, sort_keys=False, allow_unicode=True, width=1 << 20)
    if raw is not None:
        text = text.replace(f"'{PLACEHOLDER}'", raw).replace(PLACEHOLDER, raw)
    data = text.encode()
    if mode != "tree":
        op = draw(st.sampled_from(TEXT_OPS))
        lines = text.splitlines(keepends=True)
        expect = "either"
        if op == "bom":
            data, what, expect = b"\xef\xbb\xbf" + data, "a UTF-8 byte order mark", "ok"
        elif op == "utf-16":
            data, what, expect = text.encode("utf-16"), "UTF-16 text", "refuse"
        elif op == "utf-32":
            data, what, expect = text.encode("utf-32"), "UTF-32 text", "refuse"
        elif op == "bad byte":
            at = draw(st.integers(0, len(data)))
            byte = draw(st.sampled_from([b"\xff", b"\xc3", b"\x80", b"\xed\xa0\x80"]))
            data = data[:at] + byte + data[at:]
            what, expect = f"byte {byte!r} inserted at offset {at}", "refuse"
        elif op == "nul":
            at = draw(st.integers(0, len(data)))
            data, what, expect = data[:at] + b"\x00" + data[at:], f"NUL at offset {at}", "refuse"
        elif op == "tab":
            indented = [i for i, ln in enumerate(lines) if ln.startswith("  ")]
            i = draw(st.sampled_from(indented))
            lines[i] = "\t" + lines[i].lstrip(" ")
            data, what, expect = (
                "".join(lines).encode(),
                f"line {i + 1} indented by a tab",
                "refuse",
            )
        elif op == "crlf":
            data, what, expect = text.replace("\n", "\r\n").encode(), "CRLF line ends", "ok"
        elif op == "truncate":
            at = draw(st.integers(0, len(data) - 1))
            data, what = data[:at], f"truncated to {at} bytes"
        elif op == "empty":
            data, what = b"", "empty file"
        elif op == "garbage":
            data = draw(st.binary(min_size=1, max_size=300))
            what = f"random bytes {data[:16]!r}..."
        elif op == "duplicate line":
            keyed = [
                i for i, ln in enumerate(lines) if ln.strip() and not ln.rstrip().endswith(":")
            ]
            i = draw(st.sampled_from(keyed))
            lines.insert(i, lines[i])
            data, what, expect = "".join(lines).encode(), f"line {i + 1} given twice", "refuse"
            keys.append(lines[i].split(":")[0].strip())
        elif op == "top-level list":
            data, what, expect = b"- 1\n- 2\n", "a top-level list", "refuse"
        elif op == "scalar":
            data, what, expect = b"train\n", "a scalar document", "refuse"
        elif op == "two documents":
            data, what, expect = data + b"---\ntrain: {iters: 2}\n", "two YAML documents", "refuse"
        elif op == "too large":
            data = data + b"#" + b"x" * (1 << 20) + b"\n"
            what, expect = "a 1 MiB comment at the end", "refuse"
        elif op == "only a comment":
            data, what = b"# nothing\n", "only a comment"
        elif op == "unicode spaces":
            data = text.replace("  ", "\u00a0\u00a0", 1).encode()
            what, expect = "a no-break space in the indentation", "refuse"
        else:  # base
            target = draw(
                st.sampled_from(
                    ["missing.yaml", "cfg.yaml", ".", "/dev/zero", "other.yaml", "based.yaml"]
                )
            )
            data = f"base: {target}\n".encode() + data
            what = f"base: {target}"
            expect = "either" if target == "other.yaml" else "refuse"
            keys += ["base", target]
        whats.append(what)
        expects.append(expect)
    if "refuse" in expects:
        expect = "refuse"
    elif expects == ["ok"]:
        expect = "ok"
    else:
        expect = "either"
    return "; ".join(whats), data, expect, keys


def _config_case(base: Base, what: str, data: bytes, expect: str, keys: list[str], command: str):
    def make(work: Path) -> None:
        base.copy_data(work)
        (work / "cfg.yaml").write_bytes(data)
        (work / "other.yaml").write_text("train:\n  iters: 2\n")
        (work / "based.yaml").write_text("base: other.yaml\n")
        if command == "eval":
            base.copy_ck(work)

    culprits = ("cfg.yaml", *keys)
    if command == "eval":  # a config of other data is refused for the checkpoint's classes
        culprits += ("ck.pt",)
    if command == "config show":
        spec = dict(argv=["config", "show", "cfg.yaml"], validate=valid_config_show, timeout=FAST)
    elif command == "eval":
        spec = dict(ck_commands("ck.pt")["eval"])
    else:
        spec = dict(
            argv=[
                "train",
                "cfg.yaml",
                *TRAIN,
                "--set",
                "train.iters=1",
                "--set",
                "output.root=runs",
                "--set",
                "output.name=run",
                "--set",
                "train.device=cpu",
            ],
            outputs=("runs/run/checkpoints/*",),
            may_leave=("runs",),
            validate=valid_train,
            timeout=SLOW,
        )
    return Case(
        "config",
        what,
        make=make,
        expect=expect,
        culprits=culprits,
        marker="MARKER",
        **spec,
    )


def test_fuzz_config(base, tmp_path):
    """Mutated configs -> ``config show`` and ``eval``."""
    fam = family("config", tmp_path)

    @fuzz_settings(1.0)
    @given(st.data())
    def case(data):
        what, raw, expect, keys = data.draw(config_mutations(base.tree))
        command = data.draw(st.sampled_from(["config show", "config show", "eval"]))
        fam.run(_config_case(base, what, raw, expect, keys, command))

    case()
    fam.check()


def test_fuzz_config_train(base, tmp_path):
    """Mutated configs -> ``train`` (one iteration)."""
    fam = family("config", tmp_path)

    @fuzz_settings(0.5)
    @given(st.data())
    def case(data):
        what, raw, expect, keys = data.draw(config_mutations(base.tree))
        fam.run(_config_case(base, what, raw, expect, keys, "train"))

    case()
    fam.check()


# ----------------------------------------------------------------------------- 2. structure
CORE = {"model", "config", "class_names", "format_version"}
# The parts of a checkpoint each command needs: damaging one must be refused.
NEEDS = {
    "eval": CORE | {"iteration"},
    "predict": CORE | {"palette"},
    "export": CORE,
    "upgrade": {"format_version"},
    # the top-level "rng" is process 0's fallback: a run resumes each process's own state from
    # "processes" when their number matches
    "resume": CORE | {"iteration", "optimizer", "processes", "loss", "scaler", "best", "palette"},
}
WRONG = ["int", "str", "list", "none", "dict", "tensor", "bool", "nested"]
# (dotted key, value, whether the stored config is then unusable for the checkpoint's weights)
CONFIG_EDITS = [
    ("train.iters", -5, True),
    ("model.head", "nope", True),
    ("model.head", "pspnet", True),
    ("model.backbone.name", "timm:no_such_model", True),
    ("model.head_channels", 10**9, True),
    ("model.aux", False, True),
    ("eval.scales", [math.nan], True),
    ("optim.lr", -1.0, True),
    ("data.name", "nope", True),
    ("train.seed", -1, True),
    ("unknown_key", 1, True),
    ("data.mean", [0.0, 0.0, 0.0], False),
    ("model.projection_dim", 2, False),
    ("output.name", "../../elsewhere", False),
]
# (part, value, damaging)
SETS = [
    ("iteration", -1, True),
    ("iteration", "x", True),
    ("iteration", None, True),
    ("iteration", 10**30, False),
    ("iteration", 5, False),
    ("format_version", 1, True),
    ("format_version", 3, True),
    ("format_version", "2", True),
    ("format_version", 2.0, True),
    ("format_version", -1, True),
    ("format_version", None, True),
    ("format_version", 10**30, True),
    ("class_names", ["background", "cat"], True),
    ("class_names", ["x", "y", "z"], False),
    ("class_names", [f"c{i}" for i in range(300)], True),
    ("class_names", [1, 2, 3], True),
    ("class_names", [], True),
    ("class_names", "background", True),
    ("class_names", ["a", "a", "b"], False),
    ("palette", [[0, 0, 0]], True),
    ("palette", [[300, 0, 0], [0, 0, 0], [0, 0, 0]], True),
    ("palette", [[-1, 0, 0], [0, 0, 0], [0, 0, 0]], True),
    ("palette", [[0, 0], [0, 0], [0, 0]], True),
    ("palette", "red", True),
    ("palette", [[0.5, 0, 0], [0, 0, 0], [0, 0, 0]], True),
    ("digest", "sha256:" + "0" * 64, True),
    ("digest", 5, True),
    ("digest", "", True),
]


@st.composite
def structure_mutations(draw, info: dict):
    """(what, spec for fuzzing.mutate_checkpoint, damaged parts, culprit names)."""
    weights = sorted(info["weights"])
    floats = [n for n, (_, dtype) in info["weights"].items() if dtype.startswith("float")]
    parts = sorted(set(info["keys"]) - {"digest"})
    kind = draw(
        st.sampled_from(
            [
                "drop",
                "replace",
                "add",
                "set",
                "set",
                "config",
                "config drop",
                "weight shape",
                "weight dtype",
                "weight value",
                "weight value",
                "weight drop",
                "weight add",
                "weight type",
                "optimizer",
                "rng",
                "processes",
            ]
        )
    )
    if kind == "drop":
        part = draw(st.sampled_from(parts))
        return f"part {part!r} removed", ("drop", part), {part}, [part]
    if kind == "replace":
        part = draw(st.sampled_from(parts))
        wrong = draw(st.sampled_from(WRONG))
        harmless = (wrong == "dict" and part in ("loss", "scaler")) or (
            wrong == "none" and part == "best"
        )
        damaged = set() if harmless else {part}
        return f"part {part!r} replaced by a {wrong}", ("replace", part, wrong), damaged, [part]
    if kind == "add":
        key = draw(st.sampled_from(["extra", "Model", "__class__", "x" * 200]))
        wrong = draw(st.sampled_from(WRONG))
        return f"unknown part {key!r:.30} ({wrong}) added", ("add", key, wrong), set(), [key]
    if kind == "set":
        part, value, damaging = draw(st.sampled_from(SETS))
        damaged = {part} if damaging else set()
        return f"{part} set to {value!r:.50}", ("set", part, value), damaged, [part]
    if kind == "config":
        key, value, damaging = draw(st.sampled_from(CONFIG_EDITS))
        damaged = {"config"} if damaging else set()
        return f"stored config {key} set to {value!r}", ("config", key, value), damaged, [key]
    if kind == "config drop":
        section = draw(st.sampled_from(["model", "train", "data", "model.backbone", "eval"]))
        damaged = {"config"} if section.startswith("model") else set()
        return (
            f"stored config section {section} removed",
            ("config drop", section),
            damaged,
            [section],
        )
    if kind == "weight shape":
        name = draw(st.sampled_from(weights))
        how = draw(
            st.sampled_from(
                ["one row less", "one row more", "extra dimension", "flattened", "scalar", "empty"]
            )
        )
        shape = info["weights"][name][0]
        harmless = how == "flattened" and len(shape) <= 1
        damaged = set() if harmless else {"model", "weights"}
        return f"weight {name} {how}", ("weight shape", name, how), damaged, [name]
    if kind == "weight dtype":
        name = draw(st.sampled_from(weights))
        dtype = draw(st.sampled_from(["float64", "float16", "bfloat16", "int64", "bool", "uint8"]))
        was_float = info["weights"][name][1].startswith("float")
        damaging = was_float and not dtype.startswith(("float", "bfloat"))
        damaged = {"model", "weights"} if damaging else set()
        return f"weight {name} cast to {dtype}", ("weight dtype", name, dtype), damaged, [name]
    if kind == "weight value":
        name = draw(st.sampled_from(floats))
        value = draw(st.sampled_from(["nan", "inf", "-inf"]))
        where = draw(st.sampled_from(["one", "all"]))
        what = f"{'every value' if where == 'all' else 'one value'} of weight {name} set to {value}"
        return what, ("weight value", name, value, where), {"model", "finite"}, [name]
    if kind == "weight drop":
        name = draw(st.sampled_from(weights))
        return f"weight {name} removed", ("weight drop", name), {"model", "weights"}, [name]
    if kind == "weight add":
        name = draw(st.sampled_from(["head.extra.weight", "x", "backbone..weight"]))
        return f"unknown weight {name} added", ("weight add", name), {"model", "weights"}, [name]
    if kind == "weight type":
        name = draw(st.sampled_from(weights))
        wrong = draw(st.sampled_from(["int", "str", "list", "none", "dict"]))
        return (
            f"weight {name} replaced by a {wrong}",
            ("weight type", name, wrong),
            {"model", "weights"},
            [name],
        )
    what = draw(
        st.sampled_from(
            {
                "optimizer": [
                    "drop state",
                    "drop param_groups",
                    "lr nan",
                    "momentum buffer shape",
                    "param_groups not a list",
                ],
                "rng": ["torch state truncated", "torch state float", "torch state str"],
                "processes": ["empty list", "entry not a dict", "rng missing"],
            }[kind]
        )
    )
    return f"{kind}: {what}", (kind, what), {kind}, [kind]


def _expect_structure(command: str, damaged: set[str], seal: str, has_digest: bool) -> str:
    if seal == "stale":  # contents changed under the digest written with the original
        return "refuse"
    needs = NEEDS[command]
    if command == "upgrade":
        return "refuse" if damaged & needs else "either"
    if damaged & needs:
        return "refuse"
    return "either"


def _ck_case(
    base: Base,
    family_name: str,
    what: str,
    command: str,
    write,
    expect: str,
    culprits: tuple[str, ...],
) -> Case:
    """A case that runs ``command`` on a checkpoint that ``write(path)`` writes."""
    target = NEWEST if command == "resume" else "ck.pt"

    def make(work: Path) -> None:
        base.copy_data(work)
        write_image(work / "img.png")
        if command == "resume":
            base.copy_run(work)
        write(work / target)

    spec = dict(RESUME) if command == "resume" else dict(ck_commands("ck.pt")[command])
    return Case(
        family_name,
        what,
        make=make,
        expect=expect,
        culprits=(target, *culprits),
        skip_warning=target if command == "resume" else None,
        **spec,
    )


def test_fuzz_checkpoint_structure(base, tmp_path):
    """A checkpoint's parts removed, retyped or changed, its weights reshaped, recast or made
    non-finite, then sealed with a fresh digest or left with the original one -> ``eval``,
    ``predict``, ``export``, ``checkpoint upgrade``, ``train --resume``."""
    fam = family("checkpoint structure", tmp_path)
    has_digest = base.info["digest"]

    @fuzz_settings(1.0)
    @given(st.data())
    def case(data):
        what, spec, damaged, names = data.draw(structure_mutations(base.info))
        if spec[0] == "set" and spec[1] == "digest":
            seal = "as is"
        else:
            seal = data.draw(
                st.sampled_from(["sealed", "sealed", "stale"] if has_digest else ["none"])
            )
        command = data.draw(st.sampled_from(["eval", "predict", "export", "upgrade", "resume"]))
        mutated = tmp_path / "mutated.pt"
        seal, changed = call_in_child(
            fuzzing.mutate_checkpoint, str(base.ck), str(mutated), spec, seal
        )
        if not changed:  # e.g. a 1-d weight "flattened": the same contents, the same digest
            damaged, seal = set(), "sealed" if seal == "stale" else seal
        expect = _expect_structure(command, damaged, seal, has_digest)
        if spec[0] == "set" and spec[1] == "digest":
            expect = "refuse"

        def write(path: Path) -> None:
            shutil.copy(mutated, path)

        sealed = {"sealed": "a fresh digest", "stale": "the original digest", "none": "no digest"}
        described = f"{what}; {sealed.get(seal, 'digest as set')}"
        fam.run(_ck_case(base, fam.name, described, command, write, expect, tuple(names)))

    case()
    fam.check()


# ----------------------------------------------------------------------------- 3. bytes
@st.composite
def byte_mutations(draw, info: dict):
    """(what, function bytes -> bytes) of a byte-level change of the checkpoint file."""
    size = info["size"]
    records = info["records"]
    region = draw(st.sampled_from(["anywhere", "data.pkl", "a tensor", "zip directory", "header"]))
    if region == "data.pkl":
        _, start, length = records["archive/data.pkl"]
    elif region == "a tensor":
        name = draw(st.sampled_from(sorted(n for n in records if "/data/" in n)))
        _, start, length = records[name]
        region = name
    elif region == "zip directory":
        start = max(r[1] + r[2] for r in records.values())
        length = size - start
    elif region == "header":
        start, length = 0, 64
    else:
        start, length = 0, size
    length = max(length, 1)
    offset = start + draw(st.integers(0, length - 1))
    op = draw(
        st.sampled_from(["flip", "flip", "flip several", "truncate", "append", "zero", "insert"])
    )
    if op == "flip":
        bit = draw(st.integers(0, 7))

        def mutate(b: bytes) -> bytes:
            return b[:offset] + bytes([b[offset] ^ (1 << bit)]) + b[offset + 1 :]

        return f"bit {bit} of byte {offset} ({region}) flipped", mutate
    if op == "flip several":
        offsets = draw(st.lists(st.integers(start, start + length - 1), min_size=2, max_size=8))

        def mutate(b: bytes) -> bytes:
            out = bytearray(b)
            for at in offsets:
                out[at] ^= 0xFF
            return bytes(out)

        return f"bytes {offsets} ({region}) inverted", mutate
    if op == "truncate":
        return f"truncated to {offset} bytes ({region})", lambda b: b[:offset]
    if op == "append":
        junk = draw(st.sampled_from([b"\x00" * 100, b"PK\x05\x06" + b"\x00" * 18, b"junk" * 50]))
        return f"{len(junk)} bytes appended ({junk[:8]!r}...)", lambda b: b + junk
    if op == "zero":
        n = draw(st.integers(1, 4096))
        return (
            f"{n} bytes zeroed from offset {offset} ({region})",
            lambda b: b[:offset] + bytes(min(n, len(b) - offset)) + b[offset + n :],
        )
    junk = draw(st.binary(min_size=1, max_size=16))
    return (
        f"{junk!r} inserted at offset {offset} ({region})",
        lambda b: b[:offset] + junk + b[offset:],
    )


def test_fuzz_checkpoint_bytes(base, tmp_path):
    """A checkpoint's bytes flipped, truncated, extended, zeroed -> the commands that read it.
    A success is allowed only where torch.load gives back exactly the original contents."""
    fam = family("checkpoint bytes", tmp_path)
    original = base.ck.read_bytes()

    @fuzz_settings(1.0)
    @given(st.data())
    def case(data):
        what, mutate = data.draw(byte_mutations(base.info))
        command = data.draw(st.sampled_from(["eval", "predict", "export", "upgrade", "resume"]))
        mutated = mutate(original)
        probe = tmp_path / "probe.pt"
        probe.write_bytes(mutated)
        same = call_in_child(fuzzing.loads_like, str(probe), str(base.ck))
        # a file that loads as the original may be used (or refused); anything else is refused
        expect = "either" if same == "same" else "refuse"

        def write(path: Path) -> None:
            path.write_bytes(mutated)

        fam.run(_ck_case(base, fam.name, f"{what}; loads as: {same}", command, write, expect, ()))

    case()
    fam.check()


# ----------------------------------------------------------------------------- 4. payloads
# Where a pickle is read: (argv with EVIL for the file, the file's name, outputs, may leave)
def payload_places() -> dict[str, dict]:
    places = {
        name: dict(ck_commands("evil.pt")[name], target="evil.pt")
        for name in ("eval", "predict", "export", "upgrade")
    }
    places["convert"] = dict(
        argv=["convert", "evil.pth", "out.pt"], outputs=("out.pt",), target="evil.pth", timeout=FAST
    )
    places["resume"] = dict(RESUME, target=NEWEST)
    places["backbone weights"] = dict(
        argv=[
            "train",
            "cfg.yaml",
            *TRAIN,
            "--set",
            "model.backbone.weights=evil.pt",
            "--set",
            "output.name=fresh",
        ],
        outputs=("runs/fresh/checkpoints/*",),
        may_leave=("runs",),
        target="evil.pt",
        timeout=SLOW,
    )
    places["figures embeddings"] = dict(
        argv=["figures", "embeddings", "evil.pt", "--out", "f.png", "--device", "cpu"],
        outputs=("f.png", "f.pdf"),
        target="evil.pt",
        timeout=SLOW,
    )
    return places


PAYLOADS = [
    "os.system",
    "builtins.exec",
    "builtins.eval",
    "subprocess.getoutput",
    "importlib.import_module chain",
    "getattr(__import__) chain",
    "pathlib.Path.touch",
    "runpy.run_path",
    "shutil.rmtree",
    "os.system (raw)",
    "posix.system (raw)",
    "nt.system (raw)",
    "builtins.exec (raw)",
    "__builtin__.eval (raw)",
]


def test_fuzz_pickle_payloads(base, tmp_path):
    """Pickles that run code when unpickled (os.system, exec, eval, subprocess, import_module
    and getattr chains, posix.system, pathlib, runpy, shutil.rmtree) wherever a command reads
    a pickle, in a torch zip, inside a real checkpoint or as a bare pickle; and the removed
    ``--trust-checkpoint`` option. Nothing may run: outcome ``executed`` otherwise."""
    fam = family("pickle payloads", tmp_path)
    places = payload_places()

    @fuzz_settings(1.0)
    @given(st.data())
    def case(data):
        payload = data.draw(st.sampled_from(PAYLOADS))
        raw = payload.endswith("(raw)")
        container = data.draw(
            st.sampled_from(
                ["zip", "legacy pickle"] if raw else ["zip", "inside checkpoint", "legacy pickle"]
            )
        )
        place = data.draw(st.sampled_from(sorted(places)))
        spec = dict(places[place])
        target = spec.pop("target")
        trust = place in ("eval", "predict", "export", "upgrade") and data.draw(
            st.sampled_from([False, False, False, True])
        )
        if trust:
            spec["argv"] = [*spec["argv"], "--trust-checkpoint"]

        def make(work: Path) -> None:
            base.copy_data(work)
            write_image(work / "img.png")
            (work / "canary").mkdir()
            (work / "canary" / "keep").write_text("the payload must not remove this folder\n")
            script = work / "payload.py"
            script.write_text(f"open({str(work / 'MARKER')!r}, 'w').close()\n")
            if place == "resume":
                base.copy_run(work)
            objects = {
                **fuzzing.payloads(work / "MARKER", work / "canary", script),
                **fuzzing.raw_payloads(work / "MARKER"),
            }
            call_in_child(
                fuzzing.save_payload, objects[payload], str(work / target), container, str(base.ck)
            )

        what = f"{payload} in {container} as {place}'s {target}" + (
            " with --trust-checkpoint" if trust else ""
        )
        fam.run(
            Case(
                fam.name,
                what,
                make=make,
                expect="refuse",
                culprits=("--trust-checkpoint",) if trust else (target,),
                marker="MARKER",
                canary="canary",
                skip_warning=target if place == "resume" else None,
                **spec,
            )
        )

    case()
    fam.check()


# ----------------------------------------------------------------------------- 5. images
IMAGE_MODES = ("RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "1", "CMYK", "YCbCr")
FORMATS = {  # format -> (extension, modes Pillow writes)
    "PNG": (".png", ["1", "L", "P", "RGB", "RGBA", "LA", "I;16"]),
    "JPEG": (".jpg", ["L", "RGB", "CMYK"]),
    "BMP": (".bmp", ["1", "L", "P", "RGB"]),
    "TIFF": (".tif", ["1", "L", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "LA"]),
    "GIF": (".gif", ["P", "L"]),
}


def _pixels(mode: str, size: tuple[int, int], seed: int, high: int = 256) -> Image.Image:
    rng = np.random.default_rng(seed)
    h, w = size
    if mode in ("I;16", "I", "F"):
        dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
        array = rng.integers(0, min(high, 60000), size=size).astype(dtype)
        return Image.fromarray(array)  # uint16: I;16, int32: I, float32: F
    bands = len(Image.new(mode, (1, 1)).getbands())
    array = rng.integers(0, high, size=(h, w, bands), dtype=np.uint8)
    if mode == "1":
        return Image.fromarray(array[..., 0] > 127)
    if bands == 1:
        img = Image.fromarray(array[..., 0])
        return img.convert("P") if mode == "P" else img
    return Image.frombytes(mode, (w, h), array.tobytes())


def same_pixels(data: bytes, original: bytes) -> bool:
    """Whether Pillow decodes ``data`` to exactly the pixels of ``original``."""
    try:
        with Image.open(fuzzing.io.BytesIO(data)) as img:
            img.load()
            pixels = (img.mode, img.size, img.tobytes())
    except Exception:  # noqa: BLE001 - not decodable
        return False
    with Image.open(fuzzing.io.BytesIO(original)) as img:
        return pixels == (img.mode, img.size, img.tobytes())


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = fuzzing.io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@st.composite
def image_files(draw, size: tuple[int, int] | None = None):
    """(what, bytes, extension, expectation, decoded (h, w) or None) of an image file."""
    h, w = size or draw(
        st.sampled_from([SIZE, SIZE, SIZE, (1, 1), (1, 40), (40, 1), (3, 200), (33, 17)])
    )
    kind = draw(
        st.sampled_from(
            [
                "valid",
                "valid",
                "valid",
                "valid",
                "16-bit RGB PNG",
                "truncated",
                "random bytes",
                "empty",
                "huge PNG header",
                "huge JPEG header",
                "flipped",
                "wrong extension",
            ]
        )
    )
    seed = draw(st.integers(0, 3))
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    ext, modes = FORMATS[fmt]
    mode = draw(st.sampled_from(modes))
    data = encode(_pixels(mode, (h, w), seed), fmt)
    decoded = Image.open(fuzzing.io.BytesIO(data)).mode
    expect = "ok" if decoded in IMAGE_MODES else "refuse"
    what = f"{w}x{h} {fmt} of mode {mode} (reads as {decoded})"
    if kind == "16-bit RGB PNG":
        data, ext, expect = fuzzing.png_16bit_rgb(h, w, seed), ".png", "refuse"
        what = f"{w}x{h} PNG of 16 bits per RGB channel"
    elif kind == "truncated":
        cut = draw(st.integers(0, max(0, len(data) * 9 // 10)))
        whole = same_pixels(data[:cut], data)  # only a trailer cut off: the pixels are whole
        what = f"{what}, truncated to {cut} of {len(data)} bytes"
        data, expect = data[:cut], "either" if whole else "refuse"
    elif kind == "random bytes":
        data = draw(st.binary(min_size=1, max_size=200))
        what, expect = f"random bytes {data[:12]!r}...", "refuse"
    elif kind == "empty":
        data, what, expect = b"", "an empty file", "refuse"
    elif kind == "huge PNG header":
        big = draw(
            st.sampled_from([(100_000, 100_000), (1, 10**7), (30_000, 30_000), (2**31 - 1, 1)])
        )
        data = fuzzing.png_with_size(encode(_pixels("RGB", (h, w), seed), "PNG"), *big)
        ext, expect = ".png", "refuse"
        what = f"PNG whose header claims {big[1]}x{big[0]} (CRC valid, data {w}x{h})"
    elif kind == "huge JPEG header":
        big = draw(st.sampled_from([(65_000, 65_000), (1, 65_000), (40_000, 30_000)]))
        data = fuzzing.jpeg_with_size(encode(_pixels("RGB", (h, w), seed), "JPEG"), *big)
        # within the pixel limit the file decodes as libjpeg decodes a JPEG whose data ends
        # early (grey where data is missing), as every viewer shows it: accepted
        ext = ".jpg"
        expect = "refuse" if big[0] * big[1] > MAX_IMAGE_PIXELS else "either"
        what = f"JPEG whose SOF claims {big[1]}x{big[0]} (data {w}x{h})"
        h, w = big  # the size it decodes to
    elif kind == "flipped":
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]
        what, expect = f"{what}, byte {at} inverted", "either"
    elif kind == "wrong extension":
        ext = draw(st.sampled_from([e for e in (".png", ".jpg", ".bmp", ".tif") if e != ext]))
        what = f"{what}, named {ext}"
    return what, data, ext, expect, (h, w)


def test_fuzz_images(base, tmp_path):
    """Images of every format and mode, 16-bit RGB, truncated, random, empty, with headers
    claiming huge sizes, flipped, misnamed -> ``predict`` (with and without ``--strict``),
    ``data check`` and ``train`` on a folder data set holding it."""
    fam = family("images", tmp_path)

    @fuzz_settings(1.5)
    @given(st.data())
    def case(data):
        command = data.draw(
            st.sampled_from(["predict", "predict", "predict lenient", "data check", "train"])
        )
        what, raw, ext, expect, size = data.draw(image_files())
        if command in ("data check", "train"):
            if ext not in (".png", ".jpg", ".bmp", ".tif"):
                ext = ".png"  # a folder data set lists these
            if size != SIZE and expect != "refuse":
                expect, what = "refuse", f"{what} (its mask is {SIZE[1]}x{SIZE[0]})"
            name = f"data/images/a{ext}"
        else:
            name = f"img{ext}"

        def make(work: Path) -> None:
            base.copy_data(work)
            if command in ("data check", "train"):
                (work / "data" / "images" / "a.png").unlink()
            else:
                base.copy_ck(work)
            (work / name).write_bytes(raw)

        if command.startswith("predict"):
            argv = ["predict", "--checkpoint", "ck.pt", name, "--out", "P"]
            spec = dict(
                argv=argv + (["--strict"] if command == "predict" else []),
                outputs=("P/*",),
                validate=valid_predict({"img": size}),
                report_status=command == "predict lenient",
                timeout=SLOW,
            )
        elif command == "data check":
            spec = dict(
                argv=["data", "check", "cfg.yaml"],
                validate=valid_data_check,
                report_status=True,
                timeout=FAST,
            )
        else:
            spec = dict(
                argv=["train", "cfg.yaml", *TRAIN, "--set", "train.iters=1"],
                outputs=("runs/run/checkpoints/*",),
                may_leave=("runs",),
                validate=valid_train,
                timeout=SLOW,
            )
        culprits = (name, "data/masks/a.png") if command in ("data check", "train") else (name,)
        fam.run(Case(fam.name, what, make=make, expect=expect, culprits=culprits, **spec))

    case()
    fam.check()


# ----------------------------------------------------------------------------- 6. label maps
@st.composite
def mask_files(draw):
    """(what, bytes, expectation) of a mask file named a.png."""
    kind = draw(
        st.sampled_from(
            [
                "valid",
                "valid",
                "mode",
                "mode",
                "values",
                "size",
                "huge header",
                "truncated",
                "random bytes",
                "empty",
                "jpeg inside",
            ]
        )
    )
    seed = draw(st.integers(0, 3))
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, len(CLASSES), size=SIZE).astype(np.uint8)
    if draw(st.booleans()):
        ids[0, :3] = 255  # ignored pixels
    if kind == "valid":
        mode = draw(st.sampled_from(["L", "P", "1", "I;16"]))
        if mode == "1":
            img = Image.fromarray(ids > 1)
        elif mode == "I;16":
            img = Image.fromarray(ids.astype(np.uint16))
        else:
            img = Image.fromarray(ids)
            if mode == "P":
                img = img.convert("P")
                img.putpalette([200, 10, 10] * 256)
        return f"valid {mode} mask", encode(img, "PNG"), "ok"
    if kind == "mode":
        mode = draw(st.sampled_from(["RGB", "RGBA", "LA", "F", "I"]))
        if mode == "F":
            data = encode(Image.fromarray(ids.astype(np.float32)), "TIFF")
            return "a float (mode F) TIFF named a.png", data, "refuse"
        if mode == "I":
            data = encode(Image.fromarray(ids.astype(np.int32)), "TIFF")
            return "a 32-bit integer (mode I) TIFF named a.png", data, "either"
        rgb = np.stack([ids] * len(mode), axis=-1)
        return (
            f"a mode {mode} mask",
            encode(Image.frombytes(mode, SIZE[::-1], rgb.tobytes()), "PNG"),
            "refuse",
        )
    if kind == "values":
        value = draw(st.sampled_from([3, 7, 200, 254, 256, 1000, 65535]))
        big = ids.astype(np.uint16)
        big[draw(st.integers(0, SIZE[0] - 1)), draw(st.integers(0, SIZE[1] - 1))] = value
        mode = "I;16" if value > 255 else "L"
        img = Image.fromarray(big if mode == "I;16" else big.astype(np.uint8))
        return f"a {mode} mask holding the value {value}", encode(img, "PNG"), "refuse"
    if kind == "size":
        h, w = draw(st.sampled_from([(10, 12), (12, 11), (1, 1), (24, 20), (11, 10)]))
        img = Image.fromarray(rng.integers(0, 3, size=(h, w)).astype(np.uint8))
        return f"a {w}x{h} mask (the image is {SIZE[1]}x{SIZE[0]})", encode(img, "PNG"), "refuse"
    if kind == "huge header":
        big = draw(st.sampled_from([(100_000, 100_000), (1, 10**7), (30_000, 30_000)]))
        data = fuzzing.png_with_size(encode(Image.fromarray(ids), "PNG"), *big)
        return f"a mask whose header claims {big[1]}x{big[0]}", data, "refuse"
    data = encode(Image.fromarray(ids), "PNG")
    if kind == "truncated":
        cut = draw(st.integers(0, len(data) * 9 // 10))
        expect = "either" if same_pixels(data[:cut], data) else "refuse"
        return f"a mask truncated to {cut} of {len(data)} bytes", data[:cut], expect
    if kind == "random bytes":
        raw = draw(st.binary(min_size=1, max_size=200))
        return f"random bytes {raw[:12]!r}...", raw, "refuse"
    if kind == "empty":
        return "an empty mask file", b"", "refuse"
    return (
        "a JPEG (lossy ids) named a.png",
        encode(Image.fromarray(ids * 100), "JPEG"),
        "refuse",
    )


def test_fuzz_label_maps(base, tmp_path):
    """Masks of other sizes, modes and values, truncated, random, claiming huge sizes ->
    ``data check``, ``eval`` and ``train`` on the folder data set (sample a, in both splits)."""
    fam = family("label maps", tmp_path)

    @fuzz_settings(1.0)
    @given(st.data())
    def case(data):
        what, raw, expect = data.draw(mask_files())
        command = data.draw(st.sampled_from(["data check", "data check", "eval", "train"]))

        def make(work: Path) -> None:
            base.copy_data(work)
            if command == "eval":
                base.copy_ck(work)
            (work / "data" / "masks" / "a.png").write_bytes(raw)

        if command == "data check":
            spec = dict(
                argv=["data", "check", "cfg.yaml"],
                validate=valid_data_check,
                report_status=True,
                timeout=FAST,
            )
        elif command == "eval":
            spec = dict(ck_commands("ck.pt")["eval"])
        else:
            spec = dict(
                argv=["train", "cfg.yaml", *TRAIN, "--set", "train.iters=1"],
                outputs=("runs/run/checkpoints/*",),
                may_leave=("runs",),
                validate=valid_train,
                timeout=SLOW,
            )
        fam.run(
            Case(fam.name, what, make=make, expect=expect, culprits=("data/masks/a.png",), **spec)
        )

    case()
    fam.check()


# ----------------------------------------------------------------------------- 7. lists
LISTS = {
    "data/splits/val.txt": ["a", "b"],
    "data/splits/train.txt": list(NAMES),
    "data/classes.txt": list(CLASSES),
}
# which command reads which list
READS = {
    "data check": set(LISTS),
    "eval": {"data/splits/val.txt", "data/classes.txt"},
    "train": set(LISTS),
}
BAD_NAMES = [
    "../images/a",
    "sub/a",
    "/etc/passwd",
    "a/../a",
    ".",
    "..",
    "images/a",
    "a b",
    "a\tb",
    "zzz",
    "ä",
    "a\x00b",
    "x" * 100_000,
    "a\\b",
    "~",
    "$HOME",
    "a*",
]


@st.composite
def list_mutations(draw):
    """(what, the file, its bytes, expectation when read, culprits) of a split list or
    classes.txt."""
    target = draw(st.sampled_from(sorted(LISTS)))
    names = list(LISTS[target])
    classes = target.endswith("classes.txt")
    op = draw(
        st.sampled_from(
            [
                "bom",
                "utf-16",
                "bad byte",
                "crlf",
                "duplicate",
                "bad name",
                "bad name",
                "surrounding spaces",
                "empty",
                "only comments",
                "comment after a name",
                "blank lines",
                "no final newline",
            ]
            + (["256 classes", "one class less", "one class more"] if classes else [])
        )
    )
    text = "".join(f"{n}\n" for n in names)
    culprits = [target]
    expect = "refuse"
    if op == "bom":
        data, expect = b"\xef\xbb\xbf" + text.encode(), "ok"
    elif op == "utf-16":
        data = text.encode("utf-16")
    elif op == "bad byte":
        at = draw(st.integers(0, len(text)))
        data = text.encode()[:at] + b"\xff" + text.encode()[at:]
    elif op == "crlf":
        data, expect = text.replace("\n", "\r\n").encode(), "ok"
    elif op == "duplicate":
        name = draw(st.sampled_from(names))
        data = (text + f"{name}\n").encode()
        culprits.append(name)
    elif op == "bad name":
        name = draw(st.sampled_from(BAD_NAMES))
        at = draw(st.integers(0, len(names) - 1))
        names[at] = name
        data = "".join(f"{n}\n" for n in names).encode()
        culprits.append(name[:50])
        expect = "either" if classes else "refuse"
        op = f"name {at + 1} replaced by {name!r:.40}"
    elif op == "surrounding spaces":
        data, expect = "".join(f"  {n} \t\n" for n in names).encode(), "ok"
    elif op == "empty":
        data = b""
    elif op == "only comments":
        data = b"# nothing here\n#\n"
    elif op == "comment after a name":
        data, expect = "".join(f"{n}  # a note\n" for n in names).encode(), "ok"
    elif op == "blank lines":
        data, expect = ("\n\n" + "\n\n".join(names) + "\n\n").encode(), "ok"
    elif op == "no final newline":
        data, expect = "\n".join(names).encode(), "ok"
    elif op == "256 classes":
        data = "".join(f"c{i}\n" for i in range(256)).encode()
    elif op == "one class less":  # the masks hold id 2
        data = "".join(f"{n}\n" for n in names[:-1]).encode()
        culprits.append("data/masks/")
    else:  # one class more: valid data, but not the checkpoint's classes
        data, expect = (text + "bird\n").encode(), "either"
    return f"{target}: {op}", target, data, expect, tuple(culprits)


def test_fuzz_split_lists(base, tmp_path):
    """Split lists and classes.txt: BOM, UTF-16, bad bytes, CRLF, duplicates, names with
    spaces, separators, '..', NULs, missing names, empty, comments, too many classes ->
    ``data check``, ``eval`` and ``train``."""
    fam = family("split lists", tmp_path)

    @fuzz_settings(1.0)
    @given(st.data())
    def case(data):
        what, target, raw, expect, culprits = data.draw(list_mutations())
        command = data.draw(st.sampled_from(["data check", "data check", "eval", "train"]))
        if target not in READS[command]:
            expect = "ok"
        elif command == "eval" and target.endswith("classes.txt") and expect != "ok":
            expect = "refuse"  # not the classes the checkpoint was trained on
            culprits = (*culprits, "ck.pt")
        elif command == "eval" and target.endswith("classes.txt"):
            culprits = (*culprits, "ck.pt")

        def make(work: Path) -> None:
            base.copy_data(work)
            if command == "eval":
                base.copy_ck(work)
            (work / target).write_bytes(raw)

        if command == "data check":
            spec = dict(
                argv=["data", "check", "cfg.yaml"],
                validate=valid_data_check,
                report_status=True,
                timeout=FAST,
            )
        elif command == "eval":
            spec = dict(ck_commands("ck.pt")["eval"])
        else:
            spec = dict(
                argv=["train", "cfg.yaml", *TRAIN, "--set", "train.iters=1"],
                outputs=("runs/run/checkpoints/*",),
                may_leave=("runs",),
                validate=valid_train,
                timeout=SLOW,
            )
        fam.run(Case(fam.name, what, make=make, expect=expect, culprits=culprits, **spec))

    case()
    fam.check()


# ----------------------------------------------------------------------------- 8. arguments
def command_table() -> dict[tuple[str, ...], list[dict]]:
    """Every command of the typer app (its path, e.g. ('data', 'check')) with its parameters:
    option names or argument name, whether a flag, repeatable, required, the value's type."""
    import typer

    from contrastseg import cli

    table = {}

    def walk(command, path):
        subs = getattr(command, "commands", None)
        if subs:
            table[tuple(path)] = []  # a group
            for name, sub in subs.items():
                walk(sub, [*path, name])
            return
        params = []
        for p in command.params:
            descriptor = getattr(p, "type_descriptor", None)
            annotation = str(getattr(descriptor, "annotation", ""))
            params.append(
                dict(
                    opts=list(p.opts) + list(getattr(p, "secondary_opts", [])),
                    option=p.opts[0].startswith("-"),
                    flag=bool(getattr(p, "is_flag", False)),
                    multiple=bool(p.multiple) or p.nargs == -1,
                    required=bool(p.required),
                    kind="path"
                    if "Path" in annotation
                    else "int"
                    if "int" in annotation
                    else "str",
                )
            )
        table[tuple(path)] = params

    walk(typer.main.get_command(cli.app), [])
    return table


# Commands that would run for minutes if valid (benchmarks, the model zoo, figures): their
# command lines always hold one token that must be refused, or --help.
GUARDED = {("bench",), ("models",), ("figures",), ("summary",)}
VALUES_BY_KIND = {
    "path": [
        "cfg.yaml",
        "ck.pt",
        "img.png",
        "folder",
        "missing.yaml",
        "",
        "-",
        "a\nb.pt",
        "\udcff\udcfe.yaml",
        "x" * 5000,
        "/dev/null",
        "/",
        ".",
        "runs/run",
        "data",
    ],
    "int": ["1", "0", "-1", "2", "abc", "1e3", "99999999999999999999", "", "1.5", "٣"],
    "str": [
        "cpu",
        "torchscript",
        "onnx",
        "torch-export",
        "val",
        "train",
        "all",
        "1",
        "",
        "garbage",
        "ü",
        "../splits/val",
        "val/../val",
        "/etc/passwd",
        "val\n",
        "best",
        "cuda:99",
    ],
}
SET_ITEMS = [
    "train.iters=1",
    "data.crop_size=[8, 8]",
    "a",
    "a=",
    "=1",
    "a.b.c.d=1",
    "data.crop_size=[1,",
    "train.iters=",
    "train=1",
    "train.iters.x=1",
    "train.iters=abc",
    "=",
    "..=1",
    "train..iters=1",
    "train.iters=1=2",
    "train.iters=.nan",
    "train.iters=!!python/name:os.system",
    "data.root=\udcff",
    "output.root=/dev/null",
    "model.head=ocr",
    "eval.scales=[]",
]
GARBAGE = ["--bogus", "-x", "--set", "--", "ü", "--help=1", "---", "-", "--no-such-flag", "@args"]
# --set items and garbage tokens that no command may accept (unless --help comes first)
MUST_FAIL = {
    "a",
    "a=",
    "=1",
    "a.b.c.d=1",
    "data.crop_size=[1,",
    "train=1",
    "train.iters.x=1",
    "train.iters=abc",
    "=",
    "..=1",
    "train..iters=1",
    "train.iters=1=2",
    "train.iters=.nan",
    "train.iters=!!python/name:os.system",
    "--bogus",
    "-x",
    "--no-such-flag",
    "---",
}


@st.composite
def command_lines(draw, table):
    """(argv, expectation, culprits) of a command line built from the real vocabulary."""
    path = draw(st.sampled_from(sorted(table)))
    params = table[path]
    argv = list(path)
    must_fail = False
    if draw(st.integers(0, 9)) == 0:  # a misspelt or unknown command
        argv = [
            draw(st.sampled_from(["trian", "evaluate", "predcit", "configs", "ü", "-"]))
        ] + argv[1:]
        must_fail = True
    for p in params:
        if not p["required"] and draw(st.booleans()):
            continue
        for _ in range(draw(st.integers(1, 2)) if p["multiple"] else 1):
            if p["option"]:
                argv.append(draw(st.sampled_from(p["opts"])))
                if p["flag"]:
                    continue
            if "--set" in p["opts"] and p["option"]:
                item = draw(st.sampled_from(SET_ITEMS))
                argv.append(item)
                must_fail |= item in MUST_FAIL
            else:
                argv.append(draw(st.sampled_from(VALUES_BY_KIND[p["kind"]])))
    if params and draw(st.booleans()):
        at = draw(st.integers(0, len(argv)))
        token = draw(st.sampled_from(GARBAGE))
        argv.insert(at, token)
        must_fail |= token in MUST_FAIL
    drop = draw(st.integers(0, 5)) == 0 and len(argv) > len(path)
    if drop:  # a token lost
        del argv[draw(st.integers(len(path), len(argv) - 1))]
    helped = "--help" in argv or (draw(st.integers(0, 7)) == 0 and not argv.append("--help"))
    if path[:1] in {g[:1] for g in GUARDED} and not helped and not must_fail:
        argv.append("--no-such-flag")
        must_fail = True
    expect = "either" if helped or drop else "refuse" if must_fail else "either"
    culprits = {t for t in argv if t not in path} | {t.split("=", 1)[0] for t in argv if "=" in t}
    for p in params:
        culprits |= set(p["opts"])
    return argv, expect, tuple(sorted(c for c in culprits if c.strip()))


def valid_any(work: Path, run: fuzzing.Run) -> str | None:
    return None if run.stdout.strip() else "status 0 and nothing printed"


def test_fuzz_arguments(base, tmp_path):
    """Command lines from the app's own commands and options, with wrong values, malformed
    --set items, garbage tokens, unicode, undecodable bytes, missing and extra arguments,
    folders and missing paths where files go. Status 0 only for --help or a valid command;
    a usage error is one line and status 2."""
    fam = family("arguments", tmp_path)
    table = command_table()

    @fuzz_settings(1.5)
    @given(st.data())
    def case(data):
        argv, expect, culprits = data.draw(command_lines(table))

        def make(work: Path) -> None:
            base.copy_data(work)
            base.copy_ck(work)
            write_image(work / "img.png")
            (work / "folder").mkdir()

        fam.run(
            Case(
                fam.name,
                "argv " + repr(argv)[:300],
                argv=argv,
                make=make,
                expect=expect,
                culprits=culprits,
                validate=valid_any,
                may_leave=("*",),
                inputs_may_change=(),
                timeout=SLOW,
            )
        )

    case()
    fam.check()


# ----------------------------------------------------------------------------- 9. special files
# Where an input goes: name -> (argv, the input's path, what else the case needs, outputs)
INPUT_PLACES = {
    "config of config show": (["config", "show", "X"], "X", (), ()),
    "config of eval": (
        ["eval", "X", "--checkpoint", "ck.pt", "--out", "e.json"],
        "X",
        ("ck",),
        ("e.json",),
    ),
    "config of train": (["train", "X", *TRAIN], "X", (), ("runs/*",)),
    "base of a config": (["config", "show", "based.yaml"], "X", ("based",), ()),
    "checkpoint of eval": (
        ["eval", "cfg.yaml", "--checkpoint", "X", "--out", "e.json"],
        "X",
        (),
        ("e.json",),
    ),
    "checkpoint of predict": (
        ["predict", "--checkpoint", "X", "img.png", "--out", "P", "--strict"],
        "X",
        ("image",),
        ("P/*",),
    ),
    "checkpoint of export": (
        ["export", "X", "--format", "torchscript", "--out", "m.ts.pt"],
        "X",
        (),
        ("m.ts.pt", "m.ts.pt.json"),
    ),
    "checkpoint of checkpoint upgrade": (
        ["checkpoint", "upgrade", "X", "new.pt"],
        "X",
        (),
        ("new.pt",),
    ),
    "source of convert": (["convert", "X", "out.pt"], "X", (), ("out.pt",)),
    "image of predict": (
        ["predict", "--checkpoint", "ck.pt", "X", "--out", "P", "--strict"],
        "X",
        ("ck",),
        ("P/*",),
    ),
    "backbone weights of train": (
        ["train", "cfg.yaml", *TRAIN, "--set", "model.backbone.weights=X"],
        "X",
        (),
        ("runs/run/checkpoints/*",),
    ),
    "image of a data set": (["data", "check", "cfg.yaml"], "data/images/a.png", (), ()),
    "mask of a data set": (["data", "check", "cfg.yaml"], "data/masks/a.png", (), ()),
    "split list": (["data", "check", "cfg.yaml"], "data/splits/val.txt", (), ()),
    "classes.txt": (["data", "check", "cfg.yaml"], "data/classes.txt", (), ()),
    "data root": (["data", "check", "cfg.yaml"], "data", (), ()),
}
SPECIAL_KINDS = [
    "a FIFO",
    "a symlink loop",
    "a folder",
    "a link to /dev/zero",
    "a link to /dev/urandom",
    "a dangling link",
    "a link to /proc/self/mem",
    "a socket",
]
NAMED = ["a newline in its name", "non-UTF-8 bytes in its name", "spaces and quotes in its name"]


def make_special(path: Path, kind: str) -> None:
    """Put a special file of ``kind`` at ``path`` (whatever was there removed)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    if kind == "a FIFO":
        os.mkfifo(path)
    elif kind == "a symlink loop":
        os.symlink(path.name + ".loop", path)
        os.symlink(path.name, path.with_name(path.name + ".loop"))
    elif kind == "a folder":
        path.mkdir()
        (path / "inside").write_text("x\n")
    elif kind == "a dangling link":
        os.symlink("nowhere/at/all", path)
    elif kind == "a socket":
        import socket

        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.bind(str(path))
        except OSError:  # a path too long for a socket: a FIFO instead
            os.mkfifo(path)
        finally:
            sock.close()
    else:
        os.symlink(kind.removeprefix("a link to "), path)


def special_name(kind: str) -> str:
    return {
        "a newline in its name": "new\nline",
        "non-UTF-8 bytes in its name": os.fsdecode(b"bad\xff\xfename"),
        "spaces and quotes in its name": 'it\'s a "file" name',
    }[kind]


def _fill_valid(base: Base, work: Path, place: str, target: Path) -> None:
    """Write the valid input of ``place`` at ``target``."""
    if place.startswith(("config", "base")):
        shutil.copy(base.config, target)
    elif place.startswith(("checkpoint", "source")):
        shutil.copy(base.ck, target)
    elif place.startswith("image"):
        write_image(target)
    elif place.startswith("backbone"):
        call_in_child(fuzzing.save_payload, {"conv_stem.weight": 0}, str(target), "zip", "")


def test_fuzz_special_files(base, tmp_path):
    """Inputs that are FIFOs (must not hang), symlink loops, folders, devices, dangling links,
    sockets, or valid files whose names hold a newline, undecodable bytes or quotes; output
    paths that are files or folders; checkpoints whose records claim huge sizes."""
    fam = family("special files", tmp_path)

    @fuzz_settings(1.5)
    @given(st.data())
    def case(data):
        group = data.draw(
            st.sampled_from(["special", "special", "special", "named", "output", "claims"])
        )
        if group == "output":
            fam.run(data.draw(output_cases(base)))
            return
        if group == "claims":
            how = data.draw(
                st.sampled_from(
                    [
                        "view past its storage",
                        "storage of 2**40 elements",
                        "zip record of 2**31 bytes",
                    ]
                )
            )
            command = data.draw(st.sampled_from(["eval", "predict", "export", "upgrade"]))

            def write(path: Path) -> None:
                call_in_child(fuzzing.save_claiming, str(path), how)

            fam.run(
                _ck_case(base, fam.name, f"a checkpoint with a {how}", command, write, "refuse", ())
            )
            return
        place = data.draw(st.sampled_from(sorted(INPUT_PLACES)))
        argv, target, needs, outputs = INPUT_PLACES[place]
        if group == "named":
            if target != "X":
                place = "checkpoint of eval"
                argv, target, needs, outputs = INPUT_PLACES[place]
            kind = data.draw(st.sampled_from(NAMED))
            name = special_name(kind)
            expect = "either"
        else:
            kind = data.draw(st.sampled_from(SPECIAL_KINDS))
            name = "X" if target == "X" else target
            expect = "refuse"
        argv = [name if a == "X" else a.replace("=X", f"={name}") for a in argv]

        def make(work: Path) -> None:
            base.copy_data(work)
            if "ck" in needs:
                base.copy_ck(work)
            if "image" in needs:
                write_image(work / "img.png")
            if "based" in needs:
                # a name of undecodable bytes goes into the YAML as those bytes
                (work / "based.yaml").write_bytes(
                    f"base: {name}\n".encode("utf-8", "surrogateescape")
                )
            if group == "named":
                _fill_valid(base, work, place, work / name)
            else:
                make_special(work / name, kind)

        validate = {
            "config of config show": valid_config_show,
            "base of a config": valid_config_show,
            "checkpoint of eval": valid_eval,
            "config of eval": valid_eval,
        }.get(place)
        fam.run(
            Case(
                fam.name,
                f"{place} is {kind}",
                argv=argv,
                make=make,
                expect=expect,
                culprits=(name, "based.yaml")
                if "based" in needs
                else (name, name.rsplit(".", 1)[0]),
                outputs=outputs,
                may_leave=("runs",),
                validate=validate,
                report_status=argv[:2] == ["data", "check"],
                timeout=20.0 if group == "special" else SLOW,
            )
        )

    case()
    fam.check()


@st.composite
def output_cases(draw, base: Base):
    """An output path that cannot be written: a file where a folder goes, a folder where a
    file goes, a path below a file."""
    kind = draw(
        st.sampled_from(
            [
                "predict --out is a file",
                "predict --out is below a file",
                "export --out is a folder",
                "export --out is below a file",
                "export torch-export --out is a folder",
                "export torch-export --out is below a file",
                "eval --out is a folder",
                "eval --out is below a file",
                "checkpoint upgrade NEW exists",
                "checkpoint upgrade NEW is a folder",
                "convert OUT is a folder",
                "train output.root is a file",
                "export --out has a newline",
                "export torch-export --out has a newline",
                "predict --out has a newline",
            ]
        )
    )
    out = {
        "is a file": "taken",
        "is below a file": "taken/sub",
        "is a folder": "folder",
        "exists": "taken",
        "has a newline": "out\nput",
    }[
        next(
            k
            for k in ("is a file", "is below a file", "is a folder", "exists", "has a newline")
            if k in kind
        )
    ]
    command = kind.split(" ")[0]
    if kind.startswith("checkpoint"):
        argv, culprits = ["checkpoint", "upgrade", "ck.pt", out], (out,)
    elif command == "predict":
        argv = ["predict", "--checkpoint", "ck.pt", "img.png", "--out", out, "--strict"]
        culprits = (out,)
    elif command == "export":
        fmt = "torch-export" if "torch-export" in kind else "torchscript"
        argv = ["export", "ck.pt", "--format", fmt, "--out", out]
        culprits = (out,)
    elif command == "eval":
        argv = ["eval", "cfg.yaml", "--checkpoint", "ck.pt", "--out", out]
        culprits = (out,)
    elif command == "convert":
        argv, culprits = ["convert", "ck.pt", out], (out, "ck.pt")
    else:
        argv = ["train", "cfg.yaml", *TRAIN, "--set", "output.root=taken"]
        culprits = ("taken", "output.root")
    expect = "either" if "newline" in kind else "refuse"

    def make(work: Path) -> None:
        base.copy_data(work)
        base.copy_ck(work)
        write_image(work / "img.png")
        (work / "taken").write_text("a file\n")
        (work / "folder").mkdir()

    return Case(
        "special files",
        kind,
        argv=argv,
        make=make,
        expect=expect,
        culprits=culprits,
        may_leave=("runs",),
        inputs_may_change=("folder*",) if "newline" in kind else (),
        timeout=SLOW,
    )


# ----------------------------------------------------------------------------- the script
def _agreement_cases(base: Base) -> list[tuple[list[str], object]]:
    def unknown_key(work: Path) -> None:
        (work / "bad.yaml").write_text("train:\n  iterz: 3\n")

    def nothing(work: Path) -> None:
        base.copy_data(work)

    def broken_image(work: Path) -> None:
        base.copy_ck(work)
        (work / "broken.png").write_bytes(fuzzing.png_16bit_rgb(*SIZE)[:60])

    return [
        (["config", "show", "bad.yaml"], unknown_key),
        (["eval", "cfg.yaml", "--checkpoint", "missing.pt", "--out", "e.json"], nothing),
        (
            ["predict", "--checkpoint", "ck.pt", "broken.png", "--out", "P", "--strict"],
            broken_image,
        ),
        (["--version"], nothing),
    ]


def _errors(text: str, *folders: Path) -> list[str]:
    """The error lines of ``text``, the case folders written WORK."""
    for folder in folders:
        text = text.replace(str(folder), "WORK")
    return [line for line in text.splitlines() if line.startswith("error: ")]


def test_console_script_agrees_with_the_forked_run(base, tmp_path):
    """The installed ``contrastseg`` script and the harness's forked ``cli.main()`` give the
    same exit status, error line and stdout on the same cases."""
    script = Path(sys.executable).parent / "contrastseg"
    assert script.exists(), script
    for i, (argv, make) in enumerate(_agreement_cases(base)):
        forked, spawned = tmp_path / f"fork{i}", tmp_path / f"script{i}"
        for work in (forked, spawned):
            work.mkdir()
            make(work)
        run = fuzzing.run_cli(argv, forked, tmp_path / f"aux{i}", timeout=FAST)
        (tmp_path / "tmp").mkdir(exist_ok=True)
        done = subprocess.run(
            [str(script), *argv],
            cwd=spawned,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "COLUMNS": "80", "TMPDIR": str(tmp_path / "tmp")},
        )
        assert run.status == done.returncode, (argv, run.stderr, done.stderr)
        ours, theirs = (_errors(t, forked, spawned) for t in (run.stderr, done.stderr))
        assert ours == theirs, (argv, run.stderr, done.stderr)
        assert run.stdout == done.stdout, (argv, run.stdout, done.stdout)


# ----------------------------------------------------------------------------- 10. ONNX models
PALETTE = [[0, 0, 0], [128, 0, 0], [0, 128, 0]]
# model kind -> expectation of predict --onnx with a valid sidecar
ONNX_KINDS = {
    "valid": "ok",
    "one output": "refuse",  # one class of logits for a sidecar of three
    "more outputs": "refuse",  # ids beyond the sidecar's classes and palette
    "nan weights": "refuse",
    "inf weights": "refuse",
    "pooled": "refuse",  # 1x1 logits: labels of another size than the image
    "rank 3": "refuse",
    "int64 ids": "refuse",
    "half the size": "refuse",
    "other input name": "refuse",
    "two inputs": "refuse",
    "external data": "refuse",
}
DEEP_JSON = "[" * 200_000 + "]" * 200_000
# Wrong values for a field of a JSON file the commands read (a sidecar, a model folder's
# config.json); "(removed)" removes the field.
JSON_FIELD_VALUES = [
    "(removed)",
    None,
    0,
    -1,
    "x",
    [],
    {},
    [math.nan] * 3,
    [0.0, 0.0, 0.0],
    ["a", "b"],
    [[300, 0, 0]] * 3,
    [f"c{i}" for i in range(300)],
    1e308,
    True,
]


@st.composite
def sidecar_mutations(draw):
    """(what, the sidecar's bytes, expectation)."""
    info = fuzzing.onnx_sidecar(list(CLASSES), PALETTE)
    kind = draw(st.sampled_from(["none", "none", "field", "field", "field", "text"]))
    if kind == "none":
        return "a valid sidecar", json.dumps(info).encode(), "ok"
    if kind == "field":
        key = draw(
            st.sampled_from(
                [
                    "format",
                    "input",
                    "output",
                    "class_names",
                    "palette",
                    "input.name",
                    "input.mean",
                    "input.std",
                    "output.name",
                    "num_classes",
                    "sidecar_version",
                ]
            )
        )
        value = draw(
            st.sampled_from([*JSON_FIELD_VALUES, "torchscript", [1.0, 1.0], [[0, 0, 0]] * 2])
        )
        fuzzing.set_dotted(info, key, value, drop=value == "(removed)")
        informational = key in ("num_classes", "sidecar_version")
        try:
            text = json.dumps(info).encode()
        except ValueError:  # NaN is written as NaN, which JSON readers may take
            text = json.dumps(info, allow_nan=True).encode()
        return f"sidecar {key} set to {value!r:.40}", text, "either" if informational else "refuse"
    text = json.dumps(info)
    op = draw(
        st.sampled_from(
            [
                "truncated",
                "bad byte",
                "nested 200,000 deep",
                "over 1 MiB",
                "a list",
                "empty",
                "a BOM",
                "NaN literals",
                "duplicate keys",
            ]
        )
    )
    if op == "truncated":
        at = draw(st.integers(0, len(text) - 1))
        return f"sidecar truncated to {at} bytes", text[:at].encode(), "refuse"
    if op == "bad byte":
        at = draw(st.integers(0, len(text)))
        return (
            f"byte 0xff at offset {at} of the sidecar",
            text[:at].encode() + b"\xff" + text[at:].encode(),
            "refuse",
        )
    if op == "nested 200,000 deep":
        info["extra"] = "@@"
        return (
            "a value nested 200,000 deep in the sidecar",
            json.dumps(info).replace('"@@"', DEEP_JSON).encode(),
            "either",
        )
    if op == "over 1 MiB":
        info["padding"] = "x" * (1 << 20)
        return "a sidecar of over 1 MiB", json.dumps(info).encode(), "refuse"
    if op == "a list":
        return "a sidecar holding a JSON list", b"[1, 2]", "refuse"
    if op == "empty":
        return "an empty sidecar", b"", "refuse"
    if op == "a BOM":
        return "a sidecar with a UTF-8 byte order mark", b"\xef\xbb\xbf" + text.encode(), "either"
    if op == "NaN literals":
        return "sidecar input.mean of NaN literals", text.replace("0.485", "NaN").encode(), "refuse"
    return (
        "a sidecar giving class_names twice",
        text.replace('"palette"', '"class_names": [], "palette"', 1).encode(),
        "either",
    )


def test_fuzz_onnx_models(base, tmp_path):
    """``predict --onnx`` on odd ONNX models (more or fewer classes than the sidecar, NaN or
    inf weights, logits of another size or rank, ids instead of logits, other inputs, weights
    in /dev/zero, damaged bytes) and odd sidecars (fields missing or wrong, NaN, over 1 MiB,
    nested 200,000 deep, truncated, not UTF-8)."""
    fam = family("onnx models", tmp_path)

    @fuzz_settings(1.0)
    @given(st.data())
    def case(data):
        model_kind = data.draw(
            st.sampled_from(["valid", "valid", "valid", *sorted(ONNX_KINDS), "damaged"])
        )
        what_sidecar, sidecar, sidecar_expect = data.draw(sidecar_mutations())
        if model_kind == "damaged":
            model = fuzzing.onnx_model("valid")
            at = data.draw(st.integers(0, len(model) - 1))
            cut = data.draw(st.booleans())
            model = model[:at] if cut else model[:at] + bytes([model[at] ^ 0xFF]) + model[at + 1 :]
            model_what = f"an ONNX model {'truncated to' if cut else 'inverted at byte'} {at}"
            model_expect = "either"  # a flipped weight byte still loads
        else:
            model = fuzzing.onnx_model(model_kind)
            model_what = f"an ONNX model: {model_kind}"
            model_expect = ONNX_KINDS[model_kind]
        expects = {model_expect, sidecar_expect}
        expect = "refuse" if "refuse" in expects else "ok" if expects == {"ok"} else "either"
        strict = data.draw(st.sampled_from([True, True, False]))

        def make(work: Path) -> None:
            (work / "m.onnx").write_bytes(model)
            (work / "m.onnx.json").write_bytes(sidecar)
            write_image(work / "img.png")

        fam.run(
            Case(
                fam.name,
                f"{model_what}; {what_sidecar}",
                argv=["predict", "--onnx", "m.onnx", "img.png", "--out", "P"]
                + (["--strict"] if strict else []),
                make=make,
                expect=expect,
                culprits=("m.onnx", "m.onnx.json", "img.png"),
                outputs=("P/*",),
                validate=valid_predict({"img": SIZE}),
                report_status=not strict,
                timeout=FAST,
            )
        )

    case()
    fam.check()


# ----------------------------------------------------------------------------- 11. run folders
RUN_FILES = {  # file -> commands that read it
    "runs/run/eval.json": {"report", "report best"},
    "runs/run/metrics.jsonl": {"report", "report best", "resume"},
    "runs/run/config.yaml": {"report", "report best", "resume"},
    "runs/run/config_changes.jsonl": {"resume"},
}


@st.composite
def run_file_mutations(draw, base: Base):
    """(what, the file, its bytes (None: removed), expectation when read)."""
    target = draw(st.sampled_from(sorted(RUN_FILES)))
    original = (base.run / Path(target).name).read_bytes() if "changes" not in target else b""
    op = draw(
        st.sampled_from(
            ["truncated", "bad byte", "nested deep", "empty", "removed", "garbage line", "values"]
        )
    )
    if op == "truncated" and original:
        at = draw(st.integers(0, len(original) - 1))
        # whole records of a JSON-lines file stay valid: fewer records, not a damaged one
        whole = target.endswith(".jsonl") and (at == 0 or original[at - 1 : at] == b"\n")
        # a config.yaml cut where what is left still parses reads with the lost keys at their
        # defaults: the run's files are written atomically, so only damage from outside cuts
        # one, and no marker tells such a cut from a config written by hand (a limit,
        # docs/fuzzing.md)
        whole = whole or target.endswith("config.yaml") and at > 0
        expect = "either" if whole else "refuse"
        return f"{target} truncated to {at} bytes", target, original[:at], expect
    if op == "bad byte" and original:
        at = draw(st.integers(0, len(original)))
        data = original[:at] + b"\xff\xfe" + original[at:]
        return f"{target}: bytes ff fe at offset {at}", target, data, "refuse"
    if op == "nested deep":
        depth = draw(st.sampled_from([100, 100_000]))
        line = ("[" * depth + "]" * depth).encode()
        data = line if target.endswith(".json") else original + line + b"\n"
        return f"{target}: a value nested {depth} deep", target, data, "refuse"
    if op == "empty":
        expect = "refuse" if target.endswith((".json", ".yaml")) else "either"
        return f"{target} empty", target, b"", expect
    if op == "removed":
        expect = "refuse" if target.endswith((".json", ".yaml")) else "either"
        return f"{target} removed", target, None, expect
    if op == "garbage line":
        junk = draw(st.sampled_from([b"not json", b"{", b"\x00\x01", b'{"iter": "x"}', b"[]"]))
        if target.endswith(".jsonl"):
            # a record without a timing is no timing: report reads only s_per_iter
            expect = "either" if junk == b'{"iter": "x"}' else "refuse"
            return f"{target}: line {junk!r} appended", target, original + junk + b"\n", expect
        return f"{target} replaced by {junk!r}", target, junk, "refuse"
    # values of the JSON
    if target.endswith("eval.json"):
        tree = json.loads(original)
        field, value = draw(
            st.sampled_from(
                [
                    ("mIoU", math.nan),
                    ("mIoU", math.inf),
                    ("mIoU", 1.5),
                    ("mIoU", -0.1),
                    ("mIoU", "0.5"),
                    ("mIoU", None),
                    ("mIoU", True),
                    ("best", {"mIoU": math.nan}),
                    ("best", 5),
                    ("split", 7),
                    ("mIoU", 0.5),
                ]
            )
        )
        tree[field] = value
        ok = field == "mIoU" and value == 0.5 or field == "split"
        return (
            f"{target}: {field} = {value!r}",
            target,
            json.dumps(tree).encode(),
            "either" if ok else "refuse",
        )
    if target.endswith("metrics.jsonl"):
        value = draw(st.sampled_from([math.nan, -1.0, "x", 1e308, None, math.inf]))
        lines = [json.loads(ln) for ln in original.decode().splitlines()]
        for rec in lines:
            rec["s_per_iter"] = value
        data = "".join(json.dumps(rec) + "\n" for rec in lines).encode()
        return (
            f"{target}: every s_per_iter = {value!r}",
            target,
            data,
            "either" if value == 1e308 else "refuse",
        )
    if target.endswith("config.yaml"):
        new = json.loads(json.dumps(base.tree))
        what, expect, _, raw = draw(tree_mutation(base.tree, new))
        text = yaml.safe_dump(new, sort_keys=False, width=1 << 20)
        if raw is not None:
            text = text.replace(f"'{PLACEHOLDER}'", raw).replace(PLACEHOLDER, raw)
        return f"{target}: {what}", target, text.encode(), expect
    record = draw(
        st.sampled_from([b'{"iteration": "x"}', b'{"iteration": 1, "changes": 5}', b"[1]"])
    )
    return f"{target}: record {record!r}", target, record + b"\n", "refuse"


def test_fuzz_run_folders(base, tmp_path):
    """A run folder's own files (eval.json, metrics.jsonl, config.yaml, config_changes.jsonl)
    damaged -> ``report``, ``report --checkpoint best`` and ``train --resume``."""
    fam = family("run folders", tmp_path)

    @fuzz_settings(1.0)
    @given(st.data())
    def case(data):
        what, target, raw, expect = data.draw(run_file_mutations(base))
        command = data.draw(st.sampled_from(["report", "report", "report best", "resume"]))
        if command not in RUN_FILES[target]:
            expect = "ok"
        elif command == "resume" and what == "runs/run/config.yaml removed":
            expect = "either"  # the checkpoint's config is then the record (docs/reliability.md)
        elif command == "resume" and "s_per_iter" in what:
            expect = "either"  # timings are not read to resume (only for the final summary)
        if command == "report best" and expect != "refuse":
            expect = "either"  # the run kept no best evaluation (train.eval_every is 0)

        def make(work: Path) -> None:
            base.copy_data(work)
            run = base.copy_run(work)
            shutil.copy(base.run / "checkpoints" / "iter_0000002.pt", run / "checkpoints")
            if raw is None:
                (work / target).unlink(missing_ok=True)
            else:
                (work / target).write_bytes(raw)

        if command == "resume":
            spec = dict(RESUME, outputs=("runs/run/checkpoints/iter_0000003.pt",))
        else:
            spec = dict(
                argv=["report", "runs/run"]
                + (["--checkpoint", "best"] if command == "report best" else []),
                validate=valid_any,
                timeout=FAST,
            )
        # --resume may drop a damaged log's lines with a warning naming the file (a crash can
        # leave a torn last line): that counts as a refusal
        skip = target if command == "resume" else None
        fam.run(
            Case(
                fam.name,
                what,
                make=make,
                expect=expect,
                culprits=(target, "runs/run"),
                skip_warning=skip,
                **spec,
            )
        )

    case()
    fam.check()


# ----------------------------------------------------------------------------- 12. model folders
FOLDER_NAMES = ("config.json", "model.safetensors", "README.md")
FOLDER_KEYS = [
    "contrastseg_model_format",
    "model",
    "model.head",
    "model.backbone.name",
    "model.classifier",
    "input",
    "input.mean",
    "input.std",
    "input.channels",
    "num_classes",
    "class_names",
    "palette",
    "evaluation",
    "evaluation.procedure",
    "evaluation.procedure.mode",
    "evaluation.procedure.scales",
    "evaluation.results",
    "training",
    "weights",
    "weights.sha256",
    "weights.file",
    "digest",
]
FOLDER_VALUES = [
    *JSON_FIELD_VALUES,
    2,
    3,
    "BGR",
    "hrnetv2",
    [0.5, 0.5],
    ["a", "b", "c"],
    [[0, 0, 0]] * 3,
    "0" * 64,
]


def model_folder_files(ck: str, dst: str) -> dict[str, bytes]:
    """The three files of ``export --format hub`` of ``ck`` (run in a child)."""
    from contrastseg import save_pretrained

    folder = save_pretrained(ck, dst)
    return {name: (folder / name).read_bytes() for name in FOLDER_NAMES}


def reseal_config(info: dict, weights: bytes | None, how: str) -> bytes:
    """config.json after a deliberate edit: ``renew`` records the weights' SHA-256 and a new
    digest; ``drop`` removes the digest; ``keep`` leaves the old one (a changed file)."""
    import hashlib

    from contrastseg.digest import content_digest

    if how != "keep":
        info.pop("digest", None)
        if isinstance(info.get("weights"), dict) and weights is not None:
            info["weights"]["sha256"] = hashlib.sha256(weights).hexdigest()
        if how == "renew":
            info["digest"] = content_digest(info)
    return json.dumps(info, allow_nan=True).encode()


def _cut_or_invert(draw, data: bytes, name: str, op: str, at: int) -> tuple[bytes, str]:
    """``data`` with byte ``at`` xor a drawn mask (``op`` "xor"), or cut before it."""
    if op == "xor":
        mask = draw(st.integers(1, 255))
        return data[:at] + bytes([data[at] ^ mask]) + data[at + 1 :], f"{name} byte {at} xor {mask}"
    return data[:at], f"{name} truncated to {at} bytes"


@st.composite
def folder_mutations(draw, files: dict[str, bytes]):
    """(what, {file: bytes, or None (removed), or 'folder'/'fifo'/'loop'}, expect)."""
    out = dict(files)
    original = json.loads(files["config.json"])
    kind = draw(
        st.sampled_from(
            ["none", "field", "field", "field", "config bytes", "weights", "weights", "file"]
        )
    )
    if kind == "none":
        return "a valid model folder", out, "ok"
    if kind == "field":
        info = json.loads(files["config.json"])
        key = draw(st.sampled_from(FOLDER_KEYS))
        value = draw(st.sampled_from(FOLDER_VALUES))
        fuzzing.set_dotted(info, key, value, drop=value == "(removed)")
        how = draw(st.sampled_from(["keep", "renew", "renew", "drop"]))
        out["config.json"] = reseal_config(info, files["model.safetensors"], how)
        unchanged = json.loads(files["config.json"]) == json.loads(out["config.json"])
        # with the old digest, a changed file is refused (a removed digest is a notice); after
        # a deliberate edit some values are valid (another eval scale, no results, ...)
        expect = "either"
        if how == "keep" and key != "digest":
            expect = "ok" if unchanged else "refuse"
        return f"config.json {key} set to {value!r:.40} ({how} digest)", out, expect
    if kind == "config bytes":
        text = files["config.json"]
        op = draw(st.sampled_from(["xor", "truncate", "insert 0xff", "BOM", "over 1 MiB"]))
        at = draw(st.integers(0, len(text) - 1))
        if op in ("xor", "truncate"):
            raw, what = _cut_or_invert(draw, text, "config.json", op, at)
        elif op == "insert 0xff":
            raw, what = text[:at] + b"\xff" + text[at:], f"config.json: 0xff at {at}"
        elif op == "BOM":
            raw, what = b"\xef\xbb\xbf" + text, "config.json with a byte order mark"
        else:
            raw = text[:-2] + b', "pad": "' + b"x" * (1 << 20) + b'"}'
            what = "config.json of over 1 MiB"
        out["config.json"] = raw
        try:
            same = json.loads(raw.decode("utf-8")) == original
        except ValueError:
            same = False
        return what, out, "either" if same else "refuse"
    if kind == "weights":
        data = files["model.safetensors"]
        op = draw(st.sampled_from(["xor", "truncate", "append", "header"]))
        resealed = draw(st.booleans())
        at = draw(st.integers(0, len(data) - 1))
        if op in ("xor", "truncate"):
            raw, what = _cut_or_invert(draw, data, "model.safetensors", op, at)
        elif op == "append":
            raw, what = (
                data + b"\0" * draw(st.integers(1, 64)),
                "model.safetensors with bytes appended",
            )
        else:
            header_len = int.from_bytes(data[:8], "little")
            claim = draw(st.sampled_from([0, 7, header_len + 1, 1 << 40, (1 << 64) - 1]))
            raw = claim.to_bytes(8, "little") + data[8:]
            what = f"model.safetensors claiming a {claim}-byte header"
        out["model.safetensors"] = raw
        if resealed:
            info = json.loads(files["config.json"])
            out["config.json"] = reseal_config(info, raw, "renew")
            return what + " (SHA-256 renewed)", out, "either"  # a changed weight still loads
        return what, out, "refuse"
    name = draw(st.sampled_from(FOLDER_NAMES))
    how = draw(st.sampled_from(["removed", "folder", "fifo", "loop", "empty"]))
    out[name] = {"removed": None, "empty": b""}.get(how, how)
    expect = "ok" if name == "README.md" and how in ("removed", "empty") else "either"
    if name != "README.md":
        expect = "refuse"
    return f"{name} {how}", out, expect


def valid_hub(work: Path, run: fuzzing.Run) -> str | None:
    names = {p.name for p in (work / "N").iterdir()} if (work / "N").is_dir() else set()
    return None if names == set(FOLDER_NAMES) else f"N/ holds {sorted(names)}"


def test_fuzz_model_folders(base, tmp_path):
    """Model folders (``export --format hub``) with config.json fields changed (digest kept,
    renewed or dropped), its bytes inverted, truncated or padded past 1 MiB, the weights' bytes
    or header length spoiled (SHA-256 kept or renewed), files removed or replaced by a folder,
    a FIFO or a symlink loop -> ``predict``, ``eval``, ``export`` and ``export --format hub``
    with ``--checkpoint M``."""
    fam = family("model folders", tmp_path)
    files = call_in_child(model_folder_files, str(base.ck), str(tmp_path / "folder"))
    commands = ck_commands("M")
    commands["hub"] = dict(
        argv=["export", "M", "--format", "hub", "--out", "N"],
        outputs=("N", "N/*"),
        validate=valid_hub,
        timeout=SLOW,
    )

    @fuzz_settings(1.0)
    @given(st.data())
    def case(data):
        what, mutated, expect = data.draw(folder_mutations(files))
        command = data.draw(st.sampled_from(["predict", "predict", "eval", "export", "hub"]))

        def make(work: Path) -> None:
            base.copy_data(work)
            write_image(work / "img.png")
            folder = work / "M"
            folder.mkdir()
            for name, content in mutated.items():
                path = folder / name
                if content is None:
                    continue
                if content == "folder":
                    path.mkdir()
                elif content == "fifo":
                    os.mkfifo(path)
                elif content == "loop":
                    path.symlink_to(name)
                else:
                    path.write_bytes(content)

        fam.run(
            Case(
                fam.name,
                what,
                make=make,
                expect=expect,
                culprits=("M",),
                **commands[command],
            )
        )

    case()
    fam.check()


def test_the_harness_sees_hangs_crashes_tracebacks_and_payloads(tmp_path):
    """The oracle itself: a child that blocks is killed and classified ``hang``, one killed by
    a signal ``other``, cli.main's internal-error line ``traceback``, a marker ``executed``,
    a success on an input to refuse ``silent``, a left temporary file ``leftover``."""
    import signal
    import time

    def case(**kw) -> Case:
        return Case("harness", "self-test", argv=[], make=lambda work: None, **kw)

    def classify(work_fn, **kw) -> str:
        work = tmp_path / f"w{len(list(tmp_path.iterdir()))}"
        work.mkdir()
        c = case(**kw)
        run = fuzzing._fork(work_fn, work, work.with_suffix(".aux"), timeout=c.timeout)
        return fuzzing.classify(c, run, work, {}).outcome

    def blocks() -> int:
        time.sleep(60)
        return 0

    def crashes() -> int:
        os.kill(os.getpid(), signal.SIGSEGV)
        return 0

    def internal() -> int:
        sys.stderr.write("error: internal error: ValueError: x (traceback in /tmp/t.txt)\n")
        return 1

    def payload() -> int:
        Path("MARKER").touch()
        return 2

    def succeeds() -> int:
        print("done")
        return 0

    def leaves() -> int:
        Path(".out.png.abc123.tmp").touch()
        sys.stderr.write("error: x.png: broken\n")
        return 2

    start = time.monotonic()
    assert classify(blocks, timeout=1.0) == "hang"
    assert time.monotonic() - start < 10
    assert classify(crashes) == "other"
    assert classify(internal) == "traceback"
    assert classify(payload, marker="MARKER") == "executed"
    assert classify(succeeds, expect="refuse") == "silent"
    assert classify(succeeds, expect="ok") == "ok"
    assert classify(leaves, expect="refuse", culprits=("x.png",)) == "leftover"
