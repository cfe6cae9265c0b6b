"""The workspace every malformed-input case starts from (tests/integration/test_bad_inputs.py): a tiny prepared
corpus with its trained tokenizer, a job config that trains on it, alignment rows and a pipeline over them, and
a Hugging Face Llama directory. Every file here is valid: each case breaks one thing in its own copy."""

import json
import shutil
from pathlib import Path

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
