"""One run of a sweep: `python -m scaling.task PLAN.json NAME` trains the run NAME of the plan with `herd train`,
or returns at once when it is finished already (what makes local sweeps and SLURM array tasks resumable). Runs are
looked up by name: plan.json may have been planned again (a budget added, its runs renumbered) since the array that
runs this task was submitted. The task holds runs/NAME.lock while it checks and trains, so no two processes (an
array task and a local sweep, say) ever train one run at once.

Exit codes are herd train's: 0 done, 2 a one-line error, 75 preempted after saving (the array script requeues).
"""

import json
import sys
from pathlib import Path


def main(argv) -> int:
    from engine.errors import HerdError
    from launch.cli import main as herd
    from scaling.runs import final_val_loss, holding_lock, run_path, train_args
    if len(argv) != 2 or not argv[1]:
        print("usage: python -m scaling.task PLAN.json NAME", file=sys.stderr)
        return 2
    plan_path, name = Path(argv[0]), argv[1]
    try:
        plan = json.loads(plan_path.read_text())
        run = next(r for r in plan["runs"] if r["name"] == name)
    except StopIteration:
        print(f"herd scaling: error: {plan_path}: no run {name} (the sweep was planned again without it)",
              file=sys.stderr)
        return 2
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:  # RecursionError: nested too deeply
        print(f"herd scaling: error: {plan_path}: not a readable plan ({type(e).__name__}: "
              f"{str(e).splitlines()[0] if str(e) else ''})", file=sys.stderr)
        return 2
    sweep = plan_path.parent
    try:
        with holding_lock(run_path(sweep, name).parent / f"{name}.lock", f"training run {name}"):
            loss = final_val_loss(sweep, run)
            if loss is not None:
                print(f"herd scaling: {name} is finished (validation loss {loss:.4f}); not trained again", flush=True)
                return 0
            print(f"herd scaling: {name}: N={run['params']:,}, {run['steps']} steps, D={run['tokens']:,} tokens",
                  flush=True)
            return herd(train_args(plan, run))
    except HerdError as e:
        print(f"herd scaling: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
