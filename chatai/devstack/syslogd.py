"""A minimal syslog receiver for the private sshd: writes what rsyslog writes to auth.log.

    python -m chatai.devstack.syslogd SOCKET LOGFILE

Why not ``sshd -E FILE``: with -E, sshd escapes log text as for a terminal (``VIS_SAFE``), which
leaves CR and LF alone, so a stranger's user name, disconnect message or key-exchange offer can
start new lines in the file. Through syslog, sshd escapes them (``VIS_NL|VIS_CSTYLE``) and every
line is one message: the format the breaker's watcher reads on a login node (Debian's
``/var/log/auth.log``). The socket is 0666 like ``/dev/log`` (sshd's session child logs as the
tunnel account), but only processes in the private sshd's mount namespace see it as /dev/log.

Each datagram ``<PRI>Mmm dd HH:MM:SS TAG[PID]: MSG`` (glibc's syslog()) becomes
``RFC3339-TIME HOST TAG[PID]: MSG``; control characters are written as ``#ooo``, as rsyslog does.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
from datetime import datetime, timezone

_GLIBC = re.compile(rb"^<\d+>(?:[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d )?(?P<rest>.*)$", re.S)


def escape(data: bytes) -> str:
    """rsyslog's $EscapeControlCharactersOnReceive: control characters as #ooo (octal)."""
    text = data.rstrip(b"\n").decode("utf-8", errors="replace")
    return "".join(f"#{ord(c):03o}" if ord(c) < 32 or ord(c) == 127 else c for c in text)


def format_line(datagram: bytes, host: str) -> str:
    m = _GLIBC.match(datagram)
    rest = m["rest"] if m else datagram
    stamp = datetime.now(timezone.utc).astimezone().isoformat(timespec="microseconds")
    return f"{stamp} {host} {escape(rest)}\n"


def serve(sock_path: str, log_path: str) -> None:
    try:
        os.unlink(sock_path)
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    old = os.umask(0o111)
    try:
        s.bind(sock_path)  # 0666 like /dev/log: sshd's session child logs as the tunnel account
    finally:
        os.umask(old)
    host = socket.gethostname().split(".")[0] or "localhost"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    print("ready", flush=True)
    while True:
        data = s.recv(65536)
        if data:
            os.write(fd, format_line(data, host).encode("utf-8"))


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2])
