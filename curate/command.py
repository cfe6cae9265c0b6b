"""`herd curate PIPELINE.yaml [overrides]` and `herd curate train-classifier` (docs/data_curation.md)."""

import argparse
import math
from pathlib import Path

from engine.errors import HerdError

MAX_EPOCHS = 1000  # fastText's usual 5-50; more only overfits small example sets, and runs for hours


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pipeline", help="curation pipeline YAML (configs/curate/demo.yaml), or train-classifier")
    parser.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. executor.tasks=8 minhash.enabled=false")
    parser.add_argument("--positive", action="append", default=[], help="train-classifier: files or directories "
                        "of good examples (label hq; repeatable)")
    parser.add_argument("--negative", action="append", default=[], help="train-classifier: bad examples (label lq)")
    parser.add_argument("--class", dest="classes", action="append", default=[], metavar="LABEL=PATH",
                        help="train-classifier: examples of one class of a domain classifier (repeatable)")
    parser.add_argument("--out", help="train-classifier: the fastText model file to write")
    parser.add_argument("--epochs", type=int, default=25, help="train-classifier: fastText epochs (1 to 1000)")


def run(args: argparse.Namespace) -> int:
    if args.pipeline == "train-classifier":
        return _train_classifier(args)
    if args.positive or args.negative or args.classes or args.out:
        raise HerdError("--positive, --negative, --class and --out go with `herd curate train-classifier`")
    from curate.config import load
    from curate.run import release_output
    cfg = load(args.pipeline, args.overrides)
    try:
        return _run_slurm(cfg) if cfg.executor.kind == "slurm" else _run_local(cfg)
    finally:
        release_output(Path(cfg.output_dir))


def _run_slurm(cfg) -> int:
    from curate.report import write_report
    from curate.run import submit_slurm
    ids = submit_slurm(cfg)
    submitted = [job for job in ids if job != "-1"]  # -1: a pass complete in an earlier run, not submitted
    report = Path(cfg.output_dir).resolve() / "report.md"
    if not submitted:
        write_report(cfg)  # cheap, and current: `examples` may have changed, or report.md been removed
        print(f"herd curate: every pass is complete; the report is {report}", flush=True)
        return 0
    print(f"herd curate: submitted {len(submitted)} job arrays (last {submitted[-1]}; {len(ids) - len(submitted)} "
          f"passes already complete); the report will be {report}", flush=True)
    return 0


def _run_local(cfg) -> int:
    import json
    from curate.run import run_local
    run_local(cfg)
    root = Path(cfg.output_dir).resolve()
    report = root / "report.md"
    if not report.is_file():  # the report pass runs on every rerun; this is only a removal while it ran
        raise HerdError(f"{report}: missing after the report pass; rerun herd curate to write it again")
    print(report.read_text(), end="", flush=True)
    empty = json.loads((root / "report.json").read_text()).get("empty", "")
    if empty:
        print(f"herd curate: nothing to train on: {empty} (report {report})", flush=True)
        return 1
    print(f"herd curate: report {report} (and report.json beside it)", flush=True)
    return 0


def _train_classifier(args: argparse.Namespace) -> int:
    from curate.models import example_flag, train_classifier
    if args.overrides:
        raise HerdError(f"train-classifier takes no overrides, got {' '.join(args.overrides)}")
    if not args.out:
        raise HerdError("train-classifier needs --out MODEL.bin")
    classes = {}
    if (args.positive or args.negative) and args.classes:
        raise HerdError("give --positive and --negative (a quality classifier) or --class LABEL=PATH (a domain "
                        "classifier), not both")
    if args.positive or args.negative:
        if not (args.positive and args.negative):
            raise HerdError("a quality classifier needs both --positive and --negative examples")
        classes = {"hq": args.positive, "lq": args.negative}
    for item in args.classes:
        label, _, path = item.partition("=")
        if not label or not path or not label.replace("_", "").isalnum():
            raise HerdError(f"--class {item}: write LABEL=PATH with a label of letters, digits and _")
        classes.setdefault(label, []).append(path)
    if len(classes) < 2:
        got = f" (got only label '{next(iter(classes))}')" if classes else ""
        raise HerdError(f"train-classifier needs --positive and --negative, or --class LABEL=PATH for at least two "
                        f"labels{got}")
    seen = {}
    for label, paths in classes.items():
        for path in paths:
            if not Path(path).exists():
                raise HerdError(f"{example_flag(label)}: '{path}' does not exist")
            other = next((seen[p] for p in _overlaps(Path(path), seen) if seen[p] != label), None)
            if other is not None:  # one text under two labels teaches the classifier nothing but noise
                raise HerdError(f"{example_flag(label)}: '{path}' overlaps the examples of {example_flag(other)}")
            seen[Path(path).resolve()] = label
    if not 1 <= args.epochs <= MAX_EPOCHS:
        raise HerdError(f"--epochs must be between 1 and {MAX_EPOCHS}, got {args.epochs}")
    out = Path(args.out)
    if out.exists() and not out.is_file():
        raise HerdError(f"--out {out}: is not a file")
    from curate.models import is_fasttext_model, model_labels
    if out.exists() and not is_fasttext_model(str(out)):  # a retrain replaces its model, never a user's file (R21)
        raise HerdError(f"--out {out}: exists and is not a fastText model; choose another path")
    labels = model_labels(str(out)) if out.exists() else sorted(classes)
    if labels != sorted(classes):  # another model (a language identifier's, say), not an earlier run of this one
        shown = ", ".join(labels[:5]) + (f" and {len(labels) - 5} more" if len(labels) > 5 else "")
        raise HerdError(f"--out {out}: holds a fastText model of other labels ({shown}); a retrain replaces only a "
                        f"model of the same labels: choose another path")
    if not out.parent.is_dir():
        raise HerdError(f"--out {out}: directory {out.parent} does not exist")
    examples, accuracy = train_classifier(classes, str(out), epochs=args.epochs)
    held = "not measured (fewer than 20 examples)" if math.isnan(accuracy) else f"{accuracy:.3f}"
    print(f"herd curate: trained a fastText classifier of {len(classes)} labels ({', '.join(classes)}) on "
          f"{examples} examples; held-out accuracy {held}: {out}", flush=True)
    return 0


def _overlaps(path: Path, seen: dict) -> list:
    """The example paths already given that are `path`, lie under it, or hold it."""
    path = path.resolve()
    return [p for p in seen if p == path or p in path.parents or path in p.parents]
