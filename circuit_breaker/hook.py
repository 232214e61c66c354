"""The two programs sshd runs for the tunnel account: ``keys`` and ``forced``.

Standard library only, so it runs on a login node without the chatai package: the installer
copies this file to a root-owned directory with a ``#!/usr/bin/python3 -I`` line (isolated
mode: no PYTHON* variables, no user site, no current directory on the path).

``keys``   AuthorizedKeysCommand, run by sshd as the unprivileged AuthorizedKeysCommandUser.
           Prints the gateway's key line(s) for the tunnel user, and nothing at all when the
           breaker is tripped or its state cannot be read (fail closed): no key, no login.
``forced`` ForceCommand, run as the tunnel user whenever a client asks for a shell, a command
           or a subsystem. A legitimate gateway only forwards a port and never gets here, so
           this records the attempt, trips the breaker, ends the tunnel account's sessions and
           exits non-zero without running anything. It offers no way to reset the breaker.

State directory layout (created by the installer):
    state.json     root 0644         {"tripped": bool, "since": ..., "reason": ..., "by": ...}
                                     written only by root, atomically (temp file + rename)
    trips/         root:tunnel 1730  sticky, not listable: the tunnel user can only add to it
    trips/TRIPPED                    trip request left by ``forced``; root absorbs it into
                                     state.json and removes it
    attempts.log   root:tunnel 0620  JSON lines appended by ``forced`` (chattr +a when possible)
    events.log     root 0600         trips and resets by operators and the watcher
"""

from __future__ import annotations

import json
import os
import pwd
import re
import signal
import sys
import time

STATE_FILE = "state.json"
TRIPS_DIR = "trips"
TRIP_MARKER = "TRIPPED"
ATTEMPTS_LOG = "attempts.log"
EVENTS_LOG = "events.log"

# A key line the hook agrees to print must carry these restrictions itself.
REQUIRED_KEY_PREFIX = "restrict,"

_NAME_CHARS = re.compile(r"[^A-Za-z0-9._+-]")
SUBSYSTEM_NAMES = {"sftp-server", "internal-sftp", "sftp"}


def load_config(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    for key in ("state_dir", "tunnel_user", "keys_file"):
        if not isinstance(cfg.get(key), str):
            raise ValueError(f"breaker config {path}: missing {key}")
    return cfg


def read_state(state_dir: str) -> dict:
    """The breaker's state; a missing or unreadable state counts as tripped (fail closed)."""
    try:
        with open(os.path.join(state_dir, STATE_FILE), encoding="utf-8") as f:
            state = json.load(f)
        if not isinstance(state, dict) or not isinstance(state.get("tripped"), bool):
            raise ValueError("malformed state")
    except FileNotFoundError:
        state = {"tripped": True, "reason": "no breaker state file (fail closed)"}
    except (OSError, ValueError) as exc:
        state = {"tripped": True, "reason": f"breaker state unreadable (fail closed): {type(exc).__name__}"}
    try:
        marker = os.path.lexists(os.path.join(state_dir, TRIPS_DIR, TRIP_MARKER))
    except OSError:  # pragma: no cover - lexists swallows most errors itself
        marker = True
    if not os.access(os.path.join(state_dir, TRIPS_DIR), os.X_OK):
        marker = True  # cannot look: fail closed
    state["pending_trip"] = marker
    if marker:
        state["tripped"] = True
        state.setdefault("reason", "tripped by the tunnel account's forced command")
    return state


def is_tripped(state_dir: str) -> bool:
    return read_state(state_dir)["tripped"]


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def command_name(original: str | None) -> tuple[str, str]:
    """(kind, name) of what the client asked for: never its arguments."""
    if original is None:
        return "shell", "-"
    first = original.strip().split(None, 1)[0] if original.strip() else ""
    name = _NAME_CHARS.sub("?", os.path.basename(first))[:64] or "-"
    return ("subsystem" if name in SUBSYSTEM_NAMES else "exec"), name


def attempt_record(environ: dict[str, str]) -> dict:
    kind, name = command_name(environ.get("SSH_ORIGINAL_COMMAND"))
    conn = environ.get("SSH_CONNECTION", "").split()
    return {
        "time": now_iso(),
        "event": "forced-command",
        "user": pwd.getpwuid(os.getuid()).pw_name,
        "client": conn[0] if conn else None,
        "client_port": conn[1] if len(conn) > 1 else None,
        "kind": kind,
        "command": name,
        # What sshd granted this session: all three must stay false.
        "granted": {"pty": "SSH_TTY" in environ, "agent": "SSH_AUTH_SOCK" in environ,
                    "x11": "DISPLAY" in environ},
    }


def _append(path: str, line: str, create_mode: int | None = None) -> bool:
    flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW
    if create_mode is not None:
        flags |= os.O_CREAT
    try:
        fd = os.open(path, flags, create_mode or 0)
    except OSError:
        return False
    try:
        os.write(fd, line.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def processes_of(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        # /proc/<pid> of a non-dumpable process (sshd's session child) is owned by root:
        # the real uid is read from the status file instead.
        try:
            with open(f"/proc/{entry}/status", encoding="ascii", errors="replace") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        if uid in (int(x) for x in line.split()[1:3]):
                            pids.append(int(entry))
                        break
        except (OSError, ValueError):
            continue
    return pids


def end_sessions(uid: int, exclude: set[int] | None = None, grace: float = 0.3) -> int:
    """SIGTERM, then SIGKILL, every process of this uid (the tunnel account's sshd sessions)."""
    exclude = exclude or set()
    targets = [p for p in processes_of(uid) if p not in exclude]
    for pid in targets:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(p in targets for p in processes_of(uid)):
        time.sleep(0.05)
    for pid in targets:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return len(targets)


def cmd_keys(cfg: dict, user: str) -> int:
    if user != cfg["tunnel_user"]:
        return 0
    if is_tripped(cfg["state_dir"]):
        return 0
    try:
        with open(cfg["keys_file"], encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return 0
    out = [ln.strip() for ln in lines if ln.strip().startswith(REQUIRED_KEY_PREFIX)]
    if out:
        sys.stdout.write("\n".join(out) + "\n")
    return 0


def cmd_forced(cfg: dict) -> int:
    # A client that hangs up at once must not stop the record and the trip.
    for sig in (signal.SIGHUP, signal.SIGPIPE, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    # Never read what the client sends: point stdin at /dev/null before anything else.
    try:
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
    except OSError:
        pass
    os.umask(0o077)
    state_dir = cfg["state_dir"]
    record = attempt_record(dict(os.environ))
    line = json.dumps(record, sort_keys=True) + "\n"
    _append(os.path.join(state_dir, ATTEMPTS_LOG), line)
    # The trip request: its mere existence trips the breaker; root absorbs it.
    _append(os.path.join(state_dir, TRIPS_DIR, TRIP_MARKER), line, create_mode=0o640)
    try:
        sys.stderr.write("This account only forwards one port. The attempt was recorded and the "
                         "circuit breaker is tripped.\n")
        sys.stderr.flush()
        time.sleep(0.1)  # let sshd relay the message before the session ends
    except OSError:
        pass
    end_sessions(os.getuid(), exclude={os.getpid()})
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3 or argv[1] != "--config" or argv[0] not in ("keys", "forced"):
        sys.stderr.write("usage: hook keys --config FILE USER | hook forced --config FILE\n")
        return 2
    try:
        cfg = load_config(argv[2])
    except (OSError, ValueError):
        if argv[0] == "forced":
            sys.stderr.write("circuit breaker misconfigured; nothing runs here\n")
        return 1
    if argv[0] == "keys":
        if len(argv) != 4:
            return 2
        return cmd_keys(cfg, argv[3])
    return cmd_forced(cfg)


if __name__ == "__main__":
    sys.exit(main())
