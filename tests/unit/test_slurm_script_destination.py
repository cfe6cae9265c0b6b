"""`herd launch --slurm --out PATH` replaces only an earlier herd script (launch/slurm.py check_script_destination):
a FIFO at PATH is refused without being opened (reading it would block forever: a bad-input hunt found the hang in
`herd scaling --slurm`, which shares the check's pattern), a user's file is refused, an earlier herd script is
replaced (before, a script rendered from today's templates was refused: the check wanted the mark as the whole
second line, and the templates continue it)."""

import os

import pytest

from engine.errors import HerdError
from launch.slurm import SCRIPT_MARK, check_script_destination


def test_only_an_earlier_herd_script_is_replaced(tmp_path):
    fifo = tmp_path / "job.sbatch"
    os.mkfifo(fifo)
    with pytest.raises(HerdError, match="exists and is not a file"):
        check_script_destination(str(fifo), "config.yaml")
    mine = tmp_path / "notes.txt"
    mine.write_text("#!/bin/bash\nmy own notes\n")
    with pytest.raises(HerdError, match="is not a herd sbatch script"):
        check_script_destination(str(mine), "config.yaml")
    earlier = tmp_path / "earlier.sbatch"
    earlier.write_text(f"#!/bin/bash\n{SCRIPT_MARK}\n" + "x" * 200000)
    assert check_script_destination(str(earlier), "config.yaml") == earlier


def test_a_rendered_script_can_be_rendered_again(tmp_path):
    from engine.config import load_config
    from launch.slurm import render, write_and_submit
    cfg = load_config("configs/demo.yaml", ["train.device=cpu", "slurm.gpus_per_node=2"], world_size=2)
    out = tmp_path / "job.sbatch"
    write_and_submit(render(cfg, "configs/demo.yaml", []), str(out), submit=False)
    assert check_script_destination(str(out), "configs/demo.yaml") == out
