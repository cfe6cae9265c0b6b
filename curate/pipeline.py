"""The curation pipeline as datatrove passes, run by its local or SLURM executor.

Stages (Llama 3 section 3.1), each writing its kept documents to OUT/data/<stage>/ and what it removed, with the
reason, to OUT/removed/<stage>/: read (text, JSONL, HTML main content) -> url_dedup -> exact_dedup -> minhash ->
line_dedup -> heuristics -> models (language, quality, domain; written per domain to OUT/domains/<domain>/) ->
tokenize (herd's .bin/.idx per domain and OUT/blend.yaml) -> report (OUT/report.json, OUT/report.md).

A stage is one or more passes; a pass is one datatrove executor run with its own logging folder
(OUT/logs/<pass>/), whose completions/ files mark finished tasks: a killed run, started again, skips every task
that finished (datatrove's completions mechanism) and redoes only the others, whose outputs it overwrites.
Every pass keeps executor.tasks tasks (or one per bucket for the bucket passes), so that a dedup filter re-reads
its input sharded exactly as its signature pass did (datatrove's dedup filters address documents by position).
"""

import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List

from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup import (ExactDedupConfig, ExactDedupFilter, ExactDedupSignature, ExactFindDedups,
                                      MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter,
                                      MinhashDedupSignature)
from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.hashing import HashConfig

from curate.dedup import LineCountMerge, LineCountSignature, LineDedupFilter, newest_first, text_of, url_of
from curate.filters import (DirtyWordsFilter, KLDivergenceFilter, TokenCountMerge, TokenCountSignature,
                            read_word_list)
from curate.models import DomainLabel, LanguageLabel, LocalFastTextFilter
from curate.read import CorpusReader, HtmlMainContent
from curate.schema import CurateConfig

FAULT_ENV = "HERD_CURATE_FAULT"  # "PASS:RANK": that task kills its run (SIGKILL) once its outputs are written;
#                                   "PASS:RANK:hold": it marks that state and waits to be killed (scancel)
HOLD = "hold"


@dataclass
class Pass:
    name: str  # also its logging folder OUT/logs/<name>
    tasks: int
    steps: Callable[[], List]  # built when the pass runs (a signature pass needs no reader of files yet unwritten)


@dataclass
class Stage:
    name: str
    input: str  # folder of the documents it reads ("" for read)
    output: str  # folder of the documents it keeps
    passes: List[Pass]


def fault_is_hold() -> bool:
    return os.environ.get(FAULT_ENV, "").split(":")[2:] == [HOLD]


class FaultPoint(PipelineStep):
    """Fault injection for the resume tests: when FAULT_ENV names this pass and rank, the task has written its
    outputs but not yet its completion. It then kills its whole process group, as a scheduler or an OOM killer
    would; or, with `:hold` (the SLURM test, which cancels the jobs itself), it creates
    OUT/logs/<pass>/held/<rank> and waits until a signal ends it."""

    name = "💥 fault point"

    def __init__(self, pass_name: str, logging_dir: str = ""):
        super().__init__()
        self.pass_name = pass_name
        self.logging_dir = logging_dir

    def run(self, data, rank: int = 0, world_size: int = 1):
        for doc in data or ():
            yield doc
        if os.environ.get(FAULT_ENV, "").split(":")[:2] != [self.pass_name, str(rank)]:
            return
        if fault_is_hold():
            held = Path(self.logging_dir) / "held" / f"{rank:05d}"
            held.parent.mkdir(parents=True, exist_ok=True)
            held.touch()
            print(f"herd curate: fault injection: pass {self.pass_name}, task {rank} holds", file=sys.stderr,
                  flush=True)
            while True:
                signal.pause()  # SIGTERM (scancel) ends the process: its default action
        print(f"herd curate: fault injection: killing the run in pass {self.pass_name}, task {rank}",
              file=sys.stderr, flush=True)
        os.killpg(os.getpgid(0), signal.SIGKILL)


def _writer(folder: Path, name: str = "${rank}.jsonl.gz") -> JsonlWriter:
    return JsonlWriter(str(folder), output_filename=name)


class StageReader(JsonlReader):
    """datatrove's JSONL reader of the previous stage's output; a stage that kept nothing wrote no file, and its
    successor then reads nothing (datatrove's reader raises on an empty folder)."""

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        try:
            files = self.data_folder.list_files(recursive=True)
        except FileNotFoundError:
            files = []
        if not files:
            return
        yield from super().run(data, rank, world_size)


def _reader(folder: Path) -> JsonlReader:
    return StageReader(str(folder), add_file_path=False)  # every file under it: the stage wrote them


class Layout:
    """The folders of one run under OUT."""

    def __init__(self, out: str):
        self.root = Path(out).resolve()

    def data(self, stage: str) -> Path:
        return self.root / "data" / stage

    def removed(self, stage: str, step: str = "") -> Path:
        return self.root / "removed" / stage / step if step else self.root / "removed" / stage

    def work(self, stage: str) -> Path:
        return self.root / "work" / stage

    def logs(self, pass_name: str) -> Path:
        return self.root / "logs" / pass_name

    @property
    def domains(self) -> Path:
        return self.root / "domains"


def _exact_passes(name: str, config: ExactDedupConfig, src: Path, lay: Layout, tasks: int) -> List[Pass]:
    sigs, dups = lay.work(name) / "sigs", lay.work(name) / "dups"
    return [
        Pass(f"{name}_signature", tasks, lambda: [_reader(src), ExactDedupSignature(str(sigs), config)]),
        Pass(f"{name}_find", 1, lambda: [ExactFindDedups(str(sigs), str(dups), config)]),
        Pass(f"{name}_filter", tasks, lambda: [
            _reader(src), ExactDedupFilter(str(dups), config, exclusion_writer=_writer(lay.removed(name))),
            _writer(lay.data(name))]),
    ]


def _minhash_passes(cfg: CurateConfig, src: Path, lay: Layout, tasks: int) -> List[Pass]:
    m = cfg.minhash
    config = MinhashConfig(n_grams=m.n_grams, num_buckets=m.buckets, hashes_per_bucket=m.hashes_per_bucket,
                           hash_config=HashConfig(precision=64))
    work = lay.work("minhash")
    return [
        Pass("minhash_signature", tasks, lambda: [_reader(src), MinhashDedupSignature(str(work / "sigs"), config)]),
        Pass("minhash_buckets", m.buckets, lambda: [
            MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=config)]),
        Pass("minhash_cluster", 1, lambda: [MinhashDedupCluster(str(work / "buckets"), str(work / "remove"),
                                                                config=config)]),
        Pass("minhash_filter", tasks, lambda: [
            _reader(src), MinhashDedupFilter(str(work / "remove"), exclusion_writer=_writer(lay.removed("minhash"))),
            _writer(lay.data("minhash"))]),
    ]


def _line_passes(cfg: CurateConfig, src: Path, lay: Layout, tasks: int) -> List[Pass]:
    buckets, work = cfg.line_dedup.buckets, lay.work("line_dedup")
    return [
        Pass("line_dedup_count", tasks, lambda: [_reader(src), LineCountSignature(str(work / "counts"), buckets)]),
        Pass("line_dedup_find", buckets, lambda: [
            LineCountMerge(str(work / "counts"), str(work / "repeated"), cfg.line_dedup.max_repeats)]),
        Pass("line_dedup_filter", tasks, lambda: [
            _reader(src), LineDedupFilter(str(work / "repeated"), buckets, _writer(lay.removed("line_dedup"))),
            _writer(lay.data("line_dedup"))]),
    ]


def _heuristic_steps(cfg: CurateConfig, src: Path, lay: Layout) -> List:
    h, removed = cfg.heuristics, (lambda step: _writer(lay.removed("heuristics", step)))
    steps = [_reader(src)]
    if h.gopher_repetition:  # duplicated line, paragraph and n-gram coverage (Gopher, Rae et al. 2021, Table A1)
        steps.append(GopherRepetitionFilter(exclusion_writer=removed("gopher_repetition")))
    if h.gopher_quality:
        steps.append(GopherQualityFilter(exclusion_writer=removed("gopher_quality")))
    if h.c4:
        steps.append(C4QualityFilter(exclusion_writer=removed("c4")))
    if h.dirty_words_file:
        steps.append(DirtyWordsFilter(read_word_list(h.dirty_words_file), h.max_dirty_words,
                                      exclusion_writer=removed("dirty_words")))
    if h.kl:
        steps.append(KLDivergenceFilter(str(lay.work("heuristics")), h.max_kl, h.kl_min_words,
                                        exclusion_writer=removed("kl")))
    return steps + [_writer(lay.data("heuristics"))]


def _heuristic_passes(cfg: CurateConfig, src: Path, lay: Layout, tasks: int) -> List[Pass]:
    passes = []
    if cfg.heuristics.kl:
        work = lay.work("heuristics")
        passes += [Pass("heuristics_token_counts", tasks, lambda: [_reader(src), TokenCountSignature(str(work))]),
                   Pass("heuristics_distribution", 1, lambda: [TokenCountMerge(str(work))])]
    return passes + [Pass("heuristics_filter", tasks, lambda: _heuristic_steps(cfg, src, lay))]


def _model_steps(cfg: CurateConfig, src: Path, lay: Layout) -> List:
    md, steps = cfg.models, [_reader(src)]
    if md.language:
        steps.append(LanguageLabel(md.language_model, list(md.languages), md.language_threshold,
                                   exclusion_writer=_writer(lay.removed("models", "language"))))
    if md.quality_model:
        steps.append(LocalFastTextFilter(md.quality_model, keep_labels=("hq", md.quality_threshold),
                                         newline_replacement=" ", filter_mode="DOCUMENT",
                                         exclusion_writer=_writer(lay.removed("models", "quality"))))
    return steps + [DomainLabel(md.domain_model), _writer(lay.domains, "${domain}/${rank}.jsonl.gz")]


def build_stages(cfg: CurateConfig, files: List[str]) -> List[Stage]:
    """The enabled stages in Llama 3's order; each reads the previous one's output."""
    from curate.report import ReportStep
    from curate.tokenize import TokenizeStep
    lay, tasks = Layout(cfg.output_dir), cfg.executor.tasks
    i = cfg.input
    stages = [Stage("read", "", str(lay.data("read")), [Pass("read", tasks, lambda: [
        CorpusReader(files, _writer(lay.removed("read", "malformed")), i.text_key, i.id_key, i.url_key, i.date_key),
        HtmlMainContent(_writer(lay.removed("read", "html")), i.html_timeout_s), _writer(lay.data("read"))])])]
    wanted = [("url_dedup", cfg.url_dedup), ("exact_dedup", cfg.exact_dedup), ("minhash", cfg.minhash.enabled),
              ("line_dedup", cfg.line_dedup.enabled), ("heuristics", cfg.heuristics.enabled)]
    for name, enabled in wanted:
        if not enabled:
            continue
        src = Path(stages[-1].output)
        if name == "url_dedup":
            passes = _exact_passes(name, ExactDedupConfig(content_getter=url_of, document_priority=newest_first),
                                   src, lay, tasks)
        elif name == "exact_dedup":
            passes = _exact_passes(name, ExactDedupConfig(content_getter=text_of), src, lay, tasks)
        elif name == "minhash":
            passes = _minhash_passes(cfg, src, lay, tasks)
        elif name == "line_dedup":
            passes = _line_passes(cfg, src, lay, tasks)
        else:
            passes = _heuristic_passes(cfg, src, lay, tasks)
        stages.append(Stage(name, str(src), str(lay.data(name)), passes))
    src = Path(stages[-1].output)
    stages.append(Stage("models", str(src), str(lay.domains), [Pass("models", tasks,
                                                                     lambda: _model_steps(cfg, src, lay))]))
    if cfg.tokenize.enabled:
        stages.append(Stage("tokenize", str(lay.domains), str(lay.root / "tokens"),
                            [Pass("tokenize", 1, lambda: [TokenizeStep(cfg)])]))
    stages.append(Stage("report", "", str(lay.root), [Pass("report", 1, lambda: [ReportStep(cfg)])]))
    return stages
