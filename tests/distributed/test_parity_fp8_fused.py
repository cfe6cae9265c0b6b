"""The FP8 casts fused into RMSNorm and SwiGLU (fp8.fuse_norm_cast, fuse_swiglu_cast; engine/fp8/fused_cast.py)
under FSDP2 with bf16 parameters, without and with full activation checkpointing, on gloo ranks: each layout with
the switches trains bitwise like the same layout without them (losses of the 5 parity steps and every final
parameter equal, not within a tolerance: the switches change where the cast runs, not what it computes). tp > 1 is
refused (tests/unit/test_fp8_fused_cast.py).

Pipeline parallelism (pp 2, 1F1B) too: torch's pipelining runs each stage once more inside the first step to infer
shapes (the later stage on uninitialized tensors), and the pipeline's ScheduleGate keeps the FP8 windows from
recording that pass (tests/distributed/test_parity_fp8.py shows the delayed recipe under pp then trains like one
process; before the gate two identical runs differed, step-1 loss nan in one).
"""

import torch

from parallel.multiprocess import run_on_ranks
from tests.distributed import ranks
from tests.distributed.test_parity import corpus  # noqa: F401 (fixture)

DELAYED = ["fp8.backend=native", "fp8.bf16_first_last_layers=false", "fp8.recipe=delayed", "train.dtype=bf16"]
FUSED = ["fp8.fuse_norm_cast=true", "fp8.fuse_swiglu_cast=true"]
LAYOUTS = [["parallel.dp_shard=2"], ["parallel.dp_shard=2", "parallel.activation_checkpointing=full"],
           ["parallel.pp=2", "parallel.pp_schedule=1F1B"]]


def test_fused_casts_under_fsdp2_and_pp2_are_bitwise_the_unfused_layouts(corpus, tmp_path):  # noqa: F811
    runs = [layout + DELAYED + extra for layout in LAYOUTS for extra in (FUSED, [])]
    results = run_on_ranks(ranks.train_layouts, 2, str(corpus), str(tmp_path / "runs"), runs, timeout=900)
    for index, layout in enumerate(LAYOUTS):
        fused, plain = results[0][2 * index], results[0][2 * index + 1]
        print(f"{' '.join(layout)}: losses {fused['losses']}")
        assert len(fused["losses"]) == 5 and fused["losses"] == plain["losses"], (layout, fused, plain)
        assert fused["fused_casts"] > 0 and plain["fused_casts"] == 0, layout  # the fused ops did run
        assert fused["params"].keys() == plain["params"].keys()
        assert all(torch.equal(fused["params"][k], v) for k, v in plain["params"].items()), layout
