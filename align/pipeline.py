"""`herd align PIPELINE.yaml`: post-training rounds (Llama 3 paper section 4.1: reward model, rejection sampling,
SFT, DPO, repeated) as stages of one engine, each a normal run under the job's 4D layout.

Stage r<round>-<name> runs in <run_dir>/r<round>-<name>/ and, when it has finished, writes DONE.json there
(atomically, after its checkpoints or rows are complete), recording its kind, the pipeline's name and what it
trained (its fingerprint). Running the pipeline again skips every stage whose DONE.json matches it (one that does
not, or that herd did not write, is refused before anything runs) and continues with the first without one: a
stage killed midway resumes from its own newest checkpoint (checkpoint.resume=auto) or, for rejection sampling,
starts over (its rows are written in one atomic rename at the end). So the runner is idempotent: killed anywhere,
rerun, it ends where an uninterrupted run ends.

Weights flow by rule unless a stage names them: a training stage starts from the latest policy (the last sft or
dpo stage that finished), or the pipeline's init; rejection sampling uses the latest policy and the latest reward
model; DPO's reference is the weights it starts from.
"""

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, TextIO

import torch.distributed as dist

from engine.checkpoint.checkpointer import checkpoint_root
from engine.checkpoint.store import CheckpointStore
from engine.config import PipelineConfig, StageConfig, config_fields, load_config, override_sets
from engine.config_checks import check_existing_directory
from engine.config_schema import MODEL_SHAPE_KEYS
from engine.errors import ConfigError, HerdError
from engine.files import file_problem, write_atomic
from engine.secrets import scrub
from engine.train_module import fault_point

from align.generate import SamplingConfig
from align.inputs import check_job_inputs, check_prompts

DONE = "DONE.json"
DONE_MAX_BYTES = 1 << 20  # a DONE.json herd writes is a few KiB; anything far larger is not one
POLICY_KINDS = ("sft", "dpo")
# job keys the pipeline sets from a stage's own fields (and its run directory): an override of one would silently
# replace the stage's kind or data (or be silently ignored), so overrides may not name them
STAGE_KEYS = {"align.kind": "the stage's kind", "align.train_file": "the stage's data",
              "align.valid_file": "the stage's valid", "checkpoint.load_weights": "the stage's init",
              "log.run_dir": "the pipeline's run_dir", "log.name": "the stage's name and round"}
# what does not change what a stage trains, left out of its fingerprint: the layout (a stage finished on one
# process is finished on four), where logs and checkpoints go, and the device
NOT_FINGERPRINTED = ("parallel", "log", "checkpoint", "watchdog", "slurm", "train.device", "data.micro_batch_size")
# model fields that shape the weights every stage hands on to the next


def _same_vocabulary(ours: tuple, theirs: tuple) -> bool:
    """Two tokenizer files of one token -> id mapping (a copy elsewhere) are one tokenizer; unreadable: not known."""
    if ours[0] != theirs[0] or not (ours[1] and theirs[1]):
        return False
    from engine.config import TokenizerConfig
    from engine.data.tokenizer import load_tokenizer
    try:
        return len({load_tokenizer(TokenizerConfig(kind=kind, path=path)).vocab_fingerprint
                    for kind, path in (ours, theirs)}) == 1
    except HerdError:  # missing or malformed: check_inputs says so, naming the file
        return False


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@dataclass
class Outputs:
    """What finished stages left behind, by stage name (the latest round's run of each)."""

    checkpoints: Dict[str, str] = field(default_factory=dict)
    rows: Dict[str, str] = field(default_factory=dict)
    latest_policy: str = ""
    latest_reward: str = ""

    def record(self, stage: StageConfig, done: dict) -> None:
        kind = done.get("kind", stage.kind)  # what the stage was finished as (checked equal to its kind now)
        if done.get("checkpoints"):
            self.checkpoints[stage.name] = done["checkpoints"]
            if kind in POLICY_KINDS:
                self.latest_policy = done["checkpoints"]
            elif kind == "rm":
                self.latest_reward = done["checkpoints"]
        if done.get("rows"):
            self.rows[stage.name] = done["rows"]


class PipelineRunner:
    def __init__(self, pipeline: PipelineConfig, stream: TextIO = sys.stdout, world_size: Optional[int] = None):
        """world_size: what the stages' jobs are validated for; by default this process's (WORLD_SIZE). `herd
        align --nproc N` checks the pipeline for N ranks before it starts them."""
        self.pipeline, self.stream = pipeline, stream
        self.world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
        self.run_dir = Path(pipeline.run_dir)
        self.outputs = Outputs(latest_policy=pipeline.init)
        self._trained_on: Dict[str, Dict[str, Any]] = {}  # stage name -> what it trains (see trained_on)
        self._file_hashes: Dict[str, str] = {}

    def say(self, line: str) -> None:
        if _rank() == 0:
            print(scrub(f"[align] {line}"), file=self.stream, flush=True)

    def check(self) -> None:
        """Load every stage's job once before anything runs, so a bad override or layout in the last stage is a
        one-line error now, not after hours of the first ones ("@stage" inputs stand in as placeholders)."""
        self._check_overrides()
        shapes = {}
        for stage in self.pipeline.stages:
            try:
                cfg = self._checked_job(stage)
            except ConfigError as e:  # name the stage whose job (its overrides) is wrong
                raise ConfigError(f"stages.{stage.name}", str(e)) from None
            shapes[stage.name] = {key: getattr(cfg.model, key) for key in MODEL_SHAPE_KEYS}
            tokenizer = cfg.data.tokenizer  # one token -> id mapping: the stages hand on weights that read it
            shapes[stage.name]["data.tokenizer"] = (tokenizer.kind, os.path.realpath(tokenizer.path)
                                                    if tokenizer.path else "")
        self._check_shapes(shapes)

    def _checked_job(self, stage: StageConfig, stage_id: str = ""):
        """The stage's job as its run will load it, "@stage" inputs as placeholders."""
        placeholder = (lambda value: f"rows-of-{value[1:]}.jsonl" if value.startswith("@") else value)
        extra = [] if stage.kind == "rejection_sampling" else self._align_overrides(
            stage.kind, placeholder(stage.data), placeholder(stage.valid))
        return self.job(stage, stage_id or f"r1-{stage.name}", extra)

    def _check_overrides(self) -> None:
        """No override names a key the stage's own fields set (align.kind=rm in a dpo stage's overrides trained
        a reward model and recorded it as the policy)."""
        where = [("overrides", item) for item in self.pipeline.overrides]
        where += [(f"stages.{s.name}.overrides", item) for s in self.pipeline.stages for item in s.overrides]
        for key, item in where:
            for job_key, owner in STAGE_KEYS.items():
                if override_sets(item, job_key):
                    raise ConfigError(key, f"'{item}' sets {job_key}, which the pipeline sets itself from {owner}")

    def _check_shapes(self, shapes: Dict[str, Dict[str, int]]) -> None:
        """Every stage starts from weights another stage (or the pipeline's init) left, and rejection sampling
        builds policy and reward model from one job: one model shape for all, or the load fails mid-pipeline."""
        first, reference = next(iter(shapes.items()))
        for name, shape in shapes.items():
            for key in MODEL_SHAPE_KEYS:
                if shape[key] != reference[key]:
                    raise ConfigError(f"stages.{name}", f"model.{key} is {shape[key]} here but {reference[key]} in "
                                                        f"stage {first}: the stages hand one model's weights on")
            if shape["data.tokenizer"] != reference["data.tokenizer"] and not _same_vocabulary(
                    shape["data.tokenizer"], reference["data.tokenizer"]):
                ours, theirs = (" ".join(filter(None, s["data.tokenizer"])) for s in (shape, reference))
                raise ConfigError(f"stages.{name}", f"data.tokenizer is {ours} here but {theirs} in stage {first}: "
                                                    f"the stages hand on weights that read one tokenizer's ids")

    def check_inputs(self) -> None:
        """Read every file input of every stage as the stage will (tokenizer, rows, prompts), so a malformed row
        in the last stage's file is a one-line error before the first stage trains. "@stage" inputs are made
        by the pipeline itself and checked where they are read; a stage's other, real file is read now. Also the
        pipeline's first policy, if named, and every DONE.json the run would skip a stage for."""
        check_existing_directory(self.pipeline.init, "init")
        for stage in self.pipeline.stages:
            fields = ("prompts",) if stage.kind == "rejection_sampling" else ("data", "valid")
            real = [(name, getattr(stage, name)) for name in fields
                    if getattr(stage, name) and not getattr(stage, name).startswith("@")]
            for name, value in real:  # a FIFO or /dev/zero would hang the reader: say what it is, and whose
                problem = file_problem(value)
                if problem:
                    raise ConfigError(f"stages.{stage.name}.{name}", f"{value} {problem}")
            if stage.kind == "rejection_sampling":
                self._check_prompts(stage)  # "@stage" prompts do not exist: load_pipeline refuses them
            elif real:  # the real file(s) in the job's places; an "@stage" one is left out
                files = [value for _, value in real] + [""]
                try:
                    check_job_inputs(self.job(stage, f"r1-{stage.name}",
                                              self._align_overrides(stage.kind, files[0], files[1])))
                except ConfigError as e:
                    raise ConfigError(f"stages.{stage.name}", str(e)) from None
        named = [("init", self.pipeline.init)] + [(f"stages.{s.name}.{f}", getattr(s, f)) for s in self.pipeline.stages
                                                  for f in ("init", "reward") if not getattr(s, f).startswith("@")]
        for key, root in named:  # a directory that holds no checkpoint failed when its stage began
            if root and CheckpointStore(Path(root)).latest_step() is None:
                raise ConfigError(key, f"{root} holds no complete checkpoint (name a checkpoint root: an import's "
                                       f"directory or a run's checkpoints)")
            rm_init = any(key == f"stages.{s.name}.init" and s.kind == "rm" for s in self.pipeline.stages)
            if root and not rm_init:  # a reward model where a policy belongs, or the other way round (a reward
                from align.rejection import check_model_kind  # model starts from either: its head is new)
                check_model_kind(root, key.endswith(".reward"), key)
        self.check_finished()

    def check_checkpoints(self) -> None:
        """Every training stage still to run, its checkpoint directory as its run will claim it (another run's,
        or a live run holding it: one line before `herd align --nproc` starts any rank)."""
        from engine.checkpoint.checkpointer import check_job_checkpoints
        for round_index in range(1, self.pipeline.rounds + 1):
            for stage in self.pipeline.stages:
                stage_id = f"r{round_index}-{stage.name}"
                if stage.kind == "rejection_sampling" or self._finished(stage, stage_id) is not None:
                    continue
                cfg = self._checked_job(stage, stage_id)
                check_job_checkpoints(cfg, saves=True)  # every training stage saves, as _run_stage makes it

    def _check_prompts(self, stage: StageConfig) -> None:
        check_prompts(self.job(stage, f"r1-{stage.name}", []), stage.prompts, stage.max_new_tokens,
                      key=f"stages.{stage.name}.prompts")

    @staticmethod
    def _align_overrides(kind: str, data: str, valid: str) -> List[str]:
        """The stage's align.* keys (an empty value is left out: a dotlist reads `key=` as null)."""
        return [f"align.kind={kind}", f"align.train_file={data}"] + ([f"align.valid_file={valid}"] if valid else [])

    def run(self) -> Outputs:
        self.check()
        self.check_inputs()
        for round_index in range(1, self.pipeline.rounds + 1):
            for stage in self.pipeline.stages:
                stage_id = f"r{round_index}-{stage.name}"
                done = self._finished(stage, stage_id)
                if done is not None:
                    self.say(f"{stage_id} ({stage.kind}): finished earlier, skipped")
                else:
                    self.say(f"{stage_id} ({stage.kind}): running")
                    identity = self._identity(stage)
                    self._finish(self.run_dir / stage_id / DONE, {**self._run_stage(stage, stage_id), **identity})
                    done = self._finished(stage, stage_id)
                self.outputs.record(stage, done)
        self.say(f"pipeline {self.pipeline.name} finished: policy {self.outputs.latest_policy}")
        return self.outputs

    # ---------------------------------------------------------------------------------------------------------
    # finished stages: DONE.json

    def check_finished(self) -> None:
        """Every DONE.json a run of this pipeline would skip a stage for, read and matched against the stage as
        it is now, before anything runs (see _finished)."""
        for round_index in range(1, self.pipeline.rounds + 1):
            for stage in self.pipeline.stages:
                self._finished(stage, f"r{round_index}-{stage.name}")

    def _identity(self, stage: StageConfig) -> Dict[str, Any]:
        """What DONE.json records of the stage besides its outputs: the pipeline, and what the stage trains
        (trained_on) with its fingerprint, so that a rerun skips it only if it would train the same thing."""
        trained_on = self.trained_on(stage)
        return {"pipeline": self.pipeline.name, "fingerprint": _fingerprint(trained_on), "trained_on": trained_on}

    def _finished(self, stage: StageConfig, stage_id: str) -> Optional[dict]:
        """The stage's DONE.json, or None when it has none. Refused with one line naming the file: one that is not
        a DONE.json herd wrote (not a regular file, not a JSON object of this stage), one of another kind or
        pipeline, one whose stage trained other settings or inputs, and one naming outputs that are gone.
        DONE.json files written before `pipeline` and `fingerprint` were recorded are matched by kind only."""
        path = self.run_dir / stage_id / DONE
        if not os.path.lexists(path):
            return None
        done = _read_done(path, stage_id)
        again = (f"move {path.parent} away to run the stage again, or give the pipeline another run_dir")
        recorded = done.get("pipeline")
        if done["kind"] != stage.kind:
            of = f" of pipeline {recorded}" if recorded else ""
            raise ConfigError(str(path), f"stage {stage.name} was finished as kind {done['kind']}{of}; pipeline "
                                         f"{self.pipeline.name} runs it as kind {stage.kind}: {again}")
        if recorded is not None and recorded != self.pipeline.name:
            raise ConfigError(str(path), f"stage {stage.name} was finished by pipeline {recorded}, not by "
                                         f"{self.pipeline.name}: {again}")
        changed = _differences(done.get("trained_on"), self.trained_on(stage)) if "fingerprint" in done else ""
        if changed:
            raise ConfigError(str(path), f"stage {stage.name} was finished with other settings or inputs "
                                         f"({changed}): {again}")
        self._check_outputs(path, done)
        return done

    @staticmethod
    def _check_outputs(path: Path, done: dict) -> None:
        """The checkpoints or rows a DONE.json names still exist: the next stages would start from them."""
        if done["kind"] == "rejection_sampling":
            rows = done.get("rows")
            problem = file_problem(rows) if isinstance(rows, str) and rows else "is not named"
            if problem:
                raise ConfigError(str(path), f"the rows file {rows} it names {problem}: move {path.parent} away "
                                             f"to run the stage again")
            return
        root = done.get("checkpoints")
        if not isinstance(root, str) or not root or CheckpointStore(Path(root)).latest_step() is None:
            raise ConfigError(str(path), f"the checkpoints {root} it names hold no complete checkpoint: move "
                                         f"{path.parent} away to run the stage again")

    def trained_on(self, stage: StageConfig) -> Dict[str, Any]:
        """What the stage trains, as flat keys: its kind, its job as loaded (without layout, logging and
        checkpoint keys, NOT_FINGERPRINTED), its stage fields, the pipeline's init, and each real input file by
        the sha256 of its content ("@stage" inputs by name: that stage's own DONE.json vouches for them)."""
        if stage.name in self._trained_on:
            return self._trained_on[stage.name]
        fields = config_fields(self._checked_job(stage))  # redacted: DONE.json never holds a credential (R17)
        flat = {f"job.{key}": value for key, value in fields.items()
                if not any(key == skip or key.startswith(skip + ".") for skip in NOT_FINGERPRINTED)}
        for key in ("align.train_file", "align.valid_file"):
            flat.pop(f"job.{key}", None)  # the stage's data and valid below, by content
        flat.update({"kind": stage.kind, "pipeline_init": self.pipeline.init, "init": stage.init,
                     "reward": stage.reward})
        for name in ("data", "valid", "prompts"):
            flat[name] = self._file_identity(getattr(stage, name))
        if stage.kind == "rejection_sampling":
            flat.update({name: getattr(stage, name) for name in ("samples", "max_new_tokens", "temperature",
                                                                  "top_p")})
        self._trained_on[stage.name] = flat
        return flat

    def _file_identity(self, value: str) -> str:
        if not value or value.startswith("@") or file_problem(value):
            return value  # nothing, another stage's output, or a file check_inputs has refused already
        if value not in self._file_hashes:
            digest = hashlib.sha256()
            with open(value, "rb") as stream:
                for block in iter(lambda: stream.read(1 << 20), b""):
                    digest.update(block)
            self._file_hashes[value] = f"sha256:{digest.hexdigest()}"
        return self._file_hashes[value]

    def _finish(self, done_path: Path, done: dict) -> None:
        """DONE.json, written once the stage's outputs are complete, by rank 0, atomically; every rank waits."""
        if _rank() == 0:
            write_atomic(done_path, json.dumps(done, indent=1) + "\n")
        _barrier()
        fault_point("stage_done")  # the kill tests stop the runner here, between two stages (TESTING.md R19)

    def resolve(self, value: str, what: str) -> str:
        """'@stage' -> that stage's latest checkpoints (what='checkpoints') or rows (what='rows'); else the value."""
        if not value.startswith("@"):
            return value
        found = getattr(self.outputs, what).get(value[1:])
        if found is None:
            raise ConfigError(value, f"stage '{value[1:]}' has not produced {what} yet at this point of the pipeline")
        return found

    def job(self, stage: StageConfig, stage_id: str, extra: List[str]):
        p = self.pipeline
        return load_config(p.config, [*p.overrides, *extra, *stage.overrides, f"log.run_dir={self.run_dir}",
                                      f"log.name={stage_id}"],
                           world_size=self.world_size)

    def _run_stage(self, stage: StageConfig, stage_id: str) -> dict:
        if stage.kind == "rejection_sampling":
            return self._rejection_sampling(stage, stage_id)
        init = self.resolve(stage.init, "checkpoints") or self.outputs.latest_policy
        extra = self._align_overrides(stage.kind, self.resolve(stage.data, "rows"), self.resolve(stage.valid, "rows"))
        extra += [f"checkpoint.load_weights={init}"] if init else []
        cfg = self.job(stage, stage_id, extra)
        if cfg.checkpoint.every <= 0:  # the next stage starts from this stage's final checkpoint
            cfg.checkpoint.every = cfg.train.steps
        from align.run import train_stage
        trainer = train_stage(cfg, self.stream)
        if trainer.state.preempted:
            raise SystemExit(_preempted_exit_code())
        root = checkpoint_root(cfg.checkpoint.dir, self.run_dir / stage_id)
        return {"stage": stage_id, "kind": stage.kind, "checkpoints": str(root), "steps": trainer.state.step,
                "init": init, "initial_val_loss": getattr(trainer, "initial_val_loss", None),
                "initial_eval_metrics": getattr(trainer, "initial_eval_metrics", {}),
                "last_metrics": {k: v for k, v in (trainer.last_metrics or {}).items() if isinstance(v, (int, float))}}

    def _rejection_sampling(self, stage: StageConfig, stage_id: str) -> dict:
        from align.rejection import run_rejection_sampling
        policy = self.resolve(stage.init, "checkpoints") or self.outputs.latest_policy
        reward = self.resolve(stage.reward, "checkpoints") or self.outputs.latest_reward
        if not policy or not reward:
            raise ConfigError(f"stages.{stage.name}", "rejection sampling needs a policy and a reward model: run "
                                                      "an sft/dpo and an rm stage before it, or name them")
        cfg = self.job(stage, stage_id, [])
        output = self.run_dir / stage_id / "rows.jsonl"
        output.parent.mkdir(parents=True, exist_ok=True)
        sampling = SamplingConfig(max_new_tokens=stage.max_new_tokens, temperature=stage.temperature,
                                  top_p=stage.top_p, seed=cfg.train.seed)
        stats = run_rejection_sampling(cfg, policy, reward, stage.prompts, str(output), stage.samples, sampling,
                                       self.stream)
        return {"stage": stage_id, "kind": stage.kind, "rows": str(output), "policy": policy, "reward": reward,
                "stats": {k: v for k, v in stats.items() if isinstance(v, (int, float, str))}}


def _read_done(path: Path, stage_id: str) -> dict:
    """DONE.json as herd writes it: a regular file holding a JSON object with this stage's id and its kind."""
    problem = file_problem(path)
    if problem is None and os.path.getsize(path) > DONE_MAX_BYTES:
        problem = f"holds {os.path.getsize(path):,} bytes"
    done = None
    if problem is None:
        try:
            done = json.loads(path.read_bytes())
        except (OSError, ValueError, RecursionError) as e:  # ValueError: JSON's, and UTF-8's
            problem = f"cannot be read as JSON ({' '.join(str(e).split())[:80]})"
    if problem is None and not (isinstance(done, dict) and done.get("stage") == stage_id
                                and isinstance(done.get("kind"), str)):
        problem = f"is not a JSON object recording stage {stage_id} and its kind"
    if problem is not None:
        raise ConfigError(str(path), f"{problem}: not a DONE.json herd wrote; move it away (the stage then runs "
                                     f"again)")
    return done


def _fingerprint(trained_on: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(trained_on, sort_keys=True).encode()).hexdigest()


def _differences(then: Any, now: Dict[str, Any], most: int = 3) -> str:
    """The keys whose values differ between what a DONE.json recorded and now, as "key: then -> now" ("" when
    none). Only keys both know are compared: a herd upgrade that adds or drops a config key changes no finished
    stage (the scaling sweeps' rule too)."""
    if not isinstance(then, dict):
        return "its record of what it trained is not an object"
    keys = sorted(key for key in set(then) & set(now) if then[key] != now[key])
    shown = [f"{key}: {then[key]!r} then, {now[key]!r} now" for key in keys[:most]]
    return "; ".join(shown) + (f"; and {len(keys) - most} more" if len(keys) > most else "")


def _preempted_exit_code() -> int:
    from engine.callbacks import PREEMPTED_EXIT_CODE
    return PREEMPTED_EXIT_CODE


def run_pipeline(pipeline: PipelineConfig, stream: Optional[TextIO] = None) -> Outputs:
    return PipelineRunner(pipeline, stream or sys.stdout).run()
