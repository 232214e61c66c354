#!/bin/sh
# Gateway container: the login node's pinned host key, its broker URL (from the broker
# container) and database URL, then the command (`chatai gateway ...`) as an unprivileged user. Its SSH key was
# made by gateway-key.sh (the gateway-key service) before the login node installed the breaker.
set -eu
ssh_dir=/var/lib/chatai-gateway/ssh
# Pinned: the gateway accepts this host key and no other (no trust on first use).
echo "login-node $(cut -d' ' -f1,2 /run/chatai/tunnel/login-node-host-key.pub)" > "$ssh_dir/known_hosts"
CHATAI_GATEWAY_BROKER_URL="$(cat /run/chatai/gateway/broker-url)"
export CHATAI_GATEWAY_BROKER_URL
# The replicas' shared database (docker-compose.yml's db), made by gateway-key.sh.
if [ -s /run/chatai/db/password ]; then
    CHATAI_GATEWAY_DATABASE_URL="postgresql://chatai:$(cat /run/chatai/db/password)@db:5432/chatai"
    export CHATAI_GATEWAY_DATABASE_URL
fi
chown -R chatai /var/lib/chatai-gateway
exec runuser -u chatai -- "$@"
