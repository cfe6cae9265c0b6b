"""Running the passes of curate/pipeline.py on datatrove's LocalPipelineExecutor or SlurmPipelineExecutor."""

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import List

from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor

from curate.pipeline import FAULT_ENV, HOLD, FaultPoint, Layout, build_stages, fault_is_hold
from curate.read import list_corpus
from curate.schema import CurateConfig
from engine.errors import HerdError
from engine.files import write_atomic

FILES_LIST = "inputs.json"  # the corpus's file list, fixed at the first run so a resumed run shards alike
PIPELINE_RECORD = "pipeline.json"  # the settings the outputs were made with
RUNTIME_KEYS = ("kind", "workers", "partition", "time", "cpus_per_task", "mem_per_cpu_gb", "venv_path")


def _settings(cfg: CurateConfig) -> dict:
    """What the outputs depend on: everything but how the tasks are scheduled (executor.tasks stays: the
    shards)."""
    settings = dataclasses.asdict(cfg)
    for key in RUNTIME_KEYS:
        settings["executor"].pop(key)
    settings.pop("examples")
    return settings


def _first_difference(old, new, prefix: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            found = _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if found:
                return found
        return ""
    return "" if old == new else f"{prefix[:-1]} was {old!r}, now {new!r}"


def claim_output(cfg: CurateConfig) -> None:
    """The output directory is new, empty, or an earlier run of the same pipeline (which this run resumes); a
    directory of other files, or a run with other settings (its finished tasks would be kept as they are), is
    refused in one line and left untouched (R21)."""
    root = Layout(cfg.output_dir).root
    record = root / PIPELINE_RECORD
    if root.exists() and not root.is_dir():
        raise HerdError(f"output_dir {root} is a file")
    if record.is_file():
        old = _read_json(record, dict)
        difference = _first_difference(old, _settings(cfg))
        if difference:
            raise HerdError(f"output_dir {root} holds a run of another pipeline ({difference}); use a new "
                            f"output_dir, or remove it to start over")
        return
    if root.is_dir() and any(root.iterdir()):
        raise HerdError(f"output_dir {root} exists and is not a herd curate output; choose another or remove it")
    root.mkdir(parents=True, exist_ok=True)
    write_atomic(record, json.dumps(_settings(cfg), indent=2) + "\n")


def _read_json(path: Path, kind: type):
    """A record herd wrote under output_dir; anything else there is one line naming it, never a traceback."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise HerdError(f"{path}: not a record herd curate wrote ({str(e).splitlines()[0]}); use a new output_dir, "
                        f"or remove it to start over") from None
    if not isinstance(value, kind) or (kind is list and not all(isinstance(v, str) for v in value)):
        raise HerdError(f"{path}: not a record herd curate wrote; use a new output_dir, or remove it to start over")
    return value


def corpus_files(cfg: CurateConfig) -> List[str]:
    """The input files, listed once per output directory: a rerun (resume) uses the same list and sharding even
    if files were added meanwhile."""
    listing = Layout(cfg.output_dir).root / FILES_LIST
    files = None if listing.is_file() else list_corpus(cfg.input.paths, cfg.input.include)
    if files == []:
        raise HerdError(f"input.paths: no file matching {', '.join(cfg.input.include)} in {', '.join(cfg.input.paths)}")
    claim_output(cfg)  # before anything is written
    if files is None:
        return _read_json(listing, list)
    write_atomic(listing, json.dumps(files))
    return files


def run_local(cfg: CurateConfig) -> None:
    """Every pass in order, each on a local multi-process executor; finished tasks are skipped."""
    lay = Layout(cfg.output_dir)
    if fault_is_hold():
        raise HerdError(f"{FAULT_ENV}=PASS:RANK:{HOLD} waits to be cancelled: it is for the slurm executor")
    if os.environ.get(FAULT_ENV) and os.getpgid(0) != os.getpid():
        raise HerdError(f"{FAULT_ENV} kills the run's process group: start herd curate in a session of its own")
    stages = build_stages(cfg, corpus_files(cfg))
    for stage in stages:
        for p in stage.passes:
            print(f"herd curate: {stage.name} / {p.name} ({p.tasks} task{'s' if p.tasks > 1 else ''})", flush=True)
            fault = FaultPoint(p.name, str(lay.logs(p.name)))
            executor = LocalPipelineExecutor(p.steps() + [fault], tasks=p.tasks,
                                             workers=max(1, min(cfg.executor.workers if cfg.executor.workers > 0
                                                                else p.tasks, p.tasks)),
                                             logging_dir=str(lay.logs(p.name)), start_method="fork")
            try:
                executor.run()
            except Exception as e:  # noqa: BLE001 - one line naming the pass; the tasks' logs hold the traceback
                raise HerdError(f"{p.name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (task "
                                f"logs in {lay.logs(p.name)}/logs; a rerun resumes)") from None
            incomplete = executor.get_incomplete_ranks()
            if incomplete:
                raise HerdError(f"{p.name}: tasks {incomplete} did not finish; see {lay.logs(p.name)}/logs "
                                f"(a rerun resumes them)")


class _HerdSlurmExecutor(SlurmPipelineExecutor):
    """datatrove's SLURM executor without the memory request when mem_per_cpu_gb is 0 (a cluster that does not
    schedule memory rejects any), and without its stats-merging job: herd's report pass reads the outputs."""

    def get_sbatch_args(self, max_array: int = 1) -> dict:
        args = super().get_sbatch_args(max_array)
        if not self.mem_per_cpu_gb:
            args.pop("mem-per-cpu", None)
        return args

    def launch_merge_stats(self):
        pass


def submit_slurm(cfg: CurateConfig) -> List[str]:
    """Every pass as a SLURM job array, each depending on the one before (afterok); returns the job ids. Passes
    already complete are not submitted again."""
    lay, ex = Layout(cfg.output_dir), cfg.executor
    venv = ex.venv_path or str(Path(sys.prefix) / "bin" / "activate")
    previous, executors = None, []
    for stage in build_stages(cfg, corpus_files(cfg)):
        for p in stage.passes:
            fault = FaultPoint(p.name, str(lay.logs(p.name)))
            previous = _HerdSlurmExecutor(
                p.steps() + [fault], tasks=p.tasks, time=ex.time, partition=ex.partition,
                cpus_per_task=ex.cpus_per_task, mem_per_cpu_gb=ex.mem_per_cpu_gb, workers=ex.workers,
                job_name=f"{cfg.name}-{p.name}", qos="", venv_path=venv, logging_dir=str(lay.logs(p.name)),
                depends=previous, requeue_signals=None)
            executors.append(previous)
    previous.run()  # launches its dependencies first, each array after the one before (afterok)
    return [str(e.job_id) for e in executors]  # -1: that pass was complete and not submitted
