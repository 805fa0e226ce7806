#!/usr/bin/env bash
# Installs the service and starts it on its embedded defaults (bundled demo model, no services).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh runtime
exec .venv/bin/rottenbot-inference serve "$@"
