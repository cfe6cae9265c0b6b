"""The `herd` command: a thin dispatcher. Every user mistake is printed as one line, exit code 2."""

import argparse
import contextlib
import os
import sys
import time
import traceback
from pathlib import Path
from typing import List, Optional

from engine.errors import ConfigError, HerdError
from engine.secrets import scrub

EXIT_USAGE = 2


def _train(args: argparse.Namespace) -> int:
    from engine.config import is_recipe_file, load_config
    from plan.paths import check_input_file
    check_input_file(args.config, "config")  # is_recipe_file read a FIFO forever
    if is_recipe_file(args.config):  # a recipe is one config too: as `herd recipe` would
        if args.dry_run:
            raise HerdError(f"--dry-run builds one job; {args.config} is a recipe: herd recipe {args.config} "
                            f"--print-config --world-size N checks every stage's job for N ranks")
        return _recipe(argparse.Namespace(recipe=args.config, overrides=args.overrides, nproc=None,
                                          print_config=args.print_config, world_size=args.world_size))
    if args.dry_run:
        return _dry_run(args)
    if args.world_size is not None or args.rank is not None or args.device is not None:
        raise HerdError("--world-size, --rank and --device go with --dry-run")
    from launch.local import check_master_port, check_rank_environment
    cfg = load_config(args.config, args.overrides, world_size=check_rank_environment(dict(os.environ)))
    if args.print_config:
        from engine.config import to_yaml
        print(to_yaml(cfg), end="")
        return 0
    check_master_port(dict(os.environ))  # before the run directory is claimed
    from engine.callbacks import PREEMPTED_EXIT_CODE
    from align.run import train_stage  # align.kind lm (pretraining) is the engine's own run
    from engine.run import end_rank_process
    trainer = train_stage(cfg)
    code = 0
    if trainer.state.preempted:  # saved at the step boundary; the launch script requeues on this code
        print(f"preempted by signal {trainer.state.preempted} at step {trainer.state.step}: checkpoint saved, "
              f"exiting with {PREEMPTED_EXIT_CODE} (requeue)", flush=True)
        code = PREEMPTED_EXIT_CODE
    end_rank_process(code)  # a rank of a multi-process run leaves here; one process returns
    return code


def _dry_run(args: argparse.Namespace) -> int:
    """Rank --rank of the --world-size job, built and stepped here on torch's fake process group (engine/dry_run.py)."""
    from engine.config import load_config
    from engine.dry_run import check_request, dry_run
    if args.world_size is None:
        raise HerdError("--dry-run needs the job's number of ranks: --world-size N")
    check_request(args.world_size, args.rank or 0)
    cfg = load_config(args.config, args.overrides, world_size=args.world_size)
    import torch
    try:
        report = dry_run(cfg, args.world_size, args.rank or 0, args.device or "cpu")
    except torch.OutOfMemoryError as e:  # the answer to "does this rank fit", not a crash
        raise HerdError(f"rank {args.rank or 0} of {args.world_size} does not fit on this GPU: "
                        f"{str(e).splitlines()[0]}") from None
    print("\n".join(report.lines()), flush=True)
    return 0


def _align(args: argparse.Namespace) -> int:
    """Run a post-training pipeline (align/pipeline.py); with --nproc, every stage on that many local ranks."""
    from engine.config import load_pipeline
    pipeline = load_pipeline(args.pipeline, args.overrides)
    if args.nproc is not None and "WORLD_SIZE" not in os.environ:
        from launch.local import check_nproc
        check_nproc(args.nproc)
        from align.pipeline import PipelineRunner
        runner = PipelineRunner(pipeline, world_size=args.nproc)  # every stage's job as its ranks will load it
        runner.check()
        runner.check_inputs()  # and every input file
        runner.check_checkpoints()  # and every stage's checkpoint directory: refused here, before any rank starts
        from launch.local import run_local
        herd_args = ["align", args.pipeline, *args.overrides]
        print(scrub(f"herd align: {args.nproc} ranks of herd " + " ".join(herd_args)), flush=True)
        # every training stage saves (align/pipeline.py), so every stage is preemptible
        return run_local(args.nproc, herd_args, "herd align", preemptible=True)  # owns its ranks: launch/local.py
    from align.pipeline import run_pipeline
    from engine.run import end_rank_process
    from launch.local import check_master_port, check_rank_environment
    check_rank_environment(dict(os.environ))
    check_master_port(dict(os.environ))
    run_pipeline(pipeline)
    end_rank_process(0)  # a rank of a multi-process pipeline leaves here; one process returns
    return 0


def _recipe(args: argparse.Namespace) -> int:
    """Run a pretraining recipe (recipe/runner.py); with --nproc, every stage on that many local ranks."""
    from recipe.command import recipe_command
    if args.nproc is None or "WORLD_SIZE" in os.environ:  # this process is a rank (or the only one)
        from launch.local import check_master_port, check_rank_environment
        check_rank_environment(dict(os.environ))
        if not args.print_config:
            check_master_port(dict(os.environ))
    return recipe_command(args.recipe, args.overrides, args.nproc, args.print_config, args.world_size)


def _prepare_data(args: argparse.Namespace) -> int:
    try:
        return _prepare_data_checked(args)
    except OSError as e:  # a name too long, a path under /proc, ...: the file and the system's reason, one line
        where = e.filename if e.filename is not None else "--out"
        raise HerdError(f"{os.fsdecode(where)}: {e.strerror or e}") from None
    except ConfigError as e:  # the tokenizer's checks name the training key; here the flag is what was given
        flag = {"data.tokenizer.path": "--tokenizer-path", "data.tokenizer.kind": "--tokenizer"}.get(e.key)
        if flag is None:
            raise
        raise HerdError(flag + str(e)[len(e.key):]) from None


def _prepare_data_checked(args: argparse.Namespace) -> int:
    from engine.config import TokenizerConfig
    from engine.data.prepare import (DEFAULT_PATTERNS, PrepareReport, list_inputs, no_documents, output_files,
                                     prepare_data, read_documents)
    from engine.data.tokenizer import load_tokenizer
    _check_prepare_args(args)
    patterns = tuple(args.include) if args.include else DEFAULT_PATTERNS
    kwargs = dict(text_key=args.text_key, valid_fraction=args.valid_fraction, on_bad_data=args.on_bad_data,
                  patterns=patterns, exclude=tuple(args.exclude))
    if args.train_tokenizer:
        report = PrepareReport()
        files = list_inputs(args.inputs, patterns, tuple(args.exclude), output_files(args.out, args.valid_fraction))
        documents = list(read_documents(files, args.text_key, args.on_bad_data, report))
        if not documents:
            raise HerdError(no_documents(args.inputs, report))
        with _tokenizer_written_last(args.tokenizer_path, args.vocab_size, documents) as tokenizer:
            report = prepare_data(args.inputs, args.out, tokenizer, documents=documents, report=report, **kwargs)
        print(f"trained a byte-level BPE of {tokenizer.vocab_size} tokens on {len(documents)} documents: "
              f"{args.tokenizer_path}", flush=True)
    else:
        tokenizer = load_tokenizer(TokenizerConfig(kind=args.tokenizer, path=args.tokenizer_path or ""))
        report = prepare_data(args.inputs, args.out, tokenizer, **kwargs)
    print(f"wrote {', '.join(p + '.{bin,idx}' for p in report.outputs)} ({report.summary()})", flush=True)
    return 0


@contextlib.contextmanager
def _tokenizer_written_last(path: str, vocab_size: int, documents):
    """Trains the BPE into a temporary file and moves it to `path` only after the data it describes is written
    (atomically: a reader sees no tokenizer or the whole one); a failure leaves neither."""
    from engine.data.tokenizer import train_bpe
    final = Path(path)
    temporary = final.with_name(f".{final.name}.tmp{os.getpid()}")
    try:
        tokenizer = train_bpe((d.text for d in documents), vocab_size, str(temporary))
        tokenizer.name = f"hf:{path}"  # what the data's sidecar records: the final path
        yield tokenizer
        os.replace(temporary, final)
    finally:
        temporary.unlink(missing_ok=True)


def _check_prepare_args(args: argparse.Namespace) -> None:
    """Every flag and destination, before anything is read or written (R20, R21)."""
    import math
    from engine.config_checks import check_directory
    if not 0 <= args.valid_fraction < 1 or not math.isfinite(args.valid_fraction):
        raise HerdError(f"--valid-fraction must be in [0, 1), got {args.valid_fraction}")
    if args.tokenizer == "llama3" and args.tokenizer_path:
        raise HerdError(f"--tokenizer-path {args.tokenizer_path}: --tokenizer llama3 reads the tokenizer the "
                        f"llama-models package ships, not a file; drop --tokenizer-path, or pass --tokenizer hf")
    if args.vocab_size is not None and not args.train_tokenizer:
        raise HerdError(f"--vocab-size {args.vocab_size}: only a tokenizer trained here (--train-tokenizer) takes a "
                        f"vocabulary size; a loaded one has its own")
    if args.train_tokenizer:
        if args.tokenizer != "hf" or not args.tokenizer_path:
            raise HerdError("--train-tokenizer needs --tokenizer hf and --tokenizer-path OUT.json")
        args.vocab_size = 4096 if args.vocab_size is None else args.vocab_size
        from engine.data.tokenizer import SPECIAL_TOKENS
        smallest = 256 + len(SPECIAL_TOKENS)  # a byte-level BPE holds every byte and herd's special tokens
        if not smallest <= args.vocab_size <= (1 << 31) - 1:
            raise HerdError(f"--vocab-size must be in [{smallest}, 2**31), got {args.vocab_size} (a byte-level BPE "
                            f"holds 256 byte tokens and {len(SPECIAL_TOKENS)} special tokens)")
        if Path(args.tokenizer_path).exists():
            raise HerdError(f"--tokenizer-path {args.tokenizer_path} exists; herd never replaces a tokenizer (data "
                            f"prepared with it would no longer match it): choose a new path or remove it")
    elif args.tokenizer == "hf" and not args.tokenizer_path:
        raise HerdError("--tokenizer hf needs --tokenizer-path TOKENIZER.json (or --train-tokenizer to make one)")
    if os.path.basename(args.out) in ("", ".", ".."):  # out/ would write out.bin beside the directory
        raise HerdError(f"--out {args.out}: expected a file-name prefix (PREFIX gives PREFIX.bin, PREFIX.idx and "
                        f"PREFIX.json), not a directory")
    check_directory(str(Path(args.out).parent), "--out")
    if args.train_tokenizer:
        check_directory(str(Path(args.tokenizer_path).parent), "--tokenizer-path")
    from engine.data.prepare import output_prefixes
    for prefix in output_prefixes(args.out, args.valid_fraction):
        _check_prefix_is_ours(prefix)


def _check_prefix_is_ours(prefix: str) -> None:
    """PREFIX.bin/.idx/.json may be replaced only when they are an earlier `herd prepare-data` output (its
    sidecar PREFIX.json says so); any other file there is the user's (R21)."""
    paths = [Path(f"{prefix}{ext}") for ext in (".bin", ".idx", ".json")]
    if not any(p.exists() or p.is_symlink() for p in paths):
        return
    from engine.data.indexed import read_sidecar
    try:  # the summary training reads, with the fields only prepare-data writes
        meta = read_sidecar(prefix)
        ours = meta is not None and isinstance(meta.get("inputs"), list)
    except HerdError:
        ours = False
    if not ours or any(p.is_symlink() or (p.exists() and not p.is_file()) for p in paths):
        taken = next(p for p in paths if p.exists() or p.is_symlink())
        raise HerdError(f"--out {prefix}: {taken} exists and is not a herd prepare-data output; choose another "
                        f"prefix or remove it")


def _launch_slurm(args: argparse.Namespace) -> int:
    """Render (and with --submit, sbatch) the SLURM script, after checking the config for nodes x ranks per node
    (one-line errors; nothing written or submitted)."""
    from engine.config import load_config
    from engine.run import check_parallel
    from align.inputs import check_job_inputs
    from launch.slurm import check_script_destination, render, write_and_submit
    flags = [("slurm.nodes", args.nodes), ("slurm.gpus_per_node", args.gpus_per_node), ("slurm.shape", args.shape)]
    overrides = list(args.overrides) + [f"{key}={value}" for key, value in flags if value is not None]
    overrides += ["train.device=cpu"] if args.cpu else []
    # The world size comes from slurm.* in the config; read it with the parallel degrees neutralized (a config
    # valid for its real world size is valid for this probe), then validate for real.
    single = [f"parallel.{k}=1" for k in ("dp_replicate", "dp_shard", "pp", "cp", "tp")]
    probe = load_config(args.config, overrides + single)
    world_size = probe.slurm.nodes * probe.slurm.gpus_per_node
    from engine.config_checks import MAX_WORLD_SIZE
    if world_size > MAX_WORLD_SIZE:
        raise HerdError(f"--nodes x --gpus-per-node (slurm.nodes x slurm.gpus_per_node) = {probe.slurm.nodes:,} x "
                        f"{probe.slurm.gpus_per_node:,} ranks: at most {MAX_WORLD_SIZE:,}")
    cfg = load_config(args.config, overrides, world_size=world_size)
    check_parallel(cfg, world_size)
    out = args.out or f"{cfg.slurm.job_name or cfg.log.name}.sbatch"
    check_script_destination(out, args.config, "--out" if args.out else "slurm.job_name (the default --out)")
    script = render(cfg, args.config, overrides)  # checks the env file and the template
    if not args.no_data_check:
        check_job_inputs(cfg)
    from engine.checkpoint.checkpointer import check_job_checkpoints
    check_job_checkpoints(cfg, test_lock=False)  # another run's checkpoints, seen from here, refuse before the queue
    return write_and_submit(script, out, args.submit)


def _launch(args: argparse.Namespace) -> int:
    """Check the config for this world size (one-line errors, nothing started), then run torchrun."""
    from engine.config import load_config
    from engine.run import check_parallel
    from engine.config import is_recipe_file
    from launch.local import check_nproc
    if args.nproc is not None:
        check_nproc(args.nproc)  # before a config is read: 10**10 processes were about to be started
    from plan.paths import check_input_file
    check_input_file(args.config, "config")  # is_recipe_file read a FIFO forever
    if is_recipe_file(args.config):  # a recipe's stages, on local ranks or as one SLURM job (recipe/command.py)
        from recipe.command import launch_recipe
        return launch_recipe(args)
    if args.slurm:
        return _launch_slurm(args)
    if args.nproc is None:
        raise HerdError("launch needs --nproc N (processes on this machine) or --slurm (an sbatch script)")
    cfg = load_config(args.config, args.overrides, world_size=args.nproc)
    check_parallel(cfg, args.nproc)
    from align.inputs import check_job_inputs
    check_job_inputs(cfg)  # what every rank reads first: one line here instead of a traceback per rank
    from engine.checkpoint.checkpointer import check_job_checkpoints
    check_job_checkpoints(cfg)  # another run's directory, or a live run's: refused before any rank starts
    from launch.local import run_local
    herd_args = ["train", args.config, *args.overrides]
    print(scrub(f"herd launch: {args.nproc} ranks of herd " + " ".join(herd_args)), flush=True)
    started = time.time()
    code = run_local(args.nproc, herd_args, "herd launch", preemptible=cfg.checkpoint.every > 0)  # launch/local.py
    return _hang_exit_code(cfg, started, code) if code else 0


def _hang_exit_code(cfg, started: float, code: int) -> int:
    """The first rank to fail decides the launcher's code, and it may be a peer that failed of the hang (or was
    stopped for it) rather than the watchdog; a hang report written by this job keeps the watchdog's code
    (docs/reliability.md) so a script can tell a hang from a crash."""

    from engine.callbacks.watchdog import HANG_EXIT_CODE
    report = Path(cfg.log.run_dir) / cfg.log.name / "hang" / "report.txt"
    if not report.is_file() or report.stat().st_mtime < started:
        return code
    print(f"herd launch: hang report {report}: {report.read_text().splitlines()[0]}", file=sys.stderr, flush=True)
    return HANG_EXIT_CODE


def _convert(args: argparse.Namespace) -> int:
    from engine.checkpoint.convert import import_hf
    from engine.checkpoint.hf_export import export_hf
    if not args.source or not args.dest:  # Path("") is the current directory: never meant
        raise HerdError(f"{'source' if not args.source else 'dest'}: is empty; name a directory")
    if args.direction == "hf-to-herd":
        if args.overwrite:
            raise HerdError("--overwrite applies to herd-to-hf only; an import writes a new or empty directory")
        try:
            path = import_hf(Path(args.source), Path(args.dest))
        except OSError as e:  # reading the source, checking the paths (writing is one line already): one line
            raise HerdError(f"{e.filename or args.dest}: {e.strerror or e}") from None
        print(f"wrote herd checkpoint {path}; train from it with checkpoint.load_weights={args.dest}", flush=True)
    else:
        try:
            done = export_hf(args.source, args.dest, overwrite=args.overwrite)
        except OSError as e:  # reading the checkpoint (writing is one line already): one line too, no traceback
            raise HerdError(f"{e.filename or args.source}: {e.strerror or e}") from None
        print(f"wrote HF Llama directory {done.path} from step {done.step} (transformers: "
              f"AutoModelForCausalLM.from_pretrained); tokenizer: {done.tokenizer or 'none'}", flush=True)
        for note in done.notes:
            print(f"herd convert: {note}", flush=True)
    return 0


def _average(args: argparse.Namespace) -> int:
    """Average checkpoints' model weights into one checkpoint (engine/checkpoint/average.py)."""
    from engine.checkpoint.average import average_checkpoints, parse_numbers, resolve_sources
    for flag, value in (("--steps", args.steps), ("--weights", args.weights)):
        if value is not None and not value.strip():  # `--steps=` was taken as not given (H46)
            raise HerdError(f"{flag}: empty; give a comma-separated list, or leave the flag out")
    steps = parse_numbers(args.steps, "--steps", int) if args.steps else None
    weights = parse_numbers(args.weights, "--weights", float) if args.weights else None
    try:
        sources = resolve_sources(args.checkpoints, all_steps=args.all, steps=steps)
        out = average_checkpoints(sources, Path(args.out), weights=weights, overwrite=args.overwrite)
    except OSError as e:  # reading a source (writing is one line already): one line too, no traceback
        raise HerdError(f"{e.filename or args.out}: {e.strerror or e}") from None
    print(f"wrote herd checkpoint {out}, the mean of {len(sources)} checkpoints; train from it with "
          f"checkpoint.load_weights={out}, export it with herd convert herd-to-hf {out} HF_DIR", flush=True)
    for index, source in enumerate(sources):
        print(f"  {source}" + (f" (weight {weights[index]:g})" if weights else ""), flush=True)
    return 0


def _plan(args: argparse.Namespace) -> int:
    """Search herd's 4D layouts for a model and a cluster (plan/, docs/scale.md)."""
    from plan.command import run
    return run(args)


def _curate(args: argparse.Namespace) -> int:
    """Curate a corpus on datatrove (curate/, docs/data_curation.md), or train its fastText classifier."""
    from curate.command import run
    return run(args)


def _scaling(args: argparse.Namespace) -> int:
    """IsoFLOP scaling-law sweeps: plan, train (here or as a SLURM array), fit (scaling/, docs/scaling.md)."""
    from scaling.command import run
    return run(args)


class _Parser(argparse.ArgumentParser):
    """Usage mistakes as one line, like every other herd error (the usage is one --help away)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="herd", description="Train Llama 3 models.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model from a YAML config and key=value overrides")
    train.add_argument("config", help="YAML config (presets in configs/)")
    train.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. optim.lr=1e-4 train.steps=50")
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    train.add_argument("--dry-run", action="store_true", help="build rank --rank of a --world-size job here on "
                       "torch's fake process group and run one step: print its state bytes and memory peak")
    train.add_argument("--world-size", type=int, help="with --dry-run: the job's number of ranks")
    train.add_argument("--rank", type=int, help="with --dry-run: which rank to build (default 0)")
    train.add_argument("--device", choices=("cpu", "cuda"), help="with --dry-run: fake tensors on cpu (default), "
                       "real tensors on cuda (measured peak memory and step time)")
    train.set_defaults(func=_train)

    launch = sub.add_parser("launch", help="start a local multi-process run (ranks owned by the launcher), or render a "
                                           "SLURM sbatch script with --slurm")
    launch.add_argument("--nproc", type=int, help="processes (ranks) on this machine")
    slurm = launch.add_argument_group("SLURM (--slurm; each flag overrides its slurm.* key, docs/launch.md)")
    slurm.add_argument("--slurm", action="store_true", help="write an sbatch script instead of running")
    slurm.add_argument("--nodes", type=int, help="nodes (slurm.nodes)")
    slurm.add_argument("--gpus-per-node", type=int, help="ranks per node, one per GPU (slurm.gpus_per_node)")
    slurm.add_argument("--shape", choices=("torchrun", "srun"), help="one torchrun per node, or one task per "
                                                                     "rank (slurm.shape)")
    slurm.add_argument("--cpu", action="store_true", help="CPU ranks on gloo (train.device=cpu; no GPUs asked)")
    slurm.add_argument("--out", help="script path (default: JOB_NAME.sbatch)")
    slurm.add_argument("--submit", action="store_true", help="sbatch the script after writing it")
    slurm.add_argument("--no-data-check", action="store_true",
                       help="do not read the job's data here first (data only the compute nodes can see)")
    launch.add_argument("config", help="YAML config")
    launch.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. parallel.tp=2")
    launch.set_defaults(func=_launch)

    align = sub.add_parser("align", help="run a post-training pipeline (SFT, reward model, rejection sampling, "
                                         "DPO; docs/alignment.md); finished stages are skipped on a rerun")
    align.add_argument("pipeline", help="pipeline YAML (configs/align_demo.yaml)")
    align.add_argument("overrides", nargs="*", help="pipeline overrides, e.g. rounds=2 run_dir=runs/a, or one "
                       "stage's field: stages.NAME.KEY=VALUE (docs/alignment.md)")
    align.add_argument("--nproc", type=int, help="run every stage on this many local ranks (docs/launch.md)")
    align.set_defaults(func=_align)

    recipe = sub.add_parser("recipe", help="run a staged pretraining recipe (ramps, mix changes, long context with "
                                           "gates, annealing and checkpoint averaging) as one resumable run")
    recipe.add_argument("recipe", help="recipe YAML (configs/recipes/)")
    recipe.add_argument("overrides", nargs="*", help="recipe overrides, e.g. run_dir=runs/r total_tokens=2e9, or one "
                        "stage's field: stages.NAME.KEY=VALUE (or stages.INDEX.KEY=VALUE; docs/recipe.md)")
    recipe.add_argument("--nproc", type=int, help="run every stage on this many local ranks")
    recipe.add_argument("--print-config", action="store_true", help="print the stage table and exit")
    recipe.add_argument("--world-size", type=int, help="with --print-config: check the stages' layouts for this "
                                                       "many ranks (default --nproc, or 1)")
    recipe.set_defaults(func=_recipe)
    _add_tool_commands(sub)
    return parser


def _add_tool_commands(sub) -> None:
    """The subcommands beside training: checkpoints (convert, average), data (prepare-data, curate), planning
    (plan, scaling)."""
    convert = sub.add_parser("convert", help="HF Llama directory <-> herd checkpoint")
    convert.add_argument("direction", choices=("hf-to-herd", "herd-to-hf"))
    convert.add_argument("source", help="HF directory (hf-to-herd) or herd checkpoint root (herd-to-hf)")
    convert.add_argument("dest", help="herd checkpoint root (hf-to-herd) or HF directory (herd-to-hf)")
    convert.add_argument("--overwrite", action="store_true", help="herd-to-hf: replace the content of an existing "
                                                                  "directory that herd did not export")
    convert.set_defaults(func=_convert)

    average = sub.add_parser("average", help="average checkpoints' model weights (any layouts) into one checkpoint: "
                                             "Llama 3's annealing average (docs/checkpointing.md)",
                             description="The element-wise mean of the checkpoints' model weights (float64 sums in "
                             "the order given, one rounding to fp32) as a weights-only checkpoint: train from it with "
                             "checkpoint.load_weights=OUT, export it with herd convert herd-to-hf OUT HF_DIR.")
    average.add_argument("checkpoints", nargs="+", help="step directories (CKPT_ROOT/step_00001000), or checkpoint "
                         "roots: each root's newest complete checkpoint, or those --all / --steps choose")
    average.add_argument("--out", required=True, help="checkpoint root to write: a new or empty directory")
    average.add_argument("--all", action="store_true", help="every complete checkpoint of each root given")
    average.add_argument("--steps", help="these steps of each root given, e.g. 9000,9500,10000")
    average.add_argument("--weights", help="one weight per checkpoint, in the order averaged (default: equal)")
    average.add_argument("--overwrite", action="store_true", help="replace --out when it holds an earlier average "
                         "(only that: never a source or a directory of other files)")
    average.set_defaults(func=_average)

    prep = sub.add_parser("prepare-data", help="tokenize text files or JSONL into .bin/.idx token files")
    prep.add_argument("inputs", nargs="+", help="files or directories (searched for --include patterns)")
    prep.add_argument("--out", required=True, help="output prefix (PREFIX.bin/.idx, or PREFIX.train/.valid)")
    prep.add_argument("--tokenizer", choices=("hf", "llama3"), default="hf")
    prep.add_argument("--tokenizer-path", help="tokenizer.json to load (or to write with --train-tokenizer)")
    prep.add_argument("--train-tokenizer", action="store_true", help="train a byte-level BPE on the inputs")
    prep.add_argument("--vocab-size", type=int, help="vocabulary of the trained BPE (default 4096)")
    prep.add_argument("--valid-fraction", type=float, default=0.0, help="share of documents held out")
    prep.add_argument("--text-key", default="text", help="JSONL field holding the document text")
    prep.add_argument("--on-bad-data", choices=("error", "skip"), default="error")
    prep.add_argument("--include", action="append", help="file name pattern under directories (repeatable)")
    prep.add_argument("--exclude", action="append", default=[], help="relative path pattern to leave out")
    prep.set_defaults(func=_prepare_data)

    plan = sub.add_parser("plan", help="predict memory and step time of every 4D layout and print the best "
                                       "(docs/scale.md)")
    from plan.command import add_arguments as plan_arguments
    plan_arguments(plan)
    plan.set_defaults(func=_plan)
    scaling = sub.add_parser("scaling", help="IsoFLOP scaling-law experiments: train budgets x model sizes, fit the "
                                             "compute-optimal model (docs/scaling.md); finished runs are kept")
    from scaling.command import add_arguments as scaling_arguments
    scaling_arguments(scaling)
    scaling.set_defaults(func=_scaling)
    curate = sub.add_parser("curate", help="clean, deduplicate, filter and mix a corpus on datatrove, then tokenize it "
                                           "per domain (docs/data_curation.md); `curate train-classifier` trains "
                                           "its fastText classifier")
    from curate.command import add_arguments as curate_arguments
    curate_arguments(curate)
    curate.set_defaults(func=_curate)



def _scrubbed_excepthook(kind, value, tb) -> None:
    """A crash still prints its traceback, but without secret values (a URL with a token in a message: R17)."""
    sys.stderr.write(scrub("".join(traceback.format_exception(kind, value, tb))))
    sys.stderr.flush()


def main(argv: Optional[List[str]] = None) -> int:
    sys.excepthook = _scrubbed_excepthook
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may follow options (herd train CONFIG --dry-run --world-size 8 parallel.tp=2): argparse stops
    # filling a positional list at the first option, so the words after it come back here
    if extra and isinstance(getattr(args, "overrides", None), list) and not any(e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except HerdError as e:
        print(scrub(f"herd: error: {e}"), file=sys.stderr, flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("herd: interrupted", file=sys.stderr, flush=True)
        return 130
