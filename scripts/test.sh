#!/usr/bin/env bash
# Set-up command 2: install, then run the test suite against real RabbitMQ, sshd, Slurm and vLLM.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
VENV="${CHATAI_VENV:-$PWD/.venv}"
# The tests run `chatai ...` and `sys.executable` subprocesses: both must be the venv's.
export VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH"
# CHATAI_TEST_PROCESSES=N runs the suite in N processes (pytest-xdist; each file's slow tests
# stay together in one, see tests/conftest.py). The default is one: on a 2-core machine the
# slow tier keeps both cores busy by itself (vLLM start-ups and engines), and two processes
# made it slower, not faster (docs/reliability.md, "How long the suite takes").
procs="${CHATAI_TEST_PROCESSES:-0}"
dist=()
if [[ "$procs" != 0 ]]; then dist=(-n "$procs" --dist loadgroup); fi
exec python -m pytest "${dist[@]}" "$@"
