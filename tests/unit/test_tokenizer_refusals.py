"""Tokenizers and data stages a bad-input hunt (helper H41) found taken silently: a tokenizer whose ids are not
contiguous (500 tokens, one of id 65,541) wrote 16-bit token files in which that id wrapped to 5; two tokens of one
id made the vocabulary fingerprint differ between processes; a tokenizer with no tokens for the text wrote
documents of nothing; a hand-written staged config starting past sample 0 without a checkpoint trained stage 0's
data at stage 0's length."""

import io
import json

import numpy as np
import pytest

from engine.data.indexed import IndexedDataset
from engine.data.prepare import prepare_data
from engine.data.tokenizer import HFTokenizer, train_bpe
from engine.errors import ConfigError, DataError
from engine.run import build_trainer
from tests.helpers import make_corpus, tiny_config

TEXT = "the quick brown fox jumps over the lazy dog eee\n" * 20


@pytest.fixture
def bpe(tmp_path):
    train_bpe([TEXT], 300, str(tmp_path / "tok.json"))
    return json.loads((tmp_path / "tok.json").read_text())


def write(tmp_path, spec, name="edited.json"):
    (tmp_path / name).write_text(json.dumps(spec))
    return str(tmp_path / name)


def test_sparse_ids_size_the_vocabulary_and_the_token_files(tmp_path, bpe):
    first = HFTokenizer(str(tmp_path / "tok.json")).encode_batch([TEXT])[0][0]
    token = next(t for t, i in bpe["model"]["vocab"].items() if i == first)
    bpe["model"]["vocab"][token] = 65541  # a hole below it: 300 tokens, ids up to 65,541
    tok = HFTokenizer(write(tmp_path, bpe))
    assert tok.vocab_size == 65542
    (tmp_path / "in.txt").write_text(TEXT)
    prepare_data([str(tmp_path / "in.txt")], str(tmp_path / "p"), tok)
    data = IndexedDataset(str(tmp_path / "p"))
    ids = np.concatenate([data[i] for i in range(len(data))])
    assert ids.dtype == np.int32 and 65541 in ids and first not in ids  # a uint16 file held it as 65541 - 65536


def test_two_tokens_of_one_id_are_refused(tmp_path, bpe):
    bpe["model"]["vocab"]["e"] = bpe["model"]["vocab"]["o"]
    with pytest.raises(ConfigError, match=r"^data\.tokenizer\.path: .*edited\.json: tokens 'e' and 'o' share id "
                                          r"\d+$|^data\.tokenizer\.path: .*edited\.json: tokens 'o' and 'e' share"):
        HFTokenizer(write(tmp_path, bpe))


def test_begin_and_end_of_text_sharing_an_id_are_refused(tmp_path, bpe):
    end = next(t for t in bpe["added_tokens"] if t["content"] == "<|end_of_text|>")
    begin = next(t for t in bpe["added_tokens"] if t["content"] == "<|begin_of_text|>")
    bpe["added_tokens"] = [t for t in bpe["added_tokens"] if t is not end]
    bpe["model"]["vocab"].pop("<|end_of_text|>", None)
    bpe["added_tokens"].append({**begin, "content": "<|end_of_text|>"})
    with pytest.raises(ConfigError, match=r"^data\.tokenizer\.path: .*(share id|<\|begin_of_text\|> and "
                                          r"<\|end_of_text\|> share id)"):
        HFTokenizer(write(tmp_path, bpe))


def test_text_the_tokenizer_has_no_tokens_for_is_refused(tmp_path, bpe):
    bpe["model"]["vocab"] = {t["content"]: t["id"] for t in bpe["added_tokens"]}
    bpe["model"]["merges"] = []
    tok = HFTokenizer(write(tmp_path, bpe))
    (tmp_path / "in.txt").write_text(TEXT)
    with pytest.raises(DataError, match=r"in\.txt: its text encodes to no tokens with hf:"):
        prepare_data([str(tmp_path / "in.txt")], str(tmp_path / "p"), tok)
    assert not list(tmp_path.glob("p.*"))


def test_a_fresh_run_starting_past_sample_zero_is_refused(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    stage = f"[{{start_sample: 0, seq_len: 32, train: [{{path: {corpus}/corpus.train}}]}}]"
    cfg = tiny_config(corpus, tmp_path / "runs", [f"data.stages={stage}", "data.stage_start_sample=1000"])
    with pytest.raises(ConfigError, match=r"^data\.stage_start_sample: 1000: where a resumed recipe stage's data "
                                          r"begins, but this run has no checkpoint to resume"):
        build_trainer(cfg, io.StringIO())
