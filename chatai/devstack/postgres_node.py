"""A private PostgreSQL cluster for development and tests: ``initdb`` and ``pg_ctl`` under a
temporary directory, on a free port, like the private RabbitMQ node (``broker_node``).

It never touches a PostgreSQL the machine already runs (its own data directory, port and
socket directory). ``initdb`` refuses to run as root, so as root the cluster runs as a
throw-away system account (``accounts``), removed with the cluster.

    pg = LocalPostgres.create(); pg.start()
    url = pg.new_database("t1")     # postgresql://chatai:...@127.0.0.1:PORT/t1
    pg.stop()
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from chatai.devstack.accounts import create_account, remove_account
from chatai.devstack.processes import free_port

SUPERUSER = "chatai"


def postgres_bin() -> Path | None:
    """Debian's server binaries (``/usr/lib/postgresql/<version>/bin``), the newest version."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def postgres_installed() -> bool:
    return postgres_bin() is not None


def create_database(admin_url: str, name: str | None = None) -> str:
    """Create an empty database on the server of ``admin_url`` (a fresh one per test keeps tests
    apart); returns its URL."""
    import psycopg

    name = name or f"t_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return admin_url.rsplit("/", 1)[0] + "/" + name


@dataclass
class LocalPostgres:
    base_dir: Path
    port: int
    password: str
    bin_dir: Path
    account: str | None = None  # the throw-away OS account the server runs as (root only)
    durable: bool = True  # fsync; tests turn it off (a crashed test cluster is thrown away anyway)
    _started: bool = field(default=False, repr=False)

    @classmethod
    def create(cls, durable: bool = True) -> "LocalPostgres":
        bin_dir = postgres_bin()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL's initdb was not found: install Debian's postgresql package")
        port = free_port()
        base_dir = Path(tempfile.mkdtemp(prefix=f"chatai-pg-{port}-"))
        base_dir.chmod(0o755)  # the server's account must reach its data directory
        return cls(base_dir=base_dir, port=port, password=secrets.token_urlsafe(18), bin_dir=bin_dir,
                   durable=durable)

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "postgres.log"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def _run(self, *argv: str, timeout: float = 120) -> None:
        cmd = [str(self.bin_dir / argv[0]), *argv[1:]]
        if self.account is not None:
            cmd = ["runuser", "-u", self.account, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.base_dir)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {(done.stderr or done.stdout)[-2000:]}")

    def start(self, timeout: float = 60.0) -> None:
        """initdb on the first start (password authentication only, also over the socket), then
        pg_ctl start -w; a cluster stopped with ``stop(remove=False)`` starts again with its data."""
        if not self.data_dir.exists():
            self._init()
        options = [f"-p {self.port}", "-c listen_addresses=127.0.0.1", f"-k {self.base_dir}",
                   "-c max_connections=300", "-c shared_buffers=32MB"]
        if not self.durable:
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        self._run("pg_ctl", "start", "-w", "-t", str(int(timeout)), "-D", str(self.data_dir), "-l",
                  str(self.log_path), "-o", " ".join(options), timeout=timeout + 10)
        self._started = True

    def _init(self) -> None:
        """The data directory (``initdb``), owned by a throw-away account when we are root."""
        if os.geteuid() == 0:
            self.account = create_account("cpg", "chatai private PostgreSQL (tests, dev)")
            shutil.chown(self.base_dir, self.account, self.account)
        self.base_dir.chmod(0o700)
        pwfile = self.base_dir / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self.account is not None:
            shutil.chown(pwfile, self.account, self.account)
        try:
            self._run("initdb", "-D", str(self.data_dir), "-U", SUPERUSER, f"--pwfile={pwfile}",
                      "--auth=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync")
        finally:
            pwfile.unlink(missing_ok=True)

    def new_database(self, name: str | None = None) -> str:
        return create_database(self.url(), name)

    def stop(self, remove: bool = True) -> None:
        if self._started:
            try:
                self._run("pg_ctl", "stop", "-w", "-m", "fast", "-D", str(self.data_dir), timeout=70)
            except (RuntimeError, subprocess.TimeoutExpired):
                self._run("pg_ctl", "stop", "-w", "-m", "immediate", "-D", str(self.data_dir))
            self._started = False
        if remove:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            if self.account is not None:
                remove_account(self.account)
                self.account = None
