"""A real one-node Slurm cluster on 127.0.0.1 for the tests and the bench: its own munged (own socket),
slurmctld and slurmd from Debian's slurm-wlm, a generated cgroup-free slurm.conf, all under one temp
dir, stopped (by their own process ids) afterwards.

Partitions: `debug` (default, up) and `held` (down: a job sent there stays pending).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "srun")
KEY = Path("/etc/munge/munge.key")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024 - 512
    return 2048


class LoopbackCluster:
    """`start()` → `env` (SLURM_CONF for the clients) → `stop()`."""

    def __init__(self, root: Path, cpus: int | None = None, scheduler_parameters: str | None = None):
        self.root = root
        self.scheduler_parameters = scheduler_parameters   # e.g. README's batch_sched_delay=0 (None: Slurm's defaults)
        self.node = socket.gethostname().split(".")[0]
        self.cpus = cpus or max(2, os.cpu_count() or 2)
        self.conf = root / "slurm.conf"
        self.munge_socket = root / "munge" / "munge.socket"
        self.procs: list[subprocess.Popen] = []

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def write_conf(self) -> None:
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        r = self.root
        self.conf.write_text(f"""\
ClusterName=envmgr-test
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
{f"SchedulerParameters={self.scheduler_parameters}" if self.scheduler_parameters else ""}
KillWait=60
InactiveLimit=0
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={_memory_mb()} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
PartitionName=held Nodes={self.node} Default=NO MaxTime=INFINITE State=DOWN
""")

    def start(self, timeout: float = 60.0) -> LoopbackCluster:
        missing = [t for t in TOOLS if not shutil.which(t)]
        if missing:
            raise RuntimeError(f"Slurm tools missing: {', '.join(missing)} (apt-get install slurm-wlm munge; "
                               "`make host-tools` does it)")
        self.write_conf()
        logs = open(self.root / "log" / "daemons.out", "ab")
        munged = shutil.which("munged") or "munged"
        self.procs.append(subprocess.Popen(
            [munged, "--foreground", "--force", f"--socket={self.munge_socket}", f"--key-file={KEY}",
             f"--pid-file={self.root / 'munge' / 'munged.pid'}", f"--log-file={self.root / 'log' / 'munged.log'}",
             f"--seed-file={self.root / 'munge' / 'seed'}"], stdout=logs, stderr=logs, start_new_session=True))
        self._wait(lambda: self.munge_socket.exists(), timeout, "munged")
        env = {**os.environ, **self.env}
        self.procs.append(subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(self.conf)], stdout=logs,
                                           stderr=logs, env=env, start_new_session=True))
        self.procs.append(subprocess.Popen(["slurmd", "-D", "-f", str(self.conf), "-N", self.node], stdout=logs,
                                           stderr=logs, env=env, start_new_session=True))
        self._wait(self._node_idle, timeout, "slurmd (node idle)")
        return self

    def _node_idle(self) -> bool:
        proc = subprocess.run(["sinfo", "-h", "-p", "debug", "-o", "%t"], capture_output=True, text=True,
                              env={**os.environ, **self.env})
        return proc.returncode == 0 and proc.stdout.strip().startswith(("idle", "mix", "alloc"))

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[0]} exited {proc.returncode}; logs in {self.root / 'log'}")
            time.sleep(0.2)
        raise RuntimeError(f"{what} not ready within {timeout:.0f} s; logs in {self.root / 'log'}")

    def cancel_all(self) -> None:
        subprocess.run(["scancel", "--full", "-p", "debug,held", "-u", str(os.getuid())],
                       env={**os.environ, **self.env}, capture_output=True)

    def _queue_empty(self) -> bool:
        proc = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True,
                              env={**os.environ, **self.env})
        return proc.returncode != 0 or not proc.stdout.strip()

    def stop(self) -> None:
        if self.procs:
            self.cancel_all()
            # jobs' slurmstepd processes outlive a stopped slurmd: let the cancelled jobs end first
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not self._queue_empty():
                time.sleep(0.3)
        for proc in reversed(self.procs):   # slurmd, slurmctld, then munged: each by its own pid
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()


@pytest.fixture(scope="session")
def slurm_cluster():
    """One cluster for the whole test session; stopped at its end. Fails (never skips) without Slurm."""
    root = Path(tempfile.mkdtemp(prefix="envmgr-slurm-"))
    cluster = LoopbackCluster(root).start()
    yield cluster
    cluster.stop()
    shutil.rmtree(root, ignore_errors=True)
