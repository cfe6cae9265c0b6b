"""The typed configuration of a curation pipeline (`herd curate PIPELINE.yaml`, docs/data_curation.md).

Plain dataclasses (no omegaconf here): curate/config.py loads them through engine/config.py's load_structured
(engine/ imports nothing above it) and checks their values with the key named."""

from dataclasses import dataclass, field
from typing import List


@dataclass
class CurateInputConfig:
    """Where the raw corpus is and how its records are read."""

    paths: List[str] = field(default_factory=list)  # files or directories (searched recursively for `include`)
    include: List[str] = field(default_factory=lambda: ["*.txt", "*.md", "*.jsonl", "*.html", "*.htm"])
    #  a pattern without '/' matches a file's name; one with '/' its path relative to the input directory
    text_key: str = "text"  # JSONL field holding the text
    id_key: str = "id"  # JSONL field holding the document id (default: FILE:LINE)
    url_key: str = "url"  # JSONL field holding the source URL (default: file:// of the file)
    date_key: str = "date"  # JSONL field holding the crawl date (ISO 8601); a file's mtime otherwise
    html_timeout_s: float = 5.0  # seconds one HTML page's main-content extraction may take (datatrove's sandbox);
    #                              a page past it is removed as html_timeout. It bounds a page trafilatura hangs
    #                              on; on a loaded machine a large page may exceed a small limit, so the counts
    #                              then depend on load (docs/data_curation.md)


@dataclass
class CurateExecutorConfig:
    """Which datatrove executor runs the stages."""

    kind: str = "local"  # local (multi-process on this machine) | slurm (one job array per stage)
    tasks: int = 4  # shards of the corpus; every stage keeps the same number (dedup filters re-read by index)
    workers: int = 2  # local: tasks run at once; slurm: array tasks at once (-1: no limit)
    partition: str = ""  # slurm: partition
    time: str = "01:00:00"  # slurm: time limit per array task, [D-]HH:MM:SS
    cpus_per_task: int = 1  # slurm
    mem_per_cpu_gb: int = 2  # slurm
    venv_path: str = ""  # slurm: activate script sourced by each job (default: this Python's venv)


@dataclass
class MinhashStageConfig:
    """Global MinHash near-duplicate removal (datatrove MinhashDedup*)."""

    enabled: bool = True
    n_grams: int = 5  # word n-gram shingles
    buckets: int = 14  # LSH bands: a pair is a candidate when all hashes of one band agree
    hashes_per_bucket: int = 8  # rows per band; 14 x 8 finds pairs of Jaccard 0.8 with probability 0.92, 0.75 with 0.77


@dataclass
class LineDedupStageConfig:
    """Llama 3's line-level dedup (ccNet): a line seen more than `max_repeats` times in a bucket is removed."""

    enabled: bool = True
    max_repeats: int = 6  # the paper: more than 6 times in a bucket of 30M documents
    buckets: int = 1  # documents go to a bucket by a hash of their id; each bucket counts its lines alone


@dataclass
class HeuristicStageConfig:
    """Heuristic filters: duplicated n-grams, dirty words, KL token-distribution outliers, Gopher/C4 rules."""

    enabled: bool = True
    gopher_repetition: bool = True  # datatrove GopherRepetitionFilter: duplicated line/paragraph/n-gram coverage
    gopher_quality: bool = False  # datatrove GopherQualityFilter (word counts, symbol ratios, stop words)
    c4: bool = False  # datatrove C4QualityFilter (line punctuation, "lorem ipsum", curly braces, ...)
    dirty_words_file: str = ""  # one word or phrase per line; empty: no dirty-word filter
    max_dirty_words: int = 3  # remove a document holding more than this many occurrences
    kl: bool = True  # token-distribution KL-divergence outlier filter against the corpus
    max_kl: float = 5.0  # nats: KL(document unigram || corpus unigram) above this removes the document (it grows
    #                      with the corpus: set it from the corpus's KL quantiles, docs/data_curation.md)
    kl_min_words: int = 50  # shorter documents are not scored (too few tokens for a distribution)


@dataclass
class ModelStageConfig:
    """fastText models: quality classifier, language id, domain classifier."""

    quality_model: str = ""  # `herd curate train-classifier --positive --negative` output; empty: stage off
    quality_threshold: float = 0.5  # keep documents whose P(hq) is at least this
    language_model: str = ""  # a fastText language-id model the user supplies (lid.176.bin); used (and required)
    #                           only with language=true, refused without it
    languages: List[str] = field(default_factory=lambda: ["en"])  # kept as general; others go to multilingual
    language: bool = False  # run language id (needs language_model)
    language_threshold: float = 0.65  # below: the document is removed as unknown language
    domain_model: str = ""  # `herd curate train-classifier --class code=... --class math=...`; empty: heuristic


@dataclass
class MixConfig:
    """Target share of each domain in the blend (Llama 3 section 3.1.2: about 50% general knowledge, 25% math and
    reasoning, 17% code, 8% multilingual); 0 leaves a domain out. Normalized over the domains that kept data."""

    general: float = 0.50
    math: float = 0.25
    code: float = 0.17
    multilingual: float = 0.08


@dataclass
class CurateTokenizeConfig:
    """herd's own tokenization of each domain's output, and the blend of the target mix."""

    enabled: bool = True
    tokenizer: str = "hf"  # hf | llama3 (as herd prepare-data)
    tokenizer_path: str = ""  # tokenizer.json (hf only; refused with llama3); empty with hf: a byte-level BPE
    #                           is trained on the curated text
    vocab_size: int = 4096  # of the trained BPE
    mix: MixConfig = field(default_factory=MixConfig)


@dataclass
class CurateConfig:
    """A curation pipeline: read -> URL dedup -> exact dedup -> MinHash -> line dedup -> heuristics -> models
    -> per-domain outputs -> tokens and blend. Every stage's output lies under output_dir/<stage>."""

    name: str = "curate"
    output_dir: str = "runs/curate"
    input: CurateInputConfig = field(default_factory=CurateInputConfig)
    executor: CurateExecutorConfig = field(default_factory=CurateExecutorConfig)
    url_dedup: bool = True  # keep the newest document of each URL
    exact_dedup: bool = True  # keep one document of each exact text
    minhash: MinhashStageConfig = field(default_factory=MinhashStageConfig)
    line_dedup: LineDedupStageConfig = field(default_factory=LineDedupStageConfig)
    heuristics: HeuristicStageConfig = field(default_factory=HeuristicStageConfig)
    models: ModelStageConfig = field(default_factory=ModelStageConfig)
    tokenize: CurateTokenizeConfig = field(default_factory=CurateTokenizeConfig)
    examples: int = 3  # removed documents shown per stage and reason in the report
