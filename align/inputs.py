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

from engine.config import JobConfig


def check_job_inputs(cfg: JobConfig) -> None:
    """The job's tokenizer, token files (indexes, sidecars, blend) or alignment rows, and the long-context
    evaluation's filler text, read as a rank reads them."""
    from align.run import stage_data
    stage_data(cfg, None, io.StringIO())
    if cfg.long_eval.enabled and cfg.long_eval.filler:  # read at the first evaluation: after the job is queued
        from engine.eval.needle import file_sentences
        file_sentences(cfg.long_eval.filler)


def check_prompts(cfg: JobConfig, prompts_file: str, max_new_tokens: int, key: str = "prompts") -> None:
    """Rejection sampling's prompt rows, read as run_rejection_sampling reads them."""
    from align.rejection import load_stage_prompts
    from engine.data.tokenizer import load_tokenizer
    load_stage_prompts(cfg, prompts_file, load_tokenizer(cfg.data.tokenizer), max_new_tokens, key)
