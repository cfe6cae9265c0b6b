"""Shared test fixtures' building blocks: a small real corpus and a tiny config that trains in seconds."""

import sysconfig
from pathlib import Path
from typing import List

from engine.config import JobConfig, load_config
from engine.data.prepare import prepare_data
from engine.data.tokenizer import train_bpe

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def make_corpus(root: Path, vocab_size: int = 500) -> Path:
    """Tokenize a few real standard-library packages (json, email, http) with a BPE trained on them."""
    files = sorted(str(p) for pkg in ("json", "email", "http") for p in (STDLIB / pkg).glob("*.py"))
    texts = [Path(f).read_text(encoding="utf-8") for f in files]
    tokenizer = train_bpe(texts, vocab_size, str(root / "tok.json"))
    prepare_data(files, str(root / "corpus"), tokenizer, valid_fraction=0.15, patterns=("*.py",))
    return root


def tiny_config(corpus: Path, run_dir: Path, extra: List[str] = (), world_size: int = 1) -> JobConfig:
    """2 layers of dim 64, 6 steps of 8 x 32 tokens in fp32 on the CPU, evaluating every 3 steps."""
    return load_config(None, [
        "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128",
        "model.vocab_size=512", "model.max_seq_len=256",
        f"data.train=[{{path: {corpus}/corpus.train}}]", f"data.valid=[{{path: {corpus}/corpus.valid}}]",
        f"data.tokenizer.path={corpus}/tok.json", "data.seq_len=32", "data.micro_batch_size=4",
        "data.global_batch_size=8", "train.steps=6", "train.dtype=fp32", "train.device=cpu", "train.eval_every=3",
        "train.eval_batches=2", "optim.lr=3e-3", "schedule.warmup_steps=2", f"log.run_dir={run_dir}",
        "log.name=t", *extra], world_size=world_size)


def run_herd(argv: List[str], capfd) -> tuple:
    """`herd ARGV` in this process: its exit code and the lines it printed (stdout, then stderr)."""
    from launch.cli import main
    code = main(argv)
    out, err = capfd.readouterr()
    return code, (out + err).strip().splitlines()


def snapshot(root: Path) -> dict:
    """Every path under root with its bytes (None for a directory): an unchanged snapshot is an untouched tree."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


PARITY_MODEL = ["model.dim=64", "model.n_layers=2", "model.n_heads=8", "model.n_kv_heads=4", "model.ffn_dim=128",
                "model.vocab_size=510", "model.max_seq_len=256"]


def parity_config(corpus: Path, run_dir: Path, overrides: List[str] = (), world_size: int = 1) -> JobConfig:
    """The layout-parity reference: 5 steps, fp32, global batch 32 sequences of 32 in micro-batches of 2, so every
    layout with dp <= 8 accumulates at least 2 micro-batches per step. The vocab (510) is not divisible by 4,
    so tp=4 exercises the padded vocabulary."""
    return load_config(None, [
        *PARITY_MODEL, f"data.train=[{{path: {corpus}/corpus.train}}]", "data.valid=[]",
        f"data.tokenizer.path={corpus}/tok.json", "data.seq_len=32", "data.micro_batch_size=2",
        "data.global_batch_size=32", "train.steps=5", "train.dtype=fp32", "train.device=cpu", "optim.lr=1e-3",
        "optim.grad_clip=0.5", "schedule.warmup_steps=2", f"log.run_dir={run_dir}", "log.name=p",
        "log.tensorboard=false", *overrides], world_size=world_size)


def parity_eval(corpus: Path) -> List[str]:
    """Validation for the parity runs: the EvalCallback evaluates 8 global micro-batches of 2 sequences from the
    valid split before the first step and after the last, whatever the data-parallel degree (train.eval_batches
    counts the whole set; each dp rank evaluates its share)."""
    return [f"data.valid=[{{path: {corpus}/corpus.valid}}]", "train.eval_batches=8", "train.eval_every=0"]


def make_sft_jsonl(path: Path, count: int = 60, max_chars: int = 400) -> Path:
    """Chat rows from real code: the user names a standard-library function (json, email, http), the assistant
    answers with its source. Conversational rows ({"messages"}) alternate with prompt/completion rows, and every
    fifth row carries a system message, so both TRL formats and the system role are exercised."""
    import ast
    import json
    rows = []
    for pkg in ("json", "email", "http"):
        for file in sorted((STDLIB / pkg).glob("*.py")):
            source = file.read_text(encoding="utf-8")
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.FunctionDef) and len(rows) < count:
                    body = ast.get_source_segment(source, node) or ""
                    if 40 < len(body) <= max_chars:
                        rows.append((f"Write `{node.name}` from {pkg}/{file.name}.", body))
    lines = []
    for i, (prompt, answer) in enumerate(rows):
        if i % 2:
            lines.append({"prompt": prompt, "completion": answer})
        else:
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
            if i % 5 == 0:
                messages.insert(0, {"role": "system", "content": "You write Python."})
            lines.append({"messages": messages})
    path.write_text("".join(json.dumps(row) + "\n" for row in lines))
    return path


def make_preference_jsonl(path: Path, count: int = 48, max_chars: int = 300) -> Path:
    """Preference rows from real code: the prompt names a standard-library function; chosen is its source,
    rejected the same lines in reverse order (code that no longer runs). Every third row instead has the source as
    an edited response, chosen missing its last line, rejected reversed (edited > chosen > rejected)."""
    import ast
    import json
    rows = []
    for pkg in ("json", "email", "http"):
        for file in sorted((STDLIB / pkg).glob("*.py")):
            source = file.read_text(encoding="utf-8")
            for node in ast.walk(ast.parse(source)):
                body = ast.get_source_segment(source, node) if isinstance(node, ast.FunctionDef) else None
                if body and 40 < len(body) <= max_chars and body.count("\n") >= 2 and len(rows) < count:
                    lines = body.splitlines()
                    row = {"prompt": f"Write `{node.name}` from {pkg}/{file.name}.", "chosen": body,
                           "rejected": "\n".join(reversed(lines))}
                    if len(rows) % 3 == 2:
                        row["edited"], row["chosen"] = body, "\n".join(lines[:-1])
                    rows.append(row)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def record_quantizations(monkeypatch) -> List[str]:
    """Patch engine.fp8.native.ScalingState.quantize to append each call's role to the returned list: "weight" (a
    Parameter), "input" (e4m3, not a Parameter) or "grad" (the default e5m2 output gradients)."""
    import torch
    from engine.fp8.native import E4M3, ScalingState
    roles: List[str] = []
    quantize = ScalingState.quantize

    def recording(state, t, transpose):
        roles.append("weight" if isinstance(t, torch.nn.Parameter) else "input" if state.dtype == E4M3 else "grad")
        return quantize(state, t, transpose)

    monkeypatch.setattr(ScalingState, "quantize", recording)
    return roles


class StubBatch:
    """A micro-batch the Trainer only moves to its device."""

    def to(self, device):
        return self


class StubLoader:
    """A loader of one stub micro-batch per step (for Trainer tests whose TrainModule ignores the data)."""

    def next_step(self):
        return [StubBatch()]


class StepsFailingAt:
    """A TrainModule whose train_step raises at call `fail_at` (loss 1 / call before it)."""

    def __init__(self, fail_at: int):
        self.fail_at, self.calls = fail_at, 0

    def train_step(self, micro_batches):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("the step failed")
        return {"loss": 1.0 / self.calls}
