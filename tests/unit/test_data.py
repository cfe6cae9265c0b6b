"""prepare-data round trip, packing, blending, the sampler's exact resume and bad data."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.config import DataConfig, DatasetConfig
from engine.data.dataset import BlendedDataset, PackedDataset
from engine.data.indexed import IndexedDataset, IndexedWriter
from engine.data.loader import StepLoader, build_blend, collate
from engine.data.prepare import prepare_data
from engine.data.tokenizer import Llama3Tokenizer, train_bpe
from engine.errors import DataError

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. " * 20,
    "import os\nprint(os.getcwd())\n",
    "Ünïcödé text — with dashes and émojis 🎉 survives the round trip.\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n" * 5,
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_bpe(CORPUS * 4, vocab_size=400, out_path=str(tmp_path_factory.mktemp("tok") / "tok.json"))


def write_corpus(root: Path, texts=CORPUS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        (root / f"doc{i}.txt").write_text(text, encoding="utf-8")
    return root


def test_prepare_round_trip_keeps_documents(tmp_path, tokenizer):
    src = write_corpus(tmp_path / "src")
    (src / "empty.txt").write_text("")
    report = prepare_data([str(src)], str(tmp_path / "out"), tokenizer)
    ds = IndexedDataset(str(tmp_path / "out"))
    assert len(ds) == len(CORPUS) and report.skipped["empty"] == 1
    assert ds.dtype == np.uint16  # vocab 400 fits
    for i, text in enumerate(CORPUS):  # files are read in sorted order: doc0..doc4
        doc = ds[i]
        assert doc[-1] == tokenizer.eod_id and tokenizer.eod_id not in doc[:-1]
        assert tokenizer.decode(doc[:-1].tolist()) == text
    meta = json.loads((tmp_path / "out.json").read_text())
    assert meta["tokens"] == ds.total_tokens and meta["eod_id"] == tokenizer.eod_id


def test_prepare_jsonl_and_valid_split(tmp_path, tokenizer):
    lines = [json.dumps({"text": f"document number {i} " + CORPUS[i % 5]}) for i in range(200)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    report = prepare_data([str(tmp_path / "a.jsonl")], str(tmp_path / "out"), tokenizer, valid_fraction=0.1)
    train, valid = IndexedDataset(str(tmp_path / "out.train")), IndexedDataset(str(tmp_path / "out.valid"))
    assert len(train) + len(valid) == 200 and 5 <= len(valid) <= 40
    assert report.documents == {"train": len(train), "valid": len(valid)}
    assert json.loads((tmp_path / "out.valid.json").read_text())["documents"] == len(valid)


def test_llama3_tokenizer_uses_int32_and_round_trips(tmp_path):
    tok = Llama3Tokenizer()
    assert tok.vocab_size == 128256 and tok.eod_id == 128001 and tok.token_id("<|eot_id|>") == 128009
    src = write_corpus(tmp_path / "src")
    prepare_data([str(src)], str(tmp_path / "out"), tok)
    ds = IndexedDataset(str(tmp_path / "out"))
    assert ds.dtype == np.int32
    assert tok.decode(ds[3][:-1].tolist()) == CORPUS[3]


@pytest.mark.parametrize("content,expected", [
    (b"good line\n\xff\xfe bad bytes\n", r"bad\.txt:2: invalid UTF-8"),
])
def test_bad_utf8_names_file_and_line(tmp_path, tokenizer, content, expected):
    (tmp_path / "bad.txt").write_bytes(content)
    with pytest.raises(DataError, match=expected):
        prepare_data([str(tmp_path / "bad.txt")], str(tmp_path / "out"), tokenizer)


def test_bad_jsonl_error_and_skip_policy(tmp_path, tokenizer):
    rows = [json.dumps({"text": "fine"}), "{not json", json.dumps({"txt": "wrong key"}), json.dumps({"text": "ok"}),
            '{"text": "caf\xe9"}']
    (tmp_path / "d.jsonl").write_bytes(("\n".join(rows[:4]) + "\n").encode() + b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: invalid JSON"):
        prepare_data([str(tmp_path / "d.jsonl")], str(tmp_path / "out"), tokenizer)
    report = prepare_data([str(tmp_path / "d.jsonl")], str(tmp_path / "out"), tokenizer, on_bad_data="skip")
    assert report.skipped == {"bad_json": 1, "missing_field": 1, "bad_utf8": 1}
    assert len(IndexedDataset(str(tmp_path / "out"))) == 2
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match=r"e\.jsonl: empty JSONL file"):
        prepare_data([str(tmp_path / "e.jsonl")], str(tmp_path / "out2"), tokenizer)


def make_indexed(prefix: Path, docs, dtype=np.uint16) -> IndexedDataset:
    writer = IndexedWriter(str(prefix), dtype)
    for doc in docs:
        writer.add_document(np.asarray(doc))
    writer.finalize()
    return IndexedDataset(str(prefix))


def test_truncated_and_empty_files_are_named(tmp_path):
    make_indexed(tmp_path / "d", [[1, 2, 3, 0], [4, 5, 0]])
    data = (tmp_path / "d.bin").read_bytes()
    (tmp_path / "d.bin").write_bytes(data[:-2])
    with pytest.raises(DataError, match=r"d\.bin: .*truncated"):
        IndexedDataset(str(tmp_path / "d"))
    (tmp_path / "d.bin").write_bytes(data)
    (tmp_path / "d.idx").write_bytes((tmp_path / "d.idx").read_bytes()[:-8])
    with pytest.raises(DataError, match=r"d\.idx: truncated"):
        IndexedDataset(str(tmp_path / "d"))
    IndexedWriter(str(tmp_path / "empty"), np.uint16).finalize()
    with pytest.raises(DataError, match=r"empty\.idx: the dataset holds no tokens"):
        IndexedDataset(str(tmp_path / "empty"))
    with pytest.raises(DataError, match=r"missing\.idx: file not found"):
        IndexedDataset(str(tmp_path / "missing"))


def test_token_ids_beyond_vocab_error_or_skip(tmp_path):
    make_indexed(tmp_path / "d", [[1, 2, 0], [3, 999, 0], [5, 6, 7, 0]] * 4)
    data = DataConfig(train=[DatasetConfig(path=str(tmp_path / "d"))], seq_len=4)
    with pytest.raises(DataError, match=r"d\.bin: document 1 holds token id 999, outside the model's vocab"):
        build_blend(data.train, data, vocab_size=100)
    data.on_bad_data = "skip"
    blend = build_blend(data.train, data, vocab_size=100)
    seen = np.concatenate([blend[i] for i in range(50)])
    assert seen.max() < 100


def test_packing_covers_every_token_once_per_epoch(tmp_path):
    docs = [np.arange(1, n + 1) * 10 + d for d, n in enumerate([5, 17, 3, 40, 9, 11])]
    docs = [np.append(doc, 0) for doc in docs]
    ds = PackedDataset(make_indexed(tmp_path / "d", docs), seq_len=8, seed=3)
    samples = [ds[i] for i in range(ds.samples_per_epoch)]
    assert all(len(s) == 9 for s in samples)
    # samples overlap by one token; the first seq_len tokens of all samples are distinct stream positions
    firsts = np.concatenate([s[:-1] for s in samples])
    assert len(firsts) == ds.samples_per_epoch * 8 <= ds.tokens_per_epoch
    non_eod = firsts[firsts != 0]
    assert len(np.unique(non_eod)) == len(non_eod)  # no token position served twice within the epoch
    assert not np.array_equal(ds[0], ds[ds.samples_per_epoch])  # the next epoch is shuffled anew


def test_collate_positions_and_documents():
    samples = np.array([[7, 8, 0, 5, 6, 9, 0, 4, 3]])
    b = collate(samples, [0], eod_id=0, document_mask=True, eod_mask_loss=True)
    assert b.inputs.tolist() == [[7, 8, 0, 5, 6, 9, 0, 4]]
    assert b.targets.tolist() == [[8, 0, 5, 6, 9, 0, 4, 3]]
    assert b.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]
    assert b.doc_ids.tolist() == [[0, 0, 0, 1, 1, 1, 1, 2]]
    assert b.loss_mask.tolist() == [[True, True, False, True, True, True, False, True]]


def test_blend_proportions_are_exact_to_a_block(tmp_path):
    sets = [PackedDataset(make_indexed(tmp_path / f"d{i}", [np.full(50, i + 1)] * 20), 8, seed=i)
            for i in range(3)]
    weights = [0.5, 0.3, 0.2]
    blend = BlendedDataset(sets, weights, block=100)
    n = 5000
    owners = np.array([blend.locate(i)[0] for i in range(n)])
    share = np.bincount(owners, minlength=3) / n
    print("blend shares", share.round(4), "for weights", weights)
    assert np.allclose(share, weights, atol=1 / 100)
    for window in range(0, n, 10):  # evenly spread: every 10 consecutive samples hold all three sources
        assert len(set(owners[window:window + 10])) == 3
    locals_of_0 = [blend.locate(i)[1] for i in range(n) if owners[i] == 0]
    assert locals_of_0 == list(range(len(locals_of_0)))  # each source is read in order, no gaps, no repeats


def loader_for(tmp_path, dp_rank=0, dp_size=1, micro=2, global_batch=8):
    docs = [np.append(np.arange(1, 30 + 3 * d) % 97 + 1, 0) for d in range(40)]
    make_indexed(tmp_path / "d", docs)
    data = DataConfig(train=[DatasetConfig(path=str(tmp_path / "d"))], seq_len=16, micro_batch_size=micro,
                      global_batch_size=global_batch)
    return StepLoader(build_blend(data.train, data, vocab_size=128), data, eod_id=0, dp_rank=dp_rank,
                      dp_size=dp_size)


def test_sampler_resume_is_exact_and_layout_independent(tmp_path):
    straight = loader_for(tmp_path)
    steps = [straight.next_step() for _ in range(6)]
    resumed = loader_for(tmp_path)
    for _ in range(3):
        resumed.next_step()
    state = resumed.state_dict()
    fresh = loader_for(tmp_path)
    fresh.load_state_dict(state)
    for expected in steps[3:]:
        got = fresh.next_step()
        assert all(torch.equal(a.inputs, b.inputs) and torch.equal(a.sample_ids, b.sample_ids)
                   for a, b in zip(expected, got))
    # the same step split over 4 data-parallel ranks: the union of their samples is the single-rank step
    ranks = [loader_for(tmp_path, dp_rank=r, dp_size=4) for r in range(4)]
    for r in ranks:
        r.load_state_dict(state)
    union = sorted(int(i) for r in ranks for mb in r.next_step() for i in mb.sample_ids)
    assert union == sorted(int(i) for mb in steps[3] for i in mb.sample_ids)
    assert len(set(union)) == 8


def test_an_empty_split_writes_nothing(tmp_path, tokenizer):
    src = write_corpus(tmp_path / "src", CORPUS[:1])
    with pytest.raises(DataError, match="the split left '.*' empty"):
        prepare_data([str(src)], str(tmp_path / "out"), tokenizer, valid_fraction=0.5)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("out")]


def test_hf_tokenizer_never_turns_text_into_control_ids(tmp_path):
    from engine.data.tokenizer import SPECIAL_TOKENS, train_bpe
    tok = train_bpe(["def f(x):\n    return x + 1\n"] * 20, 300, str(tmp_path / "t.json"))
    controls = {tok.token_id(t) for t in SPECIAL_TOKENS}
    ids = tok.encode_batch(["hi <|eot_id|> there <|begin_of_text|>"])[0]
    assert not controls & set(ids)
    assert tok.decode(ids) == "hi <|eot_id|> there <|begin_of_text|>"
