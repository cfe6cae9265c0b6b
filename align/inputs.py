"""What every rank of a job would check before its first step, done once in the process that launches it
(here, on the floor above the engine, because an alignment job's rows are read by align/'s readers).

`herd launch --nproc`, `herd launch --slurm` and `herd align --nproc` call these before any process starts, so
a missing or malformed data file, tokenizer, row file or stage input is one `herd: error:` line instead of a
traceback from every rank through torchrun (or from a SLURM job hours later in a queue). The checks are the
ranks' own code: the job's data is built as rank 0 of a one-process world builds it (the same readers, the same
one-line errors), and its console lines are discarded. The cost is one read of the data's indexes and of the
alignment rows, as each rank pays it anyway; `herd launch --slurm --no-data-check` skips it where the data is
only visible from the compute nodes.
"""

import io
import os

from engine.config import JobConfig
from engine.errors import ConfigError


def check_job_inputs(cfg: JobConfig) -> None:
    """The job's tokenizer, token files (indexes, sidecars, blend) or alignment rows, read as a rank reads them."""
    sink = io.StringIO()
    kind = cfg.align.kind
    if kind == "lm":
        from engine.run import build_data
        build_data(cfg, None)
    elif kind == "sft":
        from align.run import sft_data
        sft_data(cfg, None, sink)
    else:
        from align.run import preference_data
        preference_data(cfg, None, sink)


def check_prompts(cfg: JobConfig, prompts_file: str, max_new_tokens: int) -> None:
    """Rejection sampling's prompt rows, read as run_rejection_sampling reads them."""
    from align.formats import AlignDataError
    from align.rejection import read_prompts
    from engine.data.tokenizer import load_tokenizer
    if not os.path.isfile(prompts_file):
        raise ConfigError("prompts", f"{prompts_file} does not exist")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    prompts, skipped = read_prompts(prompts_file, tokenizer,
                                    min(cfg.data.seq_len, cfg.model.max_seq_len) - max_new_tokens)
    if not prompts:
        raise AlignDataError(f"{prompts_file}: no usable prompt ({skipped.summary()})")
