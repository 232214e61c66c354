#!/bin/sh
# Login-node container: the tunnel account and sshd with the circuit breaker, installed exactly
# as an HPC admin does (`chatai breaker install`), then the breaker's watcher (the command).
set -eu
# rabbitmqctl (run as the rabbitmq user by Debian's wrapper) reaches rabbit@broker with its cookie.
install -o rabbitmq -g rabbitmq -m 0400 /run/chatai/admin/.erlang.cookie /var/lib/rabbitmq/.erlang.cookie
ssh-keygen -A >/dev/null
cp /etc/ssh/ssh_host_ed25519_key.pub /run/chatai/tunnel/login-node-host-key.pub  # pinned by the gateway
chatai breaker install --public-key /run/chatai/tunnel/gateway.pub --broker-host broker --broker-port 5672 \
    --rabbit-node rabbit@broker --sshd-log /var/log/chatai-sshd.log
/usr/sbin/sshd -E /var/log/chatai-sshd.log
exec "$@"
