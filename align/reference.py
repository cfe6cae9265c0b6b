"""DPO's reference log-probabilities, computed once before the first step and kept beside the run.

The reference model is frozen (Rafailov et al. 2023), so log pi_ref(y | x) of every chosen and rejected response
is a constant of the data: one forward pass over the preference file gives the whole table [examples, 2], and the
policy is trained against it without a second model in memory. The table is written to
<run dir>/dpo_reference.pt before training starts; a resumed stage reads it back (its model then holds trained
weights, from which the reference could no longer be recomputed).
"""

import os
from pathlib import Path

import torch
import torch.distributed as dist

from engine.errors import HerdError
from engine.files import atomic_output

from align.modules import DPOTrainModule
from align.preference import PreferenceStepLoader

TABLE_NAME = "dpo_reference.pt"


@torch.no_grad()
def compute_reference(module: DPOTrainModule, loader: PreferenceStepLoader) -> torch.Tensor:
    """[examples, 2] float64 summed log-probs (chosen, rejected) under the module's current weights. Data-parallel
    ranks split the examples, every layout gives the same table (float rounding aside)."""
    count, mb, dp = len(loader.examples), loader.data.micro_batch_size, loader.dp_size
    table = torch.zeros(count, 2, dtype=torch.float64, device=module.device)
    module.parallel.train(False)
    pipeline = module.parallel.pipeline
    for start in range(0, count, mb * dp):
        wanted = [start + loader.dp_rank * mb + j for j in range(mb)]
        batch = loader.batch_of_examples([i if i < count else 0 for i in wanted]).to(module.device)
        module.collect, module._queue = [], [batch]
        if pipeline is not None:
            with module.autocast():
                pipeline.forward_only([batch], module.micro_loss)
        else:
            module._loss_sum(batch)
        logps = module.collect[0][0].double() if module.collect else torch.zeros(2 * mb, device=module.device,
                                                                                 dtype=torch.float64)
        if pipeline is not None:  # only the last stage computed them; the others hold zeros
            dist.all_reduce(logps, group=pipeline.group)
        for j, index in enumerate(wanted):
            if index < count:
                table[index, 0], table[index, 1] = logps[j], logps[mb + j]
    module.collect, module._queue = None, []
    mesh = module.parallel.mesh
    if mesh is not None and mesh.dims.dp > 1:  # each example was computed by exactly one data-parallel rank
        dist.all_reduce(table, group=mesh.dp_mesh.get_group())
    return table


def reference_table(trainer, loader: PreferenceStepLoader, run_dir: Path, reference_root: str = "",
                    say=None) -> torch.Tensor:
    """The stage's table: read back on resume, else computed from the starting weights (or from the checkpoint
    `reference_root`, after which the starting weights are put back) and written before training starts."""
    module: DPOTrainModule = trainer.module
    path = run_dir / TABLE_NAME
    if trainer.state.step > 0:
        if not path.is_file():
            raise HerdError(f"{path}: the DPO reference table is missing; a resumed stage cannot recompute it "
                            f"from trained weights (start the stage over in a new run directory)")
        return torch.load(path, map_location=module.device, weights_only=True)
    starting = None
    if reference_root:
        starting = [p.detach().clone() for p in module.parallel.parameters()]
        trainer.checkpointer.load_weights(Path(reference_root))
    table = compute_reference(module, loader)
    if loader.held_out is not None:  # held-out rows' ids follow the training rows' (align/preference.py)
        table = torch.cat([table, compute_reference(module, loader.held_out)])
    if starting is not None:
        with torch.no_grad():
            for param, value in zip(module.parallel.parameters(), starting):
                param.copy_(value)
    if int(os.environ.get("RANK", "0")) == 0:
        with atomic_output(path) as stream:
            torch.save(table.cpu(), stream)
        if say:
            say(f"dpo reference: log-probs of {len(table)} pairs computed once -> {path}")
    if dist.is_initialized():
        dist.barrier()
    return table
