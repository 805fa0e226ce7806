#!/usr/bin/env bash
# Installs everything the tests need (Python packages, redis-server, PostgreSQL) and runs them all.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

export TF_CPP_MIN_LOG_LEVEL=2
exec .venv/bin/python -m pytest "$@"
