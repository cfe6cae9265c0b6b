"""The last step into herd's own data: each domain's curated documents tokenized by engine/data/prepare.py into
OUT/tokens/<domain>.bin/.idx (with its .json summary), and OUT/blend.yaml: the `data.train` blend of a herd job
config whose weights are the target mix (Llama 3's 50% general, 25% math and reasoning, 17% code, 8%
multilingual by default) over the domains that kept documents.

With tokenize.tokenizer=hf and no tokenizer_path, a byte-level BPE is trained on all curated text first
(OUT/tokens/tokenizer.json) and the blend names it. When no domain of tokenize.mix kept a document, nothing is
trained or tokenized and blend.yaml is only a comment saying so (the report and the command's exit say so too).
"""

import dataclasses
import gzip
import json
from pathlib import Path
from typing import Dict, List

from datatrove.pipeline.base import PipelineStep

from curate.schema import CurateConfig
from engine.files import write_atomic


def read_domain(folder: Path) -> List:
    """The documents of one domain folder (gzipped JSONL written by the models stage), as prepare's Documents."""
    from engine.data.prepare import Document
    documents = []
    for path in sorted(folder.glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                documents.append(Document(source=str(record["id"]), text=record["text"]))
    return documents


NO_BLEND = "# herd curate: no domain of the target mix kept any document"


def blend_yaml(paths: Dict[str, str], mix: Dict[str, float], tokenizer: Dict[str, str]) -> str:
    """A herd job config fragment (data.train with weights normalized over the domains present)."""
    mix = {d: share for d, share in mix.items() if share > 0}
    present = {d: mix[d] for d in mix if d in paths}
    if not present:
        return NO_BLEND + "\n"
    total = sum(present.values())
    lines = ["# herd curate: the curated domains as a blend; include it or copy data.train into a job config",
             "data:", "  train:"]
    lines += [f"    - {{path: {json.dumps(paths[d])}, weight: {present[d] / total:.4f}}}  # {d}: target {mix[d]:g}"
              for d in present]
    # JSON strings are YAML strings: an empty path (llama3's shipped tokenizer) stays '' instead of YAML's null
    lines += [f"  tokenizer: {{kind: {tokenizer['kind']}, path: {json.dumps(tokenizer['path'] or '')}}}"]
    missing = [d for d in mix if d not in paths]
    if missing:
        lines.insert(1, f"# no documents reached: {', '.join(missing)} (their share is spread over the others)")
    unmixed = [d for d in paths if d not in mix]
    if unmixed:  # e.g. a label of `herd curate train-classifier --class NAME=...` that tokenize.mix does not name
        lines.insert(1, f"# tokenized but not in tokenize.mix, so not in this blend: {', '.join(unmixed)} "
                        f"(give them a share in tokenize.mix to train on them)")
    return "\n".join(lines) + "\n"


def tokenize_domains(cfg: CurateConfig) -> Dict[str, dict]:
    from engine.config import TokenizerConfig
    from engine.data.prepare import prepare_data
    from engine.data.tokenizer import load_tokenizer, train_bpe
    root = Path(cfg.output_dir).resolve()
    out = root / "tokens"
    out.mkdir(parents=True, exist_ok=True)
    domains = {d.name: read_domain(d) for d in sorted((root / "domains").iterdir()) if d.is_dir()} \
        if (root / "domains").is_dir() else {}
    domains = {d: docs for d, docs in domains.items() if docs}
    t = cfg.tokenize
    mix = dataclasses.asdict(t.mix)
    if not any(mix.get(d, 0) > 0 for d in domains):  # no BPE trained on, nor tokens made of, nothing to blend
        write_atomic(root / "blend.yaml", blend_yaml({}, mix, {"kind": t.tokenizer, "path": ""}))
        write_atomic(out / "summary.json", "{}\n")
        return {}
    path = t.tokenizer_path
    if t.tokenizer == "hf" and not path:
        path = str(out / "tokenizer.json")
        tokenizer = train_bpe((doc.text for docs in domains.values() for doc in docs), t.vocab_size, path)
    else:
        tokenizer = load_tokenizer(TokenizerConfig(kind=t.tokenizer, path=path))
    summary, prefixes = {}, {}
    for domain, docs in domains.items():
        prefix = str(out / domain)
        report = prepare_data([str(root / "domains" / domain)], prefix, tokenizer, documents=docs)
        summary[domain] = {"documents": report.documents["all"], "tokens": report.tokens["all"], "prefix": prefix}
        prefixes[domain] = prefix
    write_atomic(root / "blend.yaml", blend_yaml(prefixes, mix, {"kind": t.tokenizer, "path": path}))
    write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


class TokenizeStep(PipelineStep):
    name = "🔢 herd tokenization"

    def __init__(self, cfg: CurateConfig):
        super().__init__()
        self.cfg = cfg

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        for domain, info in tokenize_domains(self.cfg).items():
            self.stat_update(f"tokens_{domain}", value=info["tokens"])
        return
        yield
