#!/bin/sh
# The gateway's SSH key for the tunnel, made once and kept in the gateway's volume; only the
# public half goes to the login node (as an HPC admin gets it: docs/deploy.md).
set -eu
ssh_dir=/var/lib/chatai-gateway/ssh
mkdir -p "$ssh_dir" && chmod 700 "$ssh_dir"
[ -f "$ssh_dir/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C chatai-gateway -f "$ssh_dir/id_ed25519"
cp "$ssh_dir/id_ed25519.pub" /run/chatai/tunnel/gateway.pub
