#!/usr/bin/env bash
# Creates .venv and installs the locked dependencies: `install.sh runtime` or `install.sh test`.
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${1:-runtime}"
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -r "requirements/${profile}.txt"
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
