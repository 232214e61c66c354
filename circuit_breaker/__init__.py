"""The SSH circuit breaker: sshd config for the tunnel account, its hook programs, state and CLI."""
