"""The planner's memory model (plan/layout.py, plan/memory.py) against herd's real objects and our measurements.

Exact parts are compared with torch itself: tensor-parallel shapes from parallel.tensor_parallel on a fake process
group, FSDP2 shards from parallel.data_parallel.apply_fsdp (fully_shard) on a fake process group, pipeline stages
from parallel.pipeline_parallel.stage_module, the schedules' warm-up from torch.distributed.pipelining. The
modeled peak is compared with the allocator peaks benchmarks/mfu.py measured on an H100."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from engine.config import CONFIGS_DIR, ModelConfig, load_config
from engine.model import Transformer
from plan.hardware import RESULTS_DIR
from plan.layout import Layout, rank_state, shard_numel, stage_tensors
from plan.memory import in_flight, peak_memory, worst_peak

DEBUG = ModelConfig()  # dim 256, 4 layers, 8 heads / 4 KV heads, FFN 768, vocab 4096


def _fake_world(rank: int, world: int) -> None:
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)


def _meta_model(cfg: ModelConfig = DEBUG) -> Transformer:
    with torch.device("meta"):
        return Transformer(cfg)


@pytest.mark.parametrize("tp, vocab", [(2, 4096), (4, 4098), (8, 4096)])  # tp 8 > 4 KV heads: shared KV heads
def test_tensor_parallel_shapes_match_herd(tp, vocab):
    from parallel.tensor_parallel import apply_tensor_parallel
    cfg = ModelConfig(vocab_size=vocab)
    _fake_world(0, tp)
    try:
        model = _meta_model(cfg)
        apply_tensor_parallel(model, dist.group.WORLD, sequence_parallel=True)
        real = {n: tuple(p.shape) for n, p in model.named_parameters()}
    finally:
        dist.destroy_process_group()
    assert real == dict(stage_tensors(cfg, tp, list(range(cfg.n_layers)), True, True))
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights


@pytest.mark.parametrize("world, rank", [(6, 0), (6, 5), (8, 7)])
def test_fsdp_shards_match_fully_shard(world, rank):
    """Local shard sizes of herd's apply_fsdp on rank `rank` (uneven chunks included: 4096 rows over 6 ranks)."""
    from torch.distributed.device_mesh import init_device_mesh
    from parallel.data_parallel import apply_fsdp
    _fake_world(rank, world)
    try:
        model = _meta_model()
        mesh = SimpleNamespace(fsdp_mesh=init_device_mesh("cpu", (world,)))
        apply_fsdp(model, mesh, torch.bfloat16, reshard_after_forward=True)
        local = sum(p.to_local().numel() for p in model.parameters())
        dtypes = {p.dtype for p in model.parameters()}
    finally:
        dist.destroy_process_group()
    state = rank_state(DEBUG, Layout(dp_shard=world), 0, rank)
    assert state.params == 4 * local and dtypes == {torch.float32}
    assert state.grads == state.params and state.optimizer == 2 * state.params + 4 * state.tensors


def test_split_is_herds():
    from parallel.pipeline_parallel import split_layers as herd_split
    from plan.layout import split_layers
    for n_layers in (4, 8, 32, 80, 126):
        for n_stages in range(1, n_layers + 1):
            assert split_layers(n_layers, n_stages) == herd_split(n_layers, n_stages, 1.0, 1.0)


def test_shard_numel_is_torch_chunk():
    for rows in (1, 5, 10, 4096, 4097):
        for shards in (1, 2, 3, 4, 6, 8, 64):
            chunks = torch.arange(rows).chunk(shards) if shards > 1 else [torch.arange(rows)]
            for i in range(shards):
                expected = chunks[i].numel() if i < len(chunks) else 0
                assert shard_numel((rows, 3), shards, i) == 3 * expected


@pytest.mark.parametrize("pp, vpp, schedule", [(2, 1, "1F1B"), (2, 2, "Interleaved1F1B"), (2, 2, "ZBVZeroBubble"),
                                               (4, 1, "1F1B")])
def test_pipeline_stage_params_match_stage_module(pp, vpp, schedule):
    from parallel.pipeline_parallel import split_layers, stage_module, stage_to_rank
    cfg = ModelConfig(n_layers=8)
    model = _meta_model(cfg)
    n = pp * vpp
    layers, ranks = split_layers(cfg.n_layers, n, 1.0, 1.0), stage_to_rank(n, pp, schedule)
    for r in range(pp):
        parts = [stage_module(model, layers[s], s == 0, s == n - 1) for s in range(n) if ranks[s] == r]
        real = sum(p.numel() for part in parts for p in part.parameters())
        buffers = sum(b.numel() * b.element_size() for part in parts for b in part.buffers())
        state = rank_state(cfg, Layout(pp=pp, vpp=vpp, schedule=schedule), r, 0)
        assert (state.params, state.buffers) == (4 * real, buffers)


@pytest.mark.parametrize("schedule, factor", [("Interleaved1F1B", 2), ("InterleavedZeroBubble", 1)])
def test_in_flight_follows_torch_warmup(schedule, factor):
    from torch.distributed.pipelining.schedules import _get_warmup_ops
    for pp, v, m in ((4, 2, 8), (4, 3, 16), (16, 4, 32), (8, 2, 8)):
        rounds = max(1, m // pp)
        for rank in range(pp):
            warmup = _get_warmup_ops(rank, v, m // rounds, pp, m, multiply_factor=factor)
            layout = Layout(pp=pp, vpp=v, schedule=schedule)
            assert in_flight(layout, m, rank) == min(warmup + 1, m * v)


def test_more_parallelism_means_less_memory():
    cfg = load_config(str(CONFIGS_DIR / "models" / "llama3_70b.yaml")).model
    base = Layout(tp=2, pp=4, dp_shard=8)

    def peak(layout):
        return worst_peak(cfg, layout, 8192, 16).total
    assert peak(base) > peak(Layout(tp=4, pp=4, dp_shard=8)) > peak(Layout(tp=8, pp=4, dp_shard=8))
    assert rank_state(cfg, base).total > rank_state(cfg, Layout(tp=2, pp=4, dp_shard=16)).total
    assert peak(base) > peak(Layout(tp=2, pp=4, dp_shard=8, ac="selective")) > peak(Layout(tp=2, pp=4, dp_shard=8,
                                                                                          ac="full"))
    assert peak(Layout(tp=8, cp=2, pp=4, dp_shard=4)) < peak(Layout(tp=8, pp=4, dp_shard=8))


@pytest.mark.parametrize("file_name", ["mfu_nvidia_h100_80gb_hbm3.json", "mfu_nvidia_h100_80gb_hbm3_8layers.json",
                                       "mfu_nvidia_h100_80gb_hbm3_accum8.json"])
def test_peak_memory_against_measured_proxy(file_name):
    """torch.cuda.max_memory_allocated of the one-GPU MFU proxy (herd-bf16 rows), within 10%: these peaks were not
    used to calibrate anything."""
    row = next(r for r in json.loads((RESULTS_DIR / file_name).read_text()) if r["variant"] == "herd-bf16")
    cfg = ModelConfig(dim=row["dim"], n_layers=row["layers"], n_heads=row["heads"], n_kv_heads=row["kv_heads"],
                      ffn_dim=row["ffn_dim"], vocab_size=row["vocab"], max_seq_len=row["seq_len"])
    layout = Layout(mbs=row["batch_size"], document_mask=False)
    predicted = peak_memory(cfg, layout, row["seq_len"], row.get("accum", 1)).total / 2 ** 30
    assert math.isclose(predicted, row["peak_mem_gib"], rel_tol=0.10), (predicted, row["peak_mem_gib"])
