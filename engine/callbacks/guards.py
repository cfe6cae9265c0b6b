"""Runtime guards agreed across ranks (shared/TESTING.md R9, R11; docs/reliability.md).

- `StepGuard` runs inside the train step, between backward and the optimizer step: it decides whether this
  step's update may be applied. NaN/Inf in the loss or in any gradient element held by any rank, or a loss
  spike, withholds the update on every rank at the same step: each rank computes its own flags and one MAX
  all-reduce of them is the decision, so a value seen by one rank only (a poisoned gradient shard, a copy that the
  global norm does not count) still stops every rank.
- `GuardCallback` applies the policy to a withheld step: skip it, roll back to the last complete checkpoint, or
  stop with a one-line error naming the step.
- `StragglerCallback` gathers per-rank section timings every few steps (one small all-gather) and flags a rank
  that is slower than the median in a section no collective can hide, for several windows in a row.
- `assert_finite_state` refuses to save a checkpoint that holds a non-finite parameter or optimizer moment.

Fault injection for the tests, in the spirit of engine/train_module.py's HERD_FAULT=<point>:<rank>:<n>:
`nan_grad:<rank>:<n>` poisons one element of that rank's local gradient at the n-th step it runs (after the
global norm is taken, so only that rank holds it), `spike:<rank>:<n>` multiplies the loss that rank judges at its
n-th step by 100, and `slow:<rank>:<ms>` makes that rank sleep ms milliseconds after every step's decision.
"""

import json
import math
import os
import socket
import statistics
import time
from collections import deque
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from engine.callbacks.base import Callback
from engine.callbacks.checkpoint import CheckpointCallback
from engine.errors import HerdError
from engine.files import open_append
from engine.secrets import scrub

NONFINITE, SPIKE = 1, 2  # bits of a StepGuard verdict
Say = Optional[Callable[[str], None]]


class GuardError(HerdError):
    """A guard stopped the run (the `herd` command prints it as one line and exits non-zero)."""


def fault_arg(kind: str) -> Optional[int]:
    """n of HERD_FAULT=<kind>:<rank>:<n> when it names this rank, else None (one dictionary lookup when unset)."""
    spec = os.environ.get("HERD_FAULT")
    if not spec:
        return None
    parts = spec.split(":")
    if len(parts) == 3 and parts[0] == kind and parts[1] == os.environ.get("RANK", "0"):
        return int(parts[2])
    return None


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def any_nonfinite(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """A 0-d bool tensor on the tensors' device: does any element of any tensor hold NaN or +-Inf? The max-abs
    norm of a finite tensor is finite (no overflow, unlike the sum of squares), so one foreach kernel decides."""
    tensors = [t for t in tensors if t.numel() > 0]
    if not tensors:
        return torch.zeros((), dtype=torch.bool)
    norms = torch._foreach_norm(tensors, math.inf)
    return ~torch.isfinite(torch.stack(norms)).all()


class StepGuard:
    """Between backward and the optimizer step: may this step's update be applied (on every rank alike)?

    `check` costs one pass over the local gradients (a foreach max-abs), a host sync for the loss (the step
    reads it anyway) and one all-reduce of two numbers over `group` (None: the world).
    """

    def __init__(self, spike_factor: float, spike_window: int, device: torch.device, group=None):
        self.spike_factor, self.device, self.group = spike_factor, device, group
        self.named_parameters: Callable[[], Iterable[Tuple[str, torch.Tensor]]] = lambda: ()  # set by bind()
        self.losses: deque = deque(maxlen=spike_window)  # the losses of recent applied steps
        self.verdict = 0  # NONFINITE | SPIKE bits of the last check, the same on every rank
        self.loss = math.nan  # the loss of the last check, as judged
        self.median = math.nan  # the median it was compared with
        self.decided_at: Optional[float] = None  # perf_counter() when the last decision was agreed (R11 sections)
        self.calls = 0
        self._nan_at, self._spike_at, self._slow_ms = fault_arg("nan_grad"), fault_arg("spike"), fault_arg("slow")

    def bind(self, module) -> None:
        """Judge this train module's steps: it calls `check` between backward and the optimizer step."""
        self.named_parameters = module.parallel.named_parameters
        module.step_guard = self

    def check(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """True when the update may be applied. `loss` is the step loss already summed over every rank (the same
        value everywhere); `grad_norm` the global gradient norm (also reduced)."""
        self.calls += 1
        if self._nan_at == self.calls:
            self._poison_gradient()
        grads = [_local(p.grad) for _, p in self.named_parameters() if p.grad is not None]
        nonfinite = any_nonfinite(grads).to(self.device) | ~torch.isfinite(loss) | ~torch.isfinite(grad_norm)
        value = loss.item() * (100.0 if self._spike_at == self.calls else 1.0)
        self.median = statistics.median(self.losses) if self.losses else math.nan
        spike = (self.spike_factor > 0 and len(self.losses) == self.losses.maxlen and math.isfinite(value)
                 and value > self.spike_factor * self.median)
        flags = torch.stack([nonfinite.float(), torch.tensor(float(spike), device=self.device)])
        if _distributed():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        found_nonfinite, found_spike = (bool(f > 0) for f in flags.tolist())
        self.verdict = (NONFINITE if found_nonfinite else 0) | (SPIKE if found_spike else 0)
        self.loss = value
        if not self.verdict:  # a withheld step's loss never enters the reference (a spike cannot normalize itself)
            self.losses.append(value)
        self.decided_at = time.perf_counter()
        if self._slow_ms:
            time.sleep(self._slow_ms / 1000)
        return self.verdict == 0

    def _poison_gradient(self) -> None:
        """One NaN in this rank's local gradient, preferably of a norm weight (replicated across tensor-parallel
        ranks: a copy that the global norm counts on tp rank 0 only, so only the explicit flag carries it)."""
        held = [(n, _local(p.grad)) for n, p in self.named_parameters()
                if p.grad is not None and _local(p.grad).numel() > 0]
        _, grad = next(((n, g) for n, g in held if n.endswith("norm.weight")), held[0])
        with torch.no_grad():
            grad.view(-1)[0] = math.nan


class GuardCallback(Callback):
    """Applies the policy (guards.nonfinite, guards.spike) to a step that the StepGuard withheld, on every rank.

    skip: the update is not applied (gradients zeroed, no optimizer or LR-schedule step: the schedule counts
    updates, as Megatron-LM's does); the step still counts and its data is consumed. More than
    max_consecutive_skips in a row stop the run. rollback: the last complete checkpoint is reloaded (model,
    optimizer, schedule, step, RNG) but the data position is kept, so the batches since that checkpoint are
    skipped, not replayed (a deterministic replay would meet the same spike). stop: a GuardError naming the step.
    `events` records every action, for the tests.
    """

    def __init__(self, guard: StepGuard, nonfinite: str, spike: str, spike_factor: float,
                 max_consecutive_skips: int, max_rollbacks: int, say: Say = None):
        self.guard, self.policies = guard, {NONFINITE: nonfinite, SPIKE: spike}
        self.spike_factor = spike_factor
        self.max_skips, self.max_rollbacks, self.say = max_consecutive_skips, max_rollbacks, say
        self.skipped = self.consecutive = self.rollbacks = 0
        self.fit_steps = self.fit_skips = 0  # of this fit: a fit that skipped every one learned nothing
        self.events: List[dict] = []
        self.checkpointer = None

    def on_fit_start(self, trainer) -> None:
        self.guard.bind(trainer.module)
        self.checkpointer = next((c.checkpointer for c in trainer.callbacks if isinstance(c, CheckpointCallback)),
                                 None)

    def _check_learned(self, trainer, skipped: bool) -> None:
        """A run from step 0 whose every step, to its last, was skipped (fewer than max_consecutive_skips of them)
        ended as if it had trained: a DPO stage of an absurd beta was recorded finished with its starting weights
        (helper H44). Raised from the last step, so the trainer's abort path releases what the run holds; a resumed
        run (it trained before) and a preempted one (it goes on later) are left alone."""
        self.fit_steps, self.fit_skips = self.fit_steps + 1, self.fit_skips + skipped
        s = trainer.state
        if self.fit_skips == self.fit_steps == s.step and s.step >= s.total_steps and not s.stop_requested:
            raise GuardError(f"guards: every one of the {s.step} steps of this run was skipped for non-finite loss "
                             f"or gradients or loss spikes (the last at step {s.step}); it learned nothing")

    def _describe(self, bit: int) -> str:
        if bit == NONFINITE:
            return "non-finite loss or gradients"
        g = self.guard
        return (f"loss spike ({g.loss:.4g} > {self.spike_factor:g} x {g.median:.4g}, the median of the last "
                f"{len(g.losses)} steps)")

    def on_step_end(self, trainer, metrics: Dict[str, float]) -> None:
        verdict, step = self.guard.verdict, trainer.state.step
        self._check_learned(trainer, bool(verdict))
        if verdict:
            bit = NONFINITE if verdict & NONFINITE else SPIKE
            kind, what = ("nonfinite" if bit == NONFINITE else "spike"), self._describe(bit)
            policy = self.policies[bit]
            if policy == "stop":
                raise GuardError(f"guards: {what} at step {step}; stopping (guards.{kind}=stop)")
            self.skipped += 1
            restored = self._rollback(trainer, step, what) if policy == "rollback" else None
            if restored is None:
                self.consecutive += 1
                if self.consecutive > self.max_skips:
                    raise GuardError(f"guards: {self.consecutive} steps in a row skipped, the last at step {step} "
                                     f"({what}); stopping (guards.max_consecutive_skips={self.max_skips})")
                self._say(f"guards: {what} at step {step} on every rank: update skipped "
                          f"({self.skipped} skipped so far)")
            self.events.append({"step": step, "kind": kind, "action": "skip" if restored is None else "rollback",
                                "to": restored})
            metrics["guard_skipped"] = 1.0
        else:
            self.consecutive = 0
        metrics["skipped_steps"] = float(self.skipped)
        if self.policies[NONFINITE] == "rollback" or self.policies[SPIKE] == "rollback":
            metrics["rollbacks"] = float(self.rollbacks)

    def _rollback(self, trainer, step: int, what: str) -> Optional[int]:
        """Reload the newest complete checkpoint but keep the data position; its step, or None when there is no
        checkpoint yet (the update was withheld anyway: the step counts as skipped)."""
        if self.rollbacks >= self.max_rollbacks:
            raise GuardError(f"guards: {what} at step {step} after {self.rollbacks} rollbacks; stopping "
                             f"(guards.max_rollbacks={self.max_rollbacks})")
        if self.checkpointer is None:
            return None
        self.checkpointer.wait()  # a background save commits first: it may be the newest checkpoint
        position = trainer.loader.state_dict()
        restored = self.checkpointer.resume()
        if restored is None:
            return None
        trainer.loader.load_state_dict(position)  # the batches since the checkpoint are skipped, not replayed
        self.rollbacks += 1
        self.consecutive = 0
        self._say(f"guards: {what} at step {step} on every rank: rolled back to the checkpoint of step {restored} "
                  f"(data of steps {restored + 1}-{step} skipped, not replayed; rollback {self.rollbacks} of at "
                  f"most {self.max_rollbacks})")
        return restored

    def _say(self, line: str) -> None:
        if self.say is not None:
            self.say(line)


def _first_nonfinite(named_parameters: Iterable[Tuple[str, torch.Tensor]], optimizer) -> Optional[str]:
    """What holds the first non-finite value on this rank: a parameter or an optimizer moment, named."""
    names = {}
    for name, p in named_parameters:
        names[id(p)] = name
        if bool(any_nonfinite([_local(p).detach()])):
            return f"parameter {name}"
    for p, state in (optimizer.state.items() if optimizer is not None else ()):
        for key, value in state.items():
            if torch.is_tensor(value) and value.is_floating_point() and bool(any_nonfinite([_local(value)])):
                return f"optimizer {key} of {names.get(id(p), 'a parameter')}"
    return None


def assert_finite_state(named_parameters: Iterable[Tuple[str, torch.Tensor]], optimizer, step: int,
                        device: torch.device, group=None) -> None:
    """Raise GuardError on every rank when any rank holds a non-finite parameter or optimizer moment. Called
    before a checkpoint is written, so a checkpoint never carries NaN/Inf; a collective (every rank calls it)."""
    bad = _first_nonfinite(named_parameters, optimizer)
    flag = torch.tensor([1.0 if bad else 0.0], device=device)
    if _distributed():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if flag.item() == 0:
        return
    found = [bad]
    if _distributed():
        found = [None] * dist.get_world_size(group)
        dist.all_gather_object(found, bad, group=group)
    where = next(f"{b} on rank {r}" for r, b in enumerate(found) if b)
    raise GuardError(f"guards: refusing to save the checkpoint of step {step}: non-finite values in {where}")


# ---------------------------------------------------------------------------------------------- stragglers

SECTIONS = ("data", "forward_backward", "optimizer", "step")
# sections without collectives: a delay there is the rank's own. Forward/backward holds the collectives, where
# the other ranks wait for a slow one, so it is reported but never blamed.
DECIDING = ("data", "optimizer")
TELEMETRY_JOINED = ("gpu_sm_clock_mhz", "gpu_mem_clock_mhz", "gpu_temp_c", "gpu_power_w", "gpu_throttle_reasons")


def judge(rows: List[List[float]]) -> List[Tuple[float, str]]:
    """Per rank (excess, section): how far its slowest deciding section lies above that section's median over the
    ranks, as a fraction of the median step time. rows[r] holds rank r's mean seconds per SECTIONS."""
    median_step = statistics.median(row[SECTIONS.index("step")] for row in rows)
    medians = {s: statistics.median(row[SECTIONS.index(s)] for row in rows) for s in DECIDING}
    out = []
    for row in rows:
        excess = {s: (row[SECTIONS.index(s)] - medians[s]) / max(median_step, 1e-9) for s in DECIDING}
        section = max(excess, key=excess.get)
        out.append((excess[section], section))
    return out


class StragglerCallback(Callback):
    """Every `every` steps, each rank's mean section times over the window (data: from the end of the previous
    step to the start of this one; forward_backward: to the StepGuard's agreed decision; optimizer: from there to
    the end of the step) are all-gathered. A rank whose excess (see `judge`) exceeds `threshold` in `patience`
    consecutive windows is flagged: a console line naming rank and host, metrics, and a JSON line in
    <run>/stragglers.jsonl joined with that rank's GPU telemetry. Put it first among the callbacks, so the
    evaluation and checkpoint collectives of a step fall outside its optimizer section."""

    def __init__(self, every: int, threshold: float, patience: int, guard: StepGuard, device: torch.device,
                 report: Optional[Path] = None, say: Say = None, telemetry=None, group=None):
        self.every, self.threshold, self.patience = every, threshold, patience
        self.guard, self.device, self.report, self.say = guard, device, report, say
        self.telemetry, self.group = telemetry, group
        self.hosts: List[str] = [socket.gethostname()]
        self.flags: List[dict] = []  # every flag raised (on every rank), for the tests
        self._sums, self._count = [0.0] * len(SECTIONS), 0
        self._start = self._data = self._prev_end = None
        self._steps_run = 0
        self._streak: List[int] = []

    def on_fit_start(self, trainer) -> None:
        if _distributed():
            self.hosts = [""] * dist.get_world_size(self.group)
            dist.all_gather_object(self.hosts, socket.gethostname(), group=self.group)
        self._streak = [0] * len(self.hosts)

    def on_step_start(self, trainer) -> None:
        self._start = time.perf_counter()
        self._steps_run += 1
        # the first two steps of the process are not timed: the first allocates (optimizer state, caches) and the
        # data section of the second holds the rest of the first step's one-off work (first save, first writes)
        self._data = self._start - self._prev_end if self._steps_run > 2 else None

    def on_step_end(self, trainer, metrics: Dict[str, float]) -> None:
        end = time.perf_counter()
        if self._data is not None:
            decided = self.guard.decided_at if self.guard.decided_at is not None else end
            for i, value in enumerate((self._data, decided - self._start, end - decided, end - self._start)):
                self._sums[i] += value
            self._count += 1
        if trainer.state.step % self.every == 0 and self._count:
            self._window(trainer.state.step, metrics)
        self._prev_end = time.perf_counter()

    def _window(self, step: int, metrics: Dict[str, float]) -> None:
        joined = self.telemetry.read() if self.telemetry is not None and self.telemetry.enabled else {}
        mine = [s / self._count for s in self._sums] + [joined.get(k, math.nan) for k in TELEMETRY_JOINED]
        self._sums, self._count = [0.0] * len(SECTIONS), 0
        row = torch.tensor(mine, dtype=torch.float64, device=self.device)
        if _distributed():
            gathered = [torch.empty_like(row) for _ in range(dist.get_world_size(self.group))]
            dist.all_gather(gathered, row, group=self.group)
            rows = [g.tolist() for g in gathered]
        else:
            rows = [row.tolist()]
        self._decide(step, rows, metrics)

    def _decide(self, step: int, rows: List[List[float]], metrics: Dict[str, float]) -> None:
        """Every rank runs this on the same gathered rows, so every rank reaches the same verdict."""
        verdicts = judge(rows)
        worst = max(range(len(rows)), key=lambda r: verdicts[r][0])
        for rank, (excess, section) in enumerate(verdicts):
            self._streak[rank] = self._streak[rank] + 1 if excess > self.threshold else 0
            if self._streak[rank] == self.patience:
                self._flag(step, rank, excess, section, rows)
        metrics.update(straggler_worst_rank=float(worst), straggler_worst_excess=verdicts[worst][0],
                       stragglers=float(sum(s >= self.patience for s in self._streak)))

    def _flag(self, step: int, rank: int, excess: float, section: str, rows: List[List[float]]) -> None:
        n = len(SECTIONS)
        ms = {s: 1000 * rows[rank][i] for i, s in enumerate(SECTIONS)}
        median_ms = {s: 1000 * statistics.median(r[i] for r in rows) for i, s in enumerate(SECTIONS)}
        telemetry = {k: rows[rank][n + i] for i, k in enumerate(TELEMETRY_JOINED) if math.isfinite(rows[rank][n + i])}
        record = {"step": step, "rank": rank, "host": self.hosts[rank], "section": section, "excess": excess,
                  "windows": self.patience, "every": self.every, "ms": ms, "median_ms": median_ms,
                  "telemetry": telemetry}
        self.flags.append(record)
        gpu = ""
        if telemetry:
            from engine.callbacks.telemetry import describe
            gpu = " | " + describe(telemetry)
        if self.say is not None:
            self.say(f"straggler: rank {rank} on {self.hosts[rank]} is slower than the median by {excess:.2f} of a "
                     f"step in {section} ({ms[section]:.1f} ms vs {median_ms[section]:.1f} ms; step "
                     f"{median_ms['step']:.1f} ms) for {self.patience} windows of {self.every} steps, at step "
                     f"{step}{gpu}")
        if self.report is not None:
            self.report.parent.mkdir(parents=True, exist_ok=True)
            with open_append(self.report, "the straggler records") as f:
                f.write(scrub(json.dumps(record)) + "\n")  # host names and paths pass the secret filter (R17)
