#!/bin/sh
# Worker container: its broker URL (from the broker container), the model from the model volume
# (the tiny test model is written there first when CHATAI_DOCKER_TINY_MODEL=1 and it is empty),
# then the command (`chatai worker ...`).
set -eu
if [ "${CHATAI_DOCKER_TINY_MODEL:-0}" = 1 ] && [ ! -f "$CHATAI_WORKER_MODEL/config.json" ]; then
    chatai make-tiny-model "$CHATAI_WORKER_MODEL"
fi
CHATAI_WORKER_BROKER_URL="$(cat /run/chatai/worker/broker-url)"
export CHATAI_WORKER_BROKER_URL
exec "$@"
