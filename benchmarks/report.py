"""Printing a benchmark's table and committing its results: benchmarks/results/<name>.json (the rows) and
<name>.md (a title line, how it was made, the table)."""

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
