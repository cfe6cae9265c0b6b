"""`herd align PIPELINE.yaml`: post-training rounds (Llama 3 paper section 4.1: reward model, rejection sampling,
SFT, DPO, repeated) as stages of one engine, each a normal run under the job's 4D layout.

Stage r<round>-<name> runs in <run_dir>/r<round>-<name>/ and, when it has finished, writes DONE.json there
(atomically, after its checkpoints or rows are complete). Running the pipeline again skips every stage with a
DONE.json and continues with the first without one: a stage killed midway resumes from its own newest checkpoint
(checkpoint.resume=auto) or, for rejection sampling, starts over (its rows are written in one atomic rename at the
end). So the runner is idempotent: killed anywhere, rerun, it ends where an uninterrupted run ends.

Weights flow by rule unless a stage names them: a training stage starts from the latest policy (the last sft or
dpo stage that finished), or the pipeline's init; rejection sampling uses the latest policy and the latest reward
model; DPO's reference is the weights it starts from.
"""

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, TextIO

import torch.distributed as dist

from engine.checkpoint.checkpointer import checkpoint_root
from engine.config import PipelineConfig, StageConfig, load_config
from engine.errors import ConfigError
from engine.secrets import scrub
from engine.train_module import fault_point

from align.generate import SamplingConfig
from align.inputs import check_job_inputs, check_prompts
from engine.config_checks import check_existing_directory

DONE = "DONE.json"
POLICY_KINDS = ("sft", "dpo")


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
        if done.get("checkpoints"):
            self.checkpoints[stage.name] = done["checkpoints"]
            if stage.kind in POLICY_KINDS:
                self.latest_policy = done["checkpoints"]
            elif stage.kind == "rm":
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

    def say(self, line: str) -> None:
        if _rank() == 0:
            print(scrub(f"[align] {line}"), file=self.stream, flush=True)

    def check(self) -> None:
        """Load every stage's job once before anything runs, so a bad override or layout in the last stage is a
        one-line error now, not after hours of the first ones ("@stage" inputs stand in as placeholders)."""
        for stage in self.pipeline.stages:
            placeholder = (lambda value: f"rows-of-{value[1:]}.jsonl" if value.startswith("@") else value)
            extra = [] if stage.kind == "rejection_sampling" else self._align_overrides(
                stage.kind, placeholder(stage.data), placeholder(stage.valid))
            try:
                self.job(stage, f"r1-{stage.name}", extra)
            except ConfigError as e:  # name the stage whose job (its overrides) is wrong
                raise ConfigError(f"stages.{stage.name}", str(e)) from None

    def check_inputs(self) -> None:
        """Read every file input of every stage as the stage will (tokenizer, rows, prompts), so a malformed row
        in the last stage's file is a one-line error before the first stage trains. "@stage" inputs are made
        by the pipeline itself and checked where they are read. Also the pipeline's first policy, if named."""
        check_existing_directory(self.pipeline.init, "init")
        for stage in self.pipeline.stages:
            if stage.kind == "rejection_sampling":
                self._check_prompts(stage)  # "@stage" prompts do not exist: load_pipeline refuses them
            elif not stage.data.startswith("@") and not stage.valid.startswith("@"):
                extra = self._align_overrides(stage.kind, stage.data, stage.valid)
                check_job_inputs(self.job(stage, f"r1-{stage.name}", extra))

    def check_checkpoints(self) -> None:
        """Every training stage still to run, its checkpoint directory as its run will claim it (another run's,
        or a live run holding it: one line before `herd align --nproc` starts any rank)."""
        from engine.checkpoint.checkpointer import check_job_checkpoints
        placeholder = (lambda value: f"rows-of-{value[1:]}.jsonl" if value.startswith("@") else value)
        for round_index in range(1, self.pipeline.rounds + 1):
            for stage in self.pipeline.stages:
                stage_id = f"r{round_index}-{stage.name}"
                if stage.kind == "rejection_sampling" or (self.run_dir / stage_id / DONE).is_file():
                    continue
                cfg = self.job(stage, stage_id, self._align_overrides(stage.kind, placeholder(stage.data),
                                                                      placeholder(stage.valid)))
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
                done_path = self.run_dir / stage_id / DONE
                if done_path.is_file():
                    self.say(f"{stage_id} ({stage.kind}): finished earlier, skipped")
                else:
                    self.say(f"{stage_id} ({stage.kind}): running")
                    self._finish(done_path, self._run_stage(stage, stage_id))
                self.outputs.record(stage, json.loads(done_path.read_text()))
        self.say(f"pipeline {self.pipeline.name} finished: policy {self.outputs.latest_policy}")
        return self.outputs

    def _finish(self, done_path: Path, done: dict) -> None:
        """DONE.json, written once the stage's outputs are complete, by rank 0, atomically; every rank waits."""
        if _rank() == 0:
            temporary = done_path.with_suffix(".tmp")
            temporary.write_text(json.dumps(done, indent=1) + "\n")
            os.replace(temporary, done_path)
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


def _preempted_exit_code() -> int:
    from engine.callbacks import PREEMPTED_EXIT_CODE
    return PREEMPTED_EXIT_CODE


def run_pipeline(pipeline: PipelineConfig, stream: Optional[TextIO] = None) -> Outputs:
    return PipelineRunner(pipeline, stream or sys.stdout).run()
