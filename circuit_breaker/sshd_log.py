"""Probes that sshd itself refuses, read from sshd's log: they trip the breaker too.

A legitimate gateway opens ``direct-tcpip`` channels to the broker and sends keepalives,
nothing else. Anything more from the tunnel account is a probe, even when sshd refuses it
without ever running the ForceCommand: a forward to another host or port (``ssh -L``, a
SOCKS client through ``ssh -D``), a remote forward (``ssh -R``), a session channel, and the
requests made on one (pty, X11, agent, env, exec, shell, subsystem).

What sshd logs (OpenSSH 9.2, checked against the real daemon in the tests):
* a refused ``direct-tcpip``: ``Received request from ADDR port P to connect to host H port Q,
  but the request was denied.`` at INFO, attributed to the tunnel account through the
  ``Accepted publickey for USER from ADDR port P`` line of the same connection;
* everything else only at DEBUG. The breaker's Match block therefore sets
  ``LogVerbose`` for exactly three functions of serverloop.c (channel opens, channel requests,
  global requests) and for the tunnel account only: their lines name the request type and never
  its content (no command, no environment value, no forwarded data). Because LogVerbose is set
  only in that Match block, these lines come from the tunnel account's sessions (keep sshd's
  global LogLevel at INFO or VERBOSE, as Debian ships it).
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from pathlib import Path

ACCEPTED = re.compile(r"Accepted publickey for (?P<user>\S+) from (?P<addr>\S+) port (?P<port>\d+)")
DENIED = re.compile(r"Received request from (?P<addr>\S+) port (?P<port>\d+) to connect to host (?P<host>\S+) "
                    r"port (?P<tport>\d+), but the request was denied")
CHANNEL_OPEN = re.compile(r"server_input_channel_open\(\):\d+ (?:\(pid=\d+\): )?ctype (?P<what>\S+)")
CHANNEL_REQUEST = re.compile(r"server_input_channel_req\(\):\d+ (?:\(pid=\d+\): )?"
                             r"server_input_channel_req: channel \d+ request (?P<what>\S+)")
GLOBAL_REQUEST = re.compile(r"server_input_global_request\(\):\d+ (?:\(pid=\d+\): )?rtype (?P<what>\S+)")

ALLOWED_CHANNELS = {"direct-tcpip"}
ALLOWED_GLOBAL = {"keepalive@openssh.com", "no-more-sessions@openssh.com"}
ALLOWED_CHANNEL_REQUESTS = {"keepalive@openssh.com"}

_UNSAFE = re.compile(r"[^A-Za-z0-9@._:-]")


def _clean(value: str, limit: int = 64) -> str:
    """Names from the client are shown in the breaker's reason: printable, short."""
    return _UNSAFE.sub("?", value)[:limit]


class SshdLogWatch:
    """Follows sshd's log file (like ``tail -F``) and returns the tunnel account's probes."""

    def __init__(self, path: Path | str, tunnel_user: str, from_start: bool = False) -> None:
        self.path = Path(path)
        self.tunnel_user = tunnel_user
        self._peers: OrderedDict[tuple[str, str], None] = OrderedDict()  # tunnel connections seen
        self._inode: int | None = None
        self._pos = 0
        self._partial = b""
        if not from_start:
            try:
                st = self.path.stat()
                self._inode, self._pos = st.st_ino, st.st_size
            except OSError:
                pass

    def feed(self, line: str) -> str | None:
        """The probe this line records, or None."""
        m = ACCEPTED.search(line)
        if m:
            if m["user"] == self.tunnel_user:
                self._peers[(m["addr"], m["port"])] = None
                while len(self._peers) > 4096:
                    self._peers.popitem(last=False)
            return None
        m = DENIED.search(line)
        if m:
            if (m["addr"], m["port"]) in self._peers:
                return f"sshd refused a forward to {_clean(m['host'], 100)}:{m['tport']} from {_clean(m['addr'])}"
            return None
        m = CHANNEL_OPEN.search(line)
        if m and m["what"] not in ALLOWED_CHANNELS:
            return f"sshd: {_clean(m['what'])} channel requested"
        m = CHANNEL_REQUEST.search(line)
        if m and m["what"] not in ALLOWED_CHANNEL_REQUESTS:
            return f"sshd: {_clean(m['what'])} request on a channel"
        m = GLOBAL_REQUEST.search(line)
        if m and m["what"] not in ALLOWED_GLOBAL:
            return f"sshd: {_clean(m['what'])} global request"
        return None

    def poll(self) -> list[str]:
        """Probes logged since the last poll (follows rotation and truncation)."""
        try:
            st = self.path.stat()
        except OSError:
            return []
        if st.st_ino != self._inode or st.st_size < self._pos:
            self._inode, self._pos, self._partial = st.st_ino, 0, b""
        if st.st_size == self._pos:
            return []
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return []
        try:
            os.lseek(fd, self._pos, os.SEEK_SET)
            data = os.read(fd, min(st.st_size - self._pos, 16 * 1024 * 1024))
        finally:
            os.close(fd)
        self._pos += len(data)
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        found = []
        for raw in lines:
            reason = self.feed(raw.decode("utf-8", errors="replace"))
            if reason is not None:
                found.append(reason)
        return found
