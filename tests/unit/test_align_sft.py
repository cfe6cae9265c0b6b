"""SFT packing: exact loss masks token by token, no leakage between packed samples, layout-independent steps."""

import numpy as np
import pytest
import torch

from align.sft import SFTStepLoader, collate_rows, pack_samples
from engine.config import DataConfig, ModelConfig
from engine.model import build_model
from engine.ops.reference import cross_entropy_sum

PAD = 0


def _samples(rng, count, vocab=60, low=3, high=12):
    out = []
    for _ in range(count):
        n = int(rng.integers(low, high))
        tokens = rng.integers(1, vocab, n).tolist()
        learn = (rng.random(n) < 0.6).tolist()
        learn[0] = False  # a sample never learns its first token (nothing precedes it)
        out.append((tokens, learn))
    return out


def test_every_sample_lands_whole_in_exactly_one_row():
    samples = _samples(np.random.default_rng(0), 40)
    rows = pack_samples(samples, seq_len=23, pad_id=PAD, seed=5)
    assert rows.tokens.shape[1] == 24 and rows.samples == 40
    found = []
    for r in range(len(rows.tokens)):
        for d in np.unique(rows.doc[r]):
            where = np.flatnonzero(rows.doc[r] == d)
            assert (np.diff(where) == 1).all()  # contiguous
            found.append((tuple(rows.tokens[r, where]), tuple(rows.learn[r, where])))
    expected = sorted((tuple(t), tuple(m)) for t, m in samples)
    padding = [f for f in found if f not in expected]
    assert sorted(f for f in found if f in expected) == expected
    assert all(set(t) == {PAD} and not any(m) for t, m in padding)  # the rest is padding, never learned
    assert rows.learn_tokens == sum(sum(m) for _, m in samples)


def test_loss_mask_token_by_token():
    # row: sample A (4 tokens), sample B (3 tokens), 1 padding -> width 8, seq_len 7
    a = ([11, 12, 13, 14], [False, False, True, True])
    b = ([21, 22, 23], [False, True, True])
    rows = pack_samples([a, b], seq_len=7, pad_id=PAD, seed=0)
    assert len(rows.tokens) == 1
    batch = collate_rows(rows, [0], [0])
    first = rows.tokens[0, 0]
    order = [a, b] if first == 11 else [b, a]
    tokens = order[0][0] + order[1][0] + [PAD]
    learn = order[0][1] + order[1][1] + [False]
    doc = [0] * len(order[0][0]) + [1] * len(order[1][0]) + [2]
    assert batch.inputs[0].tolist() == tokens[:-1] and batch.targets[0].tolist() == tokens[1:]
    expected_mask = [learn[i + 1] and doc[i + 1] == doc[i] for i in range(7)]
    assert batch.loss_mask[0].tolist() == expected_mask
    assert batch.num_tokens == sum(expected_mask)
    assert batch.doc_ids[0].tolist() == doc[:-1]
    starts = [0] * 7
    for i in range(1, 7):
        starts[i] = 0 if doc[i] != doc[i - 1] else starts[i - 1] + 1
    assert batch.position_ids[0].tolist() == starts


def test_a_target_across_a_sample_boundary_is_never_learned():
    a, b = ([5, 6], [False, True]), ([7, 8], [True, True])  # b's first token marked learned on purpose
    batch = collate_rows(pack_samples([a, b], seq_len=3, pad_id=PAD, seed=0), [0], [0])
    boundary = int((batch.doc_ids[0] == 0).sum()) - 1  # last input of the first sample
    assert not batch.loss_mask[0, boundary]


def test_packed_loss_equals_the_sum_of_each_sample_alone():
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=64, max_seq_len=64)
    model = build_model(cfg, torch.device("cpu"), seed=3)
    samples = _samples(np.random.default_rng(1), 12, vocab=64)
    rows = pack_samples(samples, seq_len=31, pad_id=PAD, seed=2)
    batch = collate_rows(rows, list(range(len(rows.tokens))), list(range(len(rows.tokens))))
    with torch.no_grad():
        packed = cross_entropy_sum(model(batch.inputs, batch.position_ids, batch.doc_ids), batch.targets,
                                   batch.loss_mask)
        alone = torch.zeros(())
        for tokens, learn in samples:
            t = torch.tensor([tokens])
            mask = torch.tensor([learn[1:]])
            alone += cross_entropy_sum(model(t[:, :-1]), t[:, 1:], mask)
    assert batch.num_tokens == sum(sum(m[1:]) for _, m in samples)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_a_step_is_the_same_rows_under_any_data_parallel_size():
    rows = pack_samples(_samples(np.random.default_rng(2), 50), seq_len=15, pad_id=PAD, seed=0)
    data = DataConfig(seq_len=15, micro_batch_size=2, global_batch_size=8, seed=9)
    single = SFTStepLoader(rows, data)
    shards = [SFTStepLoader(rows, data, dp_rank=r, dp_size=4) for r in range(4)]
    for _ in range(len(rows.tokens)):  # several epochs' worth of steps
        whole = torch.cat([b.inputs for b in single.next_step()])
        split = torch.cat([b.inputs for s in shards for b in s.next_step()])
        assert torch.equal(whole, split)
    assert single.state_dict() == {"consumed_samples": 8 * len(rows.tokens)}


def test_epochs_visit_every_row_once_in_a_new_order():
    rows = pack_samples(_samples(np.random.default_rng(3), 30), seq_len=15, pad_id=PAD, seed=0)
    count = len(rows.tokens)
    loader = SFTStepLoader(rows, DataConfig(seq_len=15, micro_batch_size=1, global_batch_size=1, seed=4))
    first = [loader.row_of(i) for i in range(count)]
    second = [loader.row_of(count + i) for i in range(count)]
    assert sorted(first) == sorted(second) == list(range(count))
    assert first != second


def test_a_sample_longer_than_a_row_is_refused():
    with pytest.raises(ValueError, match="more than seq_len"):
        pack_samples([([1] * 10, [True] * 10)], seq_len=8, pad_id=PAD, seed=0)
