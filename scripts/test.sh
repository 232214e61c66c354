#!/usr/bin/env bash
# Set-up command 2: install, then run the test suite against real RabbitMQ, sshd, Slurm and vLLM.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
VENV="${CHATAI_VENV:-$PWD/.venv}"
# The tests run `chatai ...` and `sys.executable` subprocesses: both must be the venv's.
export VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH"
# The suite runs in CHATAI_TEST_PROCESSES processes (pytest-xdist; default 2, 1 for one
# process): each process has its own broker, session worker and gateway, and a file's slow tests
# stay together in one of them (tests/conftest.py), so its sshd, Slurm cluster or own workers
# start once. Two halve the time on a 2-core machine (docs/reliability.md, "How long the suite
# takes"): most slow tests wait on Slurm, timeouts and start-ups, not on the CPU.
procs="${CHATAI_TEST_PROCESSES:-2}"
dist=()
if [[ "$procs" -gt 1 ]]; then dist=(-n "$procs" --dist loadgroup); fi
exec python -m pytest "${dist[@]}" "$@"
