"""What a reader left out under `on_bad_data=skip` (or always leaves out: empty documents, rows with nothing to
learn), counted by reason and by file, with the first few places of each, so nothing is dropped silently.

Every reader records into a SkipReport; a training run (engine/run.py) prints one line, writes
`<run>/skipped.json` (`as_dict`) and adds `metrics()` to its first metrics.jsonl record; `herd prepare-data` writes
the same dictionary into `PREFIX.json`. Reasons are short snake_case names (`bad_json`, `token_id_out_of_vocab`),
which become metric names as `data_skipped_<reason>`.
"""

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List

from engine.files import write_atomic

EXAMPLES_PER_REASON = 5  # places kept per file and reason: enough to find the problem, bounded for huge files


@dataclass
class SkipReport:
    reasons: Counter = field(default_factory=Counter)  # reason -> items skipped
    files: Dict[str, Counter] = field(default_factory=dict)  # file -> reason -> items skipped
    examples: Dict[str, Dict[str, List[str]]] = field(default_factory=dict)  # file -> reason -> first places
    notes: Counter = field(default_factory=Counter)  # kept but changed (an SFT row truncated, an edit dropped)

    def add(self, reason: str, file: str, count: int = 1, places: Iterable[str] = ()) -> None:
        """Count `count` items of `file` skipped for `reason`; `places` ("line 12", "document 3") are examples."""
        if count <= 0:
            return
        self.reasons[reason] += count
        self.files.setdefault(str(file), Counter())[reason] += count
        kept = self.examples.setdefault(str(file), {}).setdefault(reason, [])
        for place in places:
            if len(kept) >= EXAMPLES_PER_REASON:
                break
            kept.append(str(place))

    def note(self, what: str, count: int = 1) -> None:
        self.notes[what] += count

    def merge(self, other: "SkipReport") -> "SkipReport":
        for file, reasons in other.files.items():
            for reason, count in reasons.items():
                self.add(reason, file, count, other.examples.get(file, {}).get(reason, ()))
        self.notes.update(other.notes)
        return self

    @property
    def total(self) -> int:
        return sum(self.reasons.values())

    def summary(self) -> str:
        """'3 skipped (2 bad_json, 1 empty)' plus notes, or 'nothing skipped'."""
        text = (f"{self.total} skipped (" + ", ".join(f"{n} {r}" for r, n in sorted(self.reasons.items())) + ")"
                if self.total else "nothing skipped")
        if self.notes:
            text += "; " + ", ".join(f"{n} {what}" for what, n in sorted(self.notes.items()))
        return text

    def as_dict(self) -> Dict:
        return {"total": self.total, "reasons": dict(sorted(self.reasons.items())),
                "files": {file: {"reasons": dict(sorted(reasons.items())),
                                 "examples": {r: self.examples.get(file, {}).get(r, []) for r in sorted(reasons)}}
                          for file, reasons in sorted(self.files.items())},
                "notes": dict(sorted(self.notes.items()))}

    def metrics(self) -> Dict[str, int]:
        """{"data_skipped": total, "data_skipped_<reason>": count, ...}: flat numbers for metrics.jsonl."""
        out = {"data_skipped": self.total}
        for reason, count in sorted(self.reasons.items()):
            out["data_skipped_" + re.sub(r"[^a-z0-9]+", "_", reason.lower()).strip("_")] = count
        return out

    def write(self, path: Path) -> Path:
        """Write as_dict() as JSON, atomically (a reader sees the old file or the whole new one)."""
        path = Path(path)
        write_atomic(path, json.dumps(self.as_dict(), indent=2, allow_nan=False) + "\n")
        return path
