#!/usr/bin/env bash
# Creates .venv and installs the locked dependencies: `install.sh runtime` or `install.sh test`.
# pip runs only when something it installs from changed: the lock of that profile or
# pyproject.toml (the package itself is installed editable, so source edits need no install).
# A stamp in .venv records what was installed; delete it (or .venv) to force a reinstall.
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${1:-runtime}"
python="${PYTHON:-python3}"
lock="requirements/${profile}.txt"
[ -f "$lock" ] || { echo "install.sh: no $lock (profiles: runtime, test)" >&2; exit 2; }
stamp=".venv/.installed-${profile}"
fingerprint="$(cat "$lock" pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$fingerprint" ]; then
  exit 0  # installed from exactly these files already
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
rm -f "$stamp"
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -r "$lock"
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
echo "$fingerprint" > "$stamp"
