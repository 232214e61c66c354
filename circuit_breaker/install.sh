#!/bin/sh
# Install or update the chatai circuit breaker on a login node. Run as root; safe to run twice.
#   sudo circuit_breaker/install.sh --public-key gateway_tunnel_key.pub \
#        --broker-host 10.0.0.5 --broker-port 5672 [--from 203.0.113.7] [--rabbit-node rabbit@broker]
# Needs only the system python3 (standard library). See docs/security.md.
set -eu
here=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
exec /usr/bin/python3 -I "$here/install.py" "$@"
