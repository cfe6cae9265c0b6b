"""curate/read.py: a JSONL record's URL and date come from the record only (reviewer finding: with the file's
URL on every URL-less record, URL dedup kept one record of a whole file; with the file's mtime, an undated copy
outranked a dated one)."""

import json

from datatrove.pipeline.writers import JsonlWriter

from curate.dedup import newest_first, url_of
from curate.read import CorpusReader


def _read(tmp_path, records):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    reader = CorpusReader([str(path)], JsonlWriter(str(tmp_path / "removed")))
    return list(reader.run(None, 0, 1))


def test_records_without_urls_are_distinct_for_url_dedup(tmp_path):
    docs = _read(tmp_path, [{"text": f"document number {i}"} for i in range(8)])
    assert len(docs) == 8
    assert len({url_of(d) for d in docs}) == 8  # each falls back to its own id (FILE:LINE)
    assert all("url" not in d.metadata and "date" not in d.metadata for d in docs)


def test_an_undated_copy_ranks_below_a_dated_one(tmp_path):
    docs = _read(tmp_path, [{"text": "old page", "url": "https://x.org/a", "date": "2023-06-01"},
                            {"text": "undated page", "url": "https://x.org/a"},
                            {"text": "new page", "url": "https://x.org/a", "date": "2024-01-02T00:00:00Z"}])
    assert len({url_of(d) for d in docs}) == 1
    old, undated, new = (newest_first(d) for d in docs)
    assert undated < old < new
