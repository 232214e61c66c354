#!/usr/bin/env bash
# Set-up command 1: install, then run the whole stack on this machine (`chatai dev`).
# Usage: CHATAI_DEV_API_KEY=<key> bash scripts/dev.sh [chatai dev options]
# The key goes through the environment (or --api-key-file), never the command line: every local
# user can read a process's arguments (ps), only its owner its environment. Without a key,
# `chatai dev` generates one and writes it to STATE_DIR/stack.json (mode 0600).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
VENV="${CHATAI_VENV:-$PWD/.venv}"
# What `. .venv/bin/activate` does, for the stack's own children (workers, sbatch scripts).
export VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH"
exec chatai dev "$@"
