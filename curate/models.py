"""Model-based stages (Llama 3 section 3.1.2): a fastText quality classifier herd trains from the user's positive
and negative examples, fastText language id with a model the user supplies, and domain labels (code / math /
general, plus multilingual from language id) that route documents to per-domain outputs.

Domain labels come from a fastText classifier trained by `herd curate train-classifier --class code=... --class
math=... --class general=...` when `models.domain_model` is set. Without one, a documented heuristic labels them:
code when at least 30% of the non-blank lines look like code (end in ; { } or ), or start with a keyword such as
def, class, import, #include, return, function, var, const), else math when at least 3% of the word tokens are
math markers (LaTeX commands, spaced digits joined by operators, Greek letters, math symbols), else general.
"""

import random
import re
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters import FastTextClassifierFilter
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers.disk_base import DiskWriter

from engine.errors import HerdError

DOMAINS = ("general", "math", "code", "multilingual")
CODE_LINE_SHARE = 0.30
MATH_TOKEN_SHARE = 0.03
_CODE_LINE = re.compile(r"(?:[;{}]\s*$|\)\s*$|^\s*(?:def|class|import|from \S+ import|#include|return|function|var|"
                        r"const|let|public|private|static|if\s*\(|for\s*\(|while\s*\()\b)")
# operators only between spaced digits: "2 + 2", not the version numbers of changelogs ("1.2-3+deb11u1")
_MATH_TOKEN = re.compile(r"\\(?:frac|sum|int|sqrt|alpha|beta|theta|lambda|pi|cdot|leq|geq|mathbb)\b|\d\s+[+\-*/^=]\s+\d"
                         r"|[∑∫√≤≥≈≠∞∂∇αβγδθλμπσΩ]|\$[^$\n]+\$")


FASTTEXT_MAGIC = (793712314).to_bytes(4, "little")  # the first 4 bytes of every fastText .bin / .ftz (fasttext.cc)


def is_fasttext_model(path: str) -> bool:
    """Whether the file starts as fastText's saved models do (a cheap check before any stage runs)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == FASTTEXT_MAGIC
    except OSError:
        return False


def load_fasttext(path: str):
    """A fastText model from a local file, loaded directly (datatrove copies models into a cache keyed by path,
    which would keep serving an old model after the user retrains to the same file)."""
    import fasttext
    try:
        return fasttext.load_model(path)
    except ValueError as e:
        raise HerdError(f"{path}: not a fastText model ({e})") from None


def model_labels(path: str) -> List[str]:
    """The labels of a fastText model, sorted, without the __label__ prefix."""
    return sorted(label.replace("__label__", "", 1) for label in load_fasttext(path).labels)


def heuristic_domain(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and sum(1 for line in lines if _CODE_LINE.search(line)) / len(lines) >= CODE_LINE_SHARE:
        return "code"
    words = max(1, len(text.split()))
    return "math" if len(_MATH_TOKEN.findall(text)) / words >= MATH_TOKEN_SHARE else "general"


class LocalFastTextFilter(FastTextClassifierFilter):
    """datatrove's fastText filter reading the model straight from the user's file (see load_fasttext). A removed
    document keeps its text (datatrove's filter() leaves only the kept spans, none, so the removal record and the
    report would show an empty document of 0 bytes) and is removed as `low_quality`."""

    @property
    def model(self):
        if self._model is None:
            self._model = load_fasttext(self.model_url)
        return self._model

    def filter(self, doc: Document):
        text = doc.text
        if super().filter(doc):
            return True
        doc.text = text
        return False, "low_quality"


class LanguageLabel(BaseFilter):
    """fastText language id: documents below `threshold` are removed; documents in `languages` keep their
    domain, the others are labeled multilingual."""

    name = "🌍 language id"

    def __init__(self, model_path: str, languages: List[str], threshold: float, exclusion_writer: DiskWriter = None):
        super().__init__(exclusion_writer)
        self.model_path, self.languages, self.threshold = model_path, languages, threshold
        self._model = None

    def filter(self, doc: Document):
        if self._model is None:
            self._model = load_fasttext(self.model_path)
        labels, scores = self._model.predict(" ".join(doc.text.split()), k=1)
        language, score = labels[0].removeprefix("__label__"), float(scores[0])
        doc.metadata.update(language=language, language_score=round(score, 4))
        if score < self.threshold:
            return False, "language_unknown"
        if language not in self.languages:
            doc.metadata["domain"] = "multilingual"
        return True


class DomainLabel(PipelineStep):
    """Sets metadata["domain"] (unless language id already said multilingual): the domain model's top label, or
    the heuristic of the module docstring."""

    name = "🏷 domain"

    def __init__(self, model_path: str = ""):
        super().__init__()
        self.model_path = model_path
        self._model = None

    def label(self, text: str) -> str:
        if not self.model_path:
            return heuristic_domain(text)
        if self._model is None:
            self._model = load_fasttext(self.model_path)
        labels, _ = self._model.predict(" ".join(text.split()), k=1)
        return labels[0].removeprefix("__label__")

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            if doc.metadata.get("domain") != "multilingual":
                doc.metadata["domain"] = self.label(doc.text)
            self.stat_update(f"domain_{doc.metadata['domain']}")
            yield doc


# ---------------------------------------------------------------------------------------------- training

def _examples(paths: List[str], text_key: str = "text") -> List[str]:
    """Texts of the example files: a .jsonl gives one per line (its `text`), any other file is one text. What is
    not an example is left out, as the curation reader counts it: anything but a regular file (a FIFO would block),
    a binary file, a JSONL line that is not a JSON object with a text, and text that is not UTF-8 (a JSON \\ud800
    escape included)."""
    import json
    import os
    import stat
    from curate.read import BINARY_PROBE, list_corpus, printable
    texts = []
    for file in list_corpus(paths, ["*"]):
        try:
            if printable(file) != file or not stat.S_ISREG(os.stat(file).st_mode):
                continue
            data = Path(file).read_bytes()
        except OSError:  # unreadable, or gone since it was listed
            continue
        if b"\0" in data[:BINARY_PROBE]:
            continue
        raw = data.decode("utf-8", errors="replace")
        if file.endswith(".jsonl"):
            for line in raw.splitlines():
                try:
                    record = json.loads(line)
                except (ValueError, RecursionError):
                    continue
                if isinstance(record, dict) and isinstance(record.get(text_key), str):
                    texts.append(record[text_key])
        else:
            texts.append(raw)
    return [" ".join(t.split()) for t in texts if t.strip() and printable(t) == t]


def example_flag(label: str) -> str:
    """The option of `herd curate train-classifier` that gave a label's examples (its errors name it)."""
    return {"hq": "--positive", "lq": "--negative"}.get(label, f"--class {label}")


def train_classifier(classes: Dict[str, List[str]], out: str, epochs: int = 25, seed: int = 0,
                     held_out: float = 0.1) -> Tuple[int, float]:
    """Trains a fastText classifier (labels __label__<class>) on the example files of each class, holding out
    `held_out` of them to measure accuracy; saves it to `out`. Returns (training examples, held-out accuracy)."""
    import fasttext
    rows = []
    for label, paths in classes.items():
        texts = _examples(paths)
        if not texts:
            raise HerdError(f"{example_flag(label)}: no example text in {', '.join(paths)}")
        rows += [(label, text) for text in texts]
    random.Random(seed).shuffle(rows)
    split = int(len(rows) * held_out) if len(rows) >= 20 else 0
    test, train = rows[:split], rows[split:]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8") as f:
        f.writelines(f"__label__{label} {text}\n" for label, text in train)
        f.flush()
        model = fasttext.train_supervised(input=f.name, epoch=epochs, lr=0.5, wordNgrams=2, minCount=1, seed=seed,
                                          thread=1, verbose=0)
    correct = sum(model.predict(text)[0][0] == f"__label__{label}" for label, text in test)
    model.save_model(out)
    return len(train), (correct / len(test)) if test else float("nan")
