"""Pipeline stage splitting and placement, schedule rules, and context-parallel zigzag sharding (no processes)."""

import pytest
import torch

from engine.config import load_config
from engine.data.loader import collate
from engine.errors import ConfigError
from engine.run import check_parallel
from parallel.context_parallel import cp_bytes_per_layer, zigzag_indices
from parallel.mesh import LayoutError
from parallel.pipeline_parallel import check_pipeline, split_layers, stage_to_rank


def test_llama3_405b_split_has_one_layer_less_on_first_and_last_stage():
    counts = [len(stage) for stage in split_layers(126, 16, 1.0, 1.0)]
    print("405B on 16 stages:", counts)
    assert counts == [7] + [8] * 14 + [7]


@pytest.mark.parametrize("n_layers,stages,emb,head", [(32, 4, 1.0, 1.0), (32, 8, 0.0, 0.0), (80, 10, 1.0, 2.0),
                                                     (4, 4, 1.0, 1.0), (8, 8, 3.0, 3.0), (13, 3, 0.5, 0.5)])
def test_split_is_contiguous_complete_and_balanced(n_layers, stages, emb, head):
    split = split_layers(n_layers, stages, emb, head)
    assert [i for stage in split for i in stage] == list(range(n_layers))
    assert all(len(stage) >= 1 for stage in split)
    costs = [len(s) + (emb if i == 0 else 0) + (head if i == stages - 1 else 0) for i, s in enumerate(split)]
    ideal = (n_layers + emb + head) / stages
    # no stage exceeds the ideal by a layer or more, unless every stage already holds a single layer
    assert max(costs) < ideal + 1 or max(len(s) for s in split) == 1, costs


def test_explicit_split_is_kept():
    assert split_layers(6, 3, 1.0, 1.0, [1, 3, 2]) == [[0], [1, 2, 3], [4, 5]]


def test_stage_placement_loop_and_v():
    assert stage_to_rank(8, 4, "Interleaved1F1B") == [0, 1, 2, 3, 0, 1, 2, 3]
    assert stage_to_rank(8, 4, "ZBVZeroBubble") == [0, 1, 2, 3, 3, 2, 1, 0]


@pytest.mark.parametrize("args,key,words", [
    ((2, 2, "1F1B", 8, 8, []), "parallel.pp_virtual_stages", "1F1B runs one stage per rank"),
    ((2, 1, "ZBVZeroBubble", 8, 8, []), "parallel.pp_virtual_stages", "needs exactly 2 stages per rank"),
    ((4, 2, "Interleaved1F1B", 4, 8, []), "parallel.pp", "8 stages but model.n_layers=4"),
    ((4, 1, "1F1B", 8, 2, []), "data.global_batch_size", "at least as many microbatches as stages (4)"),
    ((4, 2, "Interleaved1F1B", 8, 9, []), "data.global_batch_size", "9 per step is not a multiple of its 2"),
    ((2, 1, "1F1B", 6, 4, [1, 4]), "parallel.pp_layers", "must list 2 stages"),
])
def test_schedule_rules_are_one_line_errors(args, key, words):
    with pytest.raises(LayoutError) as info:
        check_pipeline(*args)
    assert info.value.key == key and words in info.value.message, str(info.value)


def test_schedule_rules_accept_counts_that_are_not_multiples_of_pp():
    check_pipeline(4, 1, "1F1B", 8, 6, [])  # 6 microbatches on 4 stages
    check_pipeline(4, 2, "Interleaved1F1B", 8, 10, [])  # 2 rounds of 5
    check_pipeline(4, 2, "Interleaved1F1B", 8, 3, [])  # one round of 3


@pytest.mark.parametrize("overrides,world,expected", [
    (["parallel.cp=3", "data.seq_len=32"], 3, "parallel.cp: data.seq_len=32 cannot be cut into 2*cp=6 equal"),
    (["parallel.cp=2", "parallel.tp=4", "data.seq_len=36"], 8,
     "parallel.sequence_parallel: data.seq_len=36 / cp=2 tokens per rank cannot be split over tp=4"),
    (["parallel.pp=4", "model.n_layers=2"], 4, "parallel.pp: pp * pp_virtual_stages = 4 stages but"),
])
def test_layout_errors_through_the_config(overrides, world, expected):
    cfg = load_config(None, ["data.global_batch_size=16", "data.micro_batch_size=1", *overrides],
                      world_size=world)
    with pytest.raises(ConfigError) as info:
        check_parallel(cfg, world)
    assert expected in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("seq_len,cp", [(16, 2), (32, 4), (24, 3)])
def test_zigzag_covers_each_token_once_with_equal_causal_work(seq_len, cp):
    shards = [zigzag_indices(seq_len, cp, r) for r in range(cp)]
    assert sorted(torch.cat(shards).tolist()) == list(range(seq_len))
    work = [int((idx + 1).sum()) for idx in shards]  # keys a causal query at position i attends: i + 1
    print(f"seq {seq_len}, cp {cp}: causal work per rank {work}")
    assert len(set(work)) == 1


def test_cp_shard_keeps_positions_documents_and_loss_tokens():
    eod = 0
    samples = torch.tensor([[5, 6, 0, 7, 8, 9, 0, 4, 3]]).numpy()  # 8 inputs + 1
    batch = collate(samples, [11], eod, document_mask=True, eod_mask_loss=True)
    shards = [batch.shard_for_cp(2, r) for r in range(2)]
    assert shards[0].inputs.tolist() == [[5, 6, 4, 3][:2] + [0, 4]]  # chunks 0 and 3: positions 0,1,6,7
    assert shards[1].inputs.tolist() == [[0, 7, 8, 9]]  # chunks 1 and 2: positions 2..5
    assert shards[0].position_ids.tolist() == [[0, 1, 3, 0]]
    assert shards[1].doc_ids.tolist() == [[0, 1, 1, 1]]
    assert sum(s.num_tokens for s in shards) == batch.num_tokens
    assert all(s.sample_ids.tolist() == [11] for s in shards)


def test_cp_comm_formula_grows_with_cp_but_not_per_token():
    small = cp_bytes_per_layer("all_gather", 2, 1, 8192, 8, 128, 2)
    large = cp_bytes_per_layer("all_gather", 8, 1, 8192, 8, 128, 2)
    assert small["forward"] == 2 * 4096 * 8 * 128 * 2  # K and V of the 4096 local tokens, sent once
    assert large["forward"] == 7 * 2 * 1024 * 8 * 128 * 2
    ring = cp_bytes_per_layer("ring", 4, 1, 8192, 8, 128, 2)
    assert ring["backward"] == 7 * 2 * 2048 * 8 * 128 * 2  # K, V, dK, dV for 3 hops, then dK, dV once more
