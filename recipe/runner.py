"""`herd recipe RECIPE.yaml`: a staged pretraining run (Llama 3 section 3.4) as one resumable run of the engine.

Every stage is a normal run of the job under its own overrides (batch, sequence length, blend, layout, RoPE), and
all stages share one run directory and one checkpoint lineage (<run_dir>/train): a stage starts by resuming the
newest checkpoint there, which is the previous stage's last (model, optimizer, step and data position), so the
optimizer carries over and TensorBoard shows one curve. The runner adds the keys that tie stages together
(recipe/plan.py): the data stream's earlier stages (engine/data/stages.py continues every dataset exactly), the
token-based LR schedule (engine/schedule.py) and the global step to reach.

<run_dir>/recipe_state.json records, after each stage (or gate check of a long-context stage), where it ended and
what its gate measured; it is written atomically by rank 0. Running the recipe again skips finished stages and
resumes the current one from its newest checkpoint, so a recipe killed anywhere ends where an uninterrupted one
ends (bitwise under the same layouts: every piece of state is in the checkpoints, every decision in the file).
"""

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional, TextIO

import torch.distributed as dist

from engine.checkpoint.checkpointer import checkpoint_root
from engine.config import RecipeConfig
from engine.config_schema import MODEL_SHAPE_KEYS
from engine.errors import ConfigError
from engine.files import write_atomic
from engine.secrets import scrub
from engine.train_module import fault_point
from recipe.averaging import HF, AVERAGED, anneal_save_count
from recipe.plan import (TRAIN_NAME, Position, StagePlan, anneal_span, data_stage, effective_every, position_job,
                         schedule_horizon, static_plan, tokens_per_step, warmup_tokens)
from recipe import gates

STATE = "recipe_state.json"


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _from_rank0(work):
    """Rank 0's result of `work` on every rank (a decision every rank must share: files another rank reads could
    lag behind on a shared filesystem)."""
    box = [work() if _rank() == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]


# What the data stream of every stage must share: the stream replays earlier stages with today's values
# (engine/data/stages.py), and which documents a tokenizer or vocabulary leaves out changes the stream.
FIXED_DATA_KEYS = ("data.seed", "data.on_bad_data", "data.tokenizer.kind", "data.tokenizer.path", "model.vocab_size")
# What every stage's checkpoint must fit: the model's shape (RoPE and its length may change: long context)
FIXED_MODEL_KEYS = tuple(f"model.{k}" for k in MODEL_SHAPE_KEYS if f"model.{k}" not in FIXED_DATA_KEYS)


def check_fixed_data(first: StagePlan, plan: StagePlan) -> None:
    for key in FIXED_DATA_KEYS + FIXED_MODEL_KEYS:
        ours, theirs = _dotted(plan.job, key), _dotted(first.job, key)
        if ours != theirs:
            why = "reads one data stream" if key in FIXED_DATA_KEYS else "trains one model (its checkpoints)"
            raise ConfigError(f"stages.{plan.stage.name}", f"{key}={ours} differs from stage {first.stage.name}'s "
                              f"{theirs}: every stage of a recipe {why}, keep it the same")


def check_average_saves(plan: StagePlan, gated_before: bool) -> None:
    """The anneal stage saves at least 2 checkpoints to average: counted at its planned steps, or, when a gated
    stage before it may end early and move its start, for the worst start (ceil(steps / every) saves)."""
    every = effective_every(plan)
    saves = (-(-plan.steps // every) if gated_before and plan.job.checkpoint.every > 0 else
             anneal_save_count(plan.start.step, plan.start.step + plan.steps, every))
    if saves < 2:
        fix = "set a smaller checkpoint.every in its overrides" if every > 1 else "give the stage more tokens"
        where = ("for any start (a gated stage before it may end early)" if gated_before else
                 f"(steps {plan.start.step + 1} to {plan.start.step + plan.steps})")
        raise ConfigError(f"stages.{plan.stage.name}.average", f"the stage saves {saves} checkpoint(s) in its "
                          f"{plan.steps} steps {where}, checkpoint.every={plan.job.checkpoint.every}; an average "
                          f"needs at least 2: {fix}")


def _dotted(obj, key: str):
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _well_formed(record) -> bool:
    """A stage's record as save_state writes it: positions of whole numbers where the runner reads them."""
    def position(value) -> bool:
        return isinstance(value, dict) and set(value) == {"step", "tokens", "samples"} and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value.values())
    return isinstance(record, dict) and position(record.get("start")) and isinstance(record.get("chunks"), list) \
        and (not record.get("done") or position(record.get("end")))


class RecipeRunner:
    def __init__(self, recipe: RecipeConfig, stream: TextIO = sys.stdout, world_size: Optional[int] = None):
        self.recipe, self.stream = recipe, stream
        self.world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
        self.run_dir = Path(recipe.run_dir)
        self.state_path = self.run_dir / STATE

    def say(self, line: str) -> None:
        if _rank() == 0:
            print(scrub(f"[recipe] {line}"), file=self.stream, flush=True)

    def plan(self, check_files: bool = True) -> List[StagePlan]:
        """Every stage's job loaded and validated for this world size, and the inputs they read present, before
        anything runs: a bad override in the last stage is a one-line error now, not after the first stages."""
        plans = static_plan(self.recipe, self.world_size)
        for plan in plans:
            gates.check_stage(plan)
            if plan.stage.average:
                check_average_saves(plan, gated_before=any(p.stage.gate.enabled for p in plans[:plans.index(plan)]))
            check_fixed_data(plans[0], plan)
            if not plan.job.data.train:
                raise ConfigError(f"stages.{plan.stage.name}", "data.train is empty: the stage has nothing to train on")
            e = plan.job.long_eval
            if check_files and e.enabled and e.needle_trials:  # else found when the stage starts, hours in
                from engine.data.tokenizer import load_tokenizer
                from engine.eval.needle import check_needle_room
                try:
                    check_needle_room(load_tokenizer(plan.job.data.tokenizer),
                                      e.needle_lengths or [plan.job.data.seq_len], e.needle_candidates, e.seed)
                except ConfigError as error:
                    raise ConfigError(f"stages.{plan.stage.name}", str(error)) from None
            for ds in (plan.job.data.train + plan.job.data.valid) if check_files else []:
                for suffix in (".bin", ".idx"):
                    if not Path(ds.path + suffix).is_file():
                        raise ConfigError(f"stages.{plan.stage.name}", f"data file {ds.path + suffix} does not exist")
        horizon, warmup = schedule_horizon(self.recipe, plans), warmup_tokens(self.recipe, plans)
        if self.recipe.total_tokens and horizon < warmup:  # warmup_steps, counted in tokens only here (H47)
            raise ConfigError("total_tokens", f"{horizon:,} is shorter than the warmup ({warmup:,} tokens: "
                                              f"warmup_steps={self.recipe.warmup_steps} of the first stages)")
        return plans

    def load_state(self) -> dict:
        if not (self.state_path.exists() or self.state_path.is_symlink()):
            return {"recipe": self.recipe.name, "stages": {}}
        try:
            if not self.state_path.is_file():  # a directory, a FIFO (a read would block), a device, a broken link
                raise ValueError(STATE)
            state = json.loads(self.state_path.read_text())
            if not isinstance(state.get("stages"), dict) or not all(map(_well_formed, state["stages"].values())):
                raise ValueError(STATE)
        except (ValueError, AttributeError, RecursionError, OSError):
            raise ConfigError("run_dir", f"{self.state_path} is not a recipe state file herd wrote: move it away or "
                                         f"use another run_dir") from None
        if state.get("recipe") != self.recipe.name:
            raise ConfigError("name", f"{self.run_dir} holds recipe '{state.get('recipe')}', not "
                                      f"'{self.recipe.name}': use another run_dir")
        return state

    def save_state(self, state: dict) -> None:
        if _rank() == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(self.state_path, json.dumps(state, indent=1) + "\n")
        _barrier()

    def run(self) -> dict:
        plans = self.plan()
        horizon, warmup = schedule_horizon(self.recipe, plans), warmup_tokens(self.recipe, plans)
        state = self.check_state(plans)
        position, history = Position(), []
        for plan in plans:
            record = state["stages"].get(plan.stage.name)
            if record is not None and record.get("done"):
                self.say(f"stage {plan.stage.name}: finished earlier (steps {record['start']['step']} to "
                         f"{record['end']['step']}), skipped")
            else:
                record = record or {"start": asdict(position), "chunks": [], "done": False}
                state["stages"][plan.stage.name] = record
                self.run_stage(plan, state, record, history, horizon, warmup)
            history.append(data_stage(plan.job, Position(**record["start"])))
            position = Position(**record["end"])
        self.finish(plans, state)
        return state

    def check_state(self, plans: List[StagePlan]) -> dict:
        """The state file of an earlier run of this recipe, checked against today's plan (one line if it differs),
        and the run directory's other contents: nothing of another run may be resumed or replaced."""
        state, position = self.load_state(), Position()
        self.check_run_dir(plans, state)
        schedule = (schedule_horizon(self.recipe, plans), warmup_tokens(self.recipe, plans))
        for plan in plans:
            record = state["stages"].get(plan.stage.name)
            self.check_unchanged(plan, record, position, schedule)
            if record is None or not record.get("done"):
                break
            position = Position(**record["end"])
        return state

    def check_run_dir(self, plans: List[StagePlan], state: dict) -> None:
        """Before any stage runs: a state naming stages the recipe no longer has (renamed: its new name would
        start over at step 0 on the old checkpoints), checkpoints without this recipe's state (a plain run saved
        as `train` there, or a state file removed), and an `averaged` or `hf` directory this recipe did not write
        (the end of the recipe replaces its own)."""
        gone = sorted(set(state["stages"]) - {plan.stage.name for plan in plans})
        if gone:
            raise ConfigError("stages", f"{self.state_path} records stage(s) {', '.join(gone)}, which the recipe no "
                                        f"longer names (renamed or removed): use another run_dir")
        if not state["stages"]:
            from engine.checkpoint.store import CheckpointStore
            root = checkpoint_root(plans[0].job.checkpoint.dir, self.run_dir / TRAIN_NAME)
            steps = CheckpointStore(root, lineage=TRAIN_NAME).complete_steps() if root.is_dir() else []
            if steps:
                raise ConfigError("run_dir", f"{root} holds checkpoints (step {steps[-1]}) but {self.run_dir} has "
                                             f"no {STATE}: not this recipe's run; use another run_dir")
        for name, wanted in ((AVERAGED, plans[-1].stage.average), (HF, self.recipe.export_hf)):
            out = self.run_dir / name
            if wanted and name not in state and state.get("writing") != name and (out.exists() or out.is_symlink()):
                raise ConfigError("run_dir", f"{out} exists and this recipe did not write it (it writes its "
                                             f"{'average' if name == AVERAGED else 'export'} there): move it away "
                                             f"or use another run_dir")

    def check_unchanged(self, plan: StagePlan, record: Optional[dict], position: Position,
                        schedule: tuple = (None, None)) -> None:
        """A recipe edited after its stages ran would continue from positions another plan made: refuse it."""
        if record is None:
            return
        key = f"stages.{plan.stage.name}"
        if Position(**record["start"]) != position:
            raise ConfigError(key, f"{self.state_path} has this stage starting at {record['start']}, the recipe "
                                   f"now at {asdict(position)}: an earlier stage changed; use another run_dir")
        # what the stage ran with: recorded when it began (since 2026-12-08; when it finished before), so an
        # edit of a preempted stage is refused as one of a finished stage is
        ran = "finished" if record.get("done") else "began"
        if "blend" in record and record["blend"] != blend_of(plan.job):
            raise ConfigError(f"{key}.overrides", f"{ran} on the blend {record['blend']}; the recipe now says "
                                                  f"{blend_of(plan.job)} (later stages replay this stage's data "
                                                  f"from it): use another run_dir")
        if "seq_len" in record and (record.get("tokens_per_step"), record.get("seq_len")) != (
                tokens_per_step(plan.job), plan.job.data.seq_len):
            raise ConfigError(key, f"{ran} with {record.get('tokens_per_step')} tokens per step at sequence length "
                                   f"{record.get('seq_len')}; the recipe now says {tokens_per_step(plan.job)} at "
                                   f"{plan.job.data.seq_len}: use another run_dir")
        for name, value in (record.get("fixed") or {}).items():
            recorded = os.path.realpath(value) if name == "data.tokenizer.path" and isinstance(value, str) and value \
                else value
            if name in FIXED_DATA_KEYS and _fixed_value(plan.job, name) != recorded:  # later stages replay its data
                raise ConfigError(name, f"stage {plan.stage.name} {ran} with {name}={value}; the recipe now says "
                                        f"{_fixed_value(plan.job, name)} (the later stages continue its data stream): "
                                        f"keep it, or use another run_dir")
        steps = record["end"]["step"] - record["start"]["step"] if record.get("done") else 0
        if record.get("done") and (steps > plan.steps or (steps < plan.steps and not plan.stage.gate.enabled)):
            raise ConfigError(f"{key}.tokens", f"the stage ran {steps} steps; the recipe now gives it {plan.steps}: "
                                               f"use another run_dir")
        ran_on = record.get("schedule")
        if isinstance(ran_on, dict) and ran_on != {"horizon": schedule[0], "warmup": schedule[1]}:
            raise ConfigError("total_tokens", f"stage {plan.stage.name} {ran} on a schedule of "
                              f"{ran_on.get('horizon')} tokens with {ran_on.get('warmup')} of warmup; the recipe now "
                              f"gives {schedule[0]} and {schedule[1]} (the LR would jump): set total_tokens="
                              f"{ran_on.get('horizon')} (and the same warmup), or use another run_dir")

    def run_stage(self, plan: StagePlan, state: dict, record: dict, history: list, horizon: int,
                  warmup: int) -> None:
        """Run the stage (a gated one chunk by chunk, until its gate passes or its budget is spent)."""
        start = Position(**record["start"])
        budget_end = start.step + plan.steps
        anneal_tokens = anneal_span(plan)
        while True:
            end = min(start.step + (len(record["chunks"]) + 1) * plan.chunk_steps, budget_end)
            job = position_job(plan, start, end, history, horizon, warmup, anneal_tokens, self.world_size,
                               first_chunk=not record["chunks"])
            from engine.run import build_trainer
            trainer = build_trainer(job, self.stream)  # a refusal of the job (its checkpoint directory) is one line
            if trainer.state.step > end:  # it was marked done at a step its checkpoint is not at (H43)
                trainer._abort()  # the run's claim and locks, taken by build_trainer
                raise self.past_end(plan, trainer.state.step, end, budget_end)
            if not record["chunks"]:  # on disk before the stage's first checkpoint: the run directory is this recipe's
                record.update(stream_record(job), schedule={"horizon": horizon, "warmup": warmup})
                self.save_state(state)
            self.say(f"stage {plan.stage.name} ({plan.stage.kind}): steps {start.step} to {end} of {budget_end}, "
                     f"{tokens_per_step(job):,} tokens per step ({job.data.global_batch_size} x {job.data.seq_len}), "
                     f"starting at {start.tokens:,} tokens")
            trainer.fit()
            if trainer.state.preempted:
                from engine.callbacks import PREEMPTED_EXIT_CODE
                raise SystemExit(PREEMPTED_EXIT_CODE)
            gate = _from_rank0(lambda: gates.measure(plan, self.run_dir / TRAIN_NAME, start.step, end))
            record["chunks"].append({"end_step": end, "gate": gate})
            passed = gate is not None and gate.get("passed") is True
            if end >= budget_end or (plan.stage.gate.enabled and passed):
                record["end"], record["done"] = asdict(start.after(end - start.step, job)), True
                record.update(stream_record(job), schedule={"horizon": horizon, "warmup": warmup})
            if gate is not None:
                self.say(gates.describe(plan.stage, gate, record["done"]))
            self.save_state(state)
            fault_point("recipe_stage_done")  # the kill tests stop the runner here, between two runs
            if record["done"]:
                return

    @staticmethod
    def past_end(plan: StagePlan, step: int, end: int, budget_end: int) -> ConfigError:
        """The refusal of a run already past where its stage (or this chunk of a gated stage) now ends."""
        name = plan.stage.name
        if step > budget_end:
            return ConfigError(f"stages.{name}.tokens", f"the run is at step {step}, past step {budget_end}, where "
                               f"the stage now ends: it trained more than the recipe now gives it; give it its "
                               f"tokens back, or use another run_dir")
        return ConfigError(f"stages.{name}.gate.check_every_tokens", f"the run is at step {step}, past step {end}, "
                           f"where this check of the gate now falls: its interval changed since the stage began; "
                           f"put it back, or use another run_dir")

    def mark_writing(self, state: dict, name: str) -> None:
        """Record that <run_dir>/NAME is being written (a kill before its result is recorded leaves it to be
        replaced by the rerun); check_run_dir refused one that was there before, and one appearing since is
        refused now."""
        out = self.run_dir / name
        if state.get("writing") != name and _from_rank0(lambda: out.exists() or out.is_symlink()):
            raise ConfigError("run_dir", f"{out} exists and this recipe did not write it: move it away or use "
                                         f"another run_dir")
        state["writing"] = name
        self.save_state(state)

    def finish(self, plans: List[StagePlan], state: dict) -> None:
        """The anneal stage's average (and the HF export), once; then the table of what each stage did."""
        last = plans[-1]
        record = state["stages"][last.stage.name]
        ckpt_root = checkpoint_root(last.job.checkpoint.dir, self.run_dir / TRAIN_NAME)
        if last.stage.average and AVERAGED not in state:
            from recipe.averaging import average_stage
            self.mark_writing(state, AVERAGED)  # from here <run_dir>/averaged is this recipe's to replace
            state[AVERAGED] = average_stage(self.run_dir, ckpt_root, Position(**record["start"]).step,
                                            Position(**record["end"]).step, effective_every(last))
            state.pop("writing")
            self.save_state(state)
            self.say(f"averaged {len(state[AVERAGED]['sources'])} annealing checkpoints into "
                     f"{state[AVERAGED]['root']}")
        exported = record["end"]["step"]  # an export of an earlier end (a stage added since) is replaced
        if self.recipe.export_hf and (HF not in state or state.get("hf_step", exported) != exported):
            from recipe.averaging import export_final
            if HF in state:  # this recipe's own export: marked as being rewritten, then replaced
                state.pop(HF)
                state["writing"] = HF
            self.mark_writing(state, HF)
            state[HF], state["hf_step"] = export_final(self.run_dir, state.get(AVERAGED), ckpt_root), exported
            state.pop("writing")
            self.save_state(state)
            self.say(f"exported {state[HF]} (transformers: AutoModelForCausalLM.from_pretrained)")
        for line in gates.summary(plans, state, self.run_dir / TRAIN_NAME):
            self.say(line)


def stream_record(job) -> dict:
    """What a stage's data stream was, as the state records it (later stages replay it)."""
    return {"tokens_per_step": tokens_per_step(job), "seq_len": job.data.seq_len, "blend": blend_of(job),
            "fixed": {key: _fixed_value(job, key) for key in FIXED_DATA_KEYS}}


def _fixed_value(job, key: str):
    """A data-stream key as recorded and compared: the tokenizer's path resolved (./tok.json is tok.json)."""
    value = _dotted(job, key)
    return os.path.realpath(value) if key == "data.tokenizer.path" and value else value


def blend_of(job) -> list:
    """A stage's training blend as the state records it: [[path, weight], ...]."""
    return [[ds.path, ds.weight] for ds in job.data.train]


def run_recipe(recipe: RecipeConfig, stream: Optional[TextIO] = None) -> dict:
    return RecipeRunner(recipe, stream or sys.stdout).run()
