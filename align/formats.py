"""TRL-compatible JSONL data for post-training: SFT rows and preference rows, read into Llama 3 chat tokens.

SFT rows (one JSON object a line):
  conversational      {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}, ...]}
  prompt/completion   {"prompt": "...", "completion": "..."}  or the same keys holding message lists.
Preference rows (reward model and DPO; Llama 3 paper section 4.1.2):
  explicit prompt     {"prompt": str | [messages], "chosen": str | [messages], "rejected": str | [messages]}
  implicit prompt     {"chosen": [messages], "rejected": [messages]}: the messages both share at the start are the
                      prompt, as in TRL.
  either may add      "edited": the annotator's improvement of the chosen answer (section 4.1.2: edited > chosen >
                      rejected).
A plain-string prompt is one user message; a plain-string completion/response one assistant message. Keys other
than these are ignored (TRL data often carries ids and scores). A malformed row (bad UTF-8 or JSON, a lone
surrogate, a missing, null or wrong-typed field, turns that do not alternate) stops the load with
"file:line: what" under on_bad_data="error" (the engine's data.on_bad_data), or is skipped and counted under
"skip"; rows with nothing to learn are always skipped and counted. SkipCounts keeps the counts per reason and the
first line numbers; skip_report() turns them into the run's report (engine/data/skips.py).
"""

import json
import os
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

from align.chat import (ChatFormatError, ChatTokens, alternation_problem, chat_format, check_messages,
                        first_learned_message)
from engine.data.jsonl import BadLine, json_object
from engine.data.prepare import lone_surrogate
from engine.data.skips import EXAMPLES_PER_REASON, SkipReport
from engine.errors import DataError
from engine.files import atomic_output, file_problem

TOO_LONG_POLICIES = ("truncate", "skip")
BAD_DATA_POLICIES = ("error", "skip")
_BATCH_ROWS = 512  # rows per encode_batch call: one call per row would be slow, one per file unbounded in memory


class AlignDataError(DataError, ValueError):
    """A post-training data file is malformed; the message is "path:line: what", `reason` the skip reason it
    counts under with on_bad_data="skip" (empty when it can never be skipped: a missing or empty file)."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason


def _error(path, line: int, what: str, reason: str = "bad_row") -> AlignDataError:
    return AlignDataError(f"{path}:{line}: {' '.join(str(what).split())}", reason)


@dataclass
class SkipCounts:
    """Rows read, rows skipped by reason (with the first line numbers of each), and other things worth reporting
    (truncations, dropped edits)."""

    rows: int = 0
    skipped: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    path: str = ""
    lines: Dict[str, List[int]] = field(default_factory=dict)  # reason -> first line numbers skipped for it

    def skip(self, reason: str, line: int = 0) -> None:
        self.skipped[reason] += 1
        first = self.lines.setdefault(reason, [])
        if line and len(first) < EXAMPLES_PER_REASON:
            first.append(line)

    def note(self, what: str) -> None:
        self.notes[what] += 1

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        kept = self.rows - self.total_skipped
        text = f"kept {kept} of {self.rows} rows"
        if self.skipped:
            text += "; skipped " + ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
        if self.notes:
            text += "; " + ", ".join(f"{n} {what}" for what, n in sorted(self.notes.items()))
        return text


@dataclass
class PreferenceExample:
    """One preference row: the prompt's tokens (ending in the open assistant header) and, per response, the whole
    dialog prompt + response, learning the response's tokens only. Every response starts with `prompt`."""

    prompt: List[int]
    chosen: ChatTokens
    rejected: ChatTokens
    edited: Optional[ChatTokens] = None
    line: int = 0


def skip_report(counts: Iterable[Optional[SkipCounts]]) -> SkipReport:
    """The files' counts as one report (per reason and file, first line numbers), as the engine writes it."""
    report = SkipReport()
    for each in counts:
        if each is None:
            continue
        for reason, count in each.skipped.items():
            report.add(reason, each.path, count, (f"line {n}" for n in each.lines.get(reason, ())))
        for what, count in each.notes.items():
            report.note(what, count)
    return report


def _check_bad_data(on_bad_data: str) -> None:
    if on_bad_data not in BAD_DATA_POLICIES:
        raise ValueError(f"on_bad_data: expected one of {', '.join(BAD_DATA_POLICIES)}, got {on_bad_data!r}")


_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")  # the only way one gets into a decoded line


def _lone_surrogate(value, where: str = "") -> Optional[str]:
    """The field path ("messages[1].content") of the first string holding a lone surrogate, or None."""
    if isinstance(value, str):
        return (where or "row") if lone_surrogate(value) is not None else None
    if isinstance(value, dict):
        for key, item in value.items():
            field_path = f"{where}.{key}" if where else str(key)
            if lone_surrogate(str(key)) is not None:
                return f"{where or 'row'} (a key)"
            found = _lone_surrogate(item, field_path)
            if found:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _lone_surrogate(item, f"{where}[{index}]")
            if found:
                return found
    return None


def _parse_line(path, number: int, raw: bytes) -> Optional[Dict[str, Any]]:
    """A non-blank line's object, None for a blank line; an AlignDataError (with its reason) for a bad one."""
    try:
        row = json_object(raw, strict=True)
    except BadLine as e:
        raise _error(path, number, str(e), e.reason) from None
    if row is not None and _ESCAPED_SURROGATE.search(raw.decode("utf-8")):
        where = _lone_surrogate(row)
        if where:
            raise _error(path, number, f"{where}: holds a lone surrogate escape (\\ud800-\\udfff without its "
                                       f"pair): not valid Unicode text", "lone_surrogate")
    return row


def read_jsonl(path, on_bad_data: str = "error",
               counts: Optional[SkipCounts] = None) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line. A line that is not UTF-8, not JSON, not an object or
    holds a lone surrogate raises "path:line: what", or with on_bad_data="skip" is counted in `counts` (as a row
    read and skipped). A missing file, or one without any non-blank line, always raises."""
    _check_bad_data(on_bad_data)
    problem = file_problem(path)
    if problem:
        raise AlignDataError(f"{path}: {'no such file' if not os.path.lexists(path) else problem}")
    found = False
    try:
        stream = open(path, "rb")
    except OSError as e:
        raise AlignDataError(f"{path}: cannot read ({e.strerror or e})") from None
    with stream:
        for number, raw in enumerate(stream, start=1):
            try:
                row = _parse_line(path, number, raw)
            except AlignDataError as e:
                if on_bad_data != "skip" or counts is None:
                    raise
                found = True
                counts.rows += 1
                counts.skip(e.reason, number)
                continue
            if row is not None:
                found = True
                yield number, row
    if not found:
        raise _error(path, 1, "empty file: no JSON objects", "")


def write_jsonl(path, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write rows one JSON object a line, atomically (engine/files.py): readers see the old file or the complete new
    one, never a partial one. Returns the number of rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with atomic_output(path, binary=False) as stream:
        for row in rows:
            stream.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")  # strict JSON readers
            count += 1
    return count


def _as_messages(path, line: int, value, key: str, string_role: Optional[str]) -> List[Dict[str, str]]:
    """A row's field as a list of {role, content}: a string becomes one `string_role` message where allowed."""
    if isinstance(value, str) and string_role is not None:
        return [{"role": string_role, "content": value}]
    try:
        check_messages(value, key)
    except ChatFormatError as e:
        raise _error(path, line, str(e), "bad_field") from None
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _require(path, line: int, row: Mapping, keys: Sequence[str]) -> None:
    for key in keys:
        if key not in row:
            hint = (" (these look like preference rows: align.kind rm or dpo reads them)"
                    if "chosen" in row and "completion" in keys else "")
            raise _error(path, line, f"missing '{key}' (found keys: {', '.join(sorted(row)) or 'none'}){hint}",
                         "missing_field")


def _sft_dialog(path, line: int, row: Mapping, train_on: str) -> Tuple[List[Dict[str, str]], int]:
    """The row's messages and the index from which assistant turns are learned."""
    both = [key for key in ("prompt", "completion") if key in row]
    if "messages" in row and both:  # one was silently dropped
        raise _error(path, line, f"holds both 'messages' and '{both[0]}': give one form of the row", "bad_field")
    if "messages" in row:
        messages = _as_messages(path, line, row["messages"], "messages", None)
        _check_turns(path, line, messages, lambda i: f"messages[{i}]")
        return messages, first_learned_message(messages, train_on)
    if "prompt" in row or "completion" in row:
        _require(path, line, row, ("prompt", "completion"))
        prompt = _as_messages(path, line, row["prompt"], "prompt", "user")
        completion = _as_messages(path, line, row["completion"], "completion", "assistant")
        _check_turns(path, line, prompt + completion,
                     lambda i: f"prompt[{i}]" if i < len(prompt) else f"completion[{i - len(prompt)}]")
        return prompt + completion, len(prompt)  # learn the completion only (TRL's completion-only loss)
    hint = " (these look like preference rows: align.kind rm or dpo reads them)" if "chosen" in row else ""
    raise _error(path, line, f"expected 'messages', or 'prompt' and 'completion' "
                             f"(found keys: {', '.join(sorted(row)) or 'none'}){hint}", "missing_field")


def _check_turns(path, line: int, messages: Sequence[Mapping[str, str]], name) -> None:
    """A dialog's turns (an SFT row, or a preference row's prompt + one response) alternate (align/chat.py
    alternation_problem); `name(i)` names message i's field."""
    problem = alternation_problem(messages)
    if problem:
        index, what = problem
        raise _error(path, line, f"{name(index)}.role: {what}", "turns_not_alternating")
    if messages[-1:] and messages[-1]["role"] != "assistant" and any(m["role"] == "assistant" for m in messages):
        # a reward model read its score at the end of a user's reply, and SFT learned nothing from the turn
        # (helper H44): an answer ends the dialog (a dialog without one is counted as no_assistant_turn)
        raise _error(path, line, f"{name(len(messages) - 1)}.role: the dialog must end with an 'assistant' turn, "
                                 f"got '{messages[-1]['role']}'", "ends_without_answer")


def _nothing_to_learn(messages: Sequence[Mapping[str, str]], learn_from: int) -> Optional[str]:
    """Why a dialog teaches nothing, or None: no assistant turn learned, or a learned one that is empty (it would
    teach the model to answer with an immediate eot)."""
    learned = [m for m in messages[learn_from:] if m["role"] == "assistant"]
    if not learned:
        return "no_assistant_turn"
    if any(blank(m["content"]) for m in learned):
        return "empty_assistant"
    return None


def blank(text: str) -> bool:
    """Whether `text` shows nothing: only whitespace, format characters (zero-width spaces and joiners, byte-order
    marks) and control characters such as NUL; str.strip() keeps the latter two, and an answer of U+200B was
    learned as content (helper H44)."""
    return all(ch.isspace() or unicodedata.category(ch) in ("Cf", "Cc") for ch in text)


def _check_policy(max_len: int, on_too_long: str) -> None:
    if not isinstance(max_len, int) or max_len < 2:
        raise ValueError(f"max_len: expected an integer >= 2, got {max_len!r}")
    if on_too_long not in TOO_LONG_POLICIES:
        raise ValueError(f"on_too_long: expected one of {', '.join(TOO_LONG_POLICIES)}, got {on_too_long!r}")


def _fit(tokens: ChatTokens, max_len: int, on_too_long: str, counts: SkipCounts,
         line: int) -> Optional[ChatTokens]:
    """The dialog within max_len tokens by policy, or None (counted) when it must be left out."""
    if len(tokens) <= max_len:
        return tokens
    if on_too_long == "skip":
        counts.skip("too_long", line)
        return None
    cut = tokens.truncated(max_len)
    if not any(cut.learn):
        counts.skip("nothing_learned_after_truncation", line)
        return None
    counts.note("truncated")
    return cut


def rows_of(path, on_bad_data: str, counts: SkipCounts, parse) -> Iterator[Tuple[int, Any]]:
    """(line, parse(line, row)) for every usable row of the file, counting each row read; a malformed one (from
    read_jsonl or `parse`) raises with a hint under on_bad_data="error", or is counted and left out."""
    rows = read_jsonl(path, on_bad_data, counts)
    while True:
        try:
            line, row = next(rows)
            counts.rows += 1
            parsed = parse(line, row)
        except StopIteration:
            return
        except AlignDataError as e:
            if on_bad_data == "skip" and e.reason:
                counts.skip(e.reason, line)
                continue
            hint = " (data.on_bad_data=skip leaves such rows out)" if e.reason else ""
            raise AlignDataError(f"{e}{hint}", e.reason) from None
        yield line, parsed


def load_sft(path, tokenizer, max_len: int, on_too_long: str = "truncate", train_on: str = "assistant",
             on_bad_data: str = "error") -> Tuple[List[ChatTokens], SkipCounts]:
    """Read an SFT JSONL file into chat tokens. train_on applies to conversational rows ('assistant': every
    assistant turn, 'last': only the last); prompt/completion rows always learn their completion only."""
    _check_policy(max_len, on_too_long)
    _check_bad_data(on_bad_data)
    first_learned_message([], train_on)  # reject a bad train_on before reading the file
    fmt, counts, examples = chat_format(tokenizer), SkipCounts(path=str(path)), []
    pending: List[Tuple[int, List[Dict[str, str]], int]] = []

    def flush():
        encoded = fmt.encode_dialogs([messages for _, messages, _ in pending], [first for _, _, first in pending])
        fitted = (_fit(t, max_len, on_too_long, counts, line) for t, (line, _, _) in zip(encoded, pending))
        examples.extend(kept for kept in fitted if kept)
        pending.clear()

    for line, (messages, first) in rows_of(path, on_bad_data, counts,
                                         lambda line, row: _sft_dialog(path, line, row, train_on)):
        reason = _nothing_to_learn(messages, first)
        if reason:
            counts.skip(reason, line)
            continue
        pending.append((line, messages, first))
        if len(pending) >= _BATCH_ROWS:
            flush()
    if pending:
        flush()
    return examples, counts


def _same(a: Mapping[str, str], b: Mapping[str, str]) -> bool:
    # Content is compared stripped, as the chat format encodes it.
    return a["role"] == b["role"] and a["content"].strip() == b["content"].strip()


def _same_list(a: Sequence[Mapping[str, str]], b: Sequence[Mapping[str, str]]) -> bool:
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


def _split_implicit(path, line: int, row: Mapping) -> Tuple[List[Dict[str, str]], Dict[str, List[Dict[str, str]]]]:
    """TRL's implicit prompt: the leading messages chosen and rejected share are the prompt."""
    for key in ("chosen", "rejected"):
        if isinstance(row[key], str):
            raise _error(path, line, f"'{key}' is a string but the row has no 'prompt' (an implicit prompt needs "
                                     f"'chosen' and 'rejected' as message lists)", "bad_preference")
    chosen = _as_messages(path, line, row["chosen"], "chosen", None)
    rejected = _as_messages(path, line, row["rejected"], "rejected", None)
    if _same_list(chosen, rejected):
        return chosen, {"chosen": [], "rejected": []}
    shared = 0
    while shared < min(len(chosen), len(rejected)) and _same(chosen[shared], rejected[shared]):
        shared += 1
    for key, messages in (("chosen", chosen), ("rejected", rejected)):
        if shared < len(messages) and messages[shared]["role"] != "assistant":
            raise _error(path, line, f"chosen and rejected first differ at message {shared}, where {key} has a "
                                     f"'{messages[shared]['role']}' message; the responses after the shared prompt "
                                     f"must start with an assistant message", "bad_preference")
    prompt = chosen[:shared]
    responses = {"chosen": chosen[shared:], "rejected": rejected[shared:]}
    if row.get("edited") is not None:
        edited = _as_messages(path, line, row["edited"], "edited", "assistant")
        if not isinstance(row["edited"], str):
            if not _same_list(edited[:shared], prompt):
                raise _error(path, line, "edited: a message list must start with the prompt that chosen and "
                                         "rejected share", "bad_preference")
            edited = edited[shared:]
        responses["edited"] = edited
    return prompt, responses


def _preference_parts(path, line: int, row: Mapping) -> Tuple[List[Dict[str, str]], Dict[str, List[Dict[str, str]]]]:
    """The row's prompt messages and its responses (chosen, rejected and, when present, edited)."""
    _require(path, line, row, ("chosen", "rejected"))
    if "prompt" not in row:
        prompt, responses = _split_implicit(path, line, row)
        offset = len(prompt)
    else:
        prompt = _as_messages(path, line, row["prompt"], "prompt", "user")
        # chosen and rejected must be there (a null is an error naming them); a null edited means none
        keys = ["chosen", "rejected"] + (["edited"] if row.get("edited") is not None else [])
        responses = {k: _as_messages(path, line, row[k], k, "assistant") for k in keys}
        offset = 0
    for key, messages in responses.items():
        if messages and messages[0]["role"] != "assistant":
            raise _error(path, line, f"{key}[{offset}].role: a response must start with an assistant message, "
                                     f"got '{messages[0]['role']}'", "bad_preference")
    # each response continues the prompt as one dialog, checked as SFT rows are: the model must never learn
    # from two answers in a row, a prompt without a user turn, or a system message mid-dialog
    shared = "prompt" if offset == 0 else "chosen"  # an implicit prompt is the messages chosen starts with
    for key, messages in responses.items():
        _check_turns(path, line, prompt + messages, lambda i, key=key: f"{shared}[{i}]" if i < len(prompt)
                     else f"{key}[{i - len(prompt) + offset}]")
    return prompt, responses


def _usable_responses(responses: Dict[str, List[Dict[str, str]]], counts: SkipCounts, line: int) -> bool:
    """Drop what cannot be learned from: False (counted) when the row must be skipped; a bad edit is dropped."""
    if _same_list(responses["chosen"], responses["rejected"]):
        counts.skip("identical_responses", line)
        return False
    for key in ("chosen", "rejected"):
        if _nothing_to_learn(responses[key], 0):
            counts.skip("empty_response", line)
            return False
    edited = responses.get("edited")
    if edited is not None and (_nothing_to_learn(edited, 0) or _same_list(edited, responses["chosen"])):
        counts.note("edited_dropped_empty_or_same_as_chosen")
        del responses["edited"]
    elif edited is not None and _same_list(edited, responses["rejected"]):
        # edited > chosen > rejected with edited == rejected contradicts itself: the row keeps chosen > rejected
        counts.note("edited_dropped_same_as_rejected")
        del responses["edited"]
    return True


def _fit_preference(prompt_len: int, dialogs: Dict[str, ChatTokens], max_len: int, on_too_long: str,
                    counts: SkipCounts, line: int) -> Optional[Dict[str, ChatTokens]]:
    """Apply the length policy to a row's dialogs; None (counted) when the row must be skipped."""
    if prompt_len >= max_len:
        counts.skip("prompt_too_long", line)
        return None
    fitted, cut, notes = {}, 0, []
    for key, tokens in dialogs.items():
        if len(tokens) <= max_len:
            fitted[key] = tokens
        elif key == "edited" and on_too_long == "skip":
            notes.append("edited_dropped_too_long")
        elif on_too_long == "skip":
            counts.skip("too_long", line)
            return None
        else:
            cut += 1
            fitted[key] = tokens.truncated(max_len)
    if fitted["chosen"].tokens == fitted["rejected"].tokens:  # the same tokens: cut to them, or encoded alike
        counts.skip("identical_after_truncation" if cut else "identical_responses", line)
        return None
    for note in notes + ["truncated"] * cut:  # said of the rows kept only (a note per response cut)
        counts.note(note)
    return fitted


def load_preferences(path, tokenizer, max_len: int, on_too_long: str = "truncate",
                     on_bad_data: str = "error") -> Tuple[List[PreferenceExample], SkipCounts]:
    """Read a preference JSONL file (reward model / DPO) into prompt and response tokens."""
    _check_policy(max_len, on_too_long)
    _check_bad_data(on_bad_data)
    fmt, counts, examples = chat_format(tokenizer), SkipCounts(path=str(path)), []
    pending: List[Tuple[int, List[Dict[str, str]], Dict[str, List[Dict[str, str]]]]] = []
    header_len = len(fmt.generation_prompt([]).tokens) - 1  # the open assistant header after begin_of_text

    def flush():
        dialogs = [prompt + responses[key] for _, prompt, responses in pending for key in responses]
        firsts = [len(prompt) for _, prompt, responses in pending for _ in responses]
        encoded = iter(fmt.encode_dialogs(dialogs, firsts))
        for line, prompt, responses in pending:
            row_dialogs = {key: next(encoded) for key in responses}
            chosen = row_dialogs["chosen"]
            # The prompt ends where the first response message's header ends.
            prompt_len = chosen.message.index(len(prompt)) + header_len
            fitted = _fit_preference(prompt_len, row_dialogs, max_len, on_too_long, counts, line)
            if fitted:
                examples.append(PreferenceExample(chosen.tokens[:prompt_len], fitted["chosen"], fitted["rejected"],
                                                  fitted.get("edited"), line))
        pending.clear()

    for line, (prompt, responses) in rows_of(path, on_bad_data, counts,
                                           lambda line, row: _preference_parts(path, line, row)):
        if _usable_responses(responses, counts, line):
            pending.append((line, prompt, responses))
        if len(pending) >= _BATCH_ROWS:
            flush()
    if pending:
        flush()
    return examples, counts
