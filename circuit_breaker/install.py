"""Install or update the circuit breaker on a login node (run as root; safe to run again).

Standard library only: ``circuit_breaker/install.sh`` runs this file with the system Python
from a checkout, and ``chatai breaker install`` calls :func:`install` where chatai is installed.

What it does, each step idempotent:
1. the tunnel account (``/bin/sh`` shell so that sshd can run the ForceCommand, a root-owned
   empty home, a disabled but *unlocked* password ``*``) and the unprivileged account that runs
   the AuthorizedKeysCommand (member of the tunnel group, to see the trip marker);
2. the hook program, root-owned, in a root-owned directory (sshd insists on that);
3. the breaker's config, its key file (restricted key lines) and state directory;
4. the sshd ``Match User`` snippet, then ``sshd -t``; an invalid configuration is rolled back;
5. the systemd unit of the watcher (``chatai breaker watch``), enabled and started where systemd
   runs: without the watcher, automatic trips do not reach the broker and probes that sshd
   refuses by itself (forwards elsewhere, pty, agent, X11, env) trip nothing.
It never restarts or reloads sshd; the new snippet is read by new connections after a reload
by the admin (``kill -HUP`` of the listener), key and breaker changes need no reload at all.
"""

from __future__ import annotations

import argparse
import grp
import json
import os
import pwd
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

HERE = Path(__file__).resolve().parent
HOOK_SOURCE = HERE / "hook.py"
SNIPPET_TEMPLATE = HERE / "sshd_breaker.conf.tmpl"
DEFAULT_SSHD_LOG = "/var/log/auth.log"  # Debian: sshd -> syslog (rsyslog) -> auth.log
KEY_TYPES = ("ssh-ed25519", "ssh-rsa", "ecdsa-sha2-", "sk-ssh-ed25519", "sk-ecdsa-sha2-")


@dataclass
class Layout:
    etc_dir: Path = Path("/etc/chatai-breaker")  # config.json, authorized_keys
    state_dir: Path = Path("/var/lib/chatai-breaker")  # state.json, trips/, logs, home/
    libexec_dir: Path = Path("/usr/local/lib/chatai-breaker")  # the hook program
    sshd_snippet: Path = Path("/etc/ssh/sshd_config.d/chatai-breaker.conf")
    sshd_config: Path = Path("/etc/ssh/sshd_config")  # what `sshd -t` validates
    systemd_unit: Path = Path("/etc/systemd/system/chatai-breaker-watch.service")
    enable_unit: bool = True  # systemctl enable --now, where systemd runs

    @classmethod
    def under(cls, base: Path, sshd_config: Path) -> "Layout":
        return cls(etc_dir=base / "etc", state_dir=base / "state", libexec_dir=base / "libexec",
                   sshd_snippet=base / "sshd_config.d" / "chatai-breaker.conf", sshd_config=sshd_config,
                   systemd_unit=base / "systemd" / "chatai-breaker-watch.service", enable_unit=False)

    @property
    def config_file(self) -> Path:
        return self.etc_dir / "config.json"

    @property
    def keys_file(self) -> Path:
        return self.etc_dir / "authorized_keys"

    @property
    def hook(self) -> Path:
        return self.libexec_dir / "chatai-breaker-hook"

    @property
    def home_dir(self) -> Path:
        return self.state_dir / "home"


def _opt(default: object, help: str) -> object:
    return field(default=default, metadata={"help": help})


@dataclass
class BreakerSpec:
    """What to install; each field is also an option of the installer (``--tunnel-user`` ...),
    declared here once: :func:`add_spec_options` derives them, with this help."""

    tunnel_user: str = _opt("chatai-tunnel", "the account the gateway's tunnel logs in as")
    keys_user: str = _opt("chatai-breaker", "the unprivileged account that runs the AuthorizedKeysCommand")
    broker_host: str = _opt("127.0.0.1", "the broker as the login node sees it")
    broker_port: int = _opt(5672, "the broker's AMQP port")
    from_: str | None = _opt(None, 'restrict the key to these client addresses (from="...")')
    rabbit_node: str | None = _opt(None, "RabbitMQ node name for rabbitmqctl -n (the broker side of a trip)")
    vhost: str = _opt("chatai", "the broker's vhost")
    broker_user: str = _opt("gateway", "the gateway's broker user, shut out on a trip")
    public_keys: list[str] = field(default_factory=list)  # the gateway's public key(s), bare (--public-key FILE)
    python: str = _opt("/usr/bin/python3", "the Python that runs the hook")
    sshd_log: str | None = _opt(None, f"sshd's log file, followed by the watcher (default: as installed, "
                                f"else {DEFAULT_SSHD_LOG})")
    chatai: str | None = _opt(None, "the chatai command for the watcher's systemd unit (default: from PATH)")

    @property
    def permit_open(self) -> str:
        host = f"[{self.broker_host}]" if ":" in self.broker_host else self.broker_host
        return f"{host}:{self.broker_port}"


class InstallError(RuntimeError):
    pass


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True)


def _check(*cmd: str) -> None:
    proc = _run(*cmd)
    if proc.returncode != 0:
        raise InstallError(f"{' '.join(cmd)}: {proc.stderr.strip() or proc.stdout.strip()}")


def key_line(public_key: str, spec: BreakerSpec) -> str:
    """The authorized_keys line: only a port forward to the broker, whatever the client asks."""
    parts = public_key.strip().split()
    if len(parts) < 2 or not parts[0].startswith(KEY_TYPES):
        raise InstallError("expected a bare public key (type, base64, optional comment), without options")
    options = f'restrict,port-forwarding,permitopen="{spec.permit_open}"'
    if spec.from_:
        if '"' in spec.from_:
            raise InstallError("from= pattern must not contain quotes")
        options += f',from="{spec.from_}"'
    return f"{options} {' '.join(parts[:3])}"


WATCH_UNIT = """\
# chatai circuit breaker watcher. Written by circuit_breaker/install.py (chatai breaker install).
[Unit]
Description=chatai circuit breaker watcher (enforces trips on the broker; trips on probes sshd refused)
After=network-online.target ssh.service rabbitmq-server.service
Wants=network-online.target

[Service]
Type=simple
# Root: it writes the breaker's state, reads sshd's log, ends tunnel sessions, runs rabbitmqctl.
ExecStart={exec_start}
Restart=always
RestartSec=2
NoNewPrivileges=yes
PrivateTmp=yes
ProtectSystem=full
ProtectHome=read-only

[Install]
WantedBy=multi-user.target
"""


def watch_unit(spec: BreakerSpec, layout: Layout) -> str:
    chatai = spec.chatai or shutil.which("chatai") or "/usr/local/bin/chatai"
    argv = [chatai, "breaker", "watch", "--config", str(layout.config_file)]
    return WATCH_UNIT.format(exec_start=" ".join(shlex.quote(a) for a in argv))


def _enable_unit(layout: Layout) -> str:
    """Enable and (re)start the watcher where systemd runs; what happened, for the report."""
    if not layout.enable_unit:
        return "not enabled (private layout)"
    if not (Path("/run/systemd/system").is_dir() and shutil.which("systemctl")):
        return "not enabled: systemd is not running here; start 'chatai breaker watch' under your supervisor"
    _check("systemctl", "daemon-reload")
    _check("systemctl", "enable", layout.systemd_unit.name)
    _check("systemctl", "restart", layout.systemd_unit.name)
    return "enabled and started"


def _write_root_file(path: Path, text: str, mode: int) -> bool:
    """Atomically replace a root-owned file; returns whether its content changed."""
    old = path.read_text() if path.exists() else None
    if old == text and (path.stat().st_mode & 0o7777) == mode and path.stat().st_uid == 0:
        return False
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, text.encode())
        os.fchmod(fd, mode)
        os.fchown(fd, 0, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return True


def _root_dir(path: Path, mode: int = 0o755, group: int = 0) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, 0, group)
    os.chmod(path, mode)


def ensure_accounts(spec: BreakerSpec, layout: Layout) -> int:
    """Create or fix both accounts; returns the tunnel group's gid."""
    _root_dir(layout.home_dir)
    try:
        pwd.getpwnam(spec.tunnel_user)
    except KeyError:
        _check("useradd", "--system", "--user-group", "--no-create-home", "--home-dir", str(layout.home_dir),
               "--shell", "/bin/sh", "--comment", "chatai SSH tunnel (port forward only)", spec.tunnel_user)
    # sshd runs ForceCommand through the login shell: nologin would swallow it.
    _check("usermod", "--shell", "/bin/sh", "--home", str(layout.home_dir), spec.tunnel_user)
    # Without a password the account is locked, and sshd refuses locked accounts even for keys.
    _check("usermod", "-p", "*", spec.tunnel_user)
    gid = pwd.getpwnam(spec.tunnel_user).pw_gid
    try:
        pwd.getpwnam(spec.keys_user)
    except KeyError:
        _check("useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
               "--shell", "/usr/sbin/nologin", "--comment", "chatai breaker key lookup", spec.keys_user)
    group = grp.getgrgid(gid).gr_name
    if spec.keys_user not in grp.getgrgid(gid).gr_mem:
        _check("usermod", "-a", "-G", group, spec.keys_user)
    return gid


def install(spec: BreakerSpec, layout: Layout = Layout(), validate: bool = True) -> dict:
    if os.geteuid() != 0:
        raise InstallError("run the breaker installer as root")
    gid = ensure_accounts(spec, layout)

    _root_dir(layout.libexec_dir)
    hook_text = HOOK_SOURCE.read_text()
    first, _, rest = hook_text.partition("\n")
    shebang = f"#!{spec.python} -I\n"
    _write_root_file(layout.hook, shebang + (rest if first.startswith("#!") else hook_text), 0o755)

    _root_dir(layout.etc_dir)
    _root_dir(layout.state_dir)
    _root_dir(layout.state_dir / "trips", mode=0o1730, group=gid)
    attempts = layout.state_dir / "attempts.log"
    if not attempts.exists():
        fd = os.open(attempts, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o620)
        os.close(fd)
    st = attempts.stat()
    if st.st_uid != 0 or st.st_gid != gid or (st.st_mode & 0o777) != 0o620:
        _run("chattr", "-a", str(attempts))
        os.chown(attempts, 0, gid)
        os.chmod(attempts, 0o620)
    # Append-only where the filesystem supports it: then not even a tunnel process could truncate.
    append_only = _run("chattr", "+a", str(attempts)).returncode == 0
    events = layout.state_dir / "events.log"
    if not events.exists():
        os.close(os.open(events, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    state_file = layout.state_dir / "state.json"
    if not state_file.exists():
        _write_root_file(state_file, json.dumps({"tripped": False, "since": None, "reason": "installed",
                                                 "by": "install"}) + "\n", 0o644)

    keys_text = layout.keys_file.read_text() if layout.keys_file.exists() else ""
    if spec.public_keys:
        keys_text = "".join(key_line(k, spec) + "\n" for k in spec.public_keys)
    elif keys_text:  # re-run without keys: keep the keys, re-apply the current restrictions
        keys_text = "".join(key_line(ln.split(None, 1)[1], spec) + "\n"
                            for ln in keys_text.splitlines() if ln.startswith("restrict,"))
    _write_root_file(layout.keys_file, keys_text, 0o644)

    try:
        installed = json.loads(layout.config_file.read_text())
    except (OSError, ValueError):
        installed = {}
    sshd_log = spec.sshd_log or installed.get("sshd_log") or DEFAULT_SSHD_LOG
    config = {"state_dir": str(layout.state_dir), "tunnel_user": spec.tunnel_user,
              "keys_user": spec.keys_user, "keys_file": str(layout.keys_file),
              "broker_host": spec.broker_host, "broker_port": spec.broker_port,
              "rabbit_node": spec.rabbit_node, "vhost": spec.vhost, "broker_user": spec.broker_user,
              "sshd_log": sshd_log}
    _write_root_file(layout.config_file, json.dumps(config, indent=2) + "\n", 0o644)

    snippet = SNIPPET_TEMPLATE.read_text().format(
        tunnel_user=spec.tunnel_user, keys_user=spec.keys_user, hook=layout.hook,
        config=layout.config_file, permit_open=spec.permit_open)
    layout.sshd_snippet.parent.mkdir(parents=True, exist_ok=True)
    previous = layout.sshd_snippet.read_text() if layout.sshd_snippet.exists() else None
    changed = _write_root_file(layout.sshd_snippet, snippet, 0o644)
    if validate:
        proc = _run("/usr/sbin/sshd", "-t", "-f", str(layout.sshd_config))
        if proc.returncode != 0:
            if previous is None:
                layout.sshd_snippet.unlink()
            else:
                _write_root_file(layout.sshd_snippet, previous, 0o644)
            raise InstallError(f"sshd -t rejected the configuration (rolled back): {proc.stderr.strip()}")
        check_effective(spec, layout)
    layout.systemd_unit.parent.mkdir(parents=True, exist_ok=True)
    _write_root_file(layout.systemd_unit, watch_unit(spec, layout), 0o644)
    watcher = _enable_unit(layout)
    return {"config": str(layout.config_file), "snippet": str(layout.sshd_snippet), "snippet_changed": changed,
            "append_only_log": append_only, "keys": keys_text.count("\n"), "watch_unit": str(layout.systemd_unit),
            "watcher": watcher, "time": time.time()}


def check_effective(spec: BreakerSpec, layout: Layout) -> None:
    """The Match block must be what sshd applies to the tunnel user (the snippet is Included)."""
    proc = _run("/usr/sbin/sshd", "-T", "-f", str(layout.sshd_config), "-C",
                f"user={spec.tunnel_user},host=gateway,addr=127.0.0.1")
    if proc.returncode != 0:
        raise InstallError(f"sshd -T failed: {proc.stderr.strip()}")
    eff = dict((ln.split(" ", 1) + [""])[:2] for ln in proc.stdout.splitlines())
    expected = {"permitopen": spec.permit_open, "allowtcpforwarding": "local", "permittty": "no",
                "authenticationmethods": "publickey", "passwordauthentication": "no"}
    wrong = {k: eff.get(k) for k, v in expected.items() if eff.get(k) != v}
    if str(layout.hook) not in eff.get("forcecommand", "") or wrong:
        raise InstallError(f"{layout.sshd_config} does not apply the breaker's Match block to {spec.tunnel_user} "
                           f"(add 'Include {layout.sshd_snippet}' near its top); effective: {wrong}")


def add_spec_options(p: argparse.ArgumentParser) -> None:
    """One option per :class:`BreakerSpec` field (``from_`` is ``--from``)."""
    for f in fields(BreakerSpec):
        if f.metadata:
            p.add_argument("--" + f.name.rstrip("_").replace("_", "-"), dest=f.name, default=f.default,
                           type=int if f.type == "int" else str, help=f.metadata["help"])


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description="Install the chatai circuit breaker (idempotent, run as root).")
    add_spec_options(p)
    p.add_argument("--public-key", action="append", default=[], help="file with the gateway's public key")
    p.add_argument("--unit", type=Path, default=Path("/etc/systemd/system/chatai-breaker-watch.service"))
    p.add_argument("--sshd-config", type=Path, default=Path("/etc/ssh/sshd_config"))
    p.add_argument("--snippet", type=Path, default=Path("/etc/ssh/sshd_config.d/chatai-breaker.conf"))
    p.add_argument("--prefix", type=Path, help="put etc/, state/, libexec/ and the snippet under this "
                   "root-owned directory instead of the system paths (private sshds, tests)")
    args = p.parse_args(argv)
    spec = BreakerSpec(**{f.name: getattr(args, f.name) for f in fields(BreakerSpec) if f.metadata},
                       public_keys=[Path(k).read_text().strip() for k in args.public_key])
    if args.prefix:
        layout = Layout.under(args.prefix, sshd_config=args.sshd_config)
    else:
        layout = Layout(sshd_snippet=args.snippet, sshd_config=args.sshd_config, systemd_unit=args.unit)
    try:
        result = install(spec, layout)
    except InstallError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    print("Reload sshd (kill -HUP <listener pid>) if the snippet changed; see docs/security.md.", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
