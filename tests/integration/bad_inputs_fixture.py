"""The workspace every malformed-input case starts from (tests/integration/test_bad_inputs.py): a tiny prepared
corpus with its trained tokenizer, a job config that trains on it, alignment rows and a pipeline over them, and
a Hugging Face Llama directory (build_tools_workspace adds what the newer commands read). Every file here is
valid: each case breaks one thing in its own copy. The cases' helpers (Case, the setups that break a file, and
refused_cleanly, the check every case passes) are shared by both tables."""

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega").split()

JOB = """\
model: {name: tiny, dim: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, ffn_dim: 64, vocab_size: 512, max_seq_len: 64}
data:
  train: [{path: data/c.train, weight: 1.0}]
  valid: [{path: data/c.valid, weight: 1.0}]
  tokenizer: {kind: hf, path: data/tok.json}
  seq_len: 32
  micro_batch_size: 2
  global_batch_size: 4
optim: {lr: 1.0e-3}
train: {steps: 2, dtype: fp32, device: cpu, eval_batches: 2}
log: {name: job, run_dir: runs, tensorboard: false}
watchdog: {enabled: false}
"""

PIPELINE = """\
name: tiny-align
config: align_job.yaml
run_dir: runs/align
stages:
  - {name: sft, kind: sft, data: rows/sft.jsonl, overrides: [train.steps=1]}
  - {name: rm, kind: rm, data: rows/pref.jsonl, overrides: [train.steps=1]}
  - {name: rs, kind: rejection_sampling, prompts: rows/prompts.jsonl, samples: 2, max_new_tokens: 4}
  - {name: sft_rs, kind: sft, data: '@rs', overrides: [train.steps=1]}
  - {name: dpo, kind: dpo, data: rows/pref.jsonl, overrides: [train.steps=1]}
"""

ALIGN_JOB = """\
model: {name: tiny, dim: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, ffn_dim: 64, vocab_size: 512, max_seq_len: 64}
data: {tokenizer: {kind: hf, path: data/tok.json}, seq_len: 64, micro_batch_size: 2, global_batch_size: 4}
train: {steps: 1, dtype: fp32, device: cpu, eval_batches: 2}
log: {tensorboard: false}
watchdog: {enabled: false}
"""


def _sentence(i: int) -> str:
    return " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(12 + i % 5))


def _rows(root: Path) -> None:
    rows = root / "rows"
    rows.mkdir()
    short = (lambda i: " ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(3)))
    sft = [{"messages": [{"role": "user", "content": short(i)},
                         {"role": "assistant", "content": short(i + 1)}]} for i in range(8)]
    pref = [{"prompt": short(i), "chosen": short(i + 2), "rejected": short(i + 3)} for i in range(8)]
    prompts = [{"prompt": short(i)} for i in range(4)]
    for name, items in (("sft", sft), ("pref", pref), ("prompts", prompts)):
        (rows / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))


def _hf_dir(root: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(str(root / "hf"))


def build_workspace(root: Path) -> Path:
    """Writes the valid workspace into root (a fresh directory) and returns it."""
    from engine.data.prepare import prepare_data
    from engine.data.tokenizer import train_bpe
    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    texts = []
    for i in range(40):
        text = "\n".join(_sentence(i + k) for k in range(6)) + "\n"
        (corpus / f"doc{i:02d}.txt").write_text(text)
        texts.append(text)
    (root / "data").mkdir()
    tokenizer = train_bpe(texts, 300, str(root / "data" / "tok.json"))
    prepare_data([str(corpus)], str(root / "data" / "c"), tokenizer, valid_fraction=0.2)
    (root / "job.yaml").write_text(JOB)
    (root / "align_job.yaml").write_text(ALIGN_JOB)
    (root / "pipeline.yaml").write_text(PIPELINE)
    _rows(root)
    _hf_dir(root)
    return root


def copy_workspace(template: Path, dest: Path) -> Path:
    shutil.copytree(template, dest, symlinks=True)
    return dest


# ---------------------------------------------------------------------------------------------- the newer commands
# (tests/integration/test_bad_inputs_tools.py): a recipe and a sweep over job.yaml, a curation pipeline over a tiny
# raw corpus, classifier examples, and two checkpoints to average (imports of hf/: no training)

RECIPE = """\
name: tiny-recipe
config: job.yaml
run_dir: runs/recipe
warmup_steps: 1
stages:
  - {name: short, tokens: 128, overrides: [data.seq_len=16]}
  - {name: long, tokens: 256, overrides: [data.seq_len=32]}
  - {name: anneal, kind: anneal, tokens: 256, average: true, overrides: [checkpoint.every=1]}
"""

SWEEP = """\
name: tiny-sweep
run_dir: runs
job: job.yaml
budgets: [1.0e9, 2.0e9]
dims: [16, 32, 48]
head_dim: 8
aspect_ratio: 16
kv_group: 1
min_steps: 1
eval_batches: 1
downstream: {context_tokens: 16}  # within half the job's max_seq_len=64: the candidate line follows it
"""

CURATE = """\
name: tiny-curate
output_dir: runs/curate
input: {paths: [raw], include: ["*.txt", "*.jsonl"]}
executor: {kind: local, tasks: 1, workers: 1}
minhash: {enabled: true, n_grams: 3, buckets: 2, hashes_per_bucket: 2}
heuristics: {dirty_words_file: dirty.txt, max_dirty_words: 3}
tokenize: {tokenizer: hf, tokenizer_path: data/tok.json}
"""


def _curate_inputs(root: Path) -> None:
    raw = root / "raw"
    raw.mkdir()
    for i in range(3):
        (raw / f"page{i}.txt").write_text(_sentence(i) + "\n" + _sentence(i + 1) + "\n")
    (raw / "records.jsonl").write_text("".join(json.dumps({"text": _sentence(i), "id": f"r{i}"}) + "\n"
                                               for i in range(4)))
    (root / "dirty.txt").write_text("# one word or phrase per line\nomega psi\n")
    examples = root / "examples"
    examples.mkdir()
    (examples / "good.txt").write_text(_sentence(3) + "\n")
    (examples / "bad.txt").write_text("buy now buy now\n")
    (examples / "empty.txt").write_text("\n  \n")


def build_tools_workspace(root: Path) -> Path:
    """build_workspace's files plus recipe.yaml, sweep.yaml, curate.yaml (raw/ and dirty.txt), classifier examples
    (examples/) and two weights-only checkpoints of hf/ (ckpt/a, ckpt/b), every one valid."""
    from engine.checkpoint.convert import import_hf
    build_workspace(root)
    (root / "recipe.yaml").write_text(RECIPE)
    (root / "sweep.yaml").write_text(SWEEP)
    (root / "curate.yaml").write_text(CURATE)
    _curate_inputs(root)
    for name in ("a", "b"):
        import_hf(root / "hf", root / "ckpt" / name)
    return root


# ---------------------------------------------------------------------------------------------- the cases' helpers

class Case(NamedTuple):
    id: str
    argv: List[str]
    expected: str  # a part of the one error line: the key, file or line at fault
    setup: Optional[Callable[[Path], None]] = None  # breaks a file of the workspace copy first


def write(name: str, text: str) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        (ws / name).parent.mkdir(parents=True, exist_ok=True)
        (ws / name).write_text(text)
    return setup


def write_bytes(name: str, data: bytes) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        (ws / name).parent.mkdir(parents=True, exist_ok=True)
        (ws / name).write_bytes(data)
    return setup


def edit_json(name: str, edit: Callable[[dict], object]) -> Callable[[Path], None]:
    """Changes the object in a JSON file in place (edit's return value is ignored)."""
    def setup(ws: Path) -> None:
        data = json.loads((ws / name).read_text())
        edit(data)
        (ws / name).write_text(json.dumps(data))
    return setup


def truncate(name: str, keep: int) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        data = (ws / name).read_bytes()
        (ws / name).write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])
    return setup


def chain(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        for s in setups:
            s(ws)
    return setup


def replace(name: str, old: str, new: str) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        text = (ws / name).read_text()
        assert old in text, old
        (ws / name).write_text(text.replace(old, new))
    return setup


def snapshot(root: Path) -> dict:
    """Every path under root with its kind and content hash (directories and symlinks included)."""
    state = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            state[rel] = ("link", os.readlink(path))
        elif path.is_dir():
            state[rel] = ("dir",)
        else:
            state[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
    return state


class ProcessStarted(BaseException):
    """Raised where a case would start a process or a process group (a BaseException: no handler swallows it)."""


def no_processes(monkeypatch) -> None:
    import torch.distributed as dist

    def refuse(*args, **kwargs):
        raise ProcessStarted(f"a process was started: {args[:1]}")
    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    monkeypatch.setattr(os, "fork", refuse)
    monkeypatch.setattr(dist, "init_process_group", refuse)


def refused_cleanly(case: Case, template: Path, tmp_path: Path, monkeypatch, capfd) -> str:
    """Runs the case in-process from its own copy of the workspace and checks the promise of R20/R21: exit code 2,
    one line `herd...error...` holding case.expected, no traceback, the workspace unchanged, no process started.
    Returns the line."""
    from launch.cli import main
    ws = copy_workspace(template, tmp_path / "ws")
    if case.setup is not None:
        case.setup(ws)
    before = snapshot(ws)
    monkeypatch.chdir(ws)
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    no_processes(monkeypatch)
    try:
        code = main(case.argv)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    out, err = capfd.readouterr()
    lines = (out + err).strip().splitlines()
    assert code == 2, f"exit {code}:\n{out}{err}"
    assert "Traceback" not in out + err
    assert len(lines) == 1 and lines[0].startswith("herd"), out + err
    assert "error" in lines[0]
    assert case.expected in lines[0], lines[0]
    assert snapshot(ws) == before, "the workspace changed"
    return lines[0]
