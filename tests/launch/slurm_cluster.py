"""A real one-node SLURM cluster on localhost, for tests (Debian `slurm-wlm` + `munge`).

Everything lives in a private temp dir with its own munge socket, ports and spool dirs, so it never
touches a system SLURM and several clusters can run side by side. Client commands find it through
`SLURM_CONF` (see `SlurmCluster.env`); jobs inherit that, so `scontrol` inside a job works too.

Use as a fixture from a conftest::

    @pytest.fixture(scope="session")
    def slurm_cluster():
        with start_slurm_cluster() as cluster:
            yield cluster
"""

from __future__ import annotations

import contextlib
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
# Terminal from the test's point of view; a requeued job passes through PENDING again, not these.
FINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "DEADLINE"}
) | {"BOOT_FAIL"}


class SlurmClusterError(RuntimeError):
    """The cluster did not come up, or a command or job went wrong; the message holds the daemon logs."""


@dataclass
class SlurmCluster:
    """Handle on a running cluster.

    Args:
        root: temp dir holding slurm.conf, the munge key/socket, spool dirs and daemon logs.
        partition: the only (default) partition.
        procs: the daemons this handle owns (munged, slurmctld, slurmd).
    """

    root: Path
    partition: str = "debug"
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """os.environ plus SLURM_CONF: pass as `env=` to anything that talks to this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """Runs a SLURM client command against this cluster and returns its (text) result."""
        result = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise SlurmClusterError(f"{shlex.join(argv)} exited {result.returncode}:\n{result.stderr}")
        return result

    def job(self, jobid: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); works without slurmdbd
        because MinJobAge keeps finished jobs in slurmctld's memory."""
        out = self.run("scontrol", "show", "job", "--oneliner", str(jobid)).stdout
        info: dict[str, str] = {}
        # Free-text fields (Reason, Command with the job's arguments) may hold spaces and "k=v"
        # lookalikes; they come after the state fields, so the first occurrence of a key wins.
        for item in out.split():
            key, sep, value = item.partition("=")
            if sep:
                info.setdefault(key, value)
        return info

    def wait_for_job(self, jobid: str, states: Iterable[str], timeout: float = 60) -> dict[str, str]:
        """Polls until the job's JobState is one of `states`; fails with the job record and logs if
        it reaches a different final state or the timeout passes.

        Args:
            jobid: the job id as printed by `sbatch --parsable`.
            states: wanted JobState values, e.g. {"RUNNING"} or {"COMPLETED"}.
            timeout: seconds to wait.
        """
        states = set(states)
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(jobid)
            state = info.get("JobState", "")
            if state in states:
                return info
            if state in FINAL_STATES or time.monotonic() > deadline:
                raise SlurmClusterError(
                    f"job {jobid} is {state}, wanted {sorted(states)}: {info}\n" + self.logs()
                )
            time.sleep(0.2)

    def logs(self) -> str:
        """The daemon logs, for failure messages."""
        parts = []
        for daemon in ("munged", "slurmctld", "slurmd"):
            for name in (f"{daemon}.log", f"{daemon}.stderr"):
                path = self.root / name
                text = path.read_text(errors="replace")[-6000:] if path.exists() else ""
                if text.strip():
                    parts.append(f"----- {name} -----\n{text}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancels every job, stops the daemons this handle started and deletes the temp dir."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            _cancel_all_jobs(self)
        # slurmd before slurmctld (it reports to it), munged last (both authenticate through it).
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is not None:
                _terminate(proc)
        shutil.rmtree(self.root, ignore_errors=True)


def _cancel_all_jobs(cluster: SlurmCluster, timeout: float = 15) -> None:
    # slurmstepd outlives slurmd, so jobs must be gone before the daemons stop or their
    # processes would leak past the test.
    jobs = cluster.run("squeue", "--noheader", "--format=%i", check=False).stdout.split()
    if jobs:
        cluster.run("scancel", *jobs, check=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = cluster.run("squeue", "--noheader", "--states=all", "--format=%T", check=False).stdout
        if not set(out.split()) & {"RUNNING", "COMPLETING", "SUSPENDED", "CONFIGURING"}:
            return
        time.sleep(0.2)


def _terminate(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_line() -> str:
    # `slurmd -C` prints the NodeName line slurmd itself will check against: configuring more
    # CPUs or memory than it finds would drain the node ("Low RealMemory").
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    return out.splitlines()[0] + " State=UNKNOWN"


def _slurm_conf(root: Path, partition: str) -> str:
    host = socket.gethostname().split(".")[0]
    lines = [
        "ClusterName=testcluster",
        # Job ids seed train.sbatch's rendezvous port: distinct ids keep two clusters running side
        # by side (parallel test sessions) off each other's ports.
        f"FirstJobId={random.randrange(1000, 10**6)}",
        f"SlurmctldHost={host}",
        f"SlurmctldPort={_free_port()}",
        f"SlurmdPort={_free_port()}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # cred_expire is also how long a requeued job waits before it may start again (default 120s).
        f"AuthInfo=socket={root / 'munge.sock'},cred_expire=10",
        f"StateSaveLocation={root / 'ctld'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'slurmd.log'}",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        # Containers have no usable cgroup hierarchy: track processes by parent pid, bind nothing.
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/backfill",
        # A requeued job becoming eligible is no scheduling event; poll often instead of every 60s.
        "SchedulerParameters=sched_interval=1,bf_interval=1",
        "MpiDefault=none",
        "MailProg=/bin/true",
        "JobRequeue=1",
        "ReturnToService=2",
        # No slurmdbd (sacct is unavailable): finished jobs must stay in `scontrol show job`.
        "MinJobAge=3600",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "JobAcctGatherType=jobacct_gather/none",
        "KillWait=5",
        "SlurmdTimeout=30",
        "InactiveLimit=0",
        _node_line(),
        f"PartitionName={partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
    ]
    return "\n".join(lines) + "\n"


def missing_binaries() -> list[str]:
    """The SLURM/munge programs not on PATH (the only reason to skip rather than fail)."""
    return [name for name in BINARIES if shutil.which(name) is None]


def _start_munged(root: Path) -> subprocess.Popen:
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    argv = ["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={root / 'munge.sock'}"]
    argv += [f"--pid-file={root / 'munged.pid'}", f"--log-file={root / 'munged.log'}"]
    argv += [f"--seed-file={root / 'munged.seed'}"]
    return _spawn(root, "munged", argv)


def _spawn(root: Path, name: str, argv: list[str]) -> subprocess.Popen:
    # A daemon that dies before opening its log file (bad config, missing plugin) only says why
    # on stderr; keep that for the failure message.
    with open(root / f"{name}.stderr", "wb") as err:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT)


def _wait(cluster: SlurmCluster, what: str, ready, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        # A dead daemon first: asking a dead slurmctld (sinfo) takes seconds of retries.
        dead = [name for name, proc in cluster.procs.items() if proc.poll() is not None]
        if not dead and ready():
            return
        if dead or time.monotonic() > deadline:
            why = f"{', '.join(dead)} exited" if dead else f"timed out after {timeout:.0f}s"
            raise SlurmClusterError(f"SLURM test cluster: {what} ({why})\n{cluster.logs()}")
        time.sleep(0.2)


def _node_idle(cluster: SlurmCluster) -> bool:
    result = cluster.run("sinfo", "--noheader", "--format=%T", check=False, timeout=10)
    return result.returncode == 0 and result.stdout.split() == ["idle"]


@contextlib.contextmanager
def start_slurm_cluster(partition: str = "debug", timeout: float = 60) -> Iterator[SlurmCluster]:
    """Starts munged, slurmctld and slurmd on localhost and yields a `SlurmCluster` once the node
    is idle; stops everything and deletes the temp dir on exit.

    Calls pytest.skip when the binaries are missing (`apt-get install slurm-wlm munge`); raises
    `SlurmClusterError` with the daemon logs when they are installed but do not come up.

    Args:
        partition: name of the single default partition.
        timeout: seconds to wait for the node to become idle.
    """
    missing = missing_binaries()
    if missing:
        pytest.skip(f"SLURM not installed (missing {', '.join(missing)}; apt-get install slurm-wlm munge)")
    # Not pytest's tmp_path: munged wants a socket dir everyone may traverse (pytest's are 0700),
    # and a unix socket path must stay under 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="slurm-"))
    root.chmod(0o755)
    cluster = SlurmCluster(root=root, partition=partition)
    try:
        for sub in ("ctld", "spool"):
            (root / sub).mkdir()
        cluster.procs["munged"] = _start_munged(root)
        _wait(cluster, "munged socket", (root / "munge.sock").exists, timeout=10)
        cluster.conf.write_text(_slurm_conf(root, partition))
        conf = ["-f", str(cluster.conf)]
        cluster.procs["slurmctld"] = _spawn(root, "slurmctld", ["slurmctld", "-D", "-i", *conf])
        cluster.procs["slurmd"] = _spawn(root, "slurmd", ["slurmd", "-D", *conf])
        _wait(cluster, "node idle in sinfo", lambda: _node_idle(cluster), timeout=timeout)
        yield cluster
    finally:
        cluster.stop()
