"""`herd average`: the element-wise mean of several checkpoints' model weights, as one herd checkpoint.

Llama 3's final pretrained model is the average of the checkpoints saved while the learning rate anneals to 0
(Polyak averaging; Llama 3 paper, Section 3.4.3, "Annealing"). Each source is read from its layout-free boxes
(DCP reads the pieces any tp / pp / cp / FSDP layout wrote into whole tensors), verified against its manifest
first, as `herd convert herd-to-hf` does.

The mean, exactly: for every parameter, with weights w_i (1 each unless given) and the sources' fp32 values x_i,

    mean = fl32( ((w_1 * x_1 + w_2 * x_2) + ... + w_n * x_n) / W ),   W = w_1 + ... + w_n

every product, sum and the division in float64, the sum in the order the sources are given and starting from
w_1 * x_1 (with unit weights the mean of equal values is that value, -0.0 included), W correctly rounded
(math.fsum), then one rounding to fp32 (round to nearest even). The weights are first scaled by the power of two
that brings the largest into [0.5, 1): exact, so the mean is the same bit for bit, but no product of a tiny
(subnormal) or huge weight underflows or overflows. With unit weights and two sources the result is
the correctly rounded mean: the products are exact, and the float64 sum of two fp32 values (24 significant bits
each, a float64 has 53) is exact unless the smaller is below 2^-29 of the larger, too small to move the result.

The result is a weights-only checkpoint at step 0, as `herd convert hf-to-herd` writes one: train from it with
`checkpoint.load_weights=OUT`, export it with `herd convert herd-to-hf OUT HF_DIR`. Its manifest carries the
first source's model description (a training run's resolved config and world size, so an export finds the run's
tokenizer; or an import's model config and special token ids) and, under `meta.averaged`, every source with its
step and weight. It is written into a staging directory beside OUT that takes OUT's place only when complete, so
a refused or failed average leaves OUT as it was.
"""

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from engine.checkpoint.convert import TOKEN_IDS, check_model_size, check_token_ids, model_field, os_error_of
from engine.checkpoint.hf_export import _checkpoint_state
from engine.checkpoint.manifest import configs_of
from engine.checkpoint.ownership import LOCK
from engine.checkpoint.sharded import Box, load_sharded, save_sharded
from engine.checkpoint.staging import install_staged
from engine.checkpoint.store import _STEP_DIR, MANIFEST, CheckpointError, CheckpointStore, describe_files
from engine.config_checks import check_directory

AVERAGED = "averaged"  # meta key of an average's manifest: its sources (path, step, weight)
_CHUNK_BYTES = 1 << 30  # fp32 bytes of parameters read from every source at once (bounds memory beyond the result)
_NOT_COMPARED = ("name", "init_std")  # model fields that do not change the function a checkpoint computes


@dataclass
class Source:
    """One checkpoint to average: a verified step of a checkpoint root."""

    root: Path
    step: int
    manifest: dict

    @property
    def path(self) -> Path:
        return CheckpointStore(self.root).step_dir(self.step)


def _is_step_dir(path: Path) -> bool:
    return bool(_STEP_DIR.fullmatch(path.name))


def resolve_sources(paths: Sequence[Path], all_steps: bool = False, steps: Optional[Sequence[int]] = None
                    ) -> List[Path]:
    """The step directories to average: a step directory as given; a checkpoint root's newest complete checkpoint,
    or every complete one (`all_steps`), or the listed `steps` of it. Nothing is verified yet (`average_checkpoints`
    verifies every source before it reads one)."""
    if all_steps and steps:
        raise CheckpointError("--all and --steps each choose a root's checkpoints: give one of them")
    if (all_steps or steps) and paths and all(_is_step_dir(Path(p)) for p in paths):  # they chose nothing (H46)
        raise CheckpointError(f"{paths[0]}: every source is a step directory (one checkpoint each); --all and "
                              f"--steps choose among a root's checkpoints: give the roots")
    out: List[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a directory (a checkpoint root or one of its step_* directories)")
        if _is_step_dir(path):
            out.append(path)
            continue
        store = CheckpointStore(path)
        complete = store.complete_steps()
        if not complete:
            raise CheckpointError(f"{path}: no complete checkpoint (a checkpoint root holds step_* directories; "
                                  f"{store.why_none_complete()})")
        if steps:
            missing = [s for s in steps if s not in complete]
            if missing:
                raise CheckpointError(f"{path}: no complete checkpoint of step {missing[0]} (complete: "
                                      f"{', '.join(map(str, complete))})")
            chosen = sorted(set(steps))
        else:
            chosen = complete if all_steps else complete[-1:]
        out += [store.step_dir(s) for s in chosen]
    return out


def parse_numbers(text: str, option: str, kind: type) -> list:
    """A comma-separated list for --steps (integers >= 0) or --weights (numbers); one line naming the option."""
    try:
        values = [kind(part) for part in text.split(",")]
    except ValueError:
        raise CheckpointError(f"{option}: must be a comma-separated list of "
                              f"{'step numbers' if kind is int else 'numbers'}, got {text!r}") from None
    if kind is int and any(v < 0 for v in values):
        raise CheckpointError(f"{option}: steps are >= 0, got {text!r}")
    return values


def _verified(step_dir: Path) -> Source:
    """A step directory checked as a load checks it (marker, manifest fields, every file's size and sha256)."""
    step_dir = Path(step_dir)
    match = _STEP_DIR.fullmatch(step_dir.name)
    if step_dir.is_symlink():
        raise CheckpointError(f"{step_dir}: is a symbolic link; give the step directory it points to")
    if match is None or not step_dir.is_dir():
        raise CheckpointError(f"{step_dir}: not a checkpoint step directory (step_<8 digits>)")
    root, step = step_dir.parent, int(match.group(1))
    manifest = CheckpointStore(root).verify(step)  # incomplete, altered or escaping: one line naming the file
    return Source(root, step, manifest)


def _shapes(model_cfg) -> Dict[str, tuple]:
    from engine.model import build_meta_model
    return {name: tuple(p.shape) for name, p in build_meta_model(model_cfg).named_parameters()}


def _shape(shape: Optional[tuple]) -> str:
    return "no such parameter" if shape is None else f"shape {shape}"


def _tokenizer_identity(tok_cfg) -> Optional[tuple]:
    """What tells two runs' tokenizers apart: the file's bytes when it is there (the same file under another path
    is the same tokenizer), else its kind and path."""
    if tok_cfg is None:
        return None
    path = Path(tok_cfg.path) if tok_cfg.path else None
    if tok_cfg.kind == "hf" and path is not None and path.is_file():
        from engine.checkpoint.store import sha256_file
        return ("hf", sha256_file(path))
    return (tok_cfg.kind, tok_cfg.path)


def check_same_model(sources: List[Source]) -> Dict[str, tuple]:
    """Every source holds the same model: the same parameters of the same shapes (else the first differing
    parameter is named), the same model config (a different rope_theta or norm_eps is another function) and the
    same tokenizer. Returns the parameter shapes."""
    described = [configs_of(s.manifest, s.path / MANIFEST) for s in sources]
    for source, (model_cfg, _) in zip(sources, described):  # before a model of it is built
        check_model_size(model_cfg, source.path / MANIFEST, model_field(source.manifest))
        check_token_ids(source.manifest, source.path / MANIFEST)  # the first source's goes into the output
    first_cfg, first_tok = described[0]
    shapes = _shapes(first_cfg)
    for source, (model_cfg, tok_cfg) in zip(sources[1:], described[1:]):
        where = f"{source.path / MANIFEST}"
        theirs = _shapes(model_cfg)
        for name in list(shapes) + [n for n in theirs if n not in shapes]:
            if shapes.get(name) != theirs.get(name):
                raise CheckpointError(f"{where}: parameter '{name}' has {_shape(theirs.get(name))} here, "
                                      f"{_shape(shapes.get(name))} in {sources[0].path}: checkpoints of different "
                                      f"models cannot be averaged")
        ours, other = dataclasses.asdict(first_cfg), dataclasses.asdict(model_cfg)
        for key in sorted(set(ours) - set(_NOT_COMPARED)):
            if ours[key] != other[key]:
                raise CheckpointError(f"{where}: model.{key} is {other[key]}, {ours[key]} in {sources[0].path}: "
                                      f"these checkpoints compute different functions; average one stage's")
        if tok_cfg is not None and first_tok is not None and \
                _tokenizer_identity(tok_cfg) != _tokenizer_identity(first_tok):
            raise CheckpointError(f"{where}: data.tokenizer ({tok_cfg.kind} {tok_cfg.path!r}) is not the tokenizer "
                                  f"of {sources[0].path} ({first_tok.kind} {first_tok.path!r})")
    return shapes


def _chunks(shapes: Dict[str, tuple], chunk_bytes: int) -> List[List[str]]:
    """Parameters in groups of at most `chunk_bytes` of fp32 (a larger single parameter is a group alone)."""
    groups: List[List[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 4 * math.prod(shape)
        if groups[-1] and size + nbytes > chunk_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


@torch.no_grad()
def mean_weights(sources: List[Source], shapes: Dict[str, tuple], weights: List[float],
                 chunk_bytes: int = _CHUNK_BYTES) -> Dict[str, torch.Tensor]:
    """The weighted mean of every parameter (the module docstring's definition), read `chunk_bytes` of
    parameters at a time from each source: memory is the fp32 result plus 12 bytes per element of one chunk."""
    largest = math.frexp(max(weights))[1]
    weights = [math.ldexp(w, -largest) for w in weights]  # exact (see the module docstring)
    total = math.fsum(weights)
    result: Dict[str, torch.Tensor] = {}
    for names in _chunks(shapes, chunk_bytes):
        sums: Dict[str, torch.Tensor] = {}  # [shape] float64
        buffers = {name: torch.empty(shapes[name], dtype=torch.float32) for name in names}
        for source, weight in zip(sources, weights):
            boxes = {f"model.{n}": Box(buffers[n], (0,) * len(shapes[n]), shapes[n]) for n in names}
            load_sharded(source.path, boxes, source.manifest["files"])  # only files the manifest lists
            for name in names:
                if not torch.isfinite(buffers[name]).all():  # named here: the mean only says that one source is
                    raise CheckpointError(f"{source.path}: parameter '{name}' holds inf or nan; the average would "
                                          f"not be finite")
                term = buffers[name].double() * weight
                sums[name] = term if name not in sums else sums[name].add_(term)
        for name in names:
            mean = (sums[name] / total).float()  # one rounding to fp32
            if not torch.isfinite(mean).all():
                raise CheckpointError(f"parameter '{name}': the average is not finite (a source holds inf or nan)")
            result[name] = mean
    return result


def _check_weights(weights: Optional[Sequence[float]], count: int) -> List[float]:
    if weights is None:
        return [1.0] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise CheckpointError(f"--weights: {len(weights)} weights for {count} checkpoints (one per checkpoint, "
                              f"in the order they are averaged)")
    try:
        total = math.fsum(weights)
    except OverflowError:  # finite weights whose sum is not (1e308,1e308)
        total = math.inf
    if not all(math.isfinite(w) and w >= 0 for w in weights) or not 0 < total < math.inf:
        raise CheckpointError(f"--weights: must be finite and >= 0 with a positive, finite sum, got {weights}")
    return weights


def _refuse_destination(out_root: Path, step_dirs: List[Path], overwrite: bool) -> None:
    """OUT is new or an empty directory; with `overwrite` also an earlier average. Never a source, a directory
    above or inside one, the current directory or one above it, nor a directory of the user's files."""
    if out_root.is_symlink():
        raise CheckpointError(f"{out_root}: is a symbolic link; choose a new directory")
    check_directory(str(out_root), "--out")  # neither a file nor under one, nor (for non-root) unwritable
    dest = out_root.resolve()
    for inside, what in [(d.resolve(), f"the source {d}") for d in step_dirs] + \
            [(Path.cwd().resolve(), "the current directory")]:
        if dest == inside or dest in inside.parents:
            raise CheckpointError(f"{out_root}: holds {what}; the average replaces --out, choose another")
    for step_dir in step_dirs:
        if step_dir.resolve() in dest.parents:
            raise CheckpointError(f"{out_root}: is inside the source {step_dir}; choose a directory outside it")
    if not out_root.exists() or not any(out_root.iterdir()):
        return
    if not overwrite:
        raise CheckpointError(f"{out_root}: exists and is not empty; choose a new directory (or pass --overwrite "
                              f"to replace an earlier average)")
    if _is_average_root(out_root):
        return
    found = _checkpoint_state(out_root)
    if found is not None:
        raise CheckpointError(f"{out_root}: holds herd checkpoint state ({found}) that is not an earlier average; "
                              f"--overwrite replaces only that, choose another directory")
    # anything else is a user's (a corpus, notes): --overwrite deleted it (helper H46)
    raise CheckpointError(f"{out_root}: is not an earlier average (it holds files of its own); --overwrite replaces "
                          f"only herd average's output, choose another directory")


def _is_average_root(root: Path) -> bool:
    """A root that `herd average` wrote: no run's lock, and its only checkpoint an average."""
    import json
    if (root / LOCK).exists():
        return False
    steps = [p for p in root.iterdir() if _STEP_DIR.fullmatch(p.name)]
    if len(steps) != 1:
        return False
    try:
        manifest = json.loads((steps[0] / MANIFEST).read_bytes())
        return isinstance(manifest, dict) and AVERAGED in manifest.get("meta", {})
    except (OSError, ValueError, RecursionError, AttributeError):
        return False


def _output_meta(sources: List[Source], weights: List[float]) -> dict:
    """The first source's model description, so load_weights and an export see the model (and its tokenizer)."""
    first = sources[0].manifest["meta"]
    meta: dict = {"step": 0, "weights_only": True,
                  AVERAGED: [{"path": str(s.path), "step": s.step, "weight": w} for s, w in zip(sources, weights)]}
    if "model" in first:  # an import: its model config and the special ids its export writes back
        meta["model"] = first["model"]
        if TOKEN_IDS in first:
            meta[TOKEN_IDS] = first[TOKEN_IDS]
    else:  # a training run: its resolved config (the model and the tokenizer), validated for its world size
        meta["config"] = first["config"]
        if "world_size" in first:
            meta["world_size"] = first["world_size"]
    return meta


def _install(out_root: Path, state: Dict[str, torch.Tensor], meta: dict) -> None:
    """Write the checkpoint root into a staging directory that then takes out_root's place
    (engine/checkpoint/staging.py). A failed write is one line naming out_root and leaves out_root as it was and
    no directory this made."""
    from torch.distributed.checkpoint.api import CheckpointException

    def write(staging: Path) -> None:
        store = CheckpointStore(staging)
        path = store.begin(0)
        try:
            save_sharded(path, {f"model.{n}": Box(t, (0,) * t.ndim, tuple(t.shape)) for n, t in state.items()})
        except CheckpointException as e:  # its own text names only the ranks: the line gives the cause
            raise os_error_of(e) from None
        store.commit(0, describe_files(path, [f for f in path.rglob("*") if f.is_file()]), meta)
    install_staged(out_root, write, "average", (OSError, CheckpointException))


def average_checkpoints(sources: List[Path], out_root: Path, weights: Optional[Sequence[float]] = None,
                        overwrite: bool = False, chunk_bytes: int = _CHUNK_BYTES) -> Path:
    """Average the model weights of `sources` (step directories, or checkpoint roots for their newest complete
    checkpoint; any layout) into the checkpoint root `out_root`; returns it. At least two distinct checkpoints;
    everything is verified and compared before anything is written. Runs in one process."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise CheckpointError(f"{out_root}: average checkpoints in one process (this one is one of "
                              f"{dist.get_world_size()} torch.distributed ranks)")
    out_root = Path(out_root)
    step_dirs = resolve_sources(sources)
    if len(step_dirs) < 2:
        raise CheckpointError(f"{out_root}: an average needs at least 2 checkpoints, got {len(step_dirs)} "
                              f"(to use one checkpoint, load or export it directly)")
    seen: Dict[Path, Path] = {}
    for step_dir in step_dirs:
        if step_dir.resolve() in seen:
            raise CheckpointError(f"{step_dir}: given twice; to count a checkpoint more, give --weights")
        seen[step_dir.resolve()] = step_dir
    weights = _check_weights(weights, len(step_dirs))
    _refuse_destination(out_root, step_dirs, overwrite)
    verified = [_verified(d) for d in step_dirs]
    shapes = check_same_model(verified)
    state = mean_weights(verified, shapes, weights, chunk_bytes)  # every source read before anything is written
    _install(out_root, state, _output_meta(verified, weights))
    return out_root
