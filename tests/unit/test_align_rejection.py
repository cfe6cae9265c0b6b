"""Rejection sampling (align/rejection.py, Llama 3 paper section 4.2.2) on one process: the kept answer is the
reward model's favourite of the K samples and scores the same when re-scored alone; rows keep their prompt and
fields; a seed gives one output; bad prompt rows fail naming file:line; a finished output is not recomputed."""

import io
import json
from dataclasses import replace

import pytest
import torch

from align import rejection
from align.chat import encode_dialog
from align.formats import AlignDataError
from align.modules import RewardTrainModule
from align.rejection import Candidate, choose_best, load_stage_module, run_rejection_sampling
from align.run import scalar_head
from engine.data.tokenizer import load_tokenizer
from engine.errors import ConfigError
from tests.distributed import rejection_ranks
from tests.distributed.rejection_ranks import K, PROMPTS, SAMPLED


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return rejection_ranks.make_world(tmp_path_factory.mktemp("rejection"))


@pytest.fixture(scope="module")
def sampled(world, tmp_path_factory):
    """One seeded run: its output rows, stats (with every candidate) and printed summary."""
    output = tmp_path_factory.mktemp("out") / "rows.jsonl"
    stream = io.StringIO()
    stats = run_rejection_sampling(rejection_ranks.job(world, "rs"), world["sft"], world["rm"], world["prompts"],
                                   str(output), K, SAMPLED, stream, keep_candidates=True)
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    return output, rows, stats, stream.getvalue()


def _prompt_messages(row):
    if "messages" in row:
        return row["messages"]
    prompt = row["prompt"]
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def test_rows_are_the_prompt_plus_the_best_answer(sampled):
    _, rows, stats, summary = sampled
    assert len(rows) == len(PROMPTS) and stats["prompts"] == len(PROMPTS) and stats["samples"] == K
    for prompt, row, candidates in zip(PROMPTS, rows, stats["candidates"]):
        assert row["messages"][:-1] == _prompt_messages(prompt)
        assert row["messages"][-1]["role"] == "assistant"
        assert len(candidates) == row["samples"] == K
        pool = [c for c in candidates if c["stopped"] and c["text"]] or [c for c in candidates if c["text"]]
        best = max(c["score"] for c in pool)
        assert row["score"] == best
        assert row["messages"][-1]["content"] in [c["text"] for c in pool if c["score"] == best]
        scored = [c["score"] for c in candidates if c["score"] is not None]
        assert row["mean_score"] == pytest.approx(sum(scored) / len(scored), abs=1e-12)
        assert row["stopped"] == sum(c["stopped"] for c in candidates)
    assert len({c["text"] for c in stats["candidates"][0]}) > 1  # the K samples really differ
    assert summary.count("\n") == 1 and "mean best score" in summary and "stopped" in summary
    assert stats["mean_best_score"] >= stats["mean_score"]


def test_samples_that_produce_a_control_token_are_dropped_not_stored_as_text(sampled):
    """The tiny policy emits header and end-of-text ids often; such a sample halts there and is never kept: its
    control token would have been stored as literal text in the SFT rows (helper H44)."""
    _, rows, stats, _ = sampled
    everything = [c for candidates in stats["candidates"] for c in candidates]
    broken = [c for c in everything if c["control"]]
    assert broken and stats["control_token"] == len(broken)
    assert all(c["text"] == "" and c["score"] is None and not c["stopped"] for c in broken)
    for row in rows:
        assert "<|" not in row["messages"][-1]["content"]


def test_rows_carry_the_prompt_rows_fields(sampled):
    _, rows, _, _ = sampled
    assert [row["id"] for row in rows] == ["p0", "p1", "p2", "p3"]
    assert rows[1]["test"] == "t1"
    assert "prompt" not in rows[0]  # it became the messages
    assert rows[3]["score"] != 9.0  # the output's own keys win over a prompt row's


def test_kept_answer_rescored_alone_matches(world, sampled):
    """The reward model read at the last token of the unpadded dialog, one sequence per forward."""
    _, rows, _, _ = sampled
    cfg = rejection_ranks.job(world, "rescore")
    module = load_stage_module(cfg, torch.device("cpu"), None, world["rm"], adapt_model=scalar_head,
                               module_factory=RewardTrainModule)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    with torch.no_grad():
        for row in rows:
            tokens = encode_dialog(tokenizer, row["messages"]).tokens
            score = module.parallel.model(torch.tensor([tokens]))[0, -1, 0].item()
            assert abs(score - row["score"]) < 1e-5, (score, row["score"])


def test_same_seed_same_output_file(world, sampled, tmp_path):
    output, _, _, _ = sampled
    again = tmp_path / "again.jsonl"
    run_rejection_sampling(rejection_ranks.job(world, "rs2"), world["sft"], world["rm"], world["prompts"],
                           str(again), K, SAMPLED, io.StringIO())
    assert again.read_bytes() == output.read_bytes()


def test_existing_output_is_returned_without_sampling(world, sampled, monkeypatch):
    output, _, stats, _ = sampled
    before = output.stat().st_mtime_ns

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled again although the output exists")

    monkeypatch.setattr(rejection, "sample_k", no_sampling)
    monkeypatch.setattr(rejection, "load_stage_module", no_sampling)
    stream = io.StringIO()
    again = run_rejection_sampling(rejection_ranks.job(world, "rs3"), world["sft"], world["rm"], world["prompts"],
                                   str(output), K, SAMPLED, stream)
    assert again["resumed"] and output.stat().st_mtime_ns == before
    for key in ("prompts", "samples", "mean_best_score", "mean_score", "stopped_fraction"):
        assert again[key] == pytest.approx(stats[key], abs=1e-12), key
    assert "nothing sampled" in stream.getvalue()


def test_stop_ids_end_samples_and_stopped_answers_are_preferred(world, tmp_path):
    """A fifth of the vocabulary as extra stop ids (<|eot_id|> is always one): many samples stop early."""
    sampling = replace(SAMPLED, stop_ids=tuple(range(3, 500, 5)))
    output = tmp_path / "rows.jsonl"
    stats = run_rejection_sampling(rejection_ranks.job(world, "stops"), world["sft"], world["rm"], world["prompts"],
                                   str(output), K, sampling, io.StringIO(), keep_candidates=True)
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    everything = [c for candidates in stats["candidates"] for c in candidates]
    stopped = sum(c["stopped"] for c in everything)
    assert stopped > 0 and stats["stopped_fraction"] == pytest.approx(stopped / len(everything))
    for row, candidates in zip(rows, stats["candidates"]):
        finished = [c for c in candidates if c["stopped"] and c["text"]]
        if finished:  # a stopped, non-empty answer exists: the kept one is the best of those
            assert row["score"] == max(c["score"] for c in finished)
    assert stats["best_unstopped"] == sum(not any(c["stopped"] and c["text"] for c in candidates)
                                          for candidates in stats["candidates"])


@pytest.mark.parametrize("line3, message", [
    ('{"id": 3}', "expected 'prompt' or 'messages'"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}',
     "must end with a user turn"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "unknown role"),
    ('{"prompt": 5}', "expected a list of messages"),
    ('{"prompt": "hi"', "invalid JSON"),
    ('{"prompt": "x", "messages": [{"role": "user", "content": "hi"}]}', "holds both 'messages' and 'prompt'"),
])
def test_malformed_prompt_row_names_file_and_line(world, tmp_path, line3, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n\n' + line3 + "\n")  # a blank line 2: line numbers are the file's
    with pytest.raises(AlignDataError, match=f"bad.jsonl:3: .*{message}"):
        run_rejection_sampling(rejection_ranks.job(world, "bad"), world["sft"], world["rm"], str(bad),
                               str(tmp_path / "out.jsonl"), K, SAMPLED, io.StringIO())
    assert not (tmp_path / "out.jsonl").exists()


def test_skipped_prompt_rows_are_counted_and_written_beside_the_rows(world, tmp_path):
    """data.on_bad_data=skip: malformed prompt rows are left out by reason and line, in stats and in
    rows.skipped.json (written before the rows file, which marks the stage finished); the good rows are answered."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"id": 3}\n{"prompt": "b"\n'
                       '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                       '{"prompt": "c"}\n')
    cfg = rejection_ranks.job(world, "skip")
    cfg.data.on_bad_data = "skip"
    output = tmp_path / "rows.jsonl"
    stats = run_rejection_sampling(cfg, world["sft"], world["rm"], str(prompts), str(output), K, SAMPLED,
                                   io.StringIO())
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["messages"][0]["content"] for r in rows] == ["a", "c"] and stats["prompts_read"] == 5
    report = json.loads((tmp_path / "rows.skipped.json").read_text())
    assert stats["skipped_file"] == str(tmp_path / "rows.skipped.json")
    assert report["total"] == 3 and report["reasons"] == {"bad_json": 1, "no_prompt": 1,
                                                          "prompt_not_ending_with_user": 1}
    assert report["files"][str(prompts)]["examples"] == {"bad_json": ["line 3"], "no_prompt": ["line 2"],
                                                        "prompt_not_ending_with_user": ["line 4"]}


def test_pipeline_parallel_is_refused(world, tmp_path):
    cfg = rejection_ranks.job(world, "pp")
    cfg.parallel.pp = 2
    with pytest.raises(ConfigError, match="not pp"):
        run_rejection_sampling(cfg, world["sft"], world["rm"], world["prompts"], str(tmp_path / "o.jsonl"), K,
                               SAMPLED, io.StringIO())


def test_choose_best_prefers_stopped_non_empty_answers():
    def c(text, stopped, score):
        return Candidate(text, stopped, None, score)
    assert choose_best([c("a", False, 3.0), c("b", True, 1.0), c("c", True, 2.0)]) == 2  # cut-off 3.0 loses
    assert choose_best([c("a", False, 1.0), c("b", False, 2.0)]) == 1  # none stopped: the best cut-off one
    assert choose_best([c("", True, 5.0), c("b", False, 1.0)]) == 1  # an empty answer is never kept
    assert choose_best([c("a", True, None), c("b", True, 0.5), c("c", True, 0.5)]) == 1  # unscorable out; ties: first
    assert choose_best([c("", True, 1.0), c("a", True, None)]) is None
    assert choose_best([c("\u200b\u200d", True, 9.0), c("b", True, 1.0)]) == 1  # shows nothing: the SFT reader's
    # empty_assistant, which would stop the next stage on herd's own rows (H47)
