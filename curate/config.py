"""Loading and checking a curation pipeline YAML: every mistake is one ConfigError naming the key."""

import math
import re
from pathlib import Path
from typing import List, Optional

from curate.schema import CurateConfig
from engine.errors import ConfigError, HerdError

EXECUTORS = ("local", "slurm")
TOKENIZERS = ("hf", "llama3")
MAX_HTML_TIMEOUT_S = 2147483  # the extractor sandbox waits in milliseconds on a signed 32-bit int: 2^31 ms
_SLURM_TIME = re.compile(r"(?:\d+-)?\d+:\d{2}:\d{2}")  # [D-]HH:MM:SS, as herd's slurm.time


def load(path: str, overrides: Optional[List[str]] = None) -> CurateConfig:
    from engine.config import load_structured  # the only YAML loader (omegaconf lives there)
    from engine.config_checks import check_directory
    cfg = load_structured(CurateConfig, path, overrides)
    check_directory(cfg.output_dir, "output_dir")
    validate(cfg)
    return cfg


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def _file(value: str, key: str, what: str) -> None:
    _require(Path(value).is_file(), key, f"'{value}' is not a file ({what})")


def validate(cfg: CurateConfig) -> None:
    _require(bool(cfg.input.paths), "input.paths", "name the files or directories of the raw corpus")
    for i, path in enumerate(cfg.input.paths):
        _require(Path(path).exists(), f"input.paths[{i}]", f"'{path}' does not exist")
    _require(bool(cfg.input.include), "input.include", "give at least one file name pattern, e.g. '*.jsonl'")
    timeout = cfg.input.html_timeout_s
    _require(math.isfinite(timeout) and timeout > 0, "input.html_timeout_s",
             f"must be a positive number of seconds, got {timeout}")
    _require(timeout <= MAX_HTML_TIMEOUT_S, "input.html_timeout_s",
             f"at most {MAX_HTML_TIMEOUT_S} (the extractor sandbox's longest wait), got {timeout:g}")
    for i, pattern in enumerate(cfg.input.include):
        _require(bool(pattern) and not pattern.startswith("/"), f"input.include[{i}]",
                 f"'{pattern}' must be a file name pattern or a path pattern relative to an input directory")
    _require(bool(cfg.output_dir), "output_dir", "name the directory the stages write to")
    _check_output_apart(cfg)
    ex = cfg.executor
    _require(ex.kind in EXECUTORS, "executor.kind", f"'{ex.kind}' is not one of {', '.join(EXECUTORS)}")
    _require(ex.tasks >= 1, "executor.tasks", f"must be at least 1, got {ex.tasks}")
    _require(ex.workers >= 1 or ex.workers == -1, "executor.workers", f"must be at least 1 (or -1), got {ex.workers}")
    if ex.kind == "slurm":
        _require(bool(ex.partition), "executor.partition", "the slurm executor needs a partition")
        _require(ex.cpus_per_task >= 1, "executor.cpus_per_task", f"must be at least 1, got {ex.cpus_per_task}")
        _require(bool(_SLURM_TIME.fullmatch(ex.time)), "executor.time",
                 f"'{ex.time}' is not a SLURM time limit: write [D-]HH:MM:SS, e.g. 01:00:00 or 2-00:00:00")
        _require(ex.mem_per_cpu_gb >= 0, "executor.mem_per_cpu_gb", "must be >= 0 (0: do not ask for memory)")
        if ex.venv_path:
            _file(ex.venv_path, "executor.venv_path", "a venv's bin/activate")
    m = cfg.minhash
    for key in ("n_grams", "buckets", "hashes_per_bucket"):
        _require(getattr(m, key) >= 1, f"minhash.{key}", f"must be at least 1, got {getattr(m, key)}")
    _require(cfg.line_dedup.max_repeats >= 1, "line_dedup.max_repeats", "must be at least 1")
    _require(cfg.line_dedup.buckets >= 1, "line_dedup.buckets", "must be at least 1")
    h = cfg.heuristics
    if h.dirty_words_file:
        _file(h.dirty_words_file, "heuristics.dirty_words_file", "one word or phrase per line")
        _check_word_list(h.dirty_words_file)
    _require(h.max_dirty_words >= 0, "heuristics.max_dirty_words", "must be >= 0")
    _require(h.max_kl > 0, "heuristics.max_kl", f"must be positive (nats), got {h.max_kl}")
    _require(h.kl_min_words >= 1, "heuristics.kl_min_words", "must be at least 1")
    _validate_models(cfg)
    _validate_tokenize(cfg)
    _require(cfg.examples >= 0, "examples", "must be >= 0")


def _validate_models(cfg: CurateConfig) -> None:
    md = cfg.models
    if md.language:
        _require(bool(md.language_model), "models.language_model",
                 "language identification needs a fastText language-id model you supply: set "
                 "models.language_model=PATH (e.g. lid.176.bin from fasttext.cc), or models.language=false")
    _require(md.language or not md.language_model, "models.language",
             "models.language_model is set but language identification is off: set models.language=true to run "
             "it, or leave models.language_model empty")
    from curate.models import is_fasttext_model
    for key in ("quality_model", "language_model", "domain_model"):
        if getattr(md, key):
            _file(getattr(md, key), f"models.{key}", "a fastText .bin model")
            _require(is_fasttext_model(getattr(md, key)), f"models.{key}", f"'{getattr(md, key)}' is not a fastText "
                     f"model (herd curate train-classifier writes one)")
    for key in ("quality_threshold", "language_threshold"):
        _require(0 <= getattr(md, key) <= 1, f"models.{key}", f"must be in [0, 1], got {getattr(md, key)}")
    _require(bool(md.languages), "models.languages", "list the languages kept as general, e.g. [en]")
    _check_model_labels(cfg)


def _labels(path: str, key: str) -> List[str]:
    from curate.models import model_labels
    try:
        return model_labels(path)
    except HerdError as e:
        raise ConfigError(key, str(e)) from None


def _shown(labels: List[str]) -> str:
    return ", ".join(labels[:8]) + (f" and {len(labels) - 8} more" if len(labels) > 8 else "")


def _check_model_labels(cfg: CurateConfig) -> None:
    """Each model's labels fit its role (a model of other labels would empty or misroute the corpus silently)."""
    from curate.models import DOMAINS
    md = cfg.models
    if md.quality_model:
        labels = _labels(md.quality_model, "models.quality_model")
        _require("hq" in labels, "models.quality_model", f"'{md.quality_model}' has no label hq (its labels: "
                 f"{_shown(labels)}); train it with herd curate train-classifier --positive --negative")
    if md.language:
        labels = _labels(md.language_model, "models.language_model")
        missing = [lang for lang in md.languages if lang not in labels]
        _require(not missing, "models.languages", f"{', '.join(missing)} not among the labels of "
                 f"models.language_model '{md.language_model}' ({_shown(labels)})")
    if md.domain_model:
        labels = _labels(md.domain_model, "models.domain_model")
        wanted = [d for d in DOMAINS if not cfg.tokenize.enabled or getattr(cfg.tokenize.mix, d) > 0]
        _require(any(label in wanted for label in labels), "models.domain_model",
                 f"'{md.domain_model}' has none of the domains {', '.join(wanted)} (those tokenize.mix blends) "
                 f"among its labels ({_shown(labels)}); train it with herd curate train-classifier --class code=... "
                 f"--class math=...")


def _check_word_list(path: str) -> None:
    """The dirty-word list is read here, not first inside a pass after the earlier stages ran."""
    from curate.filters import read_word_list
    try:
        read_word_list(path)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("heuristics.dirty_words_file", f"'{path}' is not a UTF-8 word list ({e})") from None


def _check_tokenizer_file(path: str) -> None:
    """An hf tokenizer.json is loaded here (a moment), not first in the tokenize pass at the end of the run."""
    from engine.config import TokenizerConfig
    from engine.data.tokenizer import load_tokenizer
    try:
        load_tokenizer(TokenizerConfig(kind="hf", path=path))
    except ConfigError as e:  # keyed data.tokenizer.path by the loader; here the key is ours
        raise ConfigError("tokenize.tokenizer_path", str(e).removeprefix(f"{e.key}: ")) from None


def _validate_tokenize(cfg: CurateConfig) -> None:
    from curate.models import DOMAINS
    t = cfg.tokenize
    _require(t.tokenizer in TOKENIZERS, "tokenize.tokenizer", f"'{t.tokenizer}' is not one of {', '.join(TOKENIZERS)}")
    _require(not (t.tokenizer == "llama3" and t.tokenizer_path), "tokenize.tokenizer_path",
             "tokenize.tokenizer=llama3 uses herd's built-in Llama 3 tokenizer; leave tokenizer_path empty (or use "
             "tokenize.tokenizer=hf for a tokenizer.json)")
    if t.tokenizer_path:
        _file(t.tokenizer_path, "tokenize.tokenizer_path", "a tokenizer.json")
        if t.enabled and t.tokenizer == "hf":
            _check_tokenizer_file(t.tokenizer_path)
    _require(t.vocab_size >= 512, "tokenize.vocab_size", f"must be at least 512, got {t.vocab_size}")
    shares = {domain: getattr(t.mix, domain) for domain in DOMAINS}
    for domain, share in shares.items():
        _require(share >= 0, f"tokenize.mix.{domain}", f"must be >= 0, got {share}")
    _require(sum(shares.values()) > 0, "tokenize.mix", "give at least one domain a positive share")


def _check_output_apart(cfg: CurateConfig) -> None:
    """The output directory neither inside an input directory (a later run would read its outputs, the report
    included, as corpus, and exact dedup would keep those copies over the originals) nor holding an input."""
    out = Path(cfg.output_dir).resolve()
    for i, path in enumerate(cfg.input.paths):
        source = Path(path).resolve()
        _require(not (source.is_dir() and (out == source or source in out.parents)), "output_dir",
                 f"'{cfg.output_dir}' lies inside input.paths[{i}] '{path}': later runs would read it as corpus; "
                 f"choose a directory outside the inputs")
        _require(out not in source.parents, f"input.paths[{i}]",
                 f"'{path}' lies inside output_dir '{cfg.output_dir}'; keep the raw corpus outside the outputs")
