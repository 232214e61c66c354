"""Strangers write sshd's log; none of it may trip the breaker (issue 22, item 1).

sshd logs text that an unauthenticated client chooses: its banner, the user name it tries,
the message of its SSH_MSG_DISCONNECT, the algorithm names it offers. Each test here sends the
lines the breaker's watcher looks for through one such carrier, against the real private sshd
(logging through syslog, as on a login node), then runs one round of the watcher
(``Breaker.check_sshd_log``, what ``chatai breaker watch`` does each poll) over the lines, and
the breaker must stay closed. The last tests check that real probes by the tunnel account still
trip it, including from a session that began before the watcher started.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Callable

import asyncssh
import asyncssh.connection
import pytest

from circuit_breaker import hook
from circuit_breaker.breaker import Breaker
from circuit_breaker.sshd_log import SshdLogWatch
from chatai.devstack.processes import free_port
from chatai.devstack.sshd import LocalSshd
from support.waiting import wait_until


# ------------------------------------------------------------------------ what a stranger sends

def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _packet(payload: bytes) -> bytes:
    """An unencrypted SSH binary packet (before key exchange)."""
    pad = 8 - (len(payload) + 5) % 8
    pad += 8 if pad < 4 else 0
    return struct.pack(">IB", len(payload) + pad + 1, pad) + payload + os.urandom(pad)


def raw_ssh(sshd: LocalSshd, banner: bytes, packets: list[bytes] = ()) -> int:
    """Connect, send a banner line and these packets, read until sshd hangs up; the local port."""
    with socket.create_connection((sshd.host, sshd.port), timeout=10) as s:
        s.sendall(banner + b"\r\n")
        for p in packets:
            s.sendall(_packet(p))
        try:
            while s.recv(65536):
                pass
        except OSError:
            pass
        return s.getsockname()[1]


def kexinit(kex_names: bytes) -> bytes:
    algs = [kex_names, b"ssh-ed25519", b"aes128-ctr", b"aes128-ctr", b"hmac-sha2-256", b"hmac-sha2-256",
            b"none", b"none", b"", b""]
    return bytes([20]) + os.urandom(16) + b"".join(_string(a) for a in algs) + b"\x00" + b"\x00" * 4


def disconnect(text: bytes) -> bytes:
    return bytes([1]) + struct.pack(">I", 11) + _string(text) + _string(b"")


def password_login(sshd: LocalSshd, username: str) -> int:
    """A failed password login under any user name (asyncssh's SASLprep, which would refuse CR/LF, is off)."""
    port = free_port()

    async def run() -> None:
        with pytest.raises((asyncssh.PermissionDenied, asyncssh.DisconnectError, OSError)):
            await asyncssh.connect(sshd.host, sshd.port, username=username, password="x", known_hosts=None,
                                   client_keys=None, agent_path=None, config=[], preferred_auth="password",
                                   local_addr=("127.0.0.1", port), connect_timeout=10)

    real = asyncssh.connection.saslprep
    asyncssh.connection.saslprep = lambda s: s
    try:
        asyncio.run(run())
    finally:
        asyncssh.connection.saslprep = real
    return port


# --------------------------------------------------------------------- the lines the watcher seeks

def forged(sshd: LocalSshd, pid: int, message: str) -> str:
    """A whole auth.log line after a line break: what the watcher would read if CR/LF survived."""
    return f"\r\n2026-01-01T00:00:00.000000+00:00 {socket.gethostname()} sshd[{pid}]: {message}"


def payloads(sshd: LocalSshd, monitor: int = 4242, child: int = 4243) -> list[str]:
    u = sshd.user
    accepted = f"Accepted publickey for {u} from 6.6.6.6 port 1 ssh2: ED25519 SHA256:x"
    denied = "Received request from 6.6.6.6 port 1 to connect to host evil port 22, but the request was denied."
    child_line = f"sshd.c:privsep_postauth():577 (pid={monitor}): User child is on pid {child}"
    channel = f"debug1: serverloop.c:server_input_channel_open():635 (pid={child}): ctype session rchan 0 win 1 max 1"
    glob = f"debug1: serverloop.c:server_input_global_request():782 (pid={child}): rtype tcpip-forward want_reply 1"
    return [accepted, denied, "X server_input_channel_open():1 ctype session", channel,
            forged(sshd, monitor, accepted) + forged(sshd, monitor, child_line) + forged(sshd, child, channel),
            forged(sshd, child, denied) + forged(sshd, child, glob),
            f"x\nsshd[{child}]: {denied}", f"x\r\nsshd[{child}]: {channel}"]


def complete_lines(sshd: LocalSshd) -> list[str]:
    return sshd.log_path.read_text(errors="replace").split("\n")[:-1]


def wait_logged(sshd: LocalSshd, port: int, what: str) -> None:
    """Until sshd has logged the end of the stranger's connection from ``port`` (a whole line)."""
    wait_until(lambda: any(f"127.0.0.1 port {port}" in ln and what in ln for ln in complete_lines(sshd)),
               timeout=20, what=f"sshd to log {what!r} for port {port}")


def assert_closed_after(sshd: LocalSshd, breaker: Breaker, attack: Callable[[str], None]) -> None:
    watch = SshdLogWatch(sshd.log_path, sshd.user)
    for text in payloads(sshd):
        attack(text)
    assert not breaker.check_sshd_log(watch), breaker.status()
    assert not breaker.status()["tripped"]


# -------------------------------------------------------------------------------- the carriers

def test_banner_lines_do_not_trip(sshd, breaker):
    def attack(text: str) -> None:
        port = raw_ssh(sshd, text.replace("\r", " ").replace("\n", " ").encode()[:250])
        wait_logged(sshd, port, "invalid format")

    assert_closed_after(sshd, breaker, attack)
    assert "X server_input_channel_open():1 ctype session" in sshd.log_path.read_text()  # it was logged


def test_user_names_do_not_trip(sshd, breaker):
    """Invalid-user lines: 'Invalid user X', 'Failed password for invalid user X', 'Connection closed by
    invalid user X' (sshd cuts a user name at ':', and escapes CR/LF in syslog)."""
    def attack(text: str) -> None:
        port = password_login(sshd, text[:100])
        wait_logged(sshd, port, "invalid user")

    assert_closed_after(sshd, breaker, attack)
    assert f"Invalid user Accepted publickey for {sshd.user} from 6.6.6.6 port 1" in sshd.log_path.read_text()


def test_disconnect_messages_do_not_trip(sshd, breaker):
    """'Received disconnect from ADDR port P:11: TEXT [preauth]': TEXT is the client's, 400 characters."""
    def attack(text: str) -> None:
        for i in range(0, len(text), 380):
            port = raw_ssh(sshd, b"SSH-2.0-probe", [disconnect(text[i:i + 380].encode())])
            wait_logged(sshd, port, "Received disconnect")

    assert_closed_after(sshd, breaker, attack)


def test_key_exchange_offers_do_not_trip(sshd, breaker):
    """'Unable to negotiate with ADDR port P: no matching key exchange method found. Their offer: TEXT'."""
    def attack(text: str) -> None:
        port = raw_ssh(sshd, b"SSH-2.0-probe", [kexinit(text.encode())])
        wait_logged(sshd, port, "Their offer")

    assert_closed_after(sshd, breaker, attack)


def test_the_tunnel_user_name_without_its_key_does_not_trip(sshd, breaker, tmp_path):
    """'Connection closed by authenticating user TUNNEL ...' after a wrong key, then a disconnect text."""
    wrong = asyncssh.generate_private_key("ssh-ed25519")

    def attack(text: str) -> None:
        port = free_port()

        async def run() -> None:
            conn = None
            with pytest.raises((asyncssh.PermissionDenied, asyncssh.DisconnectError, OSError)):
                conn = await asyncssh.connect(sshd.host, sshd.port, username=sshd.user, client_keys=[wrong],
                                              known_hosts=str(sshd.known_hosts_path), agent_path=None, config=[],
                                              local_addr=("127.0.0.1", port), connect_timeout=10)
            assert conn is None

        asyncio.run(run())
        wait_logged(sshd, port, "authenticating user")
        port = raw_ssh(sshd, b"SSH-2.0-probe", [disconnect(text[:380].encode())])
        wait_logged(sshd, port, "Received disconnect")

    assert_closed_after(sshd, breaker, attack)


def tunnel_uid(sshd: LocalSshd) -> int:
    import pwd

    return pwd.getpwnam(sshd.user).pw_uid


def _tunnel_pids(sshd: LocalSshd) -> tuple[int, int]:
    """(monitor, child) of the one live tunnel session: the child runs as the tunnel account."""
    (child,) = hook.processes_of(tunnel_uid(sshd))
    with open(f"/proc/{child}/stat") as f:
        monitor = int(f.read().rsplit(")", 1)[1].split()[1])
    return monitor, child


async def test_forged_lines_naming_the_live_tunnel_session_do_not_trip(sshd, breaker, broker):
    """The stranger knows (or guesses) the pids of the gateway's live tunnel session."""
    conn = await asyncssh.connect(sshd.host, sshd.port, username=sshd.user, client_keys=[str(sshd.client_key_path)],
                                  known_hosts=str(sshd.known_hosts_path), agent_path=None, config=[])
    try:
        await conn.forward_local_port("127.0.0.1", 0, sshd.broker_host, sshd.broker_port)
        monitor, child = await wait_until(lambda: len(hook.processes_of(tunnel_uid(sshd))) == 1
                                          and _tunnel_pids(sshd), what="the tunnel session's processes")
        watch = SshdLogWatch(sshd.log_path, sshd.user)
        for text in payloads(sshd, monitor, child):
            for i in range(0, len(text), 380):
                port = await asyncio.to_thread(raw_ssh, sshd, b"SSH-2.0-probe", [disconnect(text[i:i + 380].encode())])
                await asyncio.to_thread(wait_logged, sshd, port, "Received disconnect")
        assert not breaker.check_sshd_log(watch), breaker.status()
        assert not breaker.status()["tripped"]
    finally:
        conn.close()


# ------------------------------------------------------------------------- real probes still trip

async def test_a_probe_from_a_session_older_than_the_watcher_trips(sshd, breaker):
    """The watcher (re)started while the tunnel was up: it finds the session's processes in /proc."""
    conn = await asyncssh.connect(sshd.host, sshd.port, username=sshd.user, client_keys=[str(sshd.client_key_path)],
                                  known_hosts=str(sshd.known_hosts_path), agent_path=None, config=[])
    try:
        await wait_until(lambda: len(hook.processes_of(tunnel_uid(sshd))) == 1,
                         what="the tunnel session's processes")
        watch = SshdLogWatch(sshd.log_path, sshd.user)
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.open_connection("127.0.0.1", sshd.port)
        await wait_until(lambda: any("but the request was denied" in ln for ln in complete_lines(sshd)
                                     if f"to connect to host 127.0.0.1 port {sshd.port}," in ln),
                         what="sshd to log the refused forward")
        assert breaker.check_sshd_log(watch)
    finally:
        conn.close()
    st = breaker.status()
    assert st["tripped"] and st["by"] == "sshd log"
    assert f"refused a forward to 127.0.0.1:{sshd.port}" in st["reason"]
