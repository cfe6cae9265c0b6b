"""A real one-node SLURM cluster for the tests: Debian's slurmctld, slurmd and munge, started as root without
systemd, everything (config, keys, state, logs, sockets) under one directory.

`slurm_cluster` is a session-scoped pytest fixture: it installs the packages when the daemons are missing, writes a
slurm.conf for this host, starts munged, slurmctld and slurmd as background processes and waits until the node is
idle; at the end of the session it stops the daemons it started (by their pid files). A cluster that an earlier
session of this fixture left running (same directory, same slurm.conf, live daemons, node answering) is reused and
left alone.

The issue requires the real cluster, so anything that prevents it (no root, no package, a daemon that does not
come up) fails the tests with the reason and the daemon's log tail; it never skips.

Ports 16817/16818 (not SLURM's defaults) keep it clear of any other SLURM on the machine; every client command
must see SLURM_CONF (the fixture's `env`).
"""

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "munged", "sbatch", "scontrol", "squeue", "scancel", "srun")
DAEMON_PATHS = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")
CTLD_PORT, SLURMD_PORT = 16817, 16818


# Every wait in these tests is for a state (a job state, a node state, a line in a job's output); this is only the
# hang guard that turns a hung cluster or job into a failure, generous because a loaded 2-core machine is slow.
HANG_GUARD_S = 900.0
POLL_S = 0.2


class ClusterError(RuntimeError):
    """The cluster could not be installed or started; the message says which step and why."""


def wait_until(condition: Callable[[], bool], what: Callable[[], str], timeout: float = HANG_GUARD_S) -> None:
    """Poll `condition` until it holds. A query that fails meanwhile (slurmctld busy on a loaded machine: a client
    timeout, a refused connection) is retried; only the hang guard ends the wait, naming what was awaited and the
    last error."""
    deadline = time.monotonic() + timeout
    error = ""
    while True:
        try:
            if condition():
                return
            error = ""
        except (ClusterError, subprocess.SubprocessError) as e:
            error = f"; last query failed: {e}"
        if time.monotonic() > deadline:
            raise ClusterError(f"still waiting after {timeout:.0f} s (hang guard) for {what()}{error}")
        time.sleep(POLL_S)


@dataclass
class Cluster:
    root: Path
    node: str
    cpus: int
    env: Dict[str, str] = field(default_factory=dict)  # os.environ plus SLURM_CONF and PATH with the daemons
    started: List[str] = field(default_factory=list)  # pid files of the daemons this process started

    def run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        """A client command; `timeout` is a hang guard (slurm.conf's MessageTimeout bounds each RPC below it)."""
        result = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise ClusterError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def job(self, job_id: int) -> Dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...); kept for MinJobAge after the end."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def node_state(self) -> str:
        """The node's state as sinfo prints it (idle, mixed, allocated, completing, ...), without the flag marks."""
        return self.run("sinfo", "-h", "-N", "-o", "%T").stdout.strip().rstrip("*~#$@+-^!")

    def wait_for(self, job_id: int, states: tuple, timeout: float = HANG_GUARD_S, done=None) -> Dict[str, str]:
        """Wait until the job is in one of `states` (and `done(info)` holds, if given); the state reported by
        `scontrol show job` is what counts. A timeout here is a hung job, reported with its state."""
        last: Dict[str, str] = {}

        def reached() -> bool:
            last.clear()
            last.update(self.job(job_id))
            return last.get("JobState") in states and (done is None or done(last))

        wait_until(reached, lambda: f"job {job_id} in {states} (it is {last.get('JobState')}, reason "
                                    f"{last.get('Reason')}, restarts {last.get('Restarts')})", timeout)
        return dict(last)

    def log_tail(self, lines: int = 15) -> str:
        parts = []
        for name in ("munged.log", "slurmctld.log", "slurmd.log"):
            path = self.root / name
            if path.exists():
                parts.append(f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(parts)


def _which(name: str) -> Optional[str]:
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), *DAEMON_PATHS]))


def ensure_installed() -> None:
    """apt-get install Debian's packages when a binary is missing (root only; waits for a held dpkg lock)."""
    missing = [b for b in BINARIES if _which(b) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise ClusterError(f"{', '.join(missing)} not installed and not root, so apt-get cannot install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=600",
               *PACKAGES]
    result = subprocess.run(install, env=env, capture_output=True, text=True)
    if result.returncode != 0:  # a stale package index: refresh once and retry
        subprocess.run(["apt-get", "update", "-q", "-o", "DPkg::Lock::Timeout=600"], env=env, capture_output=True)
        result = subprocess.run(install, env=env, capture_output=True, text=True)
    still = [b for b in BINARIES if _which(b) is None]
    if result.returncode != 0 or still:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise ClusterError(f"apt-get install {' '.join(PACKAGES)} failed (exit {result.returncode}; missing "
                           f"{', '.join(still) or 'none'}): {' | '.join(tail)}")


def config_text(root: Path, node: str, cpus: int) -> str:
    """slurm.conf for one node with this machine's CPUs; no cgroups, no accounting daemon, root everywhere."""
    return "\n".join([
        "ClusterName=herdtest",
        f"SlurmctldHost={node}(127.0.0.1)",
        f"SlurmctldPort={CTLD_PORT}",
        f"SlurmdPort={SLURMD_PORT}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={root}/munge.socket",
        f"StateSaveLocation={root}/ctld",
        f"SlurmdSpoolDir={root}/slurmd",
        f"SlurmctldPidFile={root}/slurmctld.pid",
        f"SlurmdPidFile={root}/slurmd.pid",
        f"SlurmctldLogFile={root}/slurmctld.log",
        f"SlurmdLogFile={root}/slurmd.log",
        "ProctrackType=proctrack/linuxproc",  # no cgroups here; tracks a step's whole process tree
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/backfill",
        "MpiDefault=none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "ReturnToService=2",
        "MinJobAge=3600",  # finished jobs stay visible to `scontrol show job` (there is no slurmdbd for sacct)
        # Generous limits, so that a loaded machine (the full suite on 2 busy cores) slows the jobs down but never
        # fails them: an RPC's reply (default 10 s), a batch script's launch (default 10 s), the grace between
        # SIGTERM and SIGKILL (a rank that saved and is shutting down must not be killed: its exit 75 would turn
        # into 137 and nothing would be requeued), a step that is slow to die (default 60 s: the node drains)
        "MessageTimeout=60",
        "BatchStartTimeout=300",
        "KillWait=120",
        "UnkillableStepTimeout=300",
        "SlurmdTimeout=300",
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
        f"PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE",
        "",
    ])


def _alive(pid_file: Path) -> bool:
    """The pid file's process runs. A daemon's parent is init, which in a container may never reap it: a zombie
    (state Z in /proc) counts as stopped."""
    try:
        stat = Path(f"/proc/{int(pid_file.read_text().strip())}/stat").read_text()
    except (OSError, ValueError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _start(cluster: Cluster, args: List[str], pid_file: Path) -> None:
    result = subprocess.run(args, env=cluster.env, capture_output=True, text=True, timeout=120)
    try:
        wait_until(lambda: _alive(pid_file), lambda: f"{pid_file.name} to name a live process", timeout=300)
    except ClusterError as e:
        raise ClusterError(f"{' '.join(args)} did not start (exit {result.returncode}: {result.stderr.strip()}): "
                           f"{e}\n{cluster.log_tail()}") from None
    cluster.started.append(str(pid_file))


def _node_up(cluster: Cluster) -> bool:
    result = cluster.run("sinfo", "-h", "-N", "-o", "%T", check=False)
    return result.returncode == 0 and result.stdout.strip().rstrip("*") in ("idle", "mixed", "allocated")


def start_cluster(root: Optional[Path] = None) -> Cluster:
    """Install if needed, then start (or reuse) the one-node cluster under `root`."""
    ensure_installed()
    root = Path(root or Path(tempfile.gettempdir()) / f"herd-slurm-{os.getuid()}")
    node = socket.gethostname().split(".")[0]
    sbin = os.pathsep.join(DAEMON_PATHS)
    cluster = Cluster(root, node, os.cpu_count() or 1,
                      env={**os.environ, "SLURM_CONF": str(root / "slurm.conf"),
                           "PATH": f"{os.environ.get('PATH', '')}{os.pathsep}{sbin}"})
    pids = [root / n for n in ("munged.pid", "slurmctld.pid", "slurmd.pid")]
    conf = root / "slurm.conf"
    same_config = conf.is_file() and conf.read_text() == config_text(root, node, cluster.cpus)
    if same_config and all(_alive(p) for p in pids) and _node_up(cluster):
        print(f"slurm_cluster: reusing the running cluster in {root}")
        return cluster
    stop_cluster(Cluster(root, node, cluster.cpus, cluster.env, [str(p) for p in pids]))  # half-dead leftovers
    if root.exists():
        shutil.rmtree(root)
    for sub in ("ctld", "slurmd", "munge"):
        (root / sub).mkdir(parents=True)
    root.chmod(0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    conf.write_text(config_text(root, node, cluster.cpus))
    _start(cluster, [_which("munged"), "--force", f"--key-file={key}", f"--socket={root}/munge.socket",
                     f"--pid-file={root}/munged.pid", f"--log-file={root}/munged.log",
                     f"--seed-file={root}/munge/munged.seed"], root / "munged.pid")
    _start(cluster, [_which("slurmctld"), "-i"], root / "slurmctld.pid")
    _start(cluster, [_which("slurmd"), "-N", node], root / "slurmd.pid")
    try:
        wait_until(lambda: _node_up(cluster), lambda: f"node {node} to come up", timeout=300)
    except ClusterError as e:
        state = cluster.run("sinfo", "-h", "-N", "-o", "%T %E", check=False).stdout.strip()
        stop_cluster(cluster)
        raise ClusterError(f"node {node} did not become idle (sinfo: {state!r}): {e}\n{cluster.log_tail()}") from None
    print(f"slurm_cluster: started munged, slurmctld and slurmd in {root} (node {node}, {cluster.cpus} CPUs)")
    return cluster


def stop_cluster(cluster: Cluster) -> None:
    """Stop the daemons this process started, newest first, by their pid files."""
    for pid_file in reversed(cluster.started):
        try:
            pid = int(Path(pid_file).read_text().strip())
            os.kill(pid, 15)
        except (OSError, ValueError):
            continue
        try:  # the guard only bounds teardown: a daemon that ignores SIGTERM is left to the next session's cleanup
            wait_until(lambda: not _alive(Path(pid_file)), lambda: f"{pid_file} to stop", timeout=60)
        except ClusterError:
            pass
    cluster.started.clear()


@pytest.fixture(scope="session")
def slurm_cluster():
    try:
        cluster = start_cluster()
    except (ClusterError, OSError, subprocess.SubprocessError) as e:
        pytest.fail(f"the one-node SLURM cluster could not be started: {e}", pytrace=False)
    yield cluster
    stop_cluster(cluster)
