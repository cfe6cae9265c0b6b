"""The offline next-line task of herd scaling (scaling/downstream.py): questions built from held-out documents
(the true line among lines of other documents, re-indented), and the scoring of candidates: the batched, padded
NLL of each candidate equals the NLL of that row computed alone, token by token."""

import math

import pytest
import torch

from engine.config import DownstreamTaskConfig, ModelConfig
from engine.model import build_model
from scaling.downstream import Question, _candidate_nll, build_task, score_model


class CharTokenizer:
    """One token per character (ids 1..127; 0 pads): the task's logic without a trained BPE."""

    eod_id = 0

    def encode_batch(self, texts):
        return [[min(127, ord(c)) or 1 for c in text] for text in texts]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def documents():
    def doc(name):
        body = [f"    value_{name}_{i} = compute_{name}(argument_{i})" for i in range(40)]
        return "\n".join([f"def function_{name}():"] + body + ["    return value"]) + "\n"
    return [doc("alpha"), doc("beta"), doc("gamma")]


def test_questions_hold_the_true_line_and_distractors_from_other_documents():
    texts = documents()
    cfg = DownstreamTaskConfig(items=20, choices=4, context_tokens=32, min_line_chars=12, seed=5)
    questions = build_task(texts, CharTokenizer(), cfg)
    assert len(questions) == 20
    for q in questions:
        context = CharTokenizer().decode(q.context)
        owner = next(name for name in ("alpha", "beta", "gamma") if f"compute_{name}" in context)
        true_line = q.candidates[q.answer]
        assert len(q.candidates) == 4 and len(set(q.candidates)) == 4 and len(q.context) == 32
        assert true_line.endswith("\n") and f"compute_{owner}" in true_line
        text = next(t for t in texts if f"compute_{owner}" in t)
        assert context + true_line in text  # the line really follows the context in its document
        for i, other in enumerate(q.candidates):
            indent = true_line[:len(true_line) - len(true_line.lstrip())]
            assert other.startswith(indent) and not other[len(indent)].isspace()  # re-indented like the answer
            if i != q.answer:
                assert f"compute_{owner}" not in other  # drawn from another document
    # the same seed draws the same questions
    assert build_task(texts, CharTokenizer(), cfg) == questions
    with pytest.raises(Exception, match="downstream.items"):
        build_task(texts, CharTokenizer(), DownstreamTaskConfig(items=10_000, context_tokens=32))


def test_batched_candidate_nll_equals_each_row_alone():
    torch.manual_seed(0)
    model = build_model(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=128,
                                    max_seq_len=256), torch.device("cpu"), seed=3).eval()
    rows = [([5, 9, 11, 3], [7, 8], 2), ([4] * 9, [1, 2, 3, 4, 5], 7), ([6, 6], [9], 1)]
    batched = _candidate_nll(model, rows)
    for (context, candidate, chars), got in zip(rows, batched):
        tokens = torch.tensor([context + candidate])
        logprobs = torch.log_softmax(model(tokens).float()[0], dim=-1)  # [s, vocab]
        nll = -sum(logprobs[len(context) - 1 + j, t].item() for j, t in enumerate(candidate))
        assert got == pytest.approx(nll / chars, rel=1e-5)
    # accuracy and the correct answer's NLL from those numbers
    questions = [Question([5, 9, 11, 3], ["ab\n", "cdef\n"], 1)]
    result = score_model(model, questions, CharTokenizer())
    per_choice = _candidate_nll(model, [([5, 9, 11, 3], CharTokenizer().encode_batch([c])[0], len(c))
                                        for c in questions[0].candidates])
    assert result["nll_correct"] == pytest.approx(per_choice[1], rel=1e-6)
    assert result["accuracy"] == float(per_choice[1] < per_choice[0]) and result["choices"] == 2
    assert math.isfinite(result["nll_correct"])


def test_too_few_distractors_is_one_error_not_an_endless_draw(monkeypatch):
    """The other held-out documents hold one usable line; 4 choices need 3 distractors. build_task must say so
    (naming downstream.choices) instead of drawing forever. Should the check regress, the draws are capped here, so
    the test fails instead of hanging."""
    import random
    import types
    import scaling.downstream as downstream
    from engine.errors import HerdError

    class CappedRandom(random.Random):
        draws = 0

        def randrange(self, *args, **kwargs):
            CappedRandom.draws += 1
            assert CappedRandom.draws < 100_000, "build_task is drawing distractors without end"
            return super().randrange(*args, **kwargs)
    monkeypatch.setattr(downstream, "random", types.SimpleNamespace(Random=CappedRandom))  # this module's draws only
    long_doc = "\n".join(f"    line number {i} of the long document" for i in range(200))
    short_doc = "    a single other line of text here"
    cfg = DownstreamTaskConfig(items=10, choices=4, context_tokens=8, min_line_chars=16, seed=0)
    with pytest.raises(HerdError, match=r"^downstream\.choices: .* hold 1 distinct lines .* choices - 1 = 3"):
        build_task([long_doc, short_doc], CharTokenizer(), cfg)
    # two choices need one distractor: the same documents are enough, every question gets the other document's line
    questions = build_task([long_doc, short_doc], CharTokenizer(), DownstreamTaskConfig(
        items=10, choices=2, context_tokens=8, min_line_chars=16, seed=0))
    assert all(sorted(q.candidates)[0] == "    a single other line of text here\n" for q in questions)
