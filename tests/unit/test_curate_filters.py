"""herd curate's filters, reader and model stages on hand-built documents with known answers."""

import gzip
import json
import multiprocessing
import random
import threading

import pytest
from datatrove.data import Document
from datatrove.pipeline.filters import GopherRepetitionFilter
from datatrove.pipeline.writers import JsonlWriter

from curate.config import validate
from curate.filters import DirtyWordsFilter, KLDivergenceFilter, TokenCountMerge, TokenCountSignature
from curate.models import DomainLabel, heuristic_domain, load_fasttext, train_classifier
from curate.pipeline import build_stages
from curate.read import CorpusReader, HtmlMainContent
from curate.schema import CurateConfig, CurateInputConfig
from engine.errors import ConfigError

PROSE = ("The committee met on Tuesday to discuss the budget for the coming year. Members agreed that the library "
         "needs new shelves, and that the park should be cleaned before the summer festival begins. ")


def run(step, docs, rank=0, world_size=1):
    out = step.run(iter(docs) if docs is not None else None, rank, world_size)
    return list(out) if out is not None else []


def removed_records(folder):
    return [json.loads(line) for path in sorted(folder.rglob("*.jsonl.gz")) for line in gzip.open(path, "rt")]


def test_dirty_words_counts_whole_words_and_phrases_case_insensitively():
    flt = DirtyWordsFilter(["spam", "buy now"], max_count=2)
    assert flt.count("SPAM spam, Buy  now? buy now! spammer antispam") == 3  # "Buy  now" has two spaces: no
    docs = [Document("spam and spam", "two"), Document("spam spam spam", "three"), Document("spamming", "none")]
    assert [d.id for d in run(flt, docs)] == ["two", "none"]


def test_kl_filter_removes_a_document_of_outlier_tokens_and_keeps_the_corpus(tmp_path):
    rng = random.Random(0)
    corpus = [Document(PROSE * 3, f"prose-{i}") for i in range(200)]
    hexdump = Document(" ".join(f"{rng.getrandbits(32):08x}" for _ in range(120)), "hexdump")
    docs = corpus + [hexdump]
    run(TokenCountSignature(str(tmp_path)), docs)
    run(TokenCountMerge(str(tmp_path)), None)
    flt = KLDivergenceFilter(str(tmp_path), max_kl=3.0, min_words=50)
    kept = run(flt, docs)
    assert [d.id for d in kept] == [d.id for d in corpus]
    assert hexdump.metadata["kl"] > 3.0 > corpus[0].metadata["kl"]
    short = Document(" ".join(f"{rng.getrandbits(32):08x}" for _ in range(10)), "short")
    assert run(flt, [short]) == [short]  # under min_words: not scored


def test_gopher_repetition_removes_duplicated_ngram_coverage():
    flt = GopherRepetitionFilter()
    logs = Document("\n".join(["ERROR connection refused at worker pool"] * 40), "log")
    prose = Document(" ".join(PROSE.split()[i % 30] + f" x{i}" for i in range(200)), "prose")
    kept = run(flt, [logs, Document(PROSE, "p")])
    assert [d.id for d in kept] == ["p"] and prose


def write(path, data: bytes):
    path.write_bytes(data)
    return str(path)


def test_reader_counts_malformed_inputs_and_never_crashes(tmp_path):
    good = [{"text": "first", "url": "http://a/1", "date": "2020-01-01"}, {"text": "second", "id": "custom"}]
    lines = [json.dumps(good[0]).encode(), b'{"text": "unterminated', b"\xff\xfe not utf8", b"[1, 2]",
             b'{"no_text": 1}', json.dumps(good[1]).encode(), b""]
    files = [write(tmp_path / "a.jsonl", b"\n".join(lines)), write(tmp_path / "bad.txt", b"ok\n\xc3\x28 broken\n"),
             write(tmp_path / "empty.txt", b""), write(tmp_path / "blank.txt", b"  \n\n"),
             write(tmp_path / "binary.txt", b"\x7fELF\x00\x01\x02" * 10), write(tmp_path / "fine.txt", b"plain text"),
             write(tmp_path / "broken.txt.gz", b"\x1f\x8b not gzip")]
    reader = CorpusReader(sorted(files), JsonlWriter(str(tmp_path / "removed")))
    docs = run(reader, None)
    assert sorted(d.text for d in docs) == ["first", "plain text", "second"]
    first = next(d for d in docs if d.text == "first")
    assert first.metadata["url"] == "http://a/1" and first.metadata["date"] == "2020-01-01"
    assert first.id.endswith("a.jsonl:1") and next(d for d in docs if d.text == "second").id == "custom"
    reasons = sorted((r["metadata"]["filter_reason"], r["id"].rsplit("/", 1)[-1]) for r in
                     removed_records(tmp_path / "removed"))
    assert reasons == [("bad_gzip", "broken.txt.gz"), ("bad_json", "a.jsonl:2"), ("bad_json", "a.jsonl:4"),
                       ("bad_utf8", "a.jsonl:3"), ("bad_utf8", "bad.txt:2"), ("binary_file", "binary.txt"),
                       ("empty_file", "blank.txt"), ("empty_file", "empty.txt"), ("no_text", "a.jsonl:5")]


def test_reader_shards_files_by_task(tmp_path):
    files = [write(tmp_path / f"{i}.txt", f"doc {i}".encode()) for i in range(5)]
    texts = [sorted(d.text for d in run(CorpusReader(files, JsonlWriter(str(tmp_path / f"r{r}"))), None, r, 2))
             for r in range(2)]
    assert texts == [["doc 0", "doc 2", "doc 4"], ["doc 1", "doc 3"]]


def test_html_main_content_drops_boilerplate_and_passes_text_through(tmp_path):
    article = " ".join([PROSE] * 4)
    html = (f"<html><head><title>t</title></head><body><nav><a href='/'>Home</a> | <a href='/x'>Menu item</a></nav>"
            f"<article><h1>Budget meeting</h1><p>{article}</p></article><footer>Copyright footer text</footer>"
            f"</body></html>")
    docs = [Document(html, "page", metadata={"format": "html"}), Document("plain <b>kept</b>", "t",
                                                                         metadata={"format": "text"}),
            Document("<html><body><script>var x = 1;</script></body></html>", "empty", metadata={"format": "html"})]
    kept = run(HtmlMainContent(JsonlWriter(str(tmp_path / "removed"))), docs)
    assert [d.id for d in kept] == ["page", "t"]
    assert "library needs new shelves" in kept[0].text and "Menu item" not in kept[0].text
    assert kept[1].text == "plain <b>kept</b>"
    assert [r["metadata"]["filter_reason"] for r in removed_records(tmp_path / "removed")] == ["html_no_main_content"]


class SandboxClock:
    """Stands in for the `time` module of datatrove's extractor sandbox: every reading advances TICK seconds, so
    the sandbox's deadline passes after a known number of its own readings, whatever the machine's load."""

    TICK = 10.0

    def __init__(self):
        self.now = 0.0
        self.read = threading.Condition()

    def monotonic(self) -> float:
        with self.read:
            self.now += self.TICK
            self.read.notify_all()
            return self.now

    def wait_past(self, when: float) -> None:
        with self.read:
            assert self.read.wait_for(lambda: self.now > when, timeout=HANG_GUARD_S), f"clock still {self.now}"


HANG_GUARD_S = 600  # turns a hang into a failure; every wait here is for a state


class BlockingExtractor(HtmlMainContent):
    """An extraction that says it started and returns only once released; the events are shared with the
    sandbox's worker process (forked)."""

    def __init__(self, removed_writer, timeout):
        super().__init__(removed_writer, timeout)
        self.started, self.release = multiprocessing.Event(), multiprocessing.Event()

    def extract(self, text):
        if not text:
            return ""  # the sandbox's warm-up call
        self.started.set()
        self.release.wait()
        return "main content"


def test_html_page_past_the_timeout_is_counted_and_within_it_extracted(tmp_path, monkeypatch):
    """input.html_timeout_s is the sandbox's deadline per page, read on the sandbox's own clock: a page whose
    extraction has not returned when the clock passes it is removed as html_timeout, while with a larger limit the
    same extraction, released only after that point, is kept."""
    from datatrove.pipeline.extractors import base

    def page():
        return Document("<html><body><p>page</p></body></html>", "page", metadata={"format": "html"})

    clock = SandboxClock()
    monkeypatch.setattr(base, "time", clock)
    small = BlockingExtractor(JsonlWriter(str(tmp_path / "small")), timeout=5.0)  # never released
    assert run(small, [page(), Document("text", "t", metadata={"format": "text"})])[0].id == "t"
    assert [r["metadata"]["filter_reason"] for r in removed_records(tmp_path / "small")] == ["html_timeout"]
    assert small.stats.stats["html_timeout"].total == 1

    start = clock.now
    large = BlockingExtractor(JsonlWriter(str(tmp_path / "large")), timeout=1e5)

    def release_past_the_small_limit():
        assert large.started.wait(HANG_GUARD_S)
        clock.wait_past(start + clock.TICK + 5.0)  # its first reading set the deadline; 5 s have passed since
        large.release.set()

    releaser = threading.Thread(target=release_past_the_small_limit)
    releaser.start()
    kept = run(large, [page()])
    large.started.set()  # frees the releaser if the page ended without its extraction starting (a timeout)
    releaser.join()
    assert [d.text for d in kept] == ["main content"] and removed_records(tmp_path / "large") == []
    assert "html_timeout" not in large.stats.stats and large.stats.stats["html_pages"].total == 1


@pytest.mark.parametrize("seconds", [0.0, -1.0, float("nan"), float("inf")])
def test_html_timeout_must_be_a_positive_number_of_seconds(tmp_path, seconds):
    cfg = CurateConfig(input=CurateInputConfig(paths=[str(tmp_path)], html_timeout_s=seconds))
    with pytest.raises(ConfigError, match=r"^input\.html_timeout_s: must be a positive number of seconds, got"):
        validate(cfg)


def test_html_timeout_reaches_the_read_pass(tmp_path):
    (tmp_path / "raw").mkdir()
    cfg = CurateConfig(output_dir=str(tmp_path / "out"),
                       input=CurateInputConfig(paths=[str(tmp_path / "raw")], html_timeout_s=42.5))
    validate(cfg)
    read = build_stages(cfg, [])[0]
    assert read.name == "read"
    assert [step.timeout for step in read.passes[0].steps() if isinstance(step, HtmlMainContent)] == [42.5]


CODE = "def add(a, b):\n    return a + b\n\nclass Point:\n    x = 1;\n    y = 2;\n"
MATH = "Let x = 3 and 2 + 2 = 4. Then \\frac{a}{b} and \\sqrt{2} with 5 * 6 = 30 give the sum ∑ of α and β."


def test_domain_heuristic():
    assert heuristic_domain(CODE) == "code"
    assert heuristic_domain(MATH) == "math"
    assert heuristic_domain(PROSE) == "general"


def test_train_classifier_and_route_by_domain_model(tmp_path):
    """A fastText domain classifier trained by herd from labeled example files routes held-out documents."""
    rng = random.Random(1)
    for label, words in (("code", "def return import class self lambda yield async await print".split()),
                         ("general", "the committee park library summer festival budget members city".split())):
        folder = tmp_path / label
        folder.mkdir()
        for i in range(30):
            (folder / f"{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(40)))
    out = tmp_path / "domain.bin"
    examples, accuracy = train_classifier({"code": [str(tmp_path / "code")], "general": [str(tmp_path / "general")]},
                                          str(out), epochs=10)
    assert examples == 54 and accuracy == 1.0
    labeled = run(DomainLabel(str(out)), [Document("async def f(self): return await g", "c"),
                                          Document("the city budget for the summer festival", "g")])
    assert [d.metadata["domain"] for d in labeled] == ["code", "general"]
    with pytest.raises(Exception, match="not a fastText model"):
        load_fasttext(str(tmp_path / "code" / "0.txt"))


def labeled_folders(tmp_path, classes, count=30, length=40, seed=2):
    """Example files per class, each of random words of that class's vocabulary."""
    rng = random.Random(seed)
    for label, words in classes.items():
        (tmp_path / label).mkdir()
        for i in range(count):
            (tmp_path / label / f"{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(length)))
    return {label: [str(tmp_path / label)] for label in classes}


def test_quality_classifier_trained_by_herd_filters_documents(tmp_path):
    """`train-classifier --positive/--negative` labels hq/lq; datatrove's fastText filter (reading the model file
    directly) keeps documents whose P(hq) >= threshold and records the removal."""
    from curate.models import LocalFastTextFilter
    good = "theorem proof analysis evidence study results method history science research".split()
    bad = "click free winner prize cheap deal offer subscribe now bonus".split()
    classes = labeled_folders(tmp_path, {"hq": good, "lq": bad})
    train_classifier(classes, str(tmp_path / "quality.bin"), epochs=10)
    flt = LocalFastTextFilter(str(tmp_path / "quality.bin"), keep_labels=("hq", 0.5), newline_replacement=" ",
                              filter_mode="DOCUMENT", exclusion_writer=JsonlWriter(str(tmp_path / "removed")))
    docs = [Document("the study results and evidence of the research method", "good"),
            Document("click now for a free prize and a cheap bonus offer", "spam")]
    assert [d.id for d in run(flt, docs)] == ["good"]
    assert [r["id"] for r in removed_records(tmp_path / "removed")] == ["spam"]


def test_language_id_routes_other_languages_to_multilingual(tmp_path):
    """A fastText language-id model (here one herd trains on two toy languages, standing in for lid.176.bin):
    documents in `languages` keep their domain, others are labeled multilingual, unsure ones are removed."""
    from curate.models import LanguageLabel
    classes = labeled_folders(tmp_path, {"en": "the and of to in is that for it with".split(),
                                         "fr": "le la et les des est que pour dans une".split()})
    train_classifier(classes, str(tmp_path / "lid.bin"), epochs=10)
    step = LanguageLabel(str(tmp_path / "lid.bin"), ["en"], threshold=0.65)
    docs = [Document("the cat is in the house with it", "en"), Document("le chat est dans la maison", "fr")]
    kept = run(step, docs)
    assert [d.metadata.get("domain") for d in kept] == [None, "multilingual"]
    assert [d.metadata["language"] for d in kept] == ["en", "fr"]
    unsure = LanguageLabel(str(tmp_path / "lid.bin"), ["en"], threshold=1.01)  # no score reaches it
    assert run(unsure, [Document("the cat", "x")]) == []
