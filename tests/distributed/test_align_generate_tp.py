"""KV-cache generation under tensor parallelism (vocabulary-parallel head, padded vocabulary, with and without
sequence parallelism) and under FSDP equals one process: the same greedy tokens, logits within fp32 rounding, and
the same seeded samples."""

import pytest
import torch

from align.generate import SamplingConfig, generate_with_logits, sample_k
from engine.config import ModelConfig
from engine.model import build_model
from parallel.multiprocess import run_on_ranks
from tests.distributed import align_ranks

# vocab 97 is odd: tp=2 pads the head to 98 rows, and the padding column must never reach the sampler
MODEL = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=97, max_seq_len=64,
                    init_std=0.05)
SEED = 3
PROMPTS = [[1, 5, 9], [2, 7, 11, 13, 17, 19, 23], [3], [4, 8, 15, 16, 23, 42]]
GREEDY = SamplingConfig(max_new_tokens=10, temperature=0.0)
# eight stop ids make rows finish at different steps; with this seed every sample of prompt 3 stops within 4
# tokens while prompts 0-2 run to 10, so under FSDP rank 0 (prompt 3 only) runs out of rows 6 steps before rank 1
SAMPLED = SamplingConfig(max_new_tokens=10, temperature=0.9, top_p=0.9, stop_ids=list(range(8)), seed=21)
K = 3
FSDP_SPLIT = [[3], [0, 1, 2]]


@pytest.fixture(scope="module")
def ranks_output():
    return run_on_ranks(align_ranks.generate_in_layouts, 2, MODEL, SEED, PROMPTS, GREEDY, SAMPLED, K, FSDP_SPLIT,
                        timeout=240)


@pytest.fixture(scope="module")
def reference():
    model = build_model(MODEL, torch.device("cpu"), seed=SEED).eval()
    run = generate_with_logits(model, PROMPTS, GREEDY, keep_logits=True)
    return {"greedy": run.tokens, "logits": run.logits, "samples": sample_k(model, PROMPTS, K, SAMPLED)}


@pytest.mark.parametrize("layout", ["tp_sp", "tp"])
def test_tensor_parallel_generation_equals_one_process(ranks_output, reference, layout):
    for rank_output in ranks_output:  # every tp rank holds the whole result
        result = rank_output[layout]
        assert result["greedy"] == reference["greedy"]
        err = max((a - b).abs().max().item() for a, b in zip(result["logits"], reference["logits"]))
        print(f"{layout}: max |logit difference| vs one process {err:.2e}")
        assert err < 1e-5
        assert all(t.shape[1] == MODEL.vocab_size for t in result["logits"])  # padded column dropped
        assert result["samples"] == reference["samples"]


def test_fsdp_ranks_with_uneven_work_equal_one_process(ranks_output, reference):
    steps = [max(len(s) for i in split for s in reference["samples"][i]) for split in FSDP_SPLIT]
    assert steps[0] < steps[1], steps  # rank 0 really runs out of rows first and keeps forwarding in lockstep
    for out in ranks_output:
        for local, global_id in enumerate(out["fsdp"]["ids"]):
            assert out["fsdp"]["samples"][local] == reference["samples"][global_id]
    assert [out["fsdp"]["greedy_first"] for out in ranks_output] == [[], [reference["greedy"][0]]]
