"""A private OpenSSH sshd with the real breaker configuration, for tests and ``chatai dev``.

    sshd = start_local_sshd(state_dir, broker_host, broker_port)
    ... sshd.host, sshd.port, sshd.user, sshd.client_key_path, sshd.known_hosts_path ...
    sshd.stop()

Needs root (it creates two throw-away accounts with unique names, runs the installer and an
sshd on a free port with its own host key and config). The breaker's files live under a
root-owned ``/run/chatai-breaker-<id>/`` because sshd refuses an AuthorizedKeysCommand whose
path has a group- or world-writable component (so not under /tmp); the gateway-side files
(client key, known_hosts) go to ``state_dir``. The system sshd and its config are not touched.

sshd logs through syslog, as on a login node, not with ``-E``: it runs in a private mount
namespace whose ``/dev/log`` is the socket of a small receiver (chatai/devstack/syslogd.py)
writing ``sshd.log`` in auth.log's format. With ``-E``, sshd leaves CR/LF in client text and a
stranger could write whole lines into the log the breaker's watcher reads.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from chatai.devstack.accounts import remove_account
from chatai.devstack.processes import free_port, wait_until
from circuit_breaker import hook
from circuit_breaker.install import BreakerSpec, Layout, install

SSHD = "/usr/sbin/sshd"


def sshd_available() -> bool:
    return os.path.exists(SSHD) and shutil.which("ssh-keygen") is not None and os.geteuid() == 0


# Global part of the private sshd's config, like Debian's: the Include comes first, and the
# global defaults are permissive (passwords, X11, agent, TCP forwarding all allowed) so that it
# is the breaker's Match block that refuses them.
MAIN_CONFIG = """\
Include {snippet}
Port {port}
ListenAddress 127.0.0.1
HostKey {host_key}
PidFile {pid_file}
UsePAM yes
PasswordAuthentication yes
KbdInteractiveAuthentication no
X11Forwarding yes
AllowAgentForwarding yes
AllowTcpForwarding yes
PrintMotd no
AcceptEnv LANG LC_*
LogLevel VERBOSE
Subsystem sftp /usr/lib/openssh/sftp-server
"""


@dataclass
class LocalSshd:
    host: str
    port: int
    user: str
    keys_user: str
    client_key_path: Path
    known_hosts_path: Path
    base_dir: Path  # root-owned: sshd config, host key, the breaker's etc/state/libexec
    layout: Layout
    config_path: Path  # the breaker config (chatai breaker --config ...)
    log_path: Path
    process: subprocess.Popen | None = None
    syslogd: subprocess.Popen | None = None
    broker_host: str = "127.0.0.1"
    broker_port: int = 5672
    _stopped: bool = field(default=False, repr=False)

    @property
    def state_dir(self) -> Path:
        return self.layout.state_dir

    def breaker(self, admin=None):
        """The root-side Breaker for this sshd's tunnel account (broker side only with an admin)."""
        from circuit_breaker.breaker import Breaker

        return Breaker.from_config(self.config_path, admin=admin, use_broker=admin is not None)

    def gateway_env(self) -> dict[str, str]:
        """The ``CHATAI_GATEWAY_TUNNEL_*`` settings of a gateway that reaches the broker through
        this sshd (``chatai dev`` and the tests start their gateways with them)."""
        return {
            "CHATAI_GATEWAY_TUNNEL_HOST": self.host,
            "CHATAI_GATEWAY_TUNNEL_PORT": str(self.port),
            "CHATAI_GATEWAY_TUNNEL_USER": self.user,
            "CHATAI_GATEWAY_TUNNEL_KEY": str(self.client_key_path),
            "CHATAI_GATEWAY_TUNNEL_KNOWN_HOSTS": str(self.known_hosts_path),
            "CHATAI_GATEWAY_TUNNEL_REMOTE_HOST": self.broker_host,
            "CHATAI_GATEWAY_TUNNEL_REMOTE_PORT": str(self.broker_port),
        }

    def ssh_command(self, *options: str, remote: str | None = None) -> list[str]:
        """The system ssh client pointed at this server as the tunnel user (no user config)."""
        return ["ssh", "-F", "/dev/null", "-p", str(self.port), "-i", str(self.client_key_path),
                "-o", f"UserKnownHostsFile={self.known_hosts_path}", "-o", "StrictHostKeyChecking=yes",
                "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
                *options, f"{self.user}@{self.host}", *([remote] if remote is not None else [])]

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.syslogd is not None and self.syslogd.poll() is None:
            self.syslogd.terminate()
            self.syslogd.wait(10)
        # Sessions of the throw-away account (children of our sshd), then the accounts.
        try:
            hook.end_sessions(pwd.getpwnam(self.user).pw_uid)
        except KeyError:
            pass
        for name in (self.keys_user, self.user):
            remove_account(name)
        subprocess.run(["chattr", "-a", str(self.layout.state_dir / hook.ATTEMPTS_LOG)], capture_output=True)
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> "LocalSshd":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _ssh_banner(port: int) -> bool:
    """True once an SSH server answers on 127.0.0.1:``port`` with its version banner."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            return s.recv(64).startswith(b"SSH-")
    except OSError:
        return False


# Run in a private mount namespace: a /dev of its own (the host's devices sshd and its sessions
# use, bound in) whose /dev/log is the receiver's socket. The host's /dev is not touched.
_NAMESPACE_SETUP = """\
set -e
mount --make-rprivate /
mount --rbind /dev "$1"
mount -t tmpfs -o mode=755,size=1m chatai-dev /dev
for d in null zero full random urandom tty; do
    if [ -c "$1/$d" ]; then touch "/dev/$d"; mount --bind "$1/$d" "/dev/$d"; fi
done
if [ -d "$1/pts" ]; then mkdir /dev/pts; mount --rbind "$1/pts" /dev/pts; ln -s pts/ptmx /dev/ptmx; fi
ln -s /proc/self/fd /dev/fd
ln -s "$2" /dev/log
shift 2
exec "$@"
"""


def _start_syslogd(sock: Path, log_path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "chatai.devstack.syslogd", str(sock), str(log_path)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise RuntimeError("the sshd log receiver did not start")
    return proc


def _keygen(path: Path, comment: str) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, capture_output=True)
    return path.with_name(path.name + ".pub").read_text().strip()


def start_local_sshd(state_dir: Path, broker_host: str, broker_port: int, *, from_: str | None = None,
                     rabbit_node: str | None = None, broker_user: str = "gateway", vhost: str = "chatai",
                     timeout: float = 15.0) -> LocalSshd:
    """Start a private sshd whose tunnel account may only forward to broker_host:broker_port."""
    if not sshd_available():
        raise RuntimeError("a local sshd needs root, /usr/sbin/sshd and ssh-keygen (openssh-server)")
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    ident = secrets.token_hex(3)
    user, keys_user = f"cbt{ident}", f"cbk{ident}"
    base = Path(f"/run/chatai-breaker-{ident}")
    base.mkdir(mode=0o755)
    os.chmod(base, 0o755)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    port = free_port()
    host_key = base / "ssh_host_ed25519_key"
    host_pub = _keygen(host_key, f"chatai-test-host-{ident}")
    client_key = state_dir / "tunnel_ed25519"
    for p in (client_key, client_key.with_name(client_key.name + ".pub")):
        p.unlink(missing_ok=True)
    client_pub = _keygen(client_key, f"chatai-gateway-{ident}")
    known_hosts = state_dir / "tunnel_known_hosts"
    key_type, key_b64 = host_pub.split()[:2]
    known_hosts.write_text(f"[127.0.0.1]:{port} {key_type} {key_b64}\n")

    layout = Layout.under(base, sshd_config=base / "sshd_config")
    main_config = MAIN_CONFIG.format(snippet=layout.sshd_snippet, port=port, host_key=host_key,
                                     pid_file=base / "sshd.pid")
    layout.sshd_config.write_text(main_config)
    log_path = base / "sshd.log"
    sshd = LocalSshd(host="127.0.0.1", port=port, user=user, keys_user=keys_user, client_key_path=client_key,
                     known_hosts_path=known_hosts, base_dir=base, layout=layout, config_path=layout.config_file,
                     log_path=log_path, broker_host=broker_host, broker_port=broker_port)
    try:
        spec = BreakerSpec(tunnel_user=user, keys_user=keys_user, broker_host=broker_host, broker_port=broker_port,
                           from_=from_, rabbit_node=rabbit_node, broker_user=broker_user, vhost=vhost,
                           public_keys=[client_pub], sshd_log=str(log_path))
        install(spec, layout)
        sock = base / "syslog.sock"
        sshd.syslogd = _start_syslogd(sock, log_path)
        host_dev = base / "dev.host"
        host_dev.mkdir(mode=0o700)
        sshd.process = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _NAMESPACE_SETUP, "sh",
             str(host_dev), str(sock), SSHD, "-D", "-f", str(layout.sshd_config)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(base / "sshd.stderr", "wb"))
        def exited() -> None:
            if sshd.process.poll() is not None:
                err = (base / "sshd.stderr").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"sshd exited: {err} {log_path.read_text()[-2000:] if log_path.exists() else ''}")

        wait_until(lambda: _ssh_banner(port), timeout, "sshd to listen", check=exited)
    except BaseException:
        sshd.stop()
        raise
    return sshd
