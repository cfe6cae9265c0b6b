"""`herd launch --nproc N` and `herd align --nproc N`: N ranks on this machine, owned by the launching process.

These commands used to run torchrun. torchrun starts every worker in a session of its own, and the default
action of SIGTERM and SIGUSR1 kills a Python process that has not installed a handler. Killing `herd launch` with
any signal, or killing its whole process group, therefore left the ranks training on their own until the
run's end. Here the launcher starts the ranks itself, with torchrun's environment for them (RANK, LOCAL_RANK,
WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR/MASTER_PORT of a TCPStore this process serves, as torchrun's agent
does, TORCHELASTIC_USE_AGENT_STORE=True, ...), and owns them:

- A rank stays in the launcher's process group, so a signal to the group reaches it. Between fork and exec it
  asks for SIGKILL when its parent dies (PR_SET_PDEATHSIG) and then checks that the parent is still the
  launcher (the launcher may have died before the request). Set there, the request is already in force when the
  rank's first instruction runs. The launcher forks from its main thread, which lives as long as it does
  (PDEATHSIG fires when the forking *thread* ends).
- A rank ignores SIGINT and SIGHUP (a Ctrl-C in a terminal, sent to the foreground group, is the launcher's to
  handle) and starts with SIGTERM and SIGUSR1 blocked (also set before exec). PreemptionCallback unblocks them
  while the rank trains: a signal sent during start-up waits, pending, and reaches its handler when training
  starts; the rank saves at the next step end and exits 75. After training they are blocked again, so a rank
  that has saved, or finished, is not killed on its way out. A job that never saves (checkpoint.every=0) has no
  such handler: its ranks keep the default actions and a stop signal ends them.
- The launcher turns SIGTERM, SIGUSR1, SIGINT and SIGHUP into a preemption of its ranks: it sends them SIGTERM
  (SIGUSR1 for SIGUSR1), waits for them and exits with their code: 75 once they have saved, 0 if the run had
  finished anyway. It prints one line and no traceback. A second SIGINT kills the ranks at once (exit 130).
- A rank that fails (any code but 0 and 75) fails the job. The other ranks get SIGTERM and, after FAILURE_GRACE_S,
  SIGKILL, as torchrun does. A rank that blocks SIGTERM meanwhile (still starting, or done training) cannot act
  on it and is killed at once, as SIGTERM's default action would end it under torchrun (not after a stop
  request: those ranks may be saving). The launcher exits with the first failed rank's code (128 + N for a
  signal N), also when another rank had ended before it with 0 or 75.
"""

import ctypes
import errno
import os
import signal
import socket
import sys
import time
import uuid
from typing import Dict, List, Optional, Set

from engine.callbacks.preemption import PREEMPTED_EXIT_CODE
from engine.config_checks import MAX_WORLD_SIZE
from engine.errors import HerdError

PR_SET_PDEATHSIG = 1  # linux/prctl.h
STOP_SIGNALS = {signal.SIGTERM: signal.SIGTERM, signal.SIGUSR1: signal.SIGUSR1, signal.SIGINT: signal.SIGTERM,
                signal.SIGHUP: signal.SIGTERM}  # what the launcher gets -> what its ranks get
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # PreemptionCallback's
POLL_S = 0.1  # how often the ranks' state is looked at (torchrun's monitor interval)
FAILURE_GRACE_S = 30.0  # a failed rank's peers: SIGTERM, then SIGKILL after this long (torchrun's default)
MAX_LOCAL_RANKS = 1024  # processes one `herd launch --nproc` starts on this machine
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def launcher_exit_code(first: int) -> int:
    """The code a launcher exits with, from the exit status of the rank that decides it (the first to fail, else
    the first to end; negative: killed by that signal, as Popen and torchrun report it). 0, and 75 (preempted, saved: requeue), pass through; a rank killed
    by signal N gives 128 + N, as a shell reports it; any other failure its own code. Shared with the SLURM agent."""
    return 128 - first if first < 0 else first


def _describe(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"


def _blocks(pid: int, sig: int) -> bool:
    """Whether the process's main thread blocks `sig` (SigBlk of /proc/PID/status: the thread that runs Python's
    handlers, and the one PreemptionCallback unblocks); False if that cannot be read (the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            mask = next(int(line.split()[1], 16) for line in status if line.startswith("SigBlk:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return False
    return bool(mask >> (int(sig) - 1) & 1)


def _rank_preexec(launcher_pid: int, prctl, preemptible: bool):
    """Runs in each rank between fork and exec (little work: the launcher has other threads). The death signal,
    the ignored signals and the blocked ones all survive exec."""

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != launcher_pid:  # the launcher died before the request: it would never fire
            os.kill(os.getpid(), signal.SIGKILL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        if preemptible:
            signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)

    return preexec


def rank_env(base: Dict[str, str], rank: int, nproc: int, port: int, run_id: str) -> Dict[str, str]:
    """torchrun's variables for a rank of a one-machine run (torch/distributed/elastic/agent/server/
    local_elastic_agent.py), so that herd's ranks cannot tell this launcher from torchrun."""
    return {**base, "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "ROLE_RANK": str(rank),
            "ROLE_NAME": "default", "LOCAL_WORLD_SIZE": str(nproc), "WORLD_SIZE": str(nproc),
            "GROUP_WORLD_SIZE": "1", "ROLE_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0",
            "TORCHELASTIC_RUN_ID": run_id, "TORCHELASTIC_USE_AGENT_STORE": "True",
            "TORCH_NCCL_ASYNC_ERROR_HANDLING": base.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")}


class LocalRanks:
    """The ranks of one local run, their signals and their end (see the module docstring)."""

    def __init__(self, nproc: int, herd_args: List[str], env: Dict[str, str], name: str, preemptible: bool):
        self.nproc, self.herd_args, self.env, self.name = nproc, herd_args, env, name
        self.preemptible = preemptible
        self.procs: List = []
        self.pending: List[int] = []  # signals received, handled by the wait loop (a handler only appends)
        self.stop_signal: Optional[int] = None  # what the ranks are sent after a stop request
        self.killed = False
        self.unable: Set[int] = set()  # ranks killed after a failure because they blocked SIGTERM

    def run(self) -> int:
        import subprocess
        import torch.distributed as dist
        previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        try:
            # the store outlives the ranks: they reach it through MASTER_PORT (agent store, as under torchrun)
            store = dist.TCPStore("127.0.0.1", 0, is_master=True, multi_tenant=True)
            preexec = _rank_preexec(os.getpid(), ctypes.CDLL(None, use_errno=True).prctl, self.preemptible)
            run_id = uuid.uuid4().hex
            for rank in range(self.nproc):
                self.procs.append(subprocess.Popen([sys.executable, "-m", "launch", *self.herd_args],
                                                   env=rank_env(self.env, rank, self.nproc, store.port, run_id),
                                                   preexec_fn=preexec))
            code = self._wait()
            del store
            return code
        finally:
            self._kill_all()  # only ranks still alive: an exception here (or in Popen) leaves none behind
            # after a stop request only this process's exit is left: a repeated Ctrl-C must not turn the ranks'
            # 75 into a death by SIGINT during the interpreter's teardown
            for sig, handler in previous.items():
                signal.signal(sig, handler if self.stop_signal is None else signal.SIG_IGN)

    def _on_signal(self, signum: int, frame) -> None:
        self.pending.append(signum)

    def _handle_pending(self) -> None:
        while self.pending:
            signum = self.pending.pop(0)
            name = signal.Signals(signum).name
            if signum == signal.SIGINT and self.stop_signal is not None:
                print(f"{self.name}: {name} again: killing the ranks", file=sys.stderr, flush=True)
                self.killed = True
                self._kill_all()
            elif self.stop_signal is None:
                self.stop_signal = STOP_SIGNALS[signum]
                then = (f"the ranks save at their next step end and exit {PREEMPTED_EXIT_CODE}" if self.preemptible
                        else f"checkpoint.every=0, nothing to save: the ranks end by {self.stop_signal.name}")
                again = " (SIGINT again kills them)" if signum == signal.SIGINT else ""
                print(f"{self.name}: {name} received: {then}{again}", file=sys.stderr, flush=True)
                self._send(self.stop_signal)

    def _send(self, sig: int) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(sig)

    def _kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            proc.wait()

    def _wait(self) -> int:
        """Until every rank has ended. The launcher's code is the first failure's (the lowest rank on a tie) if a
        rank failed, else the first rank to end's: 0, or 75 when the ranks saved after a stop."""
        first: Optional[int] = None
        failure: Optional[int] = None
        failed_at: Optional[float] = None
        while True:
            self._handle_pending()
            codes = [proc.poll() for proc in self.procs]
            ended = [(rank, code) for rank, code in enumerate(codes) if code is not None]
            if first is None and ended:
                first = ended[0][1]
            failed = next(((r, c) for r, c in ended if c not in self._expected()), None)
            if failed is not None and failure is None and not self.killed:
                failure, failed_at = failed[1], time.monotonic()
                print(f"{self.name}: rank {failed[0]} {_describe(failure)}: stopping the other ranks",
                      file=sys.stderr, flush=True)
                self._send(signal.SIGTERM)
            if failure is not None and self.stop_signal is None:
                self._kill_unable_to_stop()
            if len(ended) == self.nproc:
                break
            if failed_at is not None and time.monotonic() - failed_at > FAILURE_GRACE_S:
                self._kill_all()
            time.sleep(POLL_S)
        return self._report(first if failure is None else failure)

    def _kill_unable_to_stop(self) -> None:
        """After a rank failed (not a stop request): a rank that blocks SIGTERM (still starting, or done training: the
        module docstring) cannot act on the SIGTERM it was sent, and would hold the job for
        FAILURE_GRACE_S; SIGTERM's default action would end it at once (as under torchrun), so SIGKILL it now."""
        for rank, proc in enumerate(self.procs):
            if rank not in self.unable and proc.poll() is None and _blocks(proc.pid, signal.SIGTERM):
                self.unable.add(rank)
                print(f"{self.name}: rank {rank} is not training (SIGTERM blocked): killing it", file=sys.stderr,
                      flush=True)
                proc.kill()

    def _expected(self) -> tuple:
        """How a rank may end without failing the job: finished, preempted and saved, or (a job that does not
        save) ended by the stop signal it was sent."""
        stopped = (-self.stop_signal,) if self.stop_signal is not None and not self.preemptible else ()
        return (0, PREEMPTED_EXIT_CODE, *stopped)

    def _report(self, first: int) -> int:
        if self.killed:
            return 130
        if first == PREEMPTED_EXIT_CODE:
            print(f"{self.name}: the ranks saved and exited with {first} (preempted): run the same command again "
                  f"to resume", file=sys.stderr, flush=True)
        elif first < 0 and first in self._expected():
            print(f"{self.name}: the ranks ended by {signal.Signals(-first).name} (nothing saved)", file=sys.stderr,
                  flush=True)
        return launcher_exit_code(first)


def check_nproc(nproc: int) -> None:
    if not 1 <= nproc <= MAX_LOCAL_RANKS:
        raise HerdError(f"--nproc must be between 1 and {MAX_LOCAL_RANKS:,} (processes on this machine), got {nproc}")


def run_local(nproc: int, herd_args: List[str], name: str, preemptible: bool) -> int:
    """`herd HERD_ARGS` on `nproc` local ranks (see the module docstring); returns the launcher's exit code.
    `preemptible`: the ranks save and exit 75 on SIGTERM/SIGUSR1 (PreemptionCallback: checkpoint.every > 0)."""
    check_nproc(nproc)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return LocalRanks(nproc, herd_args, env, name, preemptible).run()


def _whole(env: Dict[str, str], key: str) -> Optional[int]:
    text = env.get(key)
    if text is None:
        return None
    if not text.strip().isdigit():
        raise HerdError(f"{key}={text!r} in the environment is not a whole number >= 0 (a launcher sets it: "
                        f"torchrun, srun, herd launch)")
    return int(text)


def check_rank_environment(env: Dict[str, str]) -> int:
    """The world size this process is a rank of, from the variables a launcher sets (rank_env); an environment no
    launcher would set is refused in one line naming the variables, before anything starts: a stray RANK=1 made a
    single-process run rank 1 of 1, which trained writing no logs; WORLD_SIZE=2 without RANK or MASTER_PORT ended
    in torch's traceback."""
    rank, world = _whole(env, "RANK"), _whole(env, "WORLD_SIZE")
    local, local_world = _whole(env, "LOCAL_RANK"), _whole(env, "LOCAL_WORLD_SIZE")
    if world is not None and not 1 <= world <= MAX_WORLD_SIZE:
        raise HerdError(f"WORLD_SIZE={world} in the environment: must be between 1 and {MAX_WORLD_SIZE:,}")
    if rank is not None and rank > 0 and world is None:
        raise HerdError(f"RANK={rank} is set in the environment but WORLD_SIZE is not: unset RANK for a "
                        f"single-process run, or start the ranks with a launcher (herd launch --nproc, torchrun)")
    if world is not None and world > 1 and rank is None:
        raise HerdError(f"WORLD_SIZE={world} is set in the environment but RANK is not: a launcher sets both")
    if rank is not None and world is not None and rank >= world:
        raise HerdError(f"RANK={rank} is not below WORLD_SIZE={world} (set in the environment): ranks are 0 to "
                        f"WORLD_SIZE - 1")
    if local is not None and local_world is not None and local >= local_world:
        raise HerdError(f"LOCAL_RANK={local} is not below LOCAL_WORLD_SIZE={local_world} (set in the environment)")
    if local_world is not None and world is not None and local_world > world:
        raise HerdError(f"LOCAL_WORLD_SIZE={local_world} exceeds WORLD_SIZE={world} (set in the environment)")
    if (world or 1) > 1:
        missing = [key for key in ("MASTER_ADDR", "MASTER_PORT") if not env.get(key)]
        if missing:
            raise HerdError(f"{' and '.join(missing)} not set in the environment: rank {rank} of WORLD_SIZE={world} "
                            f"needs the address and port of rank 0's rendezvous")
        port = _whole(env, "MASTER_PORT")
        if not 1 <= port <= 65535:
            raise HerdError(f"MASTER_PORT={port} in the environment: a TCP port is 1 to 65535")
    return world or 1


def check_master_port(env: Dict[str, str]) -> None:
    """Rank 0 of a multi-process run serves the rendezvous store on MASTER_PORT unless its launcher serves it
    (herd launch --nproc and torchrun do: TORCHELASTIC_USE_AGENT_STORE=True). A port another process holds ended in
    torch's TCPStore traceback: refused here in one line. Call after check_rank_environment."""
    if int(env.get("WORLD_SIZE", "1")) < 2 or int(env.get("RANK", "0")) != 0 \
            or env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return
    port = int(env["MASTER_PORT"])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the store: a closed port in TIME_WAIT is free
        try:
            probe.bind(("", port))
        except OSError as e:
            why = ("is already in use on this host (another job, or a process left from an earlier run, listens "
                   "there)" if e.errno == errno.EADDRINUSE else f"cannot be listened on ({e.strerror or e})")
            raise HerdError(f"MASTER_PORT={port}: the port {why}; rank 0 serves the rendezvous there: choose "
                            f"another MASTER_PORT") from None
