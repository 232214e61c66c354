#!/bin/sh
# The gateway's SSH key for the tunnel, made once and kept in the gateway's volume; only the
# public half goes to the login node (as an HPC admin gets it: docs/deploy.md).
set -eu
ssh_dir=/var/lib/chatai-gateway/ssh
mkdir -p "$ssh_dir" && chmod 700 "$ssh_dir"
[ -f "$ssh_dir/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C chatai-gateway -f "$ssh_dir/id_ed25519"
cp "$ssh_dir/id_ed25519.pub" /run/chatai/tunnel/gateway.pub
# The database password the gateway replicas and PostgreSQL share, made once. PostgreSQL's image
# reads it as its own user (uid 999), hence readable; only the db and gateway services mount it.
db_password=/run/chatai/db/password
[ -s "$db_password" ] || tr -dc 'A-Za-z0-9' < /dev/urandom | head -c 32 > "$db_password"
chmod 644 "$db_password"
