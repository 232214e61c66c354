"""A private Slurm cluster on this one machine: munged, slurmctld and one or more slurmd.

Why: tests and ``chatai dev --slurm`` need real Slurm semantics (arrays, ``--signal``,
``scancel``, the backfill scheduler) without touching a site's Slurm or needing systemd.
Everything lives under one directory of its own - config, munge key and socket, state, spool
(in /tmp when that directory is too deep for its sockets), logs - on free ports, so it neither needs nor disturbs a system Slurm. Clients (sbatch, squeue,
...) find it through the ``SLURM_CONF`` variable in :attr:`LocalSlurmCluster.env`.

Several nodes are emulated by several ``slurmd -N NAME`` processes on one host (each with its
own port, ``NodeHostname=localhost``); ``SlurmdParameters=config_overrides`` lets a node claim
the CPUs and memory the config gives it rather than what the hardware has, so a two-core VM
can still show a scheduler a cluster with a queue of waiting work. GPUs are emulated the same
way: ``Gres=gpu:N`` with a gres.conf whose device ``File`` is a node of our own that aliases
``/dev/null`` (Slurm 22.05 drops a GPU without a file, and warns about one that is not a
device), a resource the scheduler allocates and no process touches. Several partitions and
extra slurm.conf lines (preemption, a job completion log) let an experiment shape the cluster
(``chatai bench coexistence``).

It runs as root (``SlurmUser=root``): a development and CI tool, not a way to run a site.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from chatai.devstack.processes import free_port, spawn, wait_until


class LocalClusterError(RuntimeError):
    pass


def slurm_installed() -> bool:
    """True when the Debian ``slurm-wlm`` and ``munge`` programs are on the PATH."""
    return all(shutil.which(p) for p in ("slurmctld", "slurmd", "sbatch", "munged", "mungekey"))


@dataclass
class LocalNode:
    """One emulated compute node: its own slurmd process on its own port."""

    name: str
    cpus: int
    memory_mb: int
    port: int = 0


@dataclass(frozen=True)
class LocalPartition:
    """One partition over all nodes; ``options`` are extra slurm.conf keys (PriorityTier=...)."""

    name: str
    default: bool = False
    options: str = ""


@dataclass
class LocalSlurmCluster:
    """Handle on a running private cluster; :meth:`start` builds and boots one.

    ``env`` is what any Slurm client or ``chatai scale`` call needs (``SLURM_CONF``); merge it
    into ``os.environ`` or pass it to subprocesses.
    """

    base_dir: Path
    nodes: list[LocalNode]
    partition: str = "chatai"
    ctld_port: int = 0
    cluster_name: str = "chatai-local"
    gpus_per_node: int = 0  # count-only GRES "gpu" on every node
    partitions: list[LocalPartition] = field(default_factory=list)  # empty: one default partition
    extra_conf: list[str] = field(default_factory=list)  # further slurm.conf lines (they win)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    spool_dir: Path | None = None  # default: base_dir / "spool" (see create)
    _owns_dir: bool = False
    _owns_spool: bool = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(
        cls,
        base_dir: Path | None = None,
        nodes: int = 1,
        cpus_per_node: int | None = None,
        memory_mb_per_node: int = 4096,
        partition: str = "chatai",
        gpus_per_node: int = 0,
        partitions: list[LocalPartition] | None = None,
        extra_conf: list[str] | None = None,
    ) -> "LocalSlurmCluster":
        """Lay out a cluster of ``nodes`` emulated nodes (not started yet).

        A single node takes the host's short name and real CPU count; several nodes are named
        ``<host>-n0..`` and get ``cpus_per_node`` each (default: the real count).
        """
        owns = base_dir is None
        base = Path(base_dir or tempfile.mkdtemp(prefix="chatai-slurm-"))
        base.mkdir(parents=True, exist_ok=True)
        host = socket.gethostname().split(".")[0]
        cpus = cpus_per_node or os.cpu_count() or 1
        if nodes == 1:
            node_list = [LocalNode(host, cpus, memory_mb_per_node, free_port())]
        else:
            node_list = [LocalNode(f"{host}-n{i}", cpus, memory_mb_per_node, free_port()) for i in range(nodes)]
        # slurmstepd makes a Unix socket per job step in the spool, <node>/<node>_<job>.<step>, and a
        # socket's path has at most 107 bytes: under a deep base_dir (a test's tmp_path under
        # pytest-xdist) the step cannot start and Slurm requeues the job. Such a spool goes to /tmp.
        spool, owns_spool = base / "spool", False
        if len(str(spool)) + 2 * max(len(n.name) for n in node_list) + 24 > 107:
            spool, owns_spool = Path(tempfile.mkdtemp(prefix="chatai-spool-")), True
        return cls(base_dir=base, nodes=node_list, partition=partition, ctld_port=free_port(), _owns_dir=owns,
                   gpus_per_node=gpus_per_node, partitions=list(partitions or []), extra_conf=list(extra_conf or []),
                   spool_dir=spool, _owns_spool=owns_spool)

    @property
    def spool(self) -> Path:
        return self.spool_dir or self.base_dir / "spool"

    @property
    def ctld_log(self) -> Path:
        """slurmctld's log: job events to the millisecond (the coexistence bench reads it)."""
        return self.base_dir / "log" / "slurmctld.log"

    @property
    def conf_path(self) -> Path:
        return self.base_dir / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.base_dir / "munge" / "munge.socket"

    @property
    def env(self) -> dict[str, str]:
        """Environment for Slurm clients talking to this cluster."""
        return {"SLURM_CONF": str(self.conf_path)}

    def client_env(self) -> dict[str, str]:
        """``os.environ`` plus :attr:`env`, for subprocesses."""
        return {**os.environ, **self.env}

    def render_conf(self) -> str:
        """The slurm.conf: backfill, cons_tres, root-run daemons, everything under base_dir."""
        b = self.base_dir
        host = socket.gethostname().split(".")[0]
        multi = len(self.nodes) > 1
        lines = [
            f"ClusterName={self.cluster_name}",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={b / 'state'}",
            f"SlurmdSpoolDir={self.spool / '%n'}",
            f"SlurmctldPidFile={b / 'slurmctld.pid'}",
            f"SlurmdPidFile={b / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={self.ctld_log}",
            f"SlurmdLogFile={b / 'log' / 'slurmd-%n.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SchedulerType=sched/backfill",
            # Backfill every second (default 30 s) so a gap is filled at once in tests and dev.
            "SchedulerParameters=bf_interval=1,bf_resolution=60,sched_min_interval=100000",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "PriorityType=priority/basic",
            "ReturnToService=2",
            "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SlurmdParameters=config_overrides",
            "KillWait=30",
            "MinJobAge=300",
            "InactiveLimit=0",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            "MessageTimeout=20",
            "MaxArraySize=1001",
        ]
        gres = ""
        if self.gpus_per_node:
            lines.append("GresTypes=gpu")
            gres = f" Gres=gpu:{self.gpus_per_node}"
        lines.extend(self._overridden(lines))
        for n in self.nodes:
            extra = f" NodeHostname=localhost NodeAddr=127.0.0.1 Port={n.port}" if multi else f" NodeAddr=127.0.0.1 Port={n.port}"
            lines.append(f"NodeName={n.name}{extra} CPUs={n.cpus} RealMemory={n.memory_mb}{gres} State=UNKNOWN")
        names = ",".join(n.name for n in self.nodes)
        for p in self.partitions or [LocalPartition(self.partition, default=True)]:
            opts = f" {p.options}" if p.options else ""
            lines.append(f"PartitionName={p.name} Nodes={names} Default={'YES' if p.default else 'NO'} "
                         f"MaxTime=INFINITE State=UP{opts}")
        return "\n".join(lines) + "\n"

    def _overridden(self, lines: list[str]) -> list[str]:
        """Apply :attr:`extra_conf`: a key already in ``lines`` is replaced there, new keys are returned."""
        index = {line.split("=", 1)[0]: i for i, line in enumerate(lines)}
        new = []
        for line in self.extra_conf:
            key = line.split("=", 1)[0]
            if key in index:
                lines[index[key]] = line
            else:
                new.append(line)
        return new

    def gpu_files(self, node: LocalNode) -> list[Path]:
        return [self.base_dir / "dev" / node.name / f"nvidia{i}" for i in range(self.gpus_per_node)]

    def render_gres_conf(self) -> str:
        """gres.conf: each node's GPUs as device files of our own (see :meth:`_make_gpu_files`)."""
        return "".join(f"NodeName={n.name} Name=gpu File={f}\n" for n in self.nodes for f in self.gpu_files(n))

    def _make_gpu_files(self) -> None:
        """Character devices with /dev/null's numbers (root may mknod); a plain file where that is
        refused, which Slurm accepts with an error line in the slurmd log."""
        for n in self.nodes:
            for f in self.gpu_files(n):
                f.parent.mkdir(parents=True, exist_ok=True)
                if f.exists():
                    continue
                try:
                    os.mknod(f, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
                except OSError:
                    f.touch()

    # ------------------------------------------------------------------ life cycle
    def start(self, timeout: float = 30.0) -> "LocalSlurmCluster":
        """Start munged, slurmctld and every slurmd; return once all nodes are idle."""
        b = self.base_dir
        for sub in ("munge", "state", "log", "spool"):
            (b / sub).mkdir(parents=True, exist_ok=True)
        for n in self.nodes:
            (self.spool / n.name).mkdir(parents=True, exist_ok=True)
        (b / "munge").chmod(0o700)
        self.conf_path.write_text(self.render_conf())
        if self.gpus_per_node:
            self._make_gpu_files()
            (b / "gres.conf").write_text(self.render_gres_conf())
        key = b / "munge" / "munge.key"
        if not key.exists():
            self._run(["mungekey", "-c", "-k", str(key)])
        self._spawn("munged", [
            "munged", "-F", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
            f"--pid-file={b / 'munge' / 'munged.pid'}", f"--log-file={b / 'log' / 'munged.log'}",
            f"--seed-file={b / 'munge' / 'munged.seed'}",
        ])
        self._await(lambda: self.munge_socket.exists(), timeout, "munged's socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf_path)])
        self._await(self._ctld_up, timeout, "slurmctld to answer")
        for n in self.nodes:
            cmd = ["slurmd", "-D", "-f", str(self.conf_path)]
            if len(self.nodes) > 1:
                cmd += ["-N", n.name]
            self._spawn(f"slurmd-{n.name}", cmd)
        self._await(self._nodes_idle, timeout, "the nodes to become idle")
        return self

    def stop(self) -> None:
        """Cancel every job, stop the daemons (TERM, then KILL), kill whatever a job left behind,
        and remove the directory."""
        if self.processes.get("slurmctld") and self.processes["slurmctld"].poll() is None:
            try:
                subprocess.run(["scancel", "--full", "--signal=KILL", "--user=root"], env=self.client_env(),
                               capture_output=True, timeout=10)
                self._await(lambda: not self._jobs_left(), 5, "the jobs to end")
            except (LocalClusterError, subprocess.TimeoutExpired):
                pass  # the sweep below takes care of them
        for name in reversed(list(self.processes)):
            proc = self.processes[name]
            if proc.poll() is None:
                proc.terminate()
        for proc in self.processes.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.processes.clear()
        self._kill_leftovers()
        if self._owns_spool:
            shutil.rmtree(self.spool, ignore_errors=True)
        if self._owns_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> "LocalSlurmCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ helpers
    def _run(self, cmd: list[str]) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.client_env(), timeout=30)
        if proc.returncode != 0:
            raise LocalClusterError(f"{cmd[0]} failed: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc

    def _spawn(self, name: str, cmd: list[str]) -> None:
        self.processes[name] = spawn(name, cmd, self.base_dir / "log" / f"{name}.out", env=self.env).proc

    def _check_alive(self) -> None:
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                tail = ""
                for f in (self.base_dir / "log" / f"{name}.out", self.base_dir / "log" / f"{name}.log"):
                    if f.exists():
                        tail += f.read_text(errors="replace")[-1500:]
                raise LocalClusterError(f"{name} exited with {proc.returncode}: {tail}")

    def _await(self, cond, timeout: float, what: str) -> None:
        try:
            wait_until(cond, timeout, what, every=0.2, check=self._check_alive)
        except TimeoutError as exc:
            raise LocalClusterError(f"{exc} (logs in {self.base_dir / 'log'})") from None

    def _jobs_left(self) -> bool:
        p = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=self.client_env(),
                           timeout=10)
        return p.returncode == 0 and bool(p.stdout.strip())

    def _kill_leftovers(self, spare: set[int] = frozenset()) -> None:
        """SIGKILL every process that still carries this cluster's SLURM_CONF (slurmstepd and job
        processes outlive slurmd with proctrack/linuxproc), except this process and its parents."""
        marker = f"SLURM_CONF={self.conf_path}".encode()
        spared = set(spare)
        pid = os.getpid()
        while pid > 1:
            spared.add(pid)
            try:
                pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                break
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in spared:
                continue
            try:
                env = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker in env:
                try:
                    os.kill(int(entry.name), 9)
                except OSError:
                    pass

    def _ctld_up(self) -> bool:
        p = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, env=self.client_env(), timeout=10)
        return p.returncode == 0 and "UP" in p.stdout

    def _nodes_idle(self) -> bool:
        p = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True,
                           env=self.client_env(), timeout=10)
        if p.returncode != 0:
            return False
        states = dict(line.split() for line in p.stdout.splitlines() if line.strip())
        return len(states) == len(self.nodes) and all(s.rstrip("*") in ("idle", "mix", "alloc") for s in states.values())


def start_local_cluster(base_dir: Path | None = None, nodes: int = 1, cpus_per_node: int | None = None) -> LocalSlurmCluster:
    """Start a private single-host Slurm and return its handle (``chatai dev --slurm`` calls this).

    The caller merges ``cluster.env`` into the environment of anything that runs Slurm
    commands and calls ``cluster.stop()`` when done.
    """
    if not slurm_installed():
        raise LocalClusterError("Slurm is not installed: apt-get install slurm-wlm munge")
    cluster = LocalSlurmCluster.create(base_dir=base_dir, nodes=nodes, cpus_per_node=cpus_per_node)
    try:
        return cluster.start()
    except BaseException:
        cluster.stop()
        raise
