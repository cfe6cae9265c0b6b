"""The recipe's commands: `herd recipe`, and `herd train` / `herd launch` given a recipe file (a recipe is a config
too). One-line errors; nothing starts before every stage's job is checked."""

import argparse
import os
from typing import List, Optional

from engine.errors import HerdError
from engine.secrets import scrub


def recipe_command(path: str, overrides: List[str], nproc: Optional[int] = None, print_config: bool = False,
                   world_size: Optional[int] = None) -> int:
    from engine.config import load_recipe
    from recipe.runner import RecipeRunner
    for flag, value in (("--world-size", world_size), ("--nproc", nproc)):
        if value is not None and value < 1:
            raise HerdError(f"{flag} must be at least 1, got {value}")
    recipe = load_recipe(path, overrides)
    if print_config:
        from recipe.plan import plan_table
        world = world_size or nproc or int(os.environ.get("WORLD_SIZE", "1"))
        plans = RecipeRunner(recipe, world_size=world).plan(check_files=False)  # the table needs no data
        print("\n".join(plan_table(recipe, plans)), flush=True)
        return 0
    if world_size is not None:
        raise HerdError("--world-size goes with --print-config (use --nproc to run on local ranks)")
    if nproc is not None and "WORLD_SIZE" not in os.environ:
        runner = RecipeRunner(recipe, world_size=nproc)
        plans = runner.plan()
        state = runner.check_state(plans)  # every stage's job as its ranks will load it, and an earlier run's state
        check_stage_checkpoints(plans, state)  # another run's directory, or a live run's: before any rank starts
        from launch.local import run_local
        herd_args = ["recipe", path, *overrides]
        print(scrub(f"herd recipe: {nproc} ranks of herd " + " ".join(herd_args)), flush=True)
        return run_local(nproc, herd_args, "herd recipe", preemptible=True)  # every stage saves
    return _run_here(recipe)


def check_stage_checkpoints(plans, state: dict, test_lock: bool = True) -> None:
    """The checkpoint directory of each stage still to run (`state`: the runner's check_state; a finished stage is
    skipped by the runner and claims nothing), as its runs will claim it (every run of a stage saves:
    recipe/plan.py position_job), once per directory and claim."""
    from engine.checkpoint.checkpointer import check_job_checkpoints
    to_run = [p for p in plans if not state["stages"].get(p.stage.name, {}).get("done")]
    claims = {(p.job.checkpoint.dir, p.job.checkpoint.on_foreign, p.job.checkpoint.resume): p for p in to_run}
    for plan in claims.values():
        check_job_checkpoints(plan.job, test_lock, saves=True)


def _run_here(recipe) -> int:
    """This process is one rank (or the only one) of the recipe."""
    from engine.callbacks import PREEMPTED_EXIT_CODE
    from engine.run import end_rank_process
    from recipe.runner import RecipeRunner
    code = 0
    try:
        RecipeRunner(recipe).run()
    except SystemExit as e:  # a stage was preempted and saved: leave with the code the launch script requeues on
        if e.code != PREEMPTED_EXIT_CODE:
            raise
        code = PREEMPTED_EXIT_CODE
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"preempted: checkpoint saved, exiting with {code} (requeue); run the recipe again to go on",
                  flush=True)
    end_rank_process(code)  # a rank of a multi-process recipe leaves here; one process returns
    return code


def launch_recipe(args: argparse.Namespace) -> int:
    """`herd launch RECIPE`: --nproc as `herd recipe --nproc`; --slurm renders the sbatch script from the stages'
    slurm.* settings (the base job and the recipe's overrides), checked for every stage at nodes x ranks."""
    if not args.slurm:
        if args.nproc is None:
            raise HerdError("launch needs --nproc N (processes on this machine) or --slurm (an sbatch script)")
        return recipe_command(args.config, args.overrides, nproc=args.nproc)
    flags = {"--nodes": args.nodes, "--gpus-per-node": args.gpus_per_node, "--shape": args.shape,
             "--cpu": args.cpu or None}
    given = [flag for flag, value in flags.items() if value is not None]
    if given:
        raise HerdError(f"{', '.join(given)}: a recipe takes its SLURM settings from its jobs; put slurm.* (and "
                        f"train.device) in the recipe's overrides instead")
    from engine.config import load_recipe
    from align.inputs import check_job_inputs
    from launch.slurm import check_script_destination, render, write_and_submit
    from recipe.plan import base_job
    from recipe.runner import RecipeRunner
    recipe = load_recipe(args.config, args.overrides)
    single = [f"parallel.{k}=1" for k in ("dp_replicate", "dp_shard", "pp", "cp", "tp")]
    probe = base_job(recipe, recipe.stages[0], 1, single).slurm  # the world size, before layouts are checked
    world = probe.nodes * probe.gpus_per_node
    runner = RecipeRunner(recipe, world_size=world)
    plans = runner.plan(check_files=False)
    state = runner.check_state(plans)
    check_stage_checkpoints(plans, state, test_lock=False)  # the SLURM job starts later: its lock is tested then
    first = plans[0].job
    out = args.out or f"{first.slurm.job_name or recipe.name}.sbatch"
    check_script_destination(out, args.config)
    script = render(first, args.config, args.overrides)  # ranks run `herd train RECIPE`: the recipe itself
    if not args.no_data_check:
        for plan in plans:
            check_job_inputs(plan.job)
    return write_and_submit(script, out, args.submit)
