#!/usr/bin/env bash
# Set-up command 2: install, then run the test suite against real RabbitMQ, sshd, Slurm and vLLM.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
VENV="${CHATAI_VENV:-$PWD/.venv}"
# The tests run `chatai ...` and `sys.executable` subprocesses: both must be the venv's.
export VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH"
exec python -m pytest "$@"
