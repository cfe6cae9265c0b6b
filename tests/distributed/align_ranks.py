"""Per-rank functions for tests/distributed/test_align_generate_tp.py (module-level so spawned ranks import them)."""

from typing import List

import torch

from align.generate import SamplingConfig, generate, generate_with_logits, sample_k
from engine import ops
from engine.config import ModelConfig
from engine.model import build_meta_model, init_weights
from parallel.mesh import ParallelDims, build_mesh
from parallel.parallelize import ParallelizeOptions, parallelize


def build_parallel_model(model_cfg: ModelConfig, dims: ParallelDims, sequence_parallel: bool, seed: int):
    """As engine/run.py build_module: meta model -> parallelize -> allocate this rank's shards -> same-seed init."""
    mesh = build_mesh(dims, "cpu")
    parallel = parallelize(build_meta_model(model_cfg), mesh, ParallelizeOptions(sequence_parallel=sequence_parallel),
                           reference_loss_sum=ops.cross_entropy_sum)
    for part in parallel.parts:
        part.to_empty(device=torch.device("cpu"))
        init_weights(part, seed, parallel.full_shape, parallel.init_parameter)
    return parallel, mesh


def generate_in_layouts(rank: int, world_size: int, model_cfg: ModelConfig, seed: int, prompts: List[List[int]],
                        greedy: SamplingConfig, sampled: SamplingConfig, k: int, fsdp_split: List[List[int]]) -> dict:
    """Under tp=2 (with and without sequence parallelism): greedy tokens with their logits, and K seeded samples
    per prompt. Under FSDP (dp_shard=2): rank r samples only the prompts fsdp_split[r], under their global ids."""
    out = {}
    for name, dims, sp in (("tp_sp", ParallelDims(tp=world_size), True),
                           ("tp", ParallelDims(tp=world_size), False)):
        parallel, _ = build_parallel_model(model_cfg, dims, sp, seed)
        run = generate_with_logits(parallel, prompts, greedy, keep_logits=True)
        out[name] = {"greedy": run.tokens, "logits": run.logits, "samples": sample_k(parallel, prompts, k, sampled)}
    parallel, mesh = build_parallel_model(model_cfg, ParallelDims(dp_shard=world_size), True, seed)
    mine = fsdp_split[mesh.dp_rank]
    out["fsdp"] = {"ids": mine, "samples": sample_k(parallel, [prompts[i] for i in mine], k, sampled, prompt_ids=mine)}
    # a rank with no prompt at all must still run the other rank's number of forwards
    out["fsdp"]["greedy_first"] = generate(parallel, [prompts[0]] if mesh.dp_rank == 1 else [], greedy)
    return out
