"""Keeping credentials out of everything herd writes (shared/TESTING.md R17).

herd configs hold no secrets (no schema field does; tokens reach a job through environment variables), but a job
runs with tokens in its environment (HF_TOKEN, WANDB_API_KEY, AWS_SECRET_ACCESS_KEY, ...), and a config dump, a
console line, a checkpoint manifest or an error message must not carry them into files that get shared. Two
rules, applied where herd writes text:

1. By name. A name (environment variable or config key) is secret-looking when, in upper case, it contains one of
   MARKERS after the HARMLESS_WORDS (TOKENIZER, TOKENS, ...) are taken out of it, and it is not one of
   HARMLESS_NAMES (SSH_AUTH_SOCK, ...). A config value with a secret-looking key anywhere on its path is written
   as "***".
2. By value. The value of every secret-looking environment variable of at least MIN_VALUE_LEN characters is
   replaced by "***" wherever it occurs in text herd writes (a URL with a token inside an error message, a path).
   Shorter values are left alone: replacing "1" or "true" everywhere would garble the logs and protect nothing.

Over-matching costs little (a harmless value shown as ***), under-matching leaks, so the markers are substrings,
not words: MY_APIKEY and PGPASSWORD match.
"""

import os
import re
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

REDACTED = "***"
MIN_VALUE_LEN = 8
MARKERS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "AUTH")
# words that contain a marker but name no secret (the tokenizer config, token counts in metrics, git's author)
HARMLESS_WORDS = ("TOKENIZERS", "TOKENIZER", "TOKENS", "AUTHOR", "KEYBOARD", "MONKEY")
# whole names that match a marker but hold a socket or file path, never the secret itself
HARMLESS_NAMES = frozenset({"SSH_AUTH_SOCK", "XAUTHORITY"})
_HARMLESS = re.compile("|".join(HARMLESS_WORDS))


def is_secret_name(name: str) -> bool:
    """True for HF_TOKEN, wandb_api_key, AWS_SECRET_ACCESS_KEY, db.password; False for data.tokenizer.path,
    tokens_per_s, TOKENIZERS_PARALLELISM, SSH_AUTH_SOCK."""
    upper = str(name).upper()
    if upper in HARMLESS_NAMES:
        return False
    stripped = _HARMLESS.sub("_", upper)
    return any(marker in stripped for marker in MARKERS)


def secret_values(environ: Optional[Mapping[str, str]] = None) -> List[str]:
    """The values to scrub from text: those of secret-looking variables, at least MIN_VALUE_LEN characters long,
    longest first (so a secret that contains another is replaced whole). Read from the environment at each call:
    cheap (a pass over a few hundred names), and never stale."""
    env = os.environ if environ is None else environ
    values = {value.strip() for name, value in env.items() if is_secret_name(name)}
    return sorted((v for v in values if len(v) >= MIN_VALUE_LEN), key=len, reverse=True)


def scrub(text: str, values: Optional[Iterable[str]] = None) -> str:
    """`text` with every known secret value replaced by ***."""
    for value in secret_values() if values is None else values:
        if value in text:
            text = text.replace(value, REDACTED)
    return text


def scrub_tree(obj: Any, values: Optional[List[str]] = None) -> Any:
    """A copy of a JSON-like tree (dicts, lists, scalars) with known secret values scrubbed from every string.
    Keys are kept: this is for metadata that herd itself reads back (a checkpoint manifest's `meta`), where a
    redacted field would break the resume; values only ever hold secrets by accident (a path)."""
    values = secret_values() if values is None else values
    if isinstance(obj, str):
        return scrub(obj, values)
    if isinstance(obj, Mapping):
        return {key: scrub_tree(value, values) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub_tree(value, values) for value in obj]
    return obj


def redact_tree(obj: Any, marked: Callable[[Tuple[str, ...]], bool] = lambda path: False,
                values: Optional[List[str]] = None, path: Tuple[str, ...] = (), secret: bool = False) -> Any:
    """A copy of a config tree in which every value under a secret-looking key (or a key `marked` says is secret,
    given its path of keys without list indices) is ***, and known secret values are scrubbed from other
    strings. Empty values stay empty (a *** would suggest something was set)."""
    values = secret_values() if values is None else values
    if isinstance(obj, Mapping):
        return {key: redact_tree(value, marked, values, path + (str(key),),
                                 secret or is_secret_name(str(key)) or marked(path + (str(key),)))
                for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_tree(value, marked, values, path, secret) for value in obj]
    if secret and obj not in (None, ""):
        return REDACTED
    return scrub(obj, values) if isinstance(obj, str) else obj


def redact_env(environ: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """The environment as it may be shown (a hang report, a rendered job script): secret-looking variables' values
    are ***, and secret values are scrubbed from the others (a URL holding a token)."""
    env = dict(os.environ if environ is None else environ)
    values = secret_values(env)
    return {name: REDACTED if is_secret_name(name) and value else scrub(value, values) for name, value in env.items()}
