"""The breaker's root side: status, trip, reset, and the watcher that enforces automatic trips.

Run as root on the login node (or wherever the state directory and ``rabbitmqctl`` live).
The tunnel account can only *request* a trip (the marker its ForceCommand leaves in the
sticky ``trips/`` directory); everything here belongs to root:

* ``trip``  writes state.json (tripped), ends the tunnel account's sessions, clears the
  gateway broker user's permissions in the vhost and closes its connections. New tunnel logins
  are refused from that moment on, because the key lookup prints no key while tripped.
* ``reset`` restores the gateway user's permissions (``broker_config.definitions``: only its own
  ``chatai.gw.<user>.`` namespace),
  removes a pending trip marker and writes state.json (not tripped): the key lookup prints the
  key again, and the gateway's tunnel manager reconnects by itself. Nothing is restarted.
* ``watch`` polls the state: it absorbs trip markers into state.json and applies (and re-applies,
  every ``reapply`` seconds) the broker side of whatever the state is. It also follows sshd's
  log (``sshd_log`` in the config) and trips on every probe sshd refused by itself: forwards
  elsewhere, remote forwards, sessions, pty / X11 / agent / env requests, by an authenticated
  tunnel-account session only, never on text a client chose (see sshd_log.py).
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from broker_config.admin import BrokerAdmin, BrokerAdminError
from broker_config.definitions import gateway_topic_permissions, permissions_for
from circuit_breaker import hook
from circuit_breaker.sshd_log import SshdLogWatch

log = logging.getLogger("chatai.breaker")

DEFAULT_CONFIG = Path("/etc/chatai-breaker/config.json")  # written by `chatai breaker install`
CONFIG_ENV = "CHATAI_BREAKER_CONFIG"  # another config, for the CLI and `chatai status`


@dataclass
class Breaker:
    state_dir: Path
    tunnel_user: str
    admin: BrokerAdmin | None = None  # None: no broker side (e.g. sshd-only tests)
    broker_user: str = "gateway"
    broker_role: str = "gateway"
    sshd_log: Path | None = None  # sshd's log, followed by ``watch`` for refused probes

    @classmethod
    def from_config(cls, path: Path = DEFAULT_CONFIG, admin: BrokerAdmin | None = None,
                    rabbit_node: str | None = None, use_broker: bool = True) -> "Breaker":
        cfg = hook.load_config(str(path))
        if admin is None and use_broker:
            admin = BrokerAdmin(node=rabbit_node or cfg.get("rabbit_node"), vhost=cfg.get("vhost") or "chatai")
        return cls(state_dir=Path(cfg["state_dir"]), tunnel_user=cfg["tunnel_user"], admin=admin,
                   broker_user=cfg.get("broker_user") or "gateway",
                   sshd_log=Path(cfg["sshd_log"]) if cfg.get("sshd_log") else None)

    # -- state -------------------------------------------------------------------------------
    @property
    def marker(self) -> Path:
        return self.state_dir / hook.TRIPS_DIR / hook.TRIP_MARKER

    def status(self) -> dict:
        state = hook.read_state(str(self.state_dir))
        state["attempts"] = self.attempts()[-5:]
        return state

    def attempts(self) -> list[dict]:
        path = self.state_dir / hook.ATTEMPTS_LOG
        out = []
        try:
            for line in path.read_text().splitlines():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    out.append({"unparsable": True})
        except OSError:
            pass
        return out

    def _write_state(self, tripped: bool, reason: str, by: str) -> dict:
        state = {"tripped": tripped, "since": hook.now_iso(), "reason": reason, "by": by}
        path = self.state_dir / hook.STATE_FILE
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        try:
            os.write(fd, (json.dumps(state) + "\n").encode())
            os.fchmod(fd, 0o644)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(self.state_dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self._event({"event": "tripped" if tripped else "reset", "reason": reason, "by": by})
        return state

    def _event(self, record: dict) -> None:
        record = {"time": hook.now_iso(), **record}
        fd = os.open(self.state_dir / hook.EVENTS_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (json.dumps(record, sort_keys=True) + "\n").encode())
        finally:
            os.close(fd)

    def absorb(self) -> bool:
        """Turn a trip request of the tunnel account into root's state; True if there was one."""
        if not os.path.lexists(self.marker):
            return False
        try:
            first = self.marker.read_text().splitlines()[0]
            attempt = json.loads(first)
            reason = f"forced command: {attempt.get('kind')} {attempt.get('command')} from {attempt.get('client')}"
        except (OSError, ValueError, IndexError):
            reason = "forced command (trip marker unreadable)"
        self._write_state(True, reason, "tunnel account")
        self.marker.unlink(missing_ok=True)
        return True

    # -- actions -----------------------------------------------------------------------------
    def end_tunnel_sessions(self) -> int:
        try:
            uid = pwd.getpwnam(self.tunnel_user).pw_uid
        except KeyError:
            return 0
        if uid == 0:  # never: a misconfiguration must not kill root's processes
            raise ValueError("the tunnel user must not be root")
        return hook.end_sessions(uid)

    def apply_broker(self, tripped: bool) -> None:
        if self.admin is None:
            return
        if tripped:
            self.admin.clear_permissions(self.broker_user)
            try:
                self.admin.close_user_connections(self.broker_user, "chatai circuit breaker tripped")
            except BrokerAdminError as exc:  # no connections is not an error worth failing for
                log.warning("closing %s connections: %s", self.broker_user, exc)
        else:
            p = permissions_for(self.broker_user, self.broker_role)
            self.admin.set_permissions(self.broker_user, p["configure"], p["write"], p["read"])
            if self.broker_role == "gateway":
                tp = gateway_topic_permissions(self.broker_user)
                self.admin.set_topic_permissions(self.broker_user, tp["exchange"], tp["write"], tp["read"])

    def trip(self, reason: str = "tripped by an operator", by: str = "operator") -> dict:
        self.absorb()
        state = self._write_state(True, reason, by)
        # A session whose login completed just before the state changed may still be forking
        # its unprivileged child: look twice. (The watcher keeps looking while tripped.)
        self.end_tunnel_sessions()
        time.sleep(0.3)
        self.end_tunnel_sessions()
        self.apply_broker(True)
        return state

    def reset(self, by: str = "operator") -> dict:
        # The broker first: when the tunnel comes back, the gateway's credentials work again.
        self.apply_broker(False)
        self.marker.unlink(missing_ok=True)
        return self._write_state(False, "reset", by)

    def record_probe(self, reason: str) -> None:
        """One attempts.log line for a probe sshd refused (root appends; the reason has no secrets)."""
        line = json.dumps({"time": hook.now_iso(), "event": "sshd-probe", "user": self.tunnel_user,
                           "kind": "probe", "command": "-", "reason": reason}, sort_keys=True) + "\n"
        hook._append(str(self.state_dir / hook.ATTEMPTS_LOG), line)

    def check_sshd_log(self, log_watch: SshdLogWatch) -> bool:
        """Trip on probes sshd logged since the last look; whether this tripped the breaker."""
        probes = log_watch.poll()
        for reason in probes:
            self.record_probe(reason)
        if probes and not hook.is_tripped(str(self.state_dir)):
            log.warning("circuit breaker: %s", probes[0])
            self.trip(reason=probes[0], by="sshd log")
            return True
        return False

    def watch(self, interval: float = 1.0, reapply: float = 30.0, stop: threading.Event | None = None,
              ready: threading.Event | None = None) -> None:
        """Enforce the state until ``stop`` is set: the admin's daemon for automatic trips.

        ``ready`` is set once sshd's log is followed: what sshd logs from then on is seen.
        """
        stop = stop or threading.Event()
        applied: bool | None = None
        last_apply = 0.0
        log_watch = SshdLogWatch(self.sshd_log, self.tunnel_user) if self.sshd_log else None
        if log_watch is None:
            log.warning("no sshd_log in the breaker config: probes that sshd refuses will not trip the breaker")
        log.info("watching the breaker in %s%s", self.state_dir,
                 f" and sshd's log {self.sshd_log}" if log_watch is not None else "")
        if ready is not None:
            ready.set()
        while not stop.is_set():
            try:
                if log_watch is not None and self.check_sshd_log(log_watch):
                    applied = True  # trip() has applied the broker side
                    last_apply = time.monotonic()
                absorbed = self.absorb()
                tripped = hook.is_tripped(str(self.state_dir))
                if tripped:  # cheap (/proc scan): no tunnel session outlives a poll while tripped
                    self.end_tunnel_sessions()
                if absorbed or tripped != applied or time.monotonic() - last_apply > reapply:
                    self.apply_broker(tripped)
                    if tripped != applied:
                        self._event({"event": "enforced", "tripped": tripped, "by": "watch"})
                        log.warning("circuit breaker %s: broker side applied", "TRIPPED" if tripped else "reset")
                    applied, last_apply = tripped, time.monotonic()
            except Exception as exc:  # keep watching; the next round retries
                log.error("breaker watch: %s", exc)
            stop.wait(interval)
