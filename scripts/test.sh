#!/usr/bin/env bash
# Set-up command 2: install, then run the test suite against real RabbitMQ, sshd, Slurm and vLLM.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
VENV="${CHATAI_VENV:-$PWD/.venv}"
# The tests run `chatai ...` and `sys.executable` subprocesses: both must be the venv's.
export VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH"
# Two test processes (CHATAI_TEST_PROCESSES; 0 runs everything in this one): the slow tier waits
# on start-ups, Slurm and timeouts more than it computes, so its files overlap well on two cores.
# Each file's slow tests stay together in one process (tests/conftest.py marks the groups).
exec python -m pytest -n "${CHATAI_TEST_PROCESSES:-2}" --dist loadgroup "$@"
