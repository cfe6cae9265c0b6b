"""This rank's last collectives, for hang reports: which collective it is in now and which it entered before.

`CollectiveRecorder.install()` wraps the `torch.distributed` functions that herd and torch's own Python layers
call through the module (`dist.all_reduce(...)`: the loss and grad-norm all-reduces, tensor-parallel all-reduces
and all-gathers, FSDP2's all-gathers and reduce-scatters, checkpoint gathers). Each call is recorded on entry and
on return in a small ring buffer: the op, its group, the group's call count (the n-th collective on that group,
the same on every member, so ranks can be compared), where herd called it from, and when. A watchdog thread reads
it without taking part in any collective. Collectives issued from C++ or through functional collectives are not
seen here; torch's own flight recorder (`torch_flight_recorder()`, gloo and NCCL) covers those where it exists.

A collective that raises a RuntimeError (a timeout, a peer that went away) is handed to `on_error` before the
exception continues, so a hang report can be written while the evidence is fresh.
"""

import functools
import inspect
import json
import os
import sys
import threading
import time
from collections import deque
from datetime import timedelta
from typing import Any, Callable, Deque, Dict, List, Optional

import torch.distributed as dist

# Collectives and point-to-point calls that can block on a peer (those this torch has are wrapped). isend, irecv
# and batch_isend_irecv are left alone: torch.distributed.P2POp accepts only the original isend/irecv objects
# (the pipeline schedules build P2POps), and their waits show up in torch's own flight recorder.
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
               "reduce_scatter_tensor", "reduce_scatter_single", "all_to_all", "all_to_all_single", "broadcast",
               "reduce", "gather", "scatter", "barrier", "monitored_barrier", "all_gather_object",
               "broadcast_object_list", "gather_object", "scatter_object_list", "send", "recv")

_TORCH_DIR = os.path.dirname(os.path.dirname(dist.__file__))  # .../site-packages/torch
_HERE = os.path.abspath(__file__)


def _call_site(depth: int = 2) -> str:
    """'parallel/parallelize.py:95 sum_over_data < engine/train_module.py:78 count_tokens': the innermost
    frames outside torch and this file, i.e. the code that asked for the collective."""
    frame, found = sys._getframe(2), []
    while frame is not None and len(found) < depth:
        path = frame.f_code.co_filename
        if not path.startswith(_TORCH_DIR) and os.path.abspath(path) != _HERE:
            short = "/".join(path.split(os.sep)[-2:])
            found.append(f"{short}:{frame.f_lineno} {frame.f_code.co_name}")
        frame = frame.f_back
    return " < ".join(found) or "?"


def describe_ranks(ranks: List[int]) -> str:
    return str(ranks) if len(ranks) <= 8 else f"[{ranks[0]}, {ranks[1]}, ..., {ranks[-1]}] ({len(ranks)} ranks)"


class CollectiveRecorder:
    """Ring buffer of this rank's last `capacity` collectives with enter/exit times (wall clock, comparable
    across hosts to within their clock skew)."""

    def __init__(self, capacity: int = 64, on_error: Optional[Callable[[dict, BaseException], None]] = None):
        self.entries: Deque[dict] = deque(maxlen=capacity)
        self.on_error = on_error
        self.groups: Dict[str, dict] = {}  # group name -> {"ranks": [...], "desc": ...}
        self.last_activity = time.time()  # any enter or exit: the watchdog counts it as progress
        self._group_counts: Dict[str, int] = {}
        self._open: List[dict] = []  # entered, not yet returned (innermost last)
        self._lock = threading.Lock()
        self._originals: Dict[str, Callable] = {}
        self._seq = 0
        self._active = False

    # ------------------------------------------------------------------------------------------- install

    def install(self) -> "CollectiveRecorder":
        self._active = True
        for name in COLLECTIVES:
            original = getattr(dist, name, None)
            if original is None or name in self._originals:
                continue
            self._originals[name] = original
            setattr(dist, name, self._wrap(name, original))
        return self

    def uninstall(self) -> None:
        """Restore torch.distributed; where another wrapper was put on top of ours meanwhile, ours stays in the
        chain but only passes calls through (it must not report for a run that is over)."""
        self._active = False
        for name, original in self._originals.items():
            if getattr(getattr(dist, name, None), "__wrapped_by__", None) is self:  # nobody wrapped us since
                setattr(dist, name, original)
        self._originals.clear()

    def _wrap(self, name: str, original: Callable) -> Callable:
        params = list(inspect.signature(original).parameters)
        group_index = params.index("group") if "group" in params else None

        @functools.wraps(original)
        def recorded(*args, **kwargs):
            if not self._active:
                return original(*args, **kwargs)
            group = kwargs.get("group")
            if group is None and group_index is not None and len(args) > group_index:
                group = args[group_index]
            entry = self._enter(name, group, bool(kwargs.get("async_op")), _call_site())
            try:
                result = original(*args, **kwargs)
            except RuntimeError as e:  # backend errors: timeouts, closed connections
                self._exit(entry, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
                if self.on_error is not None:
                    self.on_error(dict(entry), e)
                raise
            self._exit(entry, None)
            return result

        recorded.__wrapped_by__ = self
        return recorded

    # ------------------------------------------------------------------------------------------- record

    def _group_key(self, group: Any) -> str:
        group = group if group is not None else dist.group.WORLD
        name = str(getattr(group, "group_name", "default"))
        if name not in self.groups:
            try:
                ranks = dist.get_process_group_ranks(group)
            except Exception:  # noqa: BLE001 - a group this rank is not in, or no default group yet
                ranks = []
            self.groups[name] = {"ranks": list(ranks), "desc": str(getattr(group, "group_desc", "") or "")}
        return name

    def _enter(self, op: str, group: Any, async_op: bool, site: str) -> dict:
        key = self._group_key(group)
        with self._lock:
            self._seq += 1
            self._group_counts[key] = self._group_counts.get(key, 0) + 1
            entry = {"seq": self._seq, "op": op, "group": key, "group_seq": self._group_counts[key], "site": site,
                     "async": async_op, "entered": time.time(), "exited": None, "error": None}
            self.entries.append(entry)
            self._open.append(entry)
            self.last_activity = entry["entered"]
        return entry

    def _exit(self, entry: dict, error: Optional[str]) -> None:
        with self._lock:
            entry["exited"], entry["error"] = time.time(), error
            if entry in self._open:
                self._open.remove(entry)
            self.last_activity = entry["exited"]

    # ------------------------------------------------------------------------------------------- read

    def current(self) -> Optional[dict]:
        """The collective this rank is blocked in now (innermost), or None."""
        with self._lock:
            return dict(self._open[-1]) if self._open else None

    def snapshot(self) -> dict:
        """Everything a dump needs, copied under the lock (safe from another thread)."""
        with self._lock:
            return {"entries": [dict(e) for e in self.entries], "open": [dict(e) for e in self._open],
                    "group_counts": dict(self._group_counts), "groups": {k: dict(v) for k, v in self.groups.items()}}


def format_entry(entry: Optional[dict], groups: Dict[str, dict], now: Optional[float] = None) -> str:
    """'all_reduce #7 on group 2 [0, 1] at parallel/parallelize.py:95 sum_over_data (waiting 12.0 s)'."""
    if not entry:
        return "none"
    group = groups.get(entry["group"], {})
    desc = f" {group['desc']}" if group.get("desc") else ""
    text = (f"{entry['op']} #{entry['group_seq']} on group {entry['group']}{desc} "
            f"{describe_ranks(group.get('ranks', []))} at {entry['site']}")
    if entry.get("error"):
        return text + f" (failed after {entry['exited'] - entry['entered']:.1f} s: {entry['error']})"
    if entry.get("exited") is None:
        return text + f" (waiting {(now or time.time()) - entry['entered']:.1f} s)"
    return text + (" (launched async)" if entry.get("async") else f" ({entry['exited'] - entry['entered']:.3f} s)")


# ------------------------------------------------------------------------------------------- torch's own

def flight_recorder_env(device_type: str, buffer_size: int, dump_prefix: str) -> Dict[str, str]:
    """Environment that turns on torch's flight recorder, set before process groups start (values the user
    exported win). gloo (torch >= 2.8) reads TORCH_FR_BUFFER_SIZE; for NCCL also: dump the recorder when a
    collective times out, into the run's hang directory, and tear the process down on an NCCL error or timeout
    instead of leaving it blocked."""
    wanted = {"TORCH_FR_BUFFER_SIZE": str(buffer_size)}
    if device_type == "cuda":
        wanted.update({"TORCH_NCCL_TRACE_BUFFER_SIZE": str(buffer_size), "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
                       "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3", "TORCH_FR_DUMP_TEMP_FILE": dump_prefix,
                       "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": dump_prefix})
    applied = {}
    for key, value in wanted.items():
        if key not in os.environ:
            os.environ[key] = applied[key] = value
    return applied


def torch_flight_recorder() -> Optional[dict]:
    """torch's flight recorder for this process (all groups, gloo or NCCL), as JSON, or None where this torch has
    none or it is off. Safe to call while another thread is blocked in a collective."""
    try:
        from torch._C import _distributed_c10d as c10d
        dump = getattr(c10d, "_dump_nccl_trace_json", None) if _has_nccl_groups() else None
        dump = dump or getattr(c10d, "_dump_fr_trace_json", None)
        if dump is None:
            return None
        return json.loads(dump(includeCollectives=True, onlyActive=False))
    except Exception:  # noqa: BLE001 - diagnostics must never raise in a dump
        return None


def _has_nccl_groups() -> bool:
    try:
        return dist.is_initialized() and dist.get_backend() == "nccl"
    except Exception:  # noqa: BLE001
        return False


def set_collective_timeout(seconds: float) -> int:
    """Apply the timeout to every process group of this rank. init_process_group's timeout covers the world
    group only: groups made later (DeviceMesh dimensions, flattened meshes) get torch's default (30 min gloo,
    10 min NCCL). Returns how many groups were set."""
    setter = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    world = getattr(dist.distributed_c10d, "_world", None)
    if setter is None or world is None or not dist.is_initialized():
        return 0
    count = 0
    for group in list(world.pg_map):
        try:
            setter(timedelta(seconds=seconds), group)
            count += 1
        except (ValueError, RuntimeError, AssertionError):  # not a member, or a backend without timeouts
            pass
    return count
