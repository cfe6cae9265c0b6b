"""Malformed alignment rows (issue 15, TESTING.md R14/R20): null fields, rows or messages of the wrong type, lone
surrogates and SFT turns that do not alternate stop with one line naming file:line and the field, or under
on_bad_data="skip" are counted by reason with their line numbers, and reach the run's skip report."""

import json
from pathlib import Path

import pytest

from align.chat import alternation_problem
from align.formats import AlignDataError, load_preferences, load_sft, read_jsonl, skip_report
from engine.data.tokenizer import train_bpe

TEXTS = ["What is two plus two? It is four. Be brief, answer the user. " * 4, "def f(x):\n    return x\n"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_bpe(TEXTS * 4, vocab_size=400, out_path=str(tmp_path_factory.mktemp("tok") / "tok.json"))


def msg(role, content):
    return {"role": role, "content": content}


def write_lines(path: Path, lines) -> Path:
    """Rows as given: dicts and lists as JSON, strings verbatim (so a line can be malformed on purpose)."""
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines),
                    encoding="utf-8")
    return path


GOOD_SFT = {"messages": [msg("user", "What is two plus two?"), msg("assistant", "Four.")]}
GOOD_PREF = {"prompt": "What is two plus two?", "chosen": "Four.", "rejected": "Five."}


@pytest.mark.parametrize("row, where", [
    ({"messages": [msg("user", None), msg("assistant", "a")]}, r"s\.jsonl:2: messages\[0\]\.content: expected a "
                                                                r"string, got null"),
    ({"messages": [{"role": None, "content": "q"}]}, r"s\.jsonl:2: messages\[0\]\.role: expected a string, got null"),
    ({"messages": None}, r"s\.jsonl:2: messages: expected a list of messages, got null"),
    ({"messages": ["hi", msg("assistant", "a")]}, r"s\.jsonl:2: messages\[0\]: expected an object with 'role' and "
                                                  r"'content', got str"),
    ({"prompt": None, "completion": "c"}, r"s\.jsonl:2: prompt: expected a list of messages, got null"),
    ({"prompt": "p", "completion": None}, r"s\.jsonl:2: completion: expected a list of messages, got null"),
    ([GOOD_SFT], r"s\.jsonl:2: expected a JSON object, got a list"),
    ('{"messages": [{"role": "user", "content": "q\\ud800"}, {"role": "assistant", "content": "a"}]}',
     r"s\.jsonl:2: messages\[0\]\.content: holds a lone surrogate escape"),
    ('{"messages": [{"role": "user", "content": "q"}], "id": ["x", "\\udc80"]}',
     r"s\.jsonl:2: id\[1\]: holds a lone surrogate escape"),
    ("[" * 100_000, r"s\.jsonl:2: invalid JSON: nested too deeply"),
    # found by helper H44: the last value of a repeated key won, NaN/Infinity were copied into herd's own rows,
    # and a row of both forms silently used its messages
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "content": ""}]}',
     r's\.jsonl:2: invalid JSON: the key "content" appears twice in one object'),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "w": NaN}',
     r"s\.jsonl:2: invalid JSON: NaN is not a JSON value"),
    ({**GOOD_SFT, "prompt": "x", "completion": "y"}, r"s\.jsonl:2: holds both 'messages' and 'prompt'"),
    ({"prompt": "a", "completion": [msg("assistant", "b"), msg("user", "c")]},
     r"s\.jsonl:2: completion\[1\]\.role: the dialog must end with an 'assistant' turn, got 'user'"),
])
def test_sft_malformed_row_is_one_line_naming_file_line_and_field(tok, tmp_path, row, where):
    path = write_lines(tmp_path / "s.jsonl", [GOOD_SFT, row])
    with pytest.raises(AlignDataError, match=where) as info:
        load_sft(path, tok, max_len=256)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("row, where", [
    ({"prompt": None, "chosen": "a", "rejected": "b"}, r"p\.jsonl:2: prompt: expected a list of messages, got null"),
    ({"prompt": "q", "chosen": None, "rejected": "b"}, r"p\.jsonl:2: chosen: expected a list of messages, got null"),
    ({"prompt": "q", "chosen": "a", "rejected": None}, r"p\.jsonl:2: rejected: expected a list of messages, got "
                                                       r"null"),
    ({"chosen": None, "rejected": [msg("user", "q"), msg("assistant", "b")]},
     r"p\.jsonl:2: chosen: expected a list of messages, got null"),
    ({"prompt": "q", "chosen": [msg("assistant", None)], "rejected": "b"},
     r"p\.jsonl:2: chosen\[0\]\.content: expected a string, got null"),
    ({"prompt": "q", "chosen": [42], "rejected": "b"},
     r"p\.jsonl:2: chosen\[0\]: expected an object with 'role' and 'content', got int"),
    ('"just a string"', r"p\.jsonl:2: expected a JSON object, got a string"),
    ('{"prompt": "q", "chosen": "\\ud83d", "rejected": "b"}', r"p\.jsonl:2: chosen: holds a lone surrogate"),
    # the reward model read its score at the end of the user's reply (H44)
    ({"prompt": "q", "chosen": [msg("assistant", "good"), msg("user", "thanks, that is wrong")], "rejected": "bad"},
     r"p\.jsonl:2: chosen\[1\]\.role: the dialog must end with an 'assistant' turn, got 'user'"),
])
def test_preference_malformed_row_is_one_line_naming_file_line_and_field(tok, tmp_path, row, where):
    path = write_lines(tmp_path / "p.jsonl", [GOOD_PREF, row])
    with pytest.raises(AlignDataError, match=where) as info:
        load_preferences(path, tok, max_len=256)
    assert "\n" not in str(info.value) and "data.on_bad_data=skip leaves such rows out" in str(info.value)


@pytest.mark.parametrize("messages, problem", [
    ([msg("user", "q"), msg("user", "q2"), msg("assistant", "a")], (1, "expected an 'assistant' turn after a user")),
    ([msg("assistant", "a"), msg("user", "q")], (0, "expected a 'user' turn first, got 'assistant'")),
    ([msg("user", "q"), msg("system", "s"), msg("assistant", "a")], (1, "expected an 'assistant' turn after a user "
                                                                       "turn, got 'system'")),
    ([msg("system", "s"), msg("system", "t"), msg("user", "q")], (1, "expected a 'user' turn after a system turn")),
    ([msg("user", "q"), msg("assistant", "a"), msg("assistant", "b")], (2, "expected a 'user' turn after an "
                                                                          "assistant turn, got 'assistant'")),
])
def test_alternation_problem_names_the_first_bad_turn(messages, problem):
    index, what = alternation_problem(messages)
    assert index == problem[0] and what.startswith(problem[1])


def test_alternating_dialogs_pass():
    assert alternation_problem([msg("system", "s"), msg("user", "q"), msg("assistant", "a"), msg("user", "q2"),
                                msg("assistant", "b")]) is None
    assert alternation_problem([msg("user", "q"), msg("assistant", "a"), msg("user", "trailing")]) is None
    assert alternation_problem([]) is None


def test_sft_turns_that_do_not_alternate_are_refused_with_file_line_and_field(tok, tmp_path):
    rows = [GOOD_SFT, {"messages": [msg("user", "q"), msg("assistant", "a"), msg("assistant", "b")]}]
    with pytest.raises(AlignDataError, match=r"s\.jsonl:2: messages\[2\]\.role: expected a 'user' turn after an "
                                             r"assistant turn, got 'assistant' \(turns must alternate"):
        load_sft(write_lines(tmp_path / "s.jsonl", rows), tok, max_len=256)
    rows = [GOOD_SFT, {"prompt": [msg("user", "q"), msg("assistant", "a")], "completion": "b"}]
    with pytest.raises(AlignDataError, match=r"s\.jsonl:2: completion\[0\]\.role: expected a 'user' turn after an "
                                             r"assistant turn"):
        load_sft(write_lines(tmp_path / "s.jsonl", rows), tok, max_len=256)


def sft_mixture(path: Path) -> Path:
    """Good rows between one of every kind of bad SFT line; the comment is each line's number and reason."""
    path.write_bytes("".join(line + "\n" for line in [
        json.dumps(GOOD_SFT),                                                                  # 1 good
        "{not json",                                                                           # 2 bad_json
        json.dumps([GOOD_SFT]),                                                                # 3 not_an_object
        json.dumps({"messages": [msg("user", None), msg("assistant", "a")]}),                  # 4 bad_field
        '{"messages": [{"role": "user", "content": "\\udfff"}]}',                              # 5 lone_surrogate
        json.dumps({"prompt": "only a prompt"}),                                               # 6 missing_field
        json.dumps({"messages": [msg("user", "q"), msg("user", "q"), msg("assistant", "a")]}),  # 7 turns_not_alt.
        "",                                                                                    # 8 blank: not a row
        json.dumps({"messages": [msg("system", "s"), msg("user", "q")]}),                      # 9 no_assistant_turn
        json.dumps({"messages": [msg("assistant", "a"), msg("user", "q"), msg("assistant", "b")]}),  # 10 turns
        json.dumps({"prompt": "q", "completion": "Four."}),                                    # 11 good
    ]).encode() + b'{"messages": "caf\xe9"}\n')                                                # 12 bad_utf8
    return path


def test_sft_skip_policy_counts_every_reason_with_line_numbers(tok, tmp_path):
    path = sft_mixture(tmp_path / "s.jsonl")
    with pytest.raises(AlignDataError, match=r"s\.jsonl:2: invalid JSON"):
        load_sft(path, tok, max_len=256)
    examples, counts = load_sft(path, tok, max_len=256, on_bad_data="skip")
    assert len(examples) == 2 and counts.rows == 11
    assert dict(counts.skipped) == {"bad_json": 1, "not_an_object": 1, "bad_field": 1, "lone_surrogate": 1,
                                    "missing_field": 1, "turns_not_alternating": 2, "no_assistant_turn": 1,
                                    "bad_utf8": 1}
    assert counts.lines["turns_not_alternating"] == [7, 10] and counts.lines["bad_utf8"] == [12]
    assert counts.summary() == ("kept 2 of 11 rows; skipped 1 bad_field, 1 bad_json, 1 bad_utf8, 1 lone_surrogate, "
                                "1 missing_field, 1 no_assistant_turn, 1 not_an_object, 2 turns_not_alternating")
    report = skip_report([counts, None]).as_dict()
    assert report["total"] == 9
    assert report["files"][str(path)]["examples"]["turns_not_alternating"] == ["line 7", "line 10"]
    assert report["files"][str(path)]["examples"]["lone_surrogate"] == ["line 5"]


def test_preference_skip_policy_counts_null_fields_and_keeps_good_rows(tok, tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [
        GOOD_PREF,                                                       # 1 good
        {"prompt": "q", "chosen": None, "rejected": "b"},                # 2 bad_field
        {"prompt": "q", "rejected": "b"},                                # 3 missing_field
        {"prompt": "q", "chosen": [msg("user", "x")], "rejected": "b"},  # 4 bad_preference
        {"prompt": "q", "chosen": "same", "rejected": "same"},           # 5 identical_responses
        {"prompt": "q", "chosen": "a", "rejected": "b", "edited": None},  # 6 good: a null edit is no edit
        '{"prompt": "\\ud800", "chosen": "a", "rejected": "b"}',         # 7 lone_surrogate
    ])
    examples, counts = load_preferences(path, tok, max_len=256, on_bad_data="skip")
    assert [e.line for e in examples] == [1, 6] and examples[1].edited is None and counts.rows == 7
    assert dict(counts.skipped) == {"bad_field": 1, "missing_field": 1, "bad_preference": 1,
                                    "identical_responses": 1, "lone_surrogate": 1}
    assert {reason: lines for reason, lines in counts.lines.items()} == {
        "bad_field": [2], "missing_field": [3], "bad_preference": [4], "identical_responses": [5],
        "lone_surrogate": [7]}


def test_read_jsonl_skip_counts_bad_lines_and_an_empty_file_still_fails(tmp_path):
    from align.formats import SkipCounts
    counts = SkipCounts(path="r.jsonl")
    path = write_lines(tmp_path / "r.jsonl", [{"a": 1}, "{bad", "", "[1]", {"b": 2}])
    assert list(read_jsonl(path, "skip", counts)) == [(1, {"a": 1}), (5, {"b": 2})]
    assert counts.rows == 2 and dict(counts.skipped) == {"bad_json": 1, "not_an_object": 1}  # the bad lines only
    with pytest.raises(AlignDataError, match=r"e\.jsonl:1: empty file"):
        list(read_jsonl(write_lines(tmp_path / "e.jsonl", ["", " "]), "skip", SkipCounts()))
    with pytest.raises(ValueError, match="on_bad_data: expected one of error, skip, got 'drop'"):
        load_sft(path, None, max_len=256, on_bad_data="drop")


def test_sft_stage_reports_its_skips_in_the_run_directory_and_metrics(tmp_path):
    """An SFT stage under data.on_bad_data=skip: align/run.py's loaders carry the files' counts to the engine,
    which prints one line, writes <run>/skipped.json and puts data_skipped fields in the first metrics record."""
    import io

    from align.run import build_stage_trainer
    from tests.helpers import make_corpus, tiny_config
    corpus = make_corpus(tmp_path / "corpus")
    rows = [{"messages": [msg("user", f"Say {i}."), msg("assistant", f"{i}.")]} for i in range(12)]
    train = write_lines(tmp_path / "train.jsonl", rows[:6] + [
        {"messages": [msg("user", "q"), msg("user", "again")]},  # line 7: turns_not_alternating
        {"messages": [msg("user", None), msg("assistant", "a")]},  # line 8: bad_field
    ] + rows[6:])
    valid = write_lines(tmp_path / "valid.jsonl", rows[:4] + ["{oops"])  # line 5: bad_json
    cfg = tiny_config(corpus, tmp_path / "runs", [
        "align.kind=sft", f"align.train_file={train}", f"align.valid_file={valid}", "data.on_bad_data=skip",
        "data.seq_len=64", "train.steps=2", "train.eval_every=0", "log.tensorboard=false"])
    out = io.StringIO()
    build_stage_trainer(cfg, stream=out).fit()
    run = tmp_path / "runs" / "t"
    report = json.loads((run / "skipped.json").read_text())
    assert report["reasons"] == {"bad_field": 1, "bad_json": 1, "turns_not_alternating": 1}
    assert report["files"][str(train)]["examples"] == {"bad_field": ["line 8"], "turns_not_alternating": ["line 7"]}
    assert report["files"][str(valid)]["examples"] == {"bad_json": ["line 5"]}
    assert (f"data: 3 skipped (1 bad_field, 1 bad_json, 1 turns_not_alternating); per file and line in "
            f"{run / 'skipped.json'}") in out.getvalue().splitlines()
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["data_skipped"] == 3 and first["data_skipped_turns_not_alternating"] == 1


@pytest.mark.parametrize("row, where", [
    ({"prompt": [msg("user", "q"), msg("assistant", "a")], "chosen": "a", "rejected": "b"},
     r"chosen\[0\]\.role: expected a 'user' turn after an assistant turn, got 'assistant'"),
    ({"prompt": [], "chosen": "a", "rejected": "b"}, r"chosen\[0\]\.role: expected a 'user' turn first, got "
                                                     r"'assistant'"),
    ({"prompt": [msg("user", "q"), msg("system", "s")], "chosen": "a", "rejected": "b"},
     r"prompt\[1\]\.role: expected an 'assistant' turn after a user turn, got 'system'"),
    ({"prompt": "q", "chosen": [msg("assistant", "a"), msg("assistant", "a2")], "rejected": "b"},
     r"chosen\[1\]\.role: expected a 'user' turn after an assistant turn"),
    ({"prompt": "q", "chosen": "a", "rejected": [msg("assistant", "b"), msg("system", "s")]},
     r"rejected\[1\]\.role: expected a 'user' turn after an assistant turn, got 'system'"),
    ({"chosen": [msg("user", "q"), msg("assistant", "a"), msg("assistant", "x")],
      "rejected": [msg("user", "q"), msg("assistant", "b")]}, r"chosen\[2\]\.role: expected a 'user' turn"),
])
def test_preference_turns_that_do_not_alternate_are_refused_or_counted(tok, tmp_path, row, where):
    """A preference row's prompt + each response is one dialog, checked as an SFT row is (reward model and DPO)."""
    path = write_lines(tmp_path / "p.jsonl", [GOOD_PREF, row])
    with pytest.raises(AlignDataError, match=r"p\.jsonl:2: " + where) as info:
        load_preferences(path, tok, max_len=256)
    assert "\n" not in str(info.value)
    examples, counts = load_preferences(path, tok, max_len=256, on_bad_data="skip")
    assert [e.line for e in examples] == [1] and dict(counts.skipped) == {"turns_not_alternating": 1}
    assert counts.lines == {"turns_not_alternating": [2]}


def test_an_edited_response_equal_to_rejected_is_dropped_and_counted(tok, tmp_path):
    """edited > chosen > rejected with edited == rejected contradicts itself: the row keeps chosen > rejected."""
    path = write_lines(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b", "edited": " b "},
                                              {"prompt": "q", "chosen": "a", "rejected": "b", "edited": "c"}])
    examples, counts = load_preferences(path, tok, max_len=256)
    assert [e.edited is None for e in examples] == [True, False]
    assert counts.notes == {"edited_dropped_same_as_rejected": 1} and not counts.skipped


@pytest.mark.parametrize("row, where", [
    ({"messages": [msg("assistant", "x"), msg("user", "y")]}, r"messages\[0\]\.role: expected a 'user' turn first"),
    ({"messages": [msg("user", "x"), msg("user", "y")]}, r"messages\[1\]\.role: expected an 'assistant' turn after "
                                                         r"a user turn, got 'user'"),
    ({"prompt": [msg("user", "x"), msg("system", "s"), msg("user", "y")]}, r"prompt\[1\]\.role: expected an "
                                                                           r"'assistant' turn"),
])
def test_rejection_sampling_prompts_whose_turns_do_not_alternate_are_refused_or_counted(tok, tmp_path, row, where):
    """Their answered rows would be SFT rows the next stage refuses: the prompt reader checks them as SFT does."""
    from align.rejection import read_prompts
    path = write_lines(tmp_path / "prompts.jsonl", [{"prompt": "a"}, row])
    with pytest.raises(AlignDataError, match=r"prompts\.jsonl:2: " + where):
        read_prompts(path, tok, max_prompt_tokens=200)
    prompts, counts = read_prompts(path, tok, max_prompt_tokens=200, on_bad_data="skip")
    assert [p.line for p in prompts] == [1] and dict(counts.skipped) == {"turns_not_alternating": 1}


def test_only_alignment_rows_are_read_as_strict_json():
    """A corpus document's other fields (a quality score of NaN, say) are never read: prepare-data keeps Python's
    leniency; alignment rows, which herd copies into rows of its own, are strict (H47's review of H44's fix)."""
    from engine.data.jsonl import BadLine, json_object
    for raw in (b'{"text": "a doc", "score": NaN}', b'{"text": "a doc", "meta": {"k": 1, "k": 2}}'):
        assert json_object(raw)["text"] == "a doc"
        with pytest.raises(BadLine, match="invalid JSON: (NaN is not a JSON value|the key \"k\" appears twice)"):
            json_object(raw, strict=True)
