"""The Llama 3 chat format, with per-token loss and formatting masks.

A dialog is `<|begin_of_text|>` followed, for every message, by
`<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>` (the Llama 3 / 3.1 prompt format). The pieces are
encoded the way the reference formatter encodes them: the role and the `\\n\\n` as their own texts, the content
(stripped of surrounding whitespace, as the original Llama 3 formatter does) as another, so no BPE merge ever crosses
a header boundary.

Loss masks follow the Llama 3 paper, section 4.1.3 (SFT: loss on the assistant's tokens only, the prompt masked)
and 4.1.4 (DPO: "we mask out special formatting tokens including header and termination tokens"). `learn` marks
what the model must produce: assistant content and the `<|eot_id|>` closing it, so it learns when to stop.
`special` marks the control tokens (begin_of_text, the header ids, eot), which DPO leaves out of its log-ratios.

User text never becomes a control token: the literal string "<|eot_id|>" in a message is encoded as plain text
(section 4.1: the special tokens delimit turns; a user must not be able to forge one).
"""

import re
import weakref
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from engine.data.tokenizer import SPECIAL_TOKENS

ROLES = ("system", "user", "assistant")
Message = Mapping[str, str]


class ChatFormatError(ValueError):
    """A dialog that the Llama 3 chat format cannot encode (unknown role, content that is not text)."""


@dataclass
class ChatTokens:
    """One encoded dialog: the token ids plus, per token, whether it is learned, whether it is a control token and
    which message it belongs to (-1 for begin_of_text; len(messages) for a trailing generation header)."""

    tokens: List[int]
    learn: List[bool]
    special: List[bool] = field(default_factory=list)
    message: List[int] = field(default_factory=list)

    def __post_init__(self):
        if not self.special:
            self.special = [False] * len(self.tokens)
        if not self.message:
            self.message = [0] * len(self.tokens)
        lengths = {len(self.tokens), len(self.learn), len(self.special), len(self.message)}
        if len(lengths) != 1:
            raise ChatFormatError(f"ChatTokens: tokens, learn, special and message differ in length "
                                  f"({len(self.tokens)}, {len(self.learn)}, {len(self.special)}, {len(self.message)})")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_learned(self) -> int:
        return sum(self.learn)

    def truncated(self, max_len: int) -> "ChatTokens":
        """The first max_len tokens (the dialog's tail, usually the end of the last answer, is what is lost)."""
        return ChatTokens(self.tokens[:max_len], self.learn[:max_len], self.special[:max_len],
                          self.message[:max_len])


def kind_of(value) -> str:
    """A value's type as a message names it: JSON's null for None, else the Python type (str, int, list, dict)."""
    return "null" if value is None else type(value).__name__


def check_messages(messages, where: str = "messages") -> None:
    """Raise ChatFormatError naming `where[i].key` for the first message that is not {role, content} text."""
    if not isinstance(messages, (list, tuple)):
        raise ChatFormatError(f"{where}: expected a list of messages, got {kind_of(messages)}")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatFormatError(f"{where}[{index}]: expected an object with 'role' and 'content', "
                                  f"got {kind_of(message)}")
        for key in ("role", "content"):
            if key not in message:
                raise ChatFormatError(f"{where}[{index}]: missing '{key}'")
            if not isinstance(message[key], str):
                raise ChatFormatError(f"{where}[{index}].{key}: expected a string, got {kind_of(message[key])}")
        if message["role"] not in ROLES:
            raise ChatFormatError(f"{where}[{index}].role: unknown role '{message['role']}' "
                                  f"(expected one of {', '.join(ROLES)})")


def alternation_problem(messages: Sequence[Message]) -> Optional[Tuple[int, str]]:
    """(index, what) of the first message that breaks the turn order an SFT dialog must have, or None: an optional
    leading system message, then user and assistant turns alternating, starting with the user (two answers in a
    row, or a system message mid-dialog, is not a conversation the chat format can teach)."""
    expected = "user"
    for index, message in enumerate(messages):
        role = message["role"]
        if index == 0 and role == "system":
            continue
        if role != expected:
            previous = messages[index - 1]["role"] if index else ""
            after = f"after {'an' if previous == 'assistant' else 'a'} {previous} turn" if index else "first"
            return index, (f"expected {'an' if expected == 'assistant' else 'a'} '{expected}' turn {after}, got "
                           f"'{role}' (turns must alternate user/assistant after an optional leading system message)")
        expected = "assistant" if role == "user" else "user"
    return None


class ChatFormat:
    """Encodes dialogs for one tokenizer. Header pieces are encoded once; contents go through one encode_batch call
    per batch of dialogs (tokenizers parallelize a batch; a call per message would be many times slower)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.bos_id = tokenizer.token_id("<|begin_of_text|>")
        self.start_header_id = tokenizer.token_id("<|start_header_id|>")
        self.end_header_id = tokenizer.token_id("<|end_header_id|>")
        self.eot_id = tokenizer.token_id("<|eot_id|>")
        self._control_ids = self._control_token_ids(tokenizer)
        names = sorted(self._control_ids, key=len, reverse=True)
        self._control_pattern = re.compile("|".join(re.escape(name) for name in names))
        *role_ids, newlines = self.encode_texts([*ROLES, "\n\n"])
        # (token, is_special) pairs: the header ids are control tokens, the role name and "\n\n" plain text.
        self._headers = {role: [(self.start_header_id, True), *((t, False) for t in ids),
                                (self.end_header_id, True), *((t, False) for t in newlines)]
                         for role, ids in zip(ROLES, role_ids)}

    @staticmethod
    def _control_token_ids(tokenizer) -> Dict[str, int]:
        names = getattr(tokenizer, "specials", None) or SPECIAL_TOKENS
        ids = {}
        for name in names:
            try:
                ids[name] = tokenizer.token_id(name)
            except Exception:  # each tokenizer signals a missing token its own way; one it lacks it cannot emit
                continue
        return ids

    def encode_texts(self, texts: Sequence[str]) -> List[List[int]]:
        """Encode plain text, guaranteeing that no control id comes out of it whatever the text holds."""
        encoded = self.tokenizer.encode_batch(list(texts))
        forbidden = set(self._control_ids.values())
        for index, ids in enumerate(encoded):
            if not forbidden.isdisjoint(ids):
                encoded[index] = self._encode_defused(texts[index], forbidden)
        return encoded

    def _encode_defused(self, text: str, forbidden: set) -> List[int]:
        """Re-encode text whose special-token strings the tokenizer matched as control tokens: each such string is
        split after its '<', and no piece then holds a whole special token, so each piece encodes as text."""
        pieces, start = [], 0
        for match in self._control_pattern.finditer(text):
            pieces += [text[start:match.start()], match.group()[:1], match.group()[1:]]
            start = match.end()
        pieces.append(text[start:])
        ids = [t for piece_ids in self.tokenizer.encode_batch([p for p in pieces if p]) for t in piece_ids]
        if not forbidden.isdisjoint(ids):
            raise ChatFormatError(f"tokenizer {getattr(self.tokenizer, 'name', '?')} encodes plain text "
                                  f"{text[:40]!r}... as a control token even when split; it cannot be used for chat")
        return ids

    def encode_dialogs(self, dialogs: Sequence[Sequence[Message]],
                       learn_from: Optional[Sequence[int]] = None) -> List[ChatTokens]:
        """Encode many dialogs with one tokenizer call. Dialog d learns its assistant messages whose index is at
        least learn_from[d] (0: every assistant turn; the prompt's length: only the completion)."""
        learn_from = [0] * len(dialogs) if learn_from is None else list(learn_from)
        if len(learn_from) != len(dialogs):
            raise ChatFormatError(f"learn_from has {len(learn_from)} entries for {len(dialogs)} dialogs")
        for index, messages in enumerate(dialogs):
            check_messages(messages, f"dialogs[{index}]" if len(dialogs) > 1 else "messages")
        contents = self.encode_texts([m["content"].strip() for messages in dialogs for m in messages])
        encoded, offset = [], 0
        for messages, first_learned in zip(dialogs, learn_from):
            encoded.append(self._assemble(messages, contents[offset:offset + len(messages)], first_learned))
            offset += len(messages)
        return encoded

    def _assemble(self, messages: Sequence[Message], contents: List[List[int]], first_learned: int) -> ChatTokens:
        out = ChatTokens([self.bos_id], [False], [True], [-1])
        for index, (message, content_ids) in enumerate(zip(messages, contents)):
            learned = message["role"] == "assistant" and index >= first_learned
            self._append_header(out, message["role"], index)
            out.tokens += content_ids
            out.learn += [learned] * len(content_ids)
            out.special += [False] * len(content_ids)
            out.message += [index] * len(content_ids)
            # The eot closing an assistant turn is learned: producing it is how the model stops (section 4.1.3).
            out.tokens.append(self.eot_id)
            out.learn.append(learned)
            out.special.append(True)
            out.message.append(index)
        return out

    def _append_header(self, out: ChatTokens, role: str, index: int) -> None:
        header = self._headers[role]
        out.tokens += [token for token, _ in header]
        out.learn += [False] * len(header)
        out.special += [special for _, special in header]
        out.message += [index] * len(header)

    def generation_prompt(self, messages: Sequence[Message]) -> ChatTokens:
        """The dialog followed by an open assistant header: what generation continues from (stop at eot)."""
        out = self.encode_dialogs([messages], [len(messages)])[0]
        self._append_header(out, "assistant", len(messages))
        return out


_FORMATS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def chat_format(tokenizer) -> ChatFormat:
    """The ChatFormat of a tokenizer, built once per tokenizer object."""
    try:
        cached = _FORMATS.get(tokenizer)
    except TypeError:  # not weak-referenceable: build a fresh one every time
        return ChatFormat(tokenizer)
    if cached is None:
        cached = _FORMATS[tokenizer] = ChatFormat(tokenizer)
    return cached


def first_learned_message(messages: Sequence[Message], train_on: str) -> int:
    """Index of the first message whose assistant turns are learned: 'assistant' learns every assistant turn,
    'last' only the last one (prompt/completion rows, where earlier turns are context)."""
    if train_on == "assistant":
        return 0
    if train_on == "last":
        assistant = [i for i, m in enumerate(messages) if isinstance(m, Mapping) and m.get("role") == "assistant"]
        return assistant[-1] if assistant else len(messages)
    raise ChatFormatError(f"train_on: expected 'assistant' or 'last', got {train_on!r}")


def encode_dialog(tokenizer, messages: Sequence[Message], train_on: str = "assistant") -> ChatTokens:
    """Encode one dialog in the Llama 3 chat format with its loss and formatting masks."""
    first = first_learned_message(messages, train_on)
    return chat_format(tokenizer).encode_dialogs([messages], [first])[0]


def encode_generation_prompt(tokenizer, messages: Sequence[Message]) -> List[int]:
    """Token ids of the dialog plus `<|start_header_id|>assistant<|end_header_id|>\\n\\n`; generation stops at
    `<|eot_id|>`."""
    return chat_format(tokenizer).generation_prompt(messages).tokens
