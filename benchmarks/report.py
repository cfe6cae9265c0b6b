"""Printing a benchmark's table and committing its results: benchmarks/results/<name>.json (the rows) and
<name>.md (a title line, how it was made, the table)."""

import argparse
import json
from pathlib import Path
from typing import List

RESULTS = Path(__file__).resolve().parent / "results"


def publish(name: str, rows: List[dict], table: str, title: str, description: str, save: bool) -> None:
    print(table)
    if save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=2) + "\n")
        (RESULTS / f"{name}.md").write_text(f"# {title}\n\n{description}\n\n{table}\n")


def demo_args(description: str) -> argparse.Namespace:
    """--config (the demo's by default: its corpus is prepared first, once) and --save, as the CPU benchmarks that
    run the demo model take them."""
    from launch.demo import prepare_corpus
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()
    if args.config == "configs/demo.yaml" and prepare_corpus():
        raise SystemExit("could not prepare the demo corpus")
    return args
