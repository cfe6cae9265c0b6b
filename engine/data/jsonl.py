"""One JSONL line to one JSON object, with the reason a line is unusable: the one line parser behind the corpus
reader of `herd prepare-data` (engine/data/prepare.py) and the post-training row reader (align/formats.py), so a
bad line reads and counts alike in both (docs/data.md, docs/alignment.md list the reasons)."""

import json
from typing import Any, Dict, Optional

from engine.data.indexed import json_type


class BadLine(ValueError):
    """A line that holds no usable JSON object: `reason` is the skip reason it counts under (bad_utf8, bad_json,
    not_an_object), the message says what is wrong without the file and line, which the caller adds."""

    def __init__(self, reason: str, what: str):
        super().__init__(what)
        self.reason = reason


class _Refused(ValueError):
    """What strict JSON (RFC 8259) does not have, which Python's parser accepts: said as such."""


def _unique_keys(pairs):
    """A key given twice was read as its last value (a row's `content` silently became the second one)."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _Refused(f"the key {json.dumps(key)[:60]} appears twice in one object")
        seen[key] = value
    return seen


def _no_constant(name: str):
    """NaN and Infinity are not JSON: read, they were copied into herd's own output, which strict readers refuse."""
    raise _Refused(f"{name} is not a JSON value")


def json_object(raw: bytes, expected: str = "a JSON object", strict: bool = False) -> Optional[Dict[str, Any]]:
    """The object on a line of raw bytes, None for a blank line (only whitespace, Unicode's included); BadLine when
    it is not UTF-8, not JSON (or beyond the parser's limits: nesting, integer digits) or not an object
    (`expected` names what the caller wants). `strict` (alignment rows, which herd copies into rows of its own):
    also a key repeated in one object and NaN/Infinity; a corpus's documents keep Python's leniency (their other
    fields, a quality score of NaN say, are never read)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadLine("bad_utf8", f"invalid UTF-8 at byte {e.start}") from None
    if not text.strip():
        return None
    try:
        hooks = {"object_pairs_hook": _unique_keys, "parse_constant": _no_constant} if strict else {}
        value = json.loads(text.removeprefix("\ufeff"), **hooks)  # a byte-order mark some editors write first
    except _Refused as e:
        raise BadLine("bad_json", f"invalid JSON: {e}") from None
    except json.JSONDecodeError as e:
        raise BadLine("bad_json", f"invalid JSON: {e.msg} at column {e.colno}") from None
    except RecursionError:
        raise BadLine("bad_json", "invalid JSON: nested too deeply") from None
    except ValueError as e:  # the parser's own limits: an integer of more than 4300 digits (Python's int limit)
        digits = "integer string conversion" in str(e)
        what = "an integer of more than 4300 digits" if digits else str(e).splitlines()[0]
        raise BadLine("bad_json", f"invalid JSON: {what}") from None
    if not isinstance(value, dict):
        raise BadLine("not_an_object", f"expected {expected}, got {json_type(value)}")
    return value
