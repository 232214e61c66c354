"""Probes that sshd itself refuses, read from sshd's log: they trip the breaker too.

A legitimate gateway opens ``direct-tcpip`` channels to the broker and sends keepalives,
nothing else. Anything more from the tunnel account is a probe, even when sshd refuses it
without ever running the ForceCommand: a forward to another host or port (``ssh -L``, a
SOCKS client through ``ssh -D``), a remote forward (``ssh -R``), a session channel, and the
requests made on one (pty, X11, agent, env, exec, shell, subsystem).

sshd also logs text that an unauthenticated client chooses (its banner, the user name it tries,
its disconnect message, the algorithm names it offers), so the watcher trusts a line only by
its position, never by what it contains (issue 22):
* only syslog lines of sshd, ``TIME HOST sshd[PID]: MESSAGE`` (auth.log, RFC 3339 or RFC 3164
  time), each pattern anchored on the whole message; through syslog sshd escapes CR and LF, so
  a client's text never starts a line or a message. (``sshd -E FILE`` does not escape them: a
  stranger can write whole lines there. Such a file is not read; see chatai/devstack/sshd.py.)
* only lines of an authenticated tunnel session: ``Accepted publickey for TUNNEL from A port P``
  names the connection's monitor process (PID); its ``User child is on pid N`` line names the
  session child, which logs the session's requests as ``sshd[N]`` (OpenSSH 9.2, checked against
  the real daemon in the tests). A session the log did not show (the watcher started later) is
  recognised in /proc: the child runs as the tunnel account, the monitor is its parent.

What sshd logs (OpenSSH 9.2):
* a refused ``direct-tcpip``: ``Received request from A port P to connect to host H port Q,
  but the request was denied.`` at INFO, from the session child;
* everything else only at DEBUG. The breaker's Match block therefore sets ``LogVerbose`` for
  exactly three functions of serverloop.c (channel opens, channel requests, global requests)
  and for the tunnel account only: their lines name the request type and never its content (no
  command, no environment value, no forwarded data). It also forces the monitor's
  ``User child is on pid N`` line (VERBOSE), so sshd's global LogLevel may stay at INFO.

Not covered: a local user of the login node can write any line to syslog (``logger -t
'sshd[N]'``), as to every log; the ForceCommand and sshd's own refusals still hold.
"""

from __future__ import annotations

import logging
import os
import pwd
import re
from collections import OrderedDict
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = re.compile(r"^(?:\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)"  # RFC 3339
                    r"|[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d)"  # RFC 3164
                    r" \S+ sshd\[(?P<pid>\d+)\]: (?P<msg>.*)$")
ACCEPTED = re.compile(r"^Accepted publickey for (?P<user>\S+) from (?P<addr>\S+) port (?P<port>\d+) ssh2(?:: .*)?$")
CHILD = re.compile(r"^(?:sshd\.c:privsep_postauth\(\):\d+ \(pid=(?P<tag>\d+)\): )?User child is on pid (?P<child>\d+)$")
DENIED = re.compile(r"^Received request from (?P<addr>\S+) port (?P<port>\d+) to connect to host (?P<host>.*) "
                    r"port (?P<tport>\d+), but the request was denied\.$")
SERVERLOOP = re.compile(r"^debug1: serverloop\.c:(?P<func>server_input_\w+)\(\):\d+ \(pid=(?P<tag>\d+)\): (?P<rest>.*)$")
CHANNEL_OPEN = re.compile(r"^ctype (?P<what>.*) rchan \d+ win \d+ max \d+$")
CHANNEL_REQUEST = re.compile(r"^server_input_channel_req: channel -?\d+ request (?P<what>.*) reply \d+$")
GLOBAL_REQUEST = re.compile(r"^rtype (?P<what>.*) want_reply \d+$")

ALLOWED_CHANNELS = {"direct-tcpip"}
ALLOWED_GLOBAL = {"keepalive@openssh.com", "no-more-sessions@openssh.com"}
ALLOWED_CHANNEL_REQUESTS = {"keepalive@openssh.com"}
_KEEP = 4096  # sessions remembered (pids), oldest dropped first

_UNSAFE = re.compile(r"[^A-Za-z0-9@._:-]")


def _clean(value: str, limit: int = 64) -> str:
    """Names from the client are shown in the breaker's reason: printable, short."""
    return _UNSAFE.sub("?", value)[:limit]


def _status(pid: int) -> tuple[str, int, int] | None:
    """(name, real uid, parent pid) of a live process, from /proc (None if gone)."""
    name, uid, ppid = "", -1, -1
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key == "Name":
                    name = value.strip()
                elif key == "Uid":
                    uid = int(value.split()[0])
                elif key == "PPid":
                    ppid = int(value.split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return name, uid, ppid


class SshdLogWatch:
    """Follows sshd's log file (like ``tail -F``) and returns the tunnel account's probes."""

    def __init__(self, path: Path | str, tunnel_user: str, from_start: bool = False) -> None:
        self.path = Path(path)
        self.tunnel_user = tunnel_user
        try:
            self._uid: int | None = pwd.getpwnam(tunnel_user).pw_uid
        except KeyError:
            self._uid = None
        # monitor pid -> (addr, port) of its connection (None: found in /proc, address unknown)
        self._monitors: OrderedDict[int, tuple[str, str] | None] = OrderedDict()
        self._children: OrderedDict[int, int] = OrderedDict()  # session child pid -> monitor pid
        self._seen_syslog = False
        self._warned = False
        self._inode: int | None = None
        self._pos = 0
        self._partial = b""
        if not from_start:
            try:
                st = self.path.stat()
                self._inode, self._pos = st.st_ino, st.st_size
            except OSError:
                pass
        for pid in self._live_children():
            self._from_proc(pid)

    # -- sessions --------------------------------------------------------------------------------

    def _remember(self, table: OrderedDict, key: int, value) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > _KEEP:
            table.popitem(last=False)

    def _live_children(self) -> list[int]:
        if self._uid is None:
            return []
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                st = _status(int(entry))
                if st is not None and st[0] == "sshd" and st[1] == self._uid:
                    found.append(int(entry))
        return found

    def _from_proc(self, pid: int) -> bool:
        """Whether ``pid`` is a live session child of the tunnel account (then remembered)."""
        st = _status(pid)
        if self._uid is None or st is None or st[0] != "sshd" or st[1] != self._uid:
            return False
        parent = _status(st[2])
        if parent is None or parent[0] != "sshd" or parent[1] != 0:
            return False
        if st[2] not in self._monitors:
            self._remember(self._monitors, st[2], None)
        self._remember(self._children, pid, st[2])
        return True

    def _session(self, pid: int) -> tuple[str, str] | None | bool:
        """The connection (addr, port) of the tunnel session ``pid`` logs for; None if unknown
        address; False if ``pid`` is no tunnel session."""
        monitor = self._children.get(pid, pid)
        if monitor in self._monitors:
            return self._monitors[monitor]
        if self._from_proc(pid):
            return self._monitors[self._children[pid]]
        return False

    # -- lines -----------------------------------------------------------------------------------

    def feed(self, line: str) -> str | None:
        """The probe this line records, or None."""
        p = PREFIX.match(line.rstrip("\r"))
        if p is None:
            return None
        self._seen_syslog = True
        pid, msg = int(p["pid"]), p["msg"]
        m = ACCEPTED.match(msg)
        if m:
            if m["user"] == self.tunnel_user:
                self._remember(self._monitors, pid, (m["addr"], m["port"]))
            else:  # this pid is another user's connection now
                self._monitors.pop(pid, None)
            return None
        m = CHILD.match(msg)
        if m:
            if pid in self._monitors and (m["tag"] is None or int(m["tag"]) == pid):
                self._remember(self._children, int(m["child"]), pid)
            return None
        m = DENIED.match(msg)
        if m:
            conn = self._session(pid)
            if conn is False or (conn is not None and conn != (m["addr"], m["port"])):
                return None
            return f"sshd refused a forward to {_clean(m['host'], 100)}:{m['tport']} from {_clean(m['addr'])}"
        m = SERVERLOOP.match(msg)
        if m is None or int(m["tag"]) != pid or self._session(pid) is False:
            return None
        func, rest = m["func"], m["rest"]
        if func == "server_input_channel_open" and (r := CHANNEL_OPEN.match(rest)):
            if r["what"] not in ALLOWED_CHANNELS:
                return f"sshd: {_clean(r['what'])} channel requested"
        elif func == "server_input_channel_req" and (r := CHANNEL_REQUEST.match(rest)):
            if r["what"] not in ALLOWED_CHANNEL_REQUESTS:
                return f"sshd: {_clean(r['what'])} request on a channel"
        elif func == "server_input_global_request" and (r := GLOBAL_REQUEST.match(rest)):
            if r["what"] not in ALLOWED_GLOBAL:
                return f"sshd: {_clean(r['what'])} global request"
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
        if lines and not self._seen_syslog and not self._warned:
            self._warned = True
            log.warning("%s has no syslog lines of sshd (TIME HOST sshd[PID]: ...): probes sshd refuses "
                        "will not trip the breaker (sshd -E files are not read: they keep clients' CR/LF)", self.path)
        return found
