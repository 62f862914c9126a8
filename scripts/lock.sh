#!/usr/bin/env bash
# Regenerates requirements.lock: every runtime and development dependency of contrastseg (its
# dependencies and the `dev` extra, transitively), pinned with ==, the project itself left out.
#
#   scripts/lock.sh                      resolve anew in a fresh virtual environment: the newest
#                                        releases pyproject.toml allows (an upgrade)
#   scripts/lock.sh 'torch==2.15.0' ...  the same, with extra requirements or pins for pip
#   scripts/lock.sh --from .venv         freeze an environment that exists (after pip install)
#
# `make lock` runs the first form. An upgrade is its own commit: regenerate, then
# `rm -f .venv/.installed && make test` (the Makefile installs from the lock), and commit the
# lock with the suite passing.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
lock=requirements.lock

if [ "${1:-}" = "--from" ]; then
  venv="${2:?usage: scripts/lock.sh --from VENV}"
else
  venv="$(mktemp -d)/venv"
  trap 'rm -rf "$(dirname "$venv")"' EXIT
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -e '.[dev]' "$@"
fi

{
  echo "# Every runtime and development dependency of contrastseg, transitively, at the releases"
  echo "# the test suite passes with. The Makefile installs with: pip install -c $lock -e '.[dev]'"
  echo "# (a constraint applies only where a package is needed, e.g. the CUDA libraries of torch"
  echo "# only on Linux x86_64). Regenerate with scripts/lock.sh (make lock); see the README."
  echo "# Python $("$venv/bin/python" -c 'import platform; print(platform.python_version())')," \
    "$("$venv/bin/python" -c 'import platform; print(platform.system(), platform.machine())')"
  "$venv/bin/python" -m pip freeze --exclude-editable --all \
    | grep -v -i -E '^contrastseg==' | LC_ALL=C sort -f
} > "$lock.tmp"
mv "$lock.tmp" "$lock"
echo "wrote $lock ($(grep -c '==' "$lock") pins)"
