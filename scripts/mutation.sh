#!/usr/bin/env bash
# Mutation testing of the modules that carry the service's promises (token verification, the
# revocation check, admission control, the durable outbox and its drainer), each against its
# fast tests; results in docs/testing.md. Not part of every CI run: a fresh run of all ~2,100
# mutants takes an hour or more on a shared 2-core machine.
#
#   bash scripts/mutation.sh            # fresh run, 2 workers, fails below 85 % per module
#   MUTATION_JOBS=10 bash scripts/mutation.sh   # faster: a hung mutant holds a worker, idle,
#                                               # until its 30 s timeout
#   MUTATION_JOBS=4 MUTATION_MIN_SCORE=90 bash scripts/mutation.sh
#   MUTATION_KEEP=1 bash scripts/mutation.sh   # reuse mutants/ (only changed code re-tested)
#
# The modules and their tests are listed in pyproject.toml, [tool.mutmut]: to add a module, add
# its path to `only_mutate` and its fast test file(s) to `pytest_add_cli_args_test_selection`.
# `.venv/bin/mutmut show NAME` prints a surviving mutant's diff.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs="${MUTATION_JOBS:-2}"
minimum="${MUTATION_MIN_SCORE:-85}"
[ "${MUTATION_KEEP:-0}" = 1 ] || rm -rf mutants
export TF_CPP_MIN_LOG_LEVEL=2
# mutmut redraws a progress line many times a second: keep only its last state on the screen,
# and all of it in a log (a failed clean run names the failing test there).
log="${TMPDIR:-/tmp}/rottenbot-mutmut.log"
nice .venv/bin/mutmut run --max-children "$jobs" | tr '\r' '\n' | tee "$log" | tail -n 3
.venv/bin/mutmut results --all true | .venv/bin/python scripts/mutation_score.py "$minimum"
