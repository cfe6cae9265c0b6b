"""Rejection sampling's test world (tests/unit/test_align_rejection.py, tests/distributed/test_align_rejection_tp.py):
a policy and a reward checkpoint trained for two steps on the parity model, a prompt file, and the per-rank
function of the layout test (module-level so spawned processes import it)."""

import io
import json
from pathlib import Path
from typing import Dict, List

from align.generate import SamplingConfig

# 128-token rows: the reward model is trained at this length and rejection sampling scores at it
STAGE = ["data.seq_len=128", "data.global_batch_size=4", "data.micro_batch_size=2", "train.steps=2",
         "checkpoint.every=2", "log.tensorboard=false", "log.jsonl=false", "train.eval_every=0"]
K = 3
GREEDY = SamplingConfig(max_new_tokens=12, temperature=0.0)
SAMPLED = SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=7)

PROMPTS = [
    {"prompt": "Write `dumps` from json/__init__.py.", "id": "p0"},
    {"messages": [{"role": "system", "content": "You write Python."},
                  {"role": "user", "content": "Write `decode` from json/decoder.py."}], "id": "p1", "test": "t1"},
    {"messages": [{"role": "user", "content": "Write `quote` from email/utils.py."},
                  {"role": "assistant", "content": "def quote(str):"},
                  {"role": "user", "content": "The whole function, please."}], "id": "p2"},
    {"prompt": [{"role": "user", "content": "Write `parse` from http/cookies.py."}], "id": "p3", "score": 9.0},
]


def job(world: Dict[str, str], name: str, overrides: List[str] = (), world_size: int = 1):
    from tests.helpers import parity_config
    return parity_config(Path(world["corpus"]), Path(world["runs"]), [*STAGE, f"log.name={name}", *overrides],
                         world_size)


def make_world(root: Path) -> Dict[str, str]:
    """The corpus, two checkpoints (sft policy, reward model) and the prompt file, under root."""
    from align.run import build_stage_trainer
    from tests.helpers import make_corpus, make_preference_jsonl, make_sft_jsonl
    world = {"corpus": str(make_corpus(root)), "runs": str(root / "runs")}
    files = {"sft": make_sft_jsonl(root / "sft.jsonl", count=16), "rm": make_preference_jsonl(root / "pref.jsonl",
                                                                                              count=16)}
    for kind in ("sft", "rm"):
        cfg = job(world, kind, [f"align.kind={kind}", f"align.train_file={files[kind]}"])
        build_stage_trainer(cfg, io.StringIO()).fit()
        world[kind] = str(root / "runs" / kind / "checkpoints")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in PROMPTS))
    world["prompts"] = str(prompts)
    return world


def sample_in_layouts(rank: int, world_size: int, world: Dict[str, str], out_dir: str, layouts: list) -> list:
    """Run rejection sampling (greedy, then seeded sampling) under each layout; (stats, output text) per run."""
    from align.rejection import run_rejection_sampling
    results = []
    for index, overrides in enumerate(layouts):
        cfg = job(world, f"layout{index}", overrides, world_size)
        for name, sampling in (("greedy", GREEDY), ("sampled", SAMPLED)):
            output = Path(out_dir) / f"layout{index}-{name}.jsonl"
            stats = run_rejection_sampling(cfg, world["sft"], world["rm"], world["prompts"], str(output), K,
                                           sampling, io.StringIO())
            results.append({"layout": overrides, "name": name, "stats": stats, "text": output.read_text()})
    return results
