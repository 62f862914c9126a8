#!/usr/bin/env python3
"""The fuzz suite's outcomes as a markdown table (docs/fuzzing.md).

    scripts/fuzz_table.py runs/fuzz/outcomes.jsonl [--out runs/fuzz/table.md]

Reads the JSON lines tests/fuzzing.py records (``FUZZ_RECORD``: one line per case with its
family, case, command, outcome, status, error line and seconds; several files, or the files of
a folder, are read together) and prints: one row per family with the count of each outcome,
the slowest case, and every failing case (an outcome other than ok and refused), grouped by
family, outcome and what went wrong, with the reproducers of the first few.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

OUTCOMES = ("ok", "refused", "traceback", "hang", "leftover", "executed", "silent", "other")
FAILING = OUTCOMES[2:]
EXAMPLES = 3  # reproducers shown per group of failures


def read(paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
        for file in files:
            for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    sys.exit(f"error: {file}, line {number}: not JSON ({err.msg})")
    return rows


def _cell(text: object) -> str:
    """``text`` fit for a table cell or a list item: one line, ``|`` escaped, at most 300
    characters."""
    text = str(text).replace("\n", "\\n").replace("|", "\\|")
    return text if len(text) <= 300 else text[:300] + "..."


def _kind(row: dict) -> str:
    """What went wrong, with the case's own numbers, paths and quoted values masked, so that
    failures of one cause group together."""
    text = row.get("error") or row.get("reason") or ""
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", text)
    text = re.sub(r"(/[\w.\-]+)+", "PATH", text)
    text = re.sub(r"\d+", "N", text)
    return text[:160]


def table(rows: list[dict]) -> str:
    families: dict[str, Counter] = {}
    for row in rows:
        families.setdefault(row["family"], Counter())[row["outcome"]] += 1
    total = Counter()
    for counts in families.values():
        total.update(counts)
    lines = [
        "| family | cases | " + " | ".join(OUTCOMES) + " |",
        "|---|---:|" + "---:|" * len(OUTCOMES),
    ]
    for name, counts in [*families.items(), ("**all**", total)]:
        cells = [str(counts.get(o, 0)) for o in OUTCOMES]
        lines.append(f"| {name} | {sum(counts.values())} | " + " | ".join(cells) + " |")
    out = ["# Fuzz outcomes", "", *lines, ""]
    if rows:
        slow = max(rows, key=lambda r: r.get("seconds") or 0)
        seconds = sum(r.get("seconds") or 0 for r in rows)
        out += [
            f"Slowest case: {slow['seconds']:.2f} s, {slow['family']}: {_cell(slow['case'])} "
            f"(`{_cell(slow['command'])}`); all cases together {seconds:.0f} s of child time.",
            "",
        ]
    failures = [r for r in rows if r["outcome"] in FAILING]
    out.append(f"## Failures ({len(failures)})")
    out.append("")
    if not failures:
        out.append("None: every case ended ok or refused.")
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in failures:
        groups[(row["family"], row["outcome"], _kind(row))].append(row)
    for (family, outcome, _), members in sorted(groups.items(), key=lambda g: -len(g[1])):
        first = members[0]
        out.append(
            f"- **{outcome}**, {family}, {len(members)} case(s): "
            f"{_cell(first.get('error') or first.get('reason'))}"
        )
        for row in members[:EXAMPLES]:
            out.append(
                f"  - {_cell(row['case'])}: `{_cell(row['command'])}` (expected {row['expect']}, "
                f"status {row['status']}; {_cell(row.get('reason', ''))})"
            )
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="outcome files or folders of them")
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    args = parser.parse_args()
    missing = [p for p in args.paths if not p.exists()]
    if missing:
        sys.exit(f"error: {missing[0]}: no such file or folder (run `make fuzz` first)")
    text = table(read(args.paths))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
