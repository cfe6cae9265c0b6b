"""`herd plan`: its arguments and what it does (launch/cli.py only dispatches here)."""

import argparse
import math
import re
from pathlib import Path

from engine.errors import HerdError

PRESETS = {"debug": "debug", "8b": "llama3_8b", "70b": "llama3_70b", "405b": "llama3_405b"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="model preset: 8b, 70b, 405b, debug (configs/models/)")
    model.add_argument("--config", help="a run config whose model (and data.seq_len) to plan for")
    p.add_argument("overrides", nargs="*", help="overrides of the --config, e.g. model.n_layers=40")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in all")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--hardware", default="h100_sxm", help="profile name in configs/hardware/ or a YAML path")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the config's data.seq_len, else 8192)")
    p.add_argument("--global-batch-tokens", default="16M", help="tokens per optimizer step (suffix K or M: 2^10, "
                                                                 "2^20); default 16M, Llama 3 405B's batch")
    p.add_argument("--precision", choices=("bf16", "fp8"), default="bf16", help="bf16, or fp8 (native) linears")
    p.add_argument("--memory-limit", type=float, help="GiB per GPU for the modeled peak (default: the profile's "
                                                      "memory minus its reserve)")
    p.add_argument("--schedules", default="default", help="default (1F1B, Interleaved1F1B), all, or a comma list")
    p.add_argument("--no-document-mask", action="store_true", help="plan for data.document_mask=false")
    p.add_argument("--top", type=int, default=5, help="layouts to print")
    p.add_argument("--out", help="write the best layout as a config YAML herd train / herd launch --slurm accept")


def tokens_arg(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", text)
    if not match or int(match.group(1)) < 1:
        raise HerdError(f"--global-batch-tokens {text!r} is not a positive count like 16777216, 4096K or 16M")
    return int(match.group(1)) * {"": 1, "k": 2 ** 10, "m": 2 ** 20}[match.group(2).lower()]


def _schedules(text: str):
    from plan.search import ALL_SCHEDULES, DEFAULT_SCHEDULES
    if text == "default":
        return DEFAULT_SCHEDULES
    if text == "all":
        return ALL_SCHEDULES
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [n for n in names if n not in ALL_SCHEDULES]
    if unknown or not names:
        raise HerdError(f"--schedules: unknown {', '.join(unknown) or '(empty)'}; choose from "
                        f"{', '.join(ALL_SCHEDULES)}, default or all")
    return names


def _model(args: argparse.Namespace):
    from engine.config import CONFIGS_DIR, load_config
    if args.model is not None:
        preset = PRESETS.get(args.model.lower().removeprefix("llama3_").removeprefix("llama3-"))
        if preset is None:
            raise HerdError(f"--model {args.model}: not a preset (choose {', '.join(PRESETS)}) - or pass --config")
        if args.overrides:
            raise HerdError("overrides go with --config; a --model preset is planned as it is")
        return preset, load_config(str(CONFIGS_DIR / "models" / f"{preset}.yaml")), None
    from plan.paths import check_input_file
    check_input_file(args.config, "--config")
    cfg = load_config(args.config, args.overrides)
    return None, cfg, cfg.data.seq_len


def run(args: argparse.Namespace) -> int:
    from plan.hardware import load_hardware
    from plan.report import check_destination, dotlist, header, table, write_config
    from plan.search import MAX_GPUS, Request, plan
    if args.top < 1:
        raise HerdError(f"--top must be at least 1, got {args.top}")
    if args.memory_limit is not None and not 0 < args.memory_limit < math.inf:
        raise HerdError(f"--memory-limit must be a positive, finite number of GiB, got {args.memory_limit}")
    for flag, value in (("--gpus", args.gpus), ("--gpus-per-node", args.gpus_per_node)):
        if value > MAX_GPUS:  # the search's divisors and layouts grow with it (and --gpus 10**20 ran for hours)
            raise HerdError(f"{flag} {value}: herd plans for at most {MAX_GPUS:,} GPUs")
    preset, cfg, config_seq = _model(args)
    if args.out:
        check_destination(Path(args.out), preset, args.config)  # before the table is printed (R21)
    seq_len = args.seq_len if args.seq_len is not None else config_seq or 8192  # 0 is refused, not a default
    if seq_len < 1:
        raise HerdError(f"--seq-len must be positive, got {seq_len}")
    req = Request(model=cfg.model, gpus=args.gpus, hardware=load_hardware(args.hardware), seq_len=seq_len,
                  global_tokens=tokens_arg(args.global_batch_tokens), gpus_per_node=args.gpus_per_node,
                  precision=args.precision, memory_limit_gib=args.memory_limit,
                  schedules=_schedules(args.schedules), document_mask=not args.no_document_mask, top=args.top)
    result = plan(req)
    print("\n".join(header(req, cfg.model.name, result) + table(result)))
    print("best as overrides: " + " ".join(dotlist(req, result.best[0])))
    if args.out:
        try:
            path = write_config(req, result.best[0], Path(args.out), preset, args.config, list(args.overrides))
        except OSError as e:  # a full disk, a directory made read-only meanwhile: nothing replaced, one line
            raise HerdError(f"--out {args.out}: {e.strerror or e}") from None
        print(f"wrote {path} (herd launch --slurm {path} ... runs it; data.train still has to be set)")
    return 0
