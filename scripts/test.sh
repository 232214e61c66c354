#!/usr/bin/env bash
# Set-up command 2: install, then run the test suite against real RabbitMQ, sshd, Slurm and vLLM.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec python3 -m pytest "$@"
