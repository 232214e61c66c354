"""Throw-away system accounts for private daemons that refuse to run as root.

PostgreSQL's ``initdb`` and ``postgres`` refuse root; the private sshd's tunnel accounts must
exist for the breaker. Each account gets a unique name, no home and no login shell, and is
removed (with its group) when its daemon stops, so a test run leaves no users behind.
"""

from __future__ import annotations

import grp
import pwd
import secrets
import subprocess


def create_account(prefix: str, comment: str) -> str:
    """A new system account ``<prefix><6 hex>`` with a group of its own; returns its name."""
    name = f"{prefix}{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                    "--shell", "/usr/sbin/nologin", "--comment", comment, name], check=True, capture_output=True)
    return name


def remove_account(name: str) -> None:
    """Delete the account and its group if they exist (quietly: a second call is harmless)."""
    try:
        pwd.getpwnam(name)
        subprocess.run(["userdel", name], capture_output=True)
    except KeyError:
        pass
    try:
        grp.getgrnam(name)
        subprocess.run(["groupdel", name], capture_output=True)
    except KeyError:
        pass
