"""`make align-demo`: one Llama 3 post-training round on CPU (configs/align_demo.yaml, docs/alignment.md).

Prepares the demo corpus's tokenizer if `make demo` has not (launch/demo.py), builds the code-completion task from
the standard library (align/demo_data.py), runs `herd align configs/align_demo.yaml` (finished stages are skipped
on a rerun), then prints what the stages measured on held-out rows: the reward model's accuracy, the share of
rejection-sampled answers that compile, DPO's reward accuracy.
"""

import json
import sys
import sysconfig
from pathlib import Path

from align.demo_data import build, compiles
from launch.cli import main as herd
from launch.demo import prepare_corpus

PIPELINE = "configs/align_demo.yaml"
TASK = Path("data/align")
RUNS = Path("runs/align-demo")


def _done(stage: str) -> dict:
    path = RUNS / f"r1-{stage}" / "DONE.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _accuracy(done: dict) -> str:
    before = done.get("initial_eval_metrics", {}).get("rewards/accuracies")
    after = done.get("last_metrics", {}).get("val_rewards/accuracies")
    return "n/a" if before is None or after is None else f"{before:.3f} -> {after:.3f}"


def summary() -> None:
    rows = [json.loads(line) for line in (RUNS / "r1-rs" / "rows.jsonl").read_text().splitlines() if line]
    kept_ok = sum(compiles(r["messages"][-1]["content"]) for r in rows)
    print("\nalignment demo, measured on held-out rows:")
    print(f"  reward model accuracy (compiles > does not), before -> after training: {_accuracy(_done('rm'))}")
    print(f"  rejection sampling: {kept_ok} of {len(rows)} kept answers compile")
    print(f"  DPO reward accuracy on held-out pairs, before -> after: {_accuracy(_done('dpo'))}")


def main(argv) -> int:
    code = prepare_corpus()
    if code:
        return code
    if not all((TASK / f"{name}.jsonl").is_file() for name in ("sft", "sft.valid", "pref.train", "pref.valid",
                                                                "prompts")):
        counts = build(TASK, Path(sysconfig.get_paths()["stdlib"]))
        print(f"alignment task under {TASK}/: " + ", ".join(f"{n} {name} rows" for name, n in counts.items()),
              flush=True)
    code = herd(["align", PIPELINE, *argv])
    if code == 0:
        summary()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
