#!/usr/bin/env bash
# Set-up command 1: install, then run the whole stack on this machine (`chatai dev`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec chatai dev "$@"
