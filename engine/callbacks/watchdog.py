"""Hang watchdog (shared/TESTING.md R10): a heartbeat per rank, and on a hang a dump from every rank plus one
merged report that names the stuck rank and the collective, then a distinct exit code so the launcher ends the job.

Each rank runs one thread that never takes part in a collective (a collective from a side thread could itself
hang, or interleave with the training thread's). It reads what the training thread left behind: the step and
section set by this callback's hooks, and the collective recorder (parallel/flight_recorder.py), which notes every
`torch.distributed` call on entry and return. Progress is any of those changing; every `heartbeat_every` seconds
the thread writes <run>/heartbeat/rank<r>.json.

A hang is declared by the first of:
- the thread: no progress for `watchdog.timeout` seconds (a rank stuck in compute, a sleep, a dead peer's
  collective that never returns);
- the training thread: a collective raised (gloo's timeout after `watchdog.collective_timeout`, a peer that closed
  its connection); on NCCL the backend's own watchdog aborts the process at the collective timeout, so the
  heartbeat timeout should be the shorter one there;
- another rank: it created <run>/hang/TRIGGER (seen at the next heartbeat).
Then every rank writes <run>/hang/rank<r>.txt (headline, last collectives, torch's flight recorder where present,
Python stacks of all threads via faulthandler) and rank<r>.json; the rank that created TRIGGER waits up to
`dump_wait` seconds for the others' dumps, merges them with the heartbeats into <run>/hang/report.txt, and every
rank exits with HANG_EXIT_CODE once the report exists (or the wait ran out).
"""

import faulthandler
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch.distributed as dist

from engine.callbacks.base import Callback
from engine.files import aside_name, write_atomic
from engine.secrets import scrub
from parallel.flight_recorder import CollectiveRecorder, describe_ranks, format_entry, torch_flight_recorder

HANG_EXIT_CODE = 86  # not a sysexits.h code nor 128+signal: "the watchdog ended this rank after a hang"
TRIGGER = "TRIGGER"


def _fault_hang(rank: int, step: int) -> None:
    """Fault injection for R10: HERD_FAULT=hang:<rank>:<step> makes that rank sleep (HERD_FAULT_HANG_S, default an
    hour) at the start of that step, before the step's first collective. Unset, this is one dictionary lookup."""
    spec = os.environ.get("HERD_FAULT", "")
    if spec.startswith("hang:") and spec.split(":")[1:] == [str(rank), str(step)]:
        print(f"HERD_FAULT: rank {rank} hangs before the collectives of step {step}", file=sys.stderr, flush=True)
        time.sleep(float(os.environ.get("HERD_FAULT_HANG_S", "3600")))


def _write_json(path: Path, data: dict) -> None:
    """Atomically (a reader on another host never sees half a file)."""
    write_atomic(path, scrub(json.dumps(data, default=str)), sync=False)


class WatchdogCallback(Callback):
    def __init__(self, cfg, run_dir: Path, rank: int, world_size: int):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.heartbeat_dir, self.hang_dir = run_dir / "heartbeat", run_dir / "hang"
        self.recorder = CollectiveRecorder(on_error=self._collective_failed)
        self.step, self.section, self.progress = 0, "setup", time.time()
        self._stop = threading.Event()
        self._hang_once = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._fit_frame, self._fit_thread = None, None

    # ---------------------------------------------------------------------------------- training thread

    def _mark(self, section: str, step: Optional[int] = None) -> None:
        self.section, self.progress = section, time.time()
        if step is not None:
            self.step = step

    def on_fit_start(self, trainer) -> None:
        if self._thread is not None and self._thread.is_alive():  # fit() called again before the last one's
            self._stop.set()                                         # thread noticed it had ended
            self._thread.join()
        self._stop.clear()
        self.step = trainer.state.step
        self.recorder.install()
        if self.rank == 0:  # a requeued run appends to its run directory: an earlier attempt's files are stale
            if self.hang_dir.exists():
                self.hang_dir.rename(aside_name(self.hang_dir))
            for old in self.heartbeat_dir.glob("rank*.json"):
                old.unlink()
        if dist.is_available() and dist.is_initialized() and self.world_size > 1:
            dist.barrier()  # nobody writes heartbeats before rank 0 has cleared the old ones
        self.heartbeat_dir.mkdir(parents=True, exist_ok=True)
        if os.environ.get("TORCH_NCCL_DUMP_ON_TIMEOUT") == "1":  # NCCL writes its recorder there, not creating it
            self.hang_dir.mkdir(exist_ok=True)
        self._fit_thread = threading.get_ident()
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_name != "fit":
            frame = frame.f_back
        self._fit_frame = frame
        self._mark("fit_start")
        self._write_heartbeat("running")
        self._thread = threading.Thread(target=self._watch, name="herd-watchdog", daemon=True)
        self._thread.start()

    def on_step_start(self, trainer) -> None:
        self._mark("train_step", trainer.state.step + 1)
        _fault_hang(self.rank, self.step)

    def on_step_end(self, trainer, metrics) -> None:
        self._mark("step_end_callbacks (eval, checkpoint, logging)", trainer.state.step)

    def on_fit_end(self, trainer) -> None:
        # Callbacks after this one still work (the final checkpoint save and its commit): keep watching. The
        # thread stands down once fit() has returned.
        self._mark("fit_end_callbacks (final checkpoint)")

    def _collective_failed(self, entry: dict, error: BaseException) -> None:
        groups = self.recorder.snapshot()["groups"]
        self._hang(f"{format_entry(entry, groups)} on rank {self.rank}")

    # ---------------------------------------------------------------------------------- watchdog thread

    def _last_progress(self) -> float:
        return max(self.progress, self.recorder.last_activity)

    def _fit_running(self) -> bool:
        """False once fit() has left the training thread's stack (an exception ended it): then there is nothing
        to watch, and a process that lives on (a test, a notebook) must not be ended by us later."""
        frame = sys._current_frames().get(self._fit_thread)
        while frame is not None:
            if frame is self._fit_frame:
                return True
            frame = frame.f_back
        return False

    def _watch(self) -> None:
        w = self.cfg
        tick = min(1.0, w.heartbeat_every / 2)
        next_beat = time.time() + w.heartbeat_every
        while not self._stop.wait(tick):
            if self._hang_once.locked():  # the training thread is reporting a failed collective
                return
            if not self._fit_running():  # returned or raised: either way nothing is left to watch
                self.recorder.uninstall()
                self._mark("after fit")
                self._write_heartbeat("ended")
                self._fit_frame = None
                return
            now = time.time()
            if now >= next_beat:  # the trigger is looked for at heartbeats only: a shared filesystem is slow
                next_beat = now + w.heartbeat_every
                self._write_heartbeat("running")
                if (self.hang_dir / TRIGGER).exists():
                    self._hang(f"rank {self._trigger_owner()} declared a hang")
            if now - self._last_progress() >= w.timeout:
                self._hang(f"no progress on rank {self.rank} for {now - self._last_progress():.1f} s "
                           f"(watchdog.timeout={w.timeout:g})")

    # ---------------------------------------------------------------------------------- state and files

    def state(self, status: str) -> dict:
        snap = self.recorder.snapshot()
        done = [e for e in snap["entries"] if e["exited"] is not None]
        return {"rank": self.rank, "world_size": self.world_size, "host": socket.gethostname(), "pid": os.getpid(),
                "time": time.time(), "status": status, "step": self.step, "section": self.section,
                "progress_time": self._last_progress(), "collective": snap["open"][-1] if snap["open"] else None,
                "last_collective": done[-1] if done else None, "group_counts": snap["group_counts"],
                "groups": snap["groups"]}

    def _write_heartbeat(self, status: str) -> None:
        try:
            _write_json(self.heartbeat_dir / f"rank{self.rank}.json", self.state(status))
        except OSError:  # a full or flaky filesystem must not end the run; the next beat tries again
            pass

    def _trigger_owner(self) -> str:
        try:
            return (self.hang_dir / TRIGGER).read_text().split()[0]
        except (OSError, IndexError):
            return "?"

    def _claim(self, reason: str) -> bool:
        """The first rank to create TRIGGER merges the report; the file also tells the others to dump."""
        try:
            fd = os.open(self.hang_dir / TRIGGER, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(f"{self.rank} {time.time()} {reason}\n")
        return True

    def _hang(self, reason: str) -> None:
        if not self._hang_once.acquire(blocking=False):
            while True:  # the other thread of this rank is reporting and will end the process
                time.sleep(60)
        try:
            self.hang_dir.mkdir(parents=True, exist_ok=True)
            merger = self._claim(reason)
            self._dump(reason)
            self._write_heartbeat("hang")
            report = self.hang_dir / "report.txt"
            deadline = time.time() + self.cfg.dump_wait
            if merger:
                missing = set(range(self.world_size))
                while missing and time.time() < deadline:  # only the missing ones: stat calls on a shared FS
                    missing = {r for r in missing if not (self.hang_dir / f"rank{r}.json").exists()}
                    time.sleep(0.2 if missing else 0)
                text = merge_report(self.hang_dir, self.heartbeat_dir, self.world_size)
                write_atomic(report, scrub(text))
                print(scrub(f"herd watchdog: {text.splitlines()[0]}\nherd watchdog: report {report}, exiting "
                            f"with {HANG_EXIT_CODE}"), file=sys.stderr, flush=True)
            else:
                deadline += self.cfg.dump_wait  # the merger may have started waiting just now
                while time.time() < deadline and not report.exists():
                    time.sleep(0.2)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(HANG_EXIT_CODE)

    def _dump(self, reason: str) -> None:
        """rank<r>.json for the merge, rank<r>.txt for people (stacks of every thread at the end)."""
        state = self.state("hang")
        state["reason"] = reason
        state["entries"] = self.recorder.snapshot()["entries"]
        fr = torch_flight_recorder()
        state["torch_fr"] = None if fr is None else {
            "pg_status": fr.get("pg_status"), "pg_config": fr.get("pg_config"),
            "entries": [{k: e.get(k) for k in ("pg_id", "process_group", "collective_seq_id", "profiling_name",
                                               "state", "retired")} for e in (fr.get("entries") or [])[-16:]]}
        _write_json(self.hang_dir / f"rank{self.rank}.json", state)
        groups = state["groups"]
        lines = [f"rank {self.rank} of {self.world_size} on {state['host']} (pid {state['pid']}): {reason}",
                 f"step {self.step}, section {self.section}, last progress "
                 f"{state['time'] - state['progress_time']:.1f} s ago",
                 f"in collective: {format_entry(state['collective'], groups, state['time'])}", "",
                 "last collectives (oldest first):"]
        lines += [f"  {format_entry(e, groups, state['time'])}" for e in state["entries"]]
        if fr is not None:
            lines += ["", "torch flight recorder (last enqueued / started / completed per process group):"]
            lines += [f"  pg {pg}: {s}" for pg, s in (fr.get("pg_status") or {}).items()]
            lines += [f"  {e['profiling_name']} seq {e['collective_seq_id']} pg {e['process_group']} {e['state']}"
                      for e in state["torch_fr"]["entries"]]
        path = self.hang_dir / f"rank{self.rank}.txt"
        with open(path, "w") as f:
            f.write(scrub("\n".join(lines)) + "\n\nPython stacks (all threads, most recent call first per thread):\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)


# -------------------------------------------------------------------------------------------- merge

def _load(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


_OWN_FRAMES = (" in _dump", " in _hang", " in _collective_failed", " in recorded")  # the reporting code itself


def _innermost_frame(dump_txt: Path) -> str:
    """The training thread's innermost frame from a faulthandler dump ('File "x.py", line 9 in sleep'): the
    thread running Trainer.fit, frames of the report-writing code itself left out."""
    try:
        text = dump_txt.read_text()
    except OSError:
        return ""
    blocks = [b for b in text.split("Python stacks", 1)[-1].split("\n\n") if "(most recent call first)" in b]
    training = [b for b in blocks if " in fit\n" in b + "\n"] or [b for b in blocks if " in _watch" not in b]
    for block in training[:1]:
        for line in block.splitlines():
            line = line.strip()
            if line.startswith("File ") and not line.endswith(_OWN_FRAMES):
                return line
    return ""


def find_stuck(states: Dict[int, dict], world_size: int) -> dict:
    """Which rank is stuck and in (or before) which collective.

    A rank waiting in the n-th collective of a group proves that every member of the group whose count on it is
    below n never entered it: those are the stuck ranks. Failing that, ranks without any state (dead before their
    first heartbeat), then the rank whose last progress is oldest."""
    groups: Dict[str, dict] = {}
    for s in states.values():
        groups.update(s.get("groups") or {})
    for rank in sorted(states):
        entry = states[rank].get("collective")
        last = states[rank].get("last_collective")
        if entry is None and last is not None and last.get("error"):
            entry = last  # the collective raised (timeout): it is still the one this rank waited in
        if entry is None:
            continue
        members = groups.get(entry["group"], {}).get("ranks") or list(range(world_size))
        missing = [m for m in members if m not in states
                   or states[m].get("group_counts", {}).get(entry["group"], 0) < entry["group_seq"]]
        if missing:
            waiters = [r for r in sorted(states) if (states[r].get("collective") or {}).get("group") == entry["group"]
                       and (states[r].get("collective") or {}).get("group_seq") == entry["group_seq"]] or [rank]
            return {"stuck": missing, "waiting": waiters, "entry": entry, "groups": groups}
    absent = [r for r in range(world_size) if r not in states]
    if absent:
        return {"stuck": absent, "waiting": [], "entry": None, "groups": groups}
    oldest = min(states, key=lambda r: states[r].get("progress_time", 0))
    return {"stuck": [oldest], "waiting": [], "entry": None, "groups": groups}


def merge_report(hang_dir: Path, heartbeat_dir: Path, world_size: int) -> str:
    """report.txt: a headline naming the stuck rank(s) and the collective, then one block per rank."""
    now = time.time()
    dumps = {r: d for r in range(world_size) if (d := _load(hang_dir / f"rank{r}.json")) is not None}
    beats = {r: b for r in range(world_size) if (b := _load(heartbeat_dir / f"rank{r}.json")) is not None}
    states = {**beats, **dumps}  # a dump is newer than the same rank's heartbeat
    found = find_stuck(states, world_size)
    stuck, groups, entry = found["stuck"], found["groups"], found["entry"]
    who = ", ".join(str(r) for r in stuck)
    plural = "s" if len(stuck) > 1 else ""
    if entry is not None:
        waiting = ", ".join(str(r) for r in found["waiting"])
        headline = (f"HANG: rank{plural} {who} never entered {format_entry(entry, groups).split(' (')[0]} that "
                    f"rank(s) {waiting} waited in")
    else:
        s = states.get(stuck[0])
        where = (f"at step {s['step']} in section {s['section']}, no progress for "
                 f"{now - s['progress_time']:.1f} s" if s else "wrote no heartbeat and no dump (dead or frozen)")
        headline = f"HANG: rank{plural} {who} stuck {where}"
    lines = [headline, f"written {time.strftime('%Y-%m-%d %H:%M:%S')} by the watchdog; {len(dumps)} of "
             f"{world_size} ranks dumped (hang/rank<r>.txt), heartbeats in {heartbeat_dir}", ""]
    for r in range(world_size):
        s = states.get(r)
        if s is None:
            lines.append(f"rank {r}: no dump and no heartbeat (dead or frozen before its first heartbeat)")
            continue
        source = "dump" if r in dumps else f"heartbeat only ({now - s['time']:.1f} s old: no dump, dead or frozen)"
        lines.append(f"rank {r} on {s['host']} pid {s['pid']} [{source}]{'  <-- STUCK' if r in stuck else ''}")
        lines.append(f"  step {s['step']}, section {s['section']}, last progress {now - s['progress_time']:.1f} s "
                     f"before this report")
        lines.append(f"  in collective: {format_entry(s.get('collective'), groups, s['time'])}")
        lines.append(f"  last finished: {format_entry(s.get('last_collective'), groups, s['time'])}")
        if r in dumps:
            lines.append(f"  reason: {s.get('reason', '')}")
            frame = _innermost_frame(hang_dir / f"rank{r}.txt")
            if frame:
                lines.append(f"  innermost frame of the training thread: {frame}")
    lines += _torch_fr_summary(dumps)
    return "\n".join(lines) + "\n"


def _torch_fr_summary(dumps: Dict[int, dict]) -> List[str]:
    """torch's flight recorder per process group: the rank whose last enqueued collective is behind the others'
    is the one that never entered (this covers collectives the Python recorder cannot see, e.g. from C++)."""
    per_pg: Dict[str, Dict[int, int]] = {}
    for r, d in dumps.items():
        for pg, status in ((d.get("torch_fr") or {}).get("pg_status") or {}).items():
            per_pg.setdefault(pg, {})[r] = int(status.get("last_enqueued_collective", -1))
    if not per_pg:
        return []
    lines = ["", "torch flight recorder, last enqueued collective per process group and rank:"]
    for pg, seqs in sorted(per_pg.items()):
        behind = [r for r, s in seqs.items() if s < max(seqs.values())]
        lines.append(f"  pg {pg}: " + ", ".join(f"rank {r}: {s}" for r, s in sorted(seqs.items()))
                     + (f"  (behind: {describe_ranks(behind)})" if behind else ""))
    return lines
