"""`herd scaling SWEEP.yaml [overrides]`: plan an IsoFLOP sweep, train its unfinished runs (here, or as a SLURM job
array with --slurm), then fit and report (docs/scaling.md). launch/cli.py only dispatches here."""

import argparse
import re
import shlex
from pathlib import Path

from engine.errors import ConfigError, HerdError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="sweep YAML (configs/scaling/demo.yaml)")
    p.add_argument("overrides", nargs="*", help="sweep overrides, e.g. budgets=[1e12,3e12,1e13] jobs=2")
    p.add_argument("--plan-only", action="store_true", help="print and write the runs (plan.json); train nothing")
    p.add_argument("--fit-only", action="store_true", help="fit and report the finished runs; train nothing")
    slurm = p.add_argument_group("SLURM (--slurm: an array job, one task per unfinished run)")
    slurm.add_argument("--slurm", action="store_true", help="write the array's sbatch script instead of training")
    slurm.add_argument("--out", help="script path (default: <run_dir>/<name>/array.sbatch)")
    slurm.add_argument("--submit", action="store_true", help="sbatch the script after writing it")
    slurm.add_argument("--partition", default="", help="--partition of the tasks")
    slurm.add_argument("--time", default="", help="--time limit of each task (HH:MM:SS)")
    slurm.add_argument("--max-parallel", type=int, default=0, help="tasks running at once (the array's %%N)")
    slurm.add_argument("--gpus", action="store_true", help="one GPU per task (default: CPU tasks)")


def _check_flags(args: argparse.Namespace) -> None:
    """The flags, before anything is read or written; the SLURM ones go into the script as they are."""
    if args.plan_only + args.fit_only + args.slurm > 1:
        raise HerdError("--plan-only, --fit-only and --slurm exclude each other")
    if args.max_parallel < 0:
        raise HerdError(f"--max-parallel must be >= 0, got {args.max_parallel}")
    if not re.fullmatch(r"[A-Za-z0-9_.,+-]*", args.partition):
        raise HerdError(f"--partition {args.partition!r} may hold only letters, digits and . , _ + -")
    if not re.fullmatch(r"(\d+-)?\d\d:\d\d:\d\d|", args.time):
        raise HerdError(f"--time {args.time!r} is not a time limit of the form HH:MM:SS or D-HH:MM:SS")
    if (args.out or args.submit or args.partition or args.time or args.max_parallel or args.gpus) and not args.slurm:
        raise HerdError("--out, --submit, --partition, --time, --max-parallel and --gpus go with --slurm")


def run(args: argparse.Namespace) -> int:
    _check_flags(args)
    from engine.config import load_config, load_scaling
    from scaling.plan import load_job, plan_runs, sweep_dir
    from scaling.runs import LOCK_FILE, check_same_sweep, config_fields, config_hash, holding_lock
    cfg = load_scaling(args.config, args.overrides)
    job = load_job(cfg)
    runs = plan_runs(cfg, job)
    hashes = []
    for run in runs:  # each run's job as herd train will load it: one line naming the run before anything starts
        try:
            hashes.append(config_hash(load_config(cfg.job, list(cfg.overrides) + run.overrides(cfg))))
        except ConfigError as e:
            raise HerdError(f"run {run.name}: {e}") from None
    sweep = Path(sweep_dir(cfg))
    plan = {"job": cfg.job, "overrides": list(cfg.overrides), "job_config": config_fields(job),
            "runs": [{**run.as_dict(), "overrides": run.overrides(cfg), "config_hash": digest}
                     for run, digest in zip(runs, hashes)]}
    check_same_sweep(sweep, plan)
    if not args.plan_only and not args.slurm:  # results are written last: a directory in their place is refused first
        from scaling.report import check_outputs
        check_outputs(sweep)
    if args.fit_only:
        _finished_runs(args, sweep, plan)  # nothing to fit is one line before plan.json is written
    else:
        from align.inputs import check_job_inputs
        check_job_inputs(job)  # the data every run reads: one line here rather than a failure per run
    if args.slurm:
        _script_path(args, sweep)  # a user's file at --out is refused before anything is written (R21)
        from scaling.runs import check_array_paths  # and what the script could not hold, before plan.json
        check_array_paths(sweep, {"job_name": cfg.name, "partition": args.partition, "time": args.time})
    task = None
    if cfg.downstream.enabled and not args.plan_only and not args.fit_only:
        from scaling.downstream import prepare_task  # a downstream.* mistake before the runs train, not after
        task = prepare_task(job, cfg.downstream)
    with holding_lock(sweep / LOCK_FILE, f"working on the sweep {sweep} (herd scaling)"):
        check_same_sweep(sweep, plan)  # again: another invocation may have planned it before this one locked it
        return _run_locked(args, cfg, job, sweep, plan, runs, task)


def _run_locked(args: argparse.Namespace, cfg, job, sweep: Path, plan: dict, runs: list, task=None) -> int:
    """Everything that writes to the sweep directory, under its lock."""
    from scaling.runs import write_plan
    write_plan(sweep, plan)
    _print_plan(runs)
    if args.plan_only:
        print(f"herd scaling: wrote {sweep / 'plan.json'}", flush=True)
        return 0
    if args.slurm:
        return _slurm(args, cfg, sweep, plan)
    if not args.fit_only:
        from scaling.runs import run_local
        failed = run_local(sweep, plan, cfg.jobs)
        if failed:
            raise HerdError(f"{failed} run(s) failed (logs under {sweep / 'runs'}); run the same command again to "
                            f"retry them (finished runs are kept; a diverged run is not retried)")
    return _fit(args, cfg, job, sweep, plan, task)


def _print_plan(runs) -> None:
    print(f"{'run':<16} {'N':>11} {'layers x dim':>13} {'batch':>6} {'steps':>6} {'tokens D':>12} {'6ND':>9}")
    for r in runs:
        print(f"{r.name:<16} {r.params:>11,} {r.n_layers:>6} x {r.dim:<5} {r.batch_size:>6} {r.steps:>6} "
              f"{r.tokens:>12,} {r.compute:>9.3g}", flush=True)


def _slurm(args: argparse.Namespace, cfg, sweep: Path, plan: dict) -> int:
    from launch.slurm import write_and_submit
    from scaling.runs import pending, render_array
    todo = pending(sweep, plan)
    if not todo:
        print("herd scaling: every run is finished; fit them with --fit-only", flush=True)
        return 0
    out = _script_path(args, sweep)
    script = render_array(sweep, [plan["runs"][i]["name"] for i in todo],
                          {"job_name": cfg.name, "partition": args.partition, "time": args.time,
                           "max_parallel": args.max_parallel, "gpus": args.gpus})
    print(f"herd scaling: an array of {len(todo)} tasks (the unfinished runs); fit them afterwards with "
          f"herd scaling {args.config} --fit-only", flush=True)
    return write_and_submit(script, str(out), args.submit, command="herd scaling")


def _script_path(args: argparse.Namespace, sweep: Path) -> Path:
    """--out (default <sweep>/array.sbatch): new, or an earlier array script, in a directory that can be made."""
    from engine.config_checks import check_directory
    from launch.slurm import is_rendered_script
    from scaling.runs import ARRAY_SCRIPT_MARK
    out = Path(args.out or sweep / "array.sbatch")
    if out.exists() and not is_rendered_script(out, ARRAY_SCRIPT_MARK):
        raise HerdError(f"--out {out}: exists and is not a herd scaling array script; choose another path")
    check_directory(str(out.parent), "--out")
    return out


GUARDS_STOPPED = "herd's guards stopped it"


def _finished_runs(args: argparse.Namespace, sweep: Path, plan: dict) -> list:
    """Every run of the plan with its final validation loss; one line when any is not finished or diverged."""
    from scaling.runs import diverged, final_val_loss, stopped_nonfinite
    runs, failed = [], []
    for run in plan["runs"]:
        loss = final_val_loss(sweep, run)
        if diverged(loss) or loss is None and stopped_nonfinite(sweep, run):
            failed.append(f"{run['name']} ({GUARDS_STOPPED if loss is None else loss})")
        elif loss is not None:
            runs.append({k: v for k, v in run.items() if k not in ("overrides", "config_hash")} | {"val_loss": loss})
    if failed:
        raise HerdError(f"{len(failed)} run(s) diverged (final validation loss not finite: {', '.join(failed[:3])}); "
                        f"a fit needs every run: lower their lrs, or leave their widths out in a sweep of another "
                        f"name")
    missing = len(plan["runs"]) - len(runs)
    if missing:
        raise HerdError(f"{missing} of {len(plan['runs'])} runs are not finished (no final validation loss and "
                        f"checkpoint under {sweep / 'runs'}); train them first (herd scaling {args.config})")
    return runs


def _fit(args: argparse.Namespace, cfg, job, sweep: Path, plan: dict, task=None) -> int:
    """Scores (downstream `task`: (questions, tokenizer), prepared here when None), fits and writes the results."""
    from scaling.report import fit_sweep, write_results
    from scaling.runs import final_checkpoint
    runs = _finished_runs(args, sweep, plan)
    if cfg.downstream.enabled:
        from scaling.downstream import prepare_task, score_run
        questions, tokenizer = task or prepare_task(job, cfg.downstream)
        print(f"herd scaling: scoring {len(runs)} runs on {len(questions)} next-line questions "
              f"({cfg.downstream.choices} choices)", flush=True)
        for run in runs:
            root = final_checkpoint(sweep, run)
            run["downstream"] = score_run(root, questions, tokenizer, sweep / "runs" / run["name"] / "downstream.json")
    fits = fit_sweep(runs, list(cfg.targets))
    command = " ".join(["herd scaling", shlex.quote(args.config), *map(shlex.quote, args.overrides)])
    paths = write_results(sweep, runs, fits, command)
    _print_fit(fits)
    print(f"herd scaling: wrote {', '.join(str(p) for p in paths)}", flush=True)
    return 0


def _print_fit(fits: dict) -> None:
    for b in fits["budgets"]:
        if "error" in b:
            print(f"  C = {b['budget']:.3g}: no parabola ({b['error']})", flush=True)
        else:
            print(f"  C = {b['budget']:.3g}: N* = {b['n_opt']:,.0f}, D* = {b['tokens_opt']:,.0f}", flush=True)
    law = fits.get("power_law")
    if law:
        print(f"  D*(C) = {law['A']:.3g} C^{law['alpha']:.3f} (alpha standard error {law['alpha_stderr']:.3f}; "
              f"Llama 3: 0.29 C^0.53)", flush=True)
    for p in fits.get("predictions", []):
        print(f"  at C = {p['compute']:.3g}: N* = {p['params']:.3g} (95% {p['params_95'][0]:.3g}-"
              f"{p['params_95'][1]:.3g}), D* = {p['tokens']:.3g} tokens", flush=True)
    for p in fits.get("downstream_predictions", []):
        if p:
            print(f"  at C = {p['compute']:.3g}: next-line NLL {p['nll_correct']:.4f}/char -> accuracy "
                  f"{p['accuracy']:.3f}", flush=True)
