"""herd curate's dedup stages on hand-built documents with known answers: URL dedup keeps the newest, exact dedup
keeps one copy, Llama 3's line dedup removes a line seen 7 times in a bucket and keeps one seen 6 times, and
MinHash finds planted near-duplicates (stated recall at a stated Jaccard similarity, stated false removals)."""

import random

import pytest

from datatrove.data import Document
from datatrove.pipeline.dedup import (ExactDedupConfig, ExactDedupFilter, ExactDedupSignature, ExactFindDedups,
                                      MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter,
                                      MinhashDedupSignature)
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.hashing import HashConfig

from curate.dedup import (LineCountMerge, LineCountSignature, LineDedupFilter, newest_first, normalize_line,
                          text_of, url_of)


def drain(step, docs=None, rank=0, world_size=1):
    out = step.run(iter(docs) if docs is not None else None, rank, world_size)
    return list(out) if out is not None else []  # datatrove's signature steps return nothing


def doc(text, id_, **meta):
    return Document(text=text, id=id_, metadata=dict(meta))


def exact_dedup(docs, config, tmp_path):
    drain(ExactDedupSignature(str(tmp_path / "sigs"), config), docs)
    drain(ExactFindDedups(str(tmp_path / "sigs"), str(tmp_path / "dups"), config))
    return drain(ExactDedupFilter(str(tmp_path / "dups"), config), docs)


def test_url_dedup_keeps_the_newest_version_of_each_url(tmp_path):
    docs = [doc("v2019", "a", url="http://x/page", date="2019-05-01T00:00:00+00:00"),
            doc("v2023", "b", url="http://x/page", date="2023-02-01"),
            doc("v2021", "c", url="http://x/page", date="2021-07-01T12:00:00Z"),
            doc("other", "d", url="http://x/other", date="2020-01-01"),
            doc("undated", "e", url="http://x/other2")]
    kept = exact_dedup(docs, ExactDedupConfig(content_getter=url_of, document_priority=newest_first), tmp_path)
    assert sorted(d.text for d in kept) == ["other", "undated", "v2023"]
    assert newest_first(docs[4]) == 1 and newest_first(docs[1]) > newest_first(docs[2]) > newest_first(docs[0])


def test_exact_dedup_keeps_one_copy_of_each_text(tmp_path):
    docs = [doc("same text", str(i)) for i in range(4)] + [doc("same text!", "x"), doc("unique", "y")]
    kept = exact_dedup(docs, ExactDedupConfig(content_getter=text_of), tmp_path)
    assert sorted(d.text for d in kept) == ["same text", "same text!", "unique"]


def line_dedup(docs, tmp_path, buckets=1, max_repeats=6):
    removed = tmp_path / "removed"
    drain(LineCountSignature(str(tmp_path / "counts"), buckets), docs)
    for bucket in range(buckets):
        drain(LineCountMerge(str(tmp_path / "counts"), str(tmp_path / "repeated"), max_repeats), rank=bucket,
              world_size=buckets)
    return drain(LineDedupFilter(str(tmp_path / "repeated"), buckets, JsonlWriter(str(removed))), docs)


def test_line_dedup_threshold_is_exactly_six_kept_seven_removed(tmp_path):
    """Llama 3: a line seen more than 6 times in a bucket is removed. 'six' appears in 6 documents (kept), 'seven'
    in 7 (removed from all 7); the normalization (case, digits, punctuation) makes variants count together."""
    docs = []
    for i in range(10):
        lines = [f"unique line number {chr(97 + i)} of document {chr(97 + i)}"]
        if i < 6:
            lines.append("This boilerplate line appears six times.")
        if i < 7:
            variants = ["Cookie banner seen 7 times", "COOKIE BANNER seen 8 times!!", "cookie banner seen 9 times"]
            lines.append(variants[i % 3])
        docs.append(doc("\n".join(lines) + "\n", f"d{i}"))
    kept = {d.id: d.text for d in line_dedup(docs, tmp_path)}
    assert len(kept) == 10
    assert sum("six times" in t for t in kept.values()) == 6
    assert not any("cookie" in t.lower() for t in kept.values())
    assert all(f"document {chr(97 + i)}" in kept[f"d{i}"] for i in range(10))
    assert normalize_line("COOKIE BANNER seen 8 times!!") == normalize_line("cookie banner seen 9 times")


def test_line_dedup_counts_per_bucket_and_drops_emptied_documents(tmp_path):
    """With 7 copies spread over 2 buckets no bucket sees the line more than 6 times; in one bucket, a document
    made only of the repeated line is removed whole."""
    docs = [doc("repeated line\n", f"doc-{i}") for i in range(7)]
    assert len(line_dedup(docs, tmp_path / "one", buckets=1)) == 0
    assert len(line_dedup(docs, tmp_path / "two", buckets=2)) == 7


def shingles(words, n=5):
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def planted_corpus(seed=0, originals=60, length=300, edits=5):
    """`originals` distinct documents of random words, each with a near-duplicate: `edits` words replaced."""
    rng = random.Random(seed)
    # letters only: MinHash's text normalization maps digits alike (w1 and w2 would be one shingle)
    vocabulary = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
                  for _ in range(5000)]
    docs, pairs = [], []
    for i in range(originals):
        words = [rng.choice(vocabulary) for _ in range(length)]
        near = list(words)
        for position in rng.sample(range(length), edits):
            near[position] = rng.choice(vocabulary)
        docs += [doc(" ".join(words), f"orig-{i}"), doc(" ".join(near), f"near-{i}")]
        pairs.append(len(shingles(words) & shingles(near)) / len(shingles(words) | shingles(near)))
    return docs, pairs


def test_minhash_removes_planted_near_duplicates(tmp_path):
    """60 planted pairs at 5-gram Jaccard >= 0.8 (5 of 300 words replaced), datatrove's 14 bands x 8 hashes:
    P(candidate) = 1 - (1 - 0.8^8)^14 = 0.92 at J = 0.8, so recall >= 0.9 is stated; the 60 distinct originals
    (J ~ 0 to each other) must all survive: at most 0 of them wrongly removed (stated bound: 2%)."""
    docs, jaccards = planted_corpus()
    assert min(jaccards) >= 0.8
    config = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8, hash_config=HashConfig(precision=64))
    drain(MinhashDedupSignature(str(tmp_path / "sigs"), config), docs)
    for bucket in range(config.num_buckets):
        drain(MinhashDedupBuckets(str(tmp_path / "sigs"), str(tmp_path / "buckets"), config=config), rank=bucket,
              world_size=config.num_buckets)
    drain(MinhashDedupCluster(str(tmp_path / "buckets"), str(tmp_path / "remove"), config=config))
    kept = {d.id for d in drain(MinhashDedupFilter(str(tmp_path / "remove")), docs)}
    pairs_left = sum(f"orig-{i}" in kept and f"near-{i}" in kept for i in range(60))
    recall = 1 - pairs_left / 60
    originals_lost = sum(f"orig-{i}" not in kept and f"near-{i}" not in kept for i in range(60))
    assert recall >= 0.9, recall
    assert originals_lost / 60 <= 0.02, originals_lost


@pytest.mark.parametrize("date,expected", [("2024-01-02", 19725), ("garbage", 1), ("", 1), ("2300-01-01", 65535)])
def test_url_priority_is_days_since_1970(date, expected):
    assert newest_first(doc("t", "i", date=date)) == expected
