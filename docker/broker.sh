#!/bin/sh
# Broker container: RabbitMQ with broker_config/rabbitmq.conf, then the definitions (the
# container's command, `chatai broker apply ...`), then each client's broker URL into the volume
# that client mounts, and RabbitMQ in the foreground.
set -eu
secrets=/var/lib/chatai-broker/broker-secrets.json
rabbitmq-server &
server=$!
# rabbitmqctl cannot reach the node until the Erlang VM is up: ask until it answers (or 2 min).
tries=0
until rabbitmqctl -q await_startup >/dev/null 2>&1; do
    tries=$((tries + 1))
    [ "$tries" -lt 120 ] || { echo "broker: RabbitMQ did not start" >&2; exit 1; }
    sleep 1
done
"$@"
# Each client gets only its own credentials.
python3 - "$secrets" <<'PY'
import json, os, sys
passwords = json.load(open(sys.argv[1]))
for user, folder in (("gateway", "/run/chatai/gateway"), ("worker", "/run/chatai/worker")):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "broker-url")
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(f"amqp://{user}:{passwords[user]}@broker:5672/chatai\n")
PY
# The breaker on the login node administers this node with rabbitmqctl: it needs the cookie.
install -m 0600 /var/lib/rabbitmq/.erlang.cookie /run/chatai/admin/.erlang.cookie
touch /tmp/chatai-broker-ready  # the health check's sign that the definitions are in
wait "$server"
