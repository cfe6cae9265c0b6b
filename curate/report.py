"""The curation report: per stage, documents and bytes in, kept and removed, removals by reason with a few
examples of each, as OUT/report.json and OUT/report.md.

Counts come from the stages' files, not from logs: a stage's input and output folders (gzipped JSONL) give the
documents and UTF-8 bytes in and kept; its removed/ folder gives every removal with its reason. Line dedup removes
lines, not always documents: its records with `partial` count lines' bytes, not documents. The read stage's input
is the raw files: its removals are the malformed inputs (bad UTF-8, bad JSON, empty, binary) and HTML pages
without main content; its "bytes in" counts the text read plus the malformed inputs' bytes.
"""

import gzip
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Dict, List, Tuple

from datatrove.pipeline.base import PipelineStep

from curate.schema import CurateConfig
from curate.tokenize import NO_BLEND
from engine.files import write_atomic

EXAMPLE_CHARS = 160


def _records(folder: Path):
    for path in sorted(folder.rglob("*.jsonl.gz")) if folder.is_dir() else ():
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)


def _count(folder: Path) -> Tuple[int, int]:
    documents = size = 0
    for record in _records(folder):
        documents += 1
        size += len(record.get("text", "").encode("utf-8"))
    return documents, size


def _removals(folder: Path, examples: int) -> Dict[str, dict]:
    reasons: Dict[str, dict] = defaultdict(lambda: {"documents": 0, "partial": 0, "bytes": 0, "examples": []})
    for record in _records(folder):
        meta = record.get("metadata", {})
        reason = meta.get("filter_reason") or folder.name
        entry = reasons[reason]
        entry["partial" if meta.get("partial") else "documents"] += 1
        entry["bytes"] += int(meta.get("bytes", len(record.get("text", "").encode("utf-8"))))
        if len(entry["examples"]) < examples:
            text = " ".join(record.get("text", "").split())
            entry["examples"].append({"id": record["id"], "text": text[:EXAMPLE_CHARS]})
    return dict(reasons)


def build_report(cfg: CurateConfig) -> dict:
    from curate.pipeline import Layout, build_stages
    lay = Layout(cfg.output_dir)
    rows: List[dict] = []
    for stage in build_stages(cfg, []):
        if stage.name in ("tokenize", "report"):
            continue
        removed = _removals(lay.removed(stage.name), cfg.examples)
        docs_out, bytes_out = _count(Path(stage.output))
        if stage.input:
            docs_in, bytes_in = _count(Path(stage.input))
        else:  # read: what became documents plus the inputs that could not
            malformed = [r for r in removed.values()]
            docs_in = docs_out + sum(r["documents"] for r in malformed)
            bytes_in = bytes_out + sum(r["bytes"] for r in malformed)
        rows.append({"stage": stage.name, "documents_in": docs_in, "documents_kept": docs_out,
                     "documents_removed": docs_in - docs_out, "bytes_in": bytes_in, "bytes_kept": bytes_out,
                     "bytes_removed": bytes_in - bytes_out, "removed_by_reason": removed})
    domains = Counter()
    if lay.domains.is_dir():
        for folder in sorted(p for p in lay.domains.iterdir() if p.is_dir()):
            domains[folder.name] = _count(folder)[0]
    tokens_file = lay.root / "tokens" / "summary.json"
    tokens = json.loads(tokens_file.read_text()) if tokens_file.is_file() else {}
    blend = lay.root / "blend.yaml"
    empty = blend.is_file() and blend.read_text(encoding="utf-8").startswith(NO_BLEND)
    return {"name": cfg.name, "output_dir": str(lay.root), "stages": rows, "domains": dict(domains),
            "tokens": tokens, "blend": str(blend) if blend.is_file() and not empty else "",
            "empty": _empty_reason(cfg, dict(domains), empty)}


def _empty_reason(cfg: CurateConfig, domains: dict, empty_blend: bool) -> str:
    """Why the run has nothing to train on ("" when it has something)."""
    if not any(domains.values()):
        return "no document was kept"
    if empty_blend or (cfg.tokenize.enabled and not any(getattr(cfg.tokenize.mix, d, 0) > 0 and n
                                                        for d, n in domains.items())):
        return (f"no document reached a domain of tokenize.mix (kept: {', '.join(d for d, n in domains.items() if n)}"
                f"), so there is no blend to train on")
    return ""


def markdown(report: dict) -> str:
    lines = [f"# Curation report: {report['name']}", "",
             "| stage | docs in | docs kept | docs removed | bytes in | bytes kept | bytes removed |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["stages"]:
        lines.append(f"| {r['stage']} | {r['documents_in']:,} | {r['documents_kept']:,} | {r['documents_removed']:,} "
                     f"| {r['bytes_in']:,} | {r['bytes_kept']:,} | {r['bytes_removed']:,} |")
    lines += ["", "## Removals by reason", ""]
    for r in report["stages"]:
        for reason, entry in sorted(r["removed_by_reason"].items()):
            partial = f", {entry['partial']:,} documents lost lines" if entry["partial"] else ""
            lines.append(f"- **{r['stage']} / {reason}**: {entry['documents']:,} documents{partial}, "
                         f"{entry['bytes']:,} bytes")
            lines += [f"  - `{e['id']}`: {e['text']!r}" for e in entry["examples"]]
    lines += ["", "## Domains", ""] + [f"- {d}: {n:,} documents" for d, n in report["domains"].items()]
    if report["tokens"]:
        lines += ["", "## Tokens", ""] + [f"- {d}: {t['tokens']:,} tokens in {t['documents']:,} documents "
                                          f"(`{t['prefix']}.bin/.idx`)" for d, t in report["tokens"].items()]
    if report["blend"]:
        lines += ["", f"Blend for a herd job: `{report['blend']}`"]
    if report.get("empty"):
        lines += ["", f"**Nothing to train on**: {report['empty']}."]
    return "\n".join(lines) + "\n"


def write_report(cfg: CurateConfig) -> dict:
    report = build_report(cfg)
    root = Path(report["output_dir"])
    for name, text in (("report.json", json.dumps(report, indent=2) + "\n"), ("report.md", markdown(report))):
        write_atomic(root / name, text)
    return report


class ReportStep(PipelineStep):
    name = "🧾 herd curate report"

    def __init__(self, cfg: CurateConfig):
        super().__init__()
        self.cfg = cfg

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        write_report(self.cfg)
        return
        yield
