"""One run of a sweep: `python -m scaling.task PLAN.json INDEX` trains run INDEX of the plan with `herd train`,
or returns at once when it is finished already (what makes local sweeps and SLURM array tasks resumable).

Exit codes are herd train's: 0 done, 2 a one-line error, 75 preempted after saving (the array script requeues).
"""

import json
import sys
from pathlib import Path


def main(argv) -> int:
    from launch.cli import main as herd
    from scaling.runs import final_val_loss, train_args
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: python -m scaling.task PLAN.json INDEX", file=sys.stderr)
        return 2
    plan_path, index = Path(argv[0]), int(argv[1])
    try:
        plan = json.loads(plan_path.read_text())
        run = plan["runs"][index]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        print(f"herd scaling: error: {plan_path}: no run {index} ({type(e).__name__}: {e})", file=sys.stderr)
        return 2
    sweep = plan_path.parent
    loss = final_val_loss(sweep, run)
    if loss is not None:
        print(f"herd scaling: {run['name']} is finished (validation loss {loss:.4f}); not trained again", flush=True)
        return 0
    print(f"herd scaling: {run['name']}: N={run['params']:,}, {run['steps']} steps, D={run['tokens']:,} tokens",
          flush=True)
    return herd(train_args(plan, run))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
