"""`herd convert`: HF Llama checkpoints <-> herd checkpoints.

Import reads a HF directory (config.json and model.safetensors, or shards listed by model.safetensors.index.json;
pickle-based .bin weights are refused) and writes a committed, weights-only herd checkpoint at step 0 whose
boxes are the full tensors, so any layout loads it (`checkpoint.load_weights=<dir>`). A config that herd cannot
compute exactly (another activation, biases, another RoPE scaling...), or that transformers 4 and 5 would read
differently, is refused, naming the key, rather than converted into another model; so is every tensor that is not
one of the model's parameters, once, finite and of a float type. Sizes are bounded before anything is built. The
checkpoint is staged (engine/checkpoint/staging.py) as export's and average's are. Export is
engine/checkpoint/hf_export.py. herd's RoPE uses HF's half-split layout,
so q/k need no permutation.
"""

import dataclasses
import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from engine.checkpoint.sharded import Box, save_sharded
from engine.checkpoint.staging import install_staged
from engine.checkpoint.store import CheckpointError, CheckpointStore, describe_files
from engine.config import ModelConfig, RopeScalingConfig, validate_model
from engine.config_checks import check_directory
from engine.errors import ConfigError
from engine.hf_interop import herd_to_hf_name, hf_to_herd_name
from engine.model import build_meta_model


_HF_INTS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
# Bounds checked before anything is built or allocated (a meta model of 10**7 layers takes hours to build; a
# vocab of 2**62 overflows torch's size arithmetic). Far above any Llama (405B: 126 layers, hidden 16384, vocab
# 128256, 131072 positions; Llama 4 Scout: 10M positions), and small enough that every element count fits int64.
MAX_SIZE = 2**24  # any one size: hidden, ffn, vocab, heads, positions
MAX_LAYERS = 4096
MAX_PARAMETERS = 2**40


def read_json(path: Path, what: str) -> object:
    """A JSON file's content, or one line naming the file (not JSON, not UTF-8, unreadable)."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: nested too deep
        raise CheckpointError(f"{path}: not a valid {what} ({str(e).splitlines()[0]})") from None


def show(value: object) -> str:
    """A value in a one-line message: repr (escapes newlines), cut at 60 characters (a 400-digit integer)."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**40 else f"{str(value)[:12]}... " \
        f"({len(str(abs(value)))} digits)"
    return text if len(text) <= 60 else text[:57] + "..."


def _hf_number(config: dict, key: str, source: Path, kind: type, default=None, most: int = MAX_SIZE):
    """config[key] as a positive int at most `most` (kind=int) or finite positive float, else one line naming
    the key."""
    import math
    value = config.get(key, default)
    if value is None and default is None:
        raise CheckpointError(f"{source}: missing key '{key}'")
    is_int = isinstance(value, int) and not isinstance(value, bool)
    try:  # float() of a 400-digit integer overflows: not a number herd can use either
        ok = (is_int or (kind is float and isinstance(value, float))) and math.isfinite(float(value)) and value > 0
    except OverflowError:
        ok = False
    if not ok:
        raise CheckpointError(f"{source}: '{key}' must be a positive {'integer' if kind is int else 'number'}, "
                              f"got {show(value)}")
    if kind is int and value > most:
        raise CheckpointError(f"{source}: '{key}' is {show(value)}; herd converts models with '{key}' at most "
                              f"{most}")
    return value if kind is int else float(value)


# config.json keys whose other values give another function than herd's Llama: (key, value herd computes, what
# herd computes). A missing key means transformers' LlamaConfig default, which is herd's.
_EXACT_KEYS = (
    ("model_type", "llama", "a Llama ('model_type': 'llama')"),
    ("hidden_act", "silu", "SwiGLU with silu"),
    ("attention_bias", False, "attention projections without biases"),
    ("mlp_bias", False, "MLP projections without biases"),
    ("quantization_config", None, "unquantized weights"),
    ("partial_rotary_factor", 1.0, "RoPE over the whole head"),
)
_ROPE_TYPES = (None, "default", "llama3")  # plain RoPE and Llama 3.1's scaling; linear, dynamic, yarn... are not


def refuse_inexact(config: dict, rope: dict, source: Path) -> None:
    """One line naming the first key whose value makes a model herd cannot compute exactly. Keys that only act in
    training (attention_dropout), storage (torch_dtype) or the order of sums (pretraining_tp) are accepted."""
    def refuse(key, value, herd):
        raise CheckpointError(f"{source}: '{key}' is {value!r}; herd computes {herd} only, so this model cannot be "
                              f"converted exactly")
    for key, herd_value, herd in _EXACT_KEYS:
        value = rope.get(key, config.get(key, herd_value)) if key == "partial_rotary_factor" else \
            config.get(key, herd_value)
        if value != herd_value and not (herd_value is None and value in ({}, None)):
            refuse(key, value, herd)
    architectures = config.get("architectures")
    if architectures not in (None, ["LlamaForCausalLM"]):
        refuse("architectures", architectures, "LlamaForCausalLM")
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type not in _ROPE_TYPES:
        refuse("rope_scaling" if config.get("rope_scaling") else "rope_parameters", {"rope_type": rope_type},
               "plain RoPE or Llama 3.1 scaling ('llama3')")
    heads, hidden = config.get("num_attention_heads"), config.get("hidden_size")
    head_dim = config.get("head_dim")
    if head_dim is not None and isinstance(heads, int) and isinstance(hidden, int) and heads > 0 \
            and head_dim != hidden // heads:
        refuse("head_dim", head_dim, f"heads of hidden_size / num_attention_heads = {hidden // heads}")


def _rope_of(config: dict, source: Path) -> dict:
    """The RoPE parameters transformers uses: `rope_scaling` when set (transformers 4's key, which 5 reads first),
    else `rope_parameters`; their `rope_theta` before the top-level one. Both dicts given and different, or a
    top-level `rope_theta` other than theirs, are read one way by transformers 4 and another by 5 (or by a
    hand-edited config's author): refused, naming both keys, rather than guessed."""
    scaling, parameters = config.get("rope_scaling"), config.get("rope_parameters")
    for key, value in (("rope_scaling", scaling), ("rope_parameters", parameters)):
        if value and not isinstance(value, dict):  # a falsy value is ignored, as transformers ignores it
            raise CheckpointError(f"{source}: '{key}' must be an object, got {show(value)}")
    if scaling and parameters and scaling != parameters:
        raise CheckpointError(f"{source}: 'rope_scaling' ({show(scaling)}) and 'rope_parameters' "
                              f"({show(parameters)}) disagree; keep the one that describes this model")
    rope = scaling or parameters or {}
    if "rope_theta" in config and "rope_theta" in rope and config["rope_theta"] != rope["rope_theta"]:
        key = "rope_scaling" if scaling else "rope_parameters"
        raise CheckpointError(f"{source}: 'rope_theta' ({show(config['rope_theta'])}) and '{key}.rope_theta' "
                              f"({show(rope['rope_theta'])}) disagree; keep the one that describes this model")
    return rope


def model_config_from_hf(config: object, source: Path) -> ModelConfig:
    """herd's ModelConfig for a transformers LlamaConfig dict (one-line error naming the file and key)."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: must hold a JSON object (a transformers LlamaConfig)")
    rope = _rope_of(config, source)  # transformers 5 keeps theta and scaling in rope_parameters; 4.x in rope_theta
    ints = {key: _hf_number(config, key, source, int, most=MAX_LAYERS if key == "num_hidden_layers" else MAX_SIZE)
            for key in _HF_INTS}  # first: the checks below compare them
    refuse_inexact(config, rope, source)
    heads = ints["num_attention_heads"]
    theta = _hf_number({"rope_theta": rope.get("rope_theta", config.get("rope_theta", 10000.0))}, "rope_theta",
                       source, float)
    scaling = RopeScalingConfig()
    if rope.get("rope_type", rope.get("type")) == "llama3":
        scaling = RopeScalingConfig(True, *(_hf_number(rope, k, source, float) for k in (
            "factor", "low_freq_factor", "high_freq_factor")),
            _hf_number(rope, "original_max_position_embeddings", source, int))
    name = config.get("_name_or_path")
    return ModelConfig(name=name if isinstance(name, str) and name else "hf", dim=ints["hidden_size"],
                       n_layers=ints["num_hidden_layers"], n_heads=heads,
                       n_kv_heads=_hf_number(config, "num_key_value_heads", source, int, heads),
                       ffn_dim=ints["intermediate_size"], vocab_size=ints["vocab_size"],
                       norm_eps=_hf_number(config, "rms_norm_eps", source, float, 1e-6), rope_theta=theta,
                       rope_scaling=scaling,
                       max_seq_len=_hf_number(config, "max_position_embeddings", source, int, 8192))


def parameter_count(cfg: ModelConfig) -> int:
    """herd's parameters for `cfg` (Python integers: no overflow), without building the model."""
    head = cfg.dim // cfg.n_heads
    layer = 2 * cfg.dim * head * (cfg.n_heads + cfg.n_kv_heads) + 3 * cfg.dim * cfg.ffn_dim + 2 * cfg.dim
    return cfg.n_layers * layer + 2 * cfg.vocab_size * cfg.dim + cfg.dim


_SIZES = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "max_seq_len",
          "rope_scaling.original_max_seq_len")
_FLOATS = ("norm_eps", "rope_theta", "rope_scaling.factor", "rope_scaling.low_freq_factor",
           "rope_scaling.high_freq_factor")


def check_model_size(cfg: ModelConfig, file: Path, field: str) -> None:
    """A saved model config (`field` names it in the manifest: meta.model, or meta.config's model) within the
    bounds above, checked before a model is built from it: one line naming the file and key, never a hang or a
    torch overflow."""
    def get(key):
        return getattr(cfg.rope_scaling, key.split(".")[1]) if "." in key else getattr(cfg, key)
    for key in _SIZES:
        most = MAX_LAYERS if key == "n_layers" else MAX_SIZE
        if isinstance(get(key), int) and get(key) > most:
            raise CheckpointError(f"{file}: field '{field}' has model.{key} {show(get(key))}; herd builds models "
                                  f"with model.{key} at most {most}")
    for key in _FLOATS:
        try:
            float(get(key))
        except (OverflowError, TypeError, ValueError):
            raise CheckpointError(f"{file}: field '{field}' has model.{key} {show(get(key))}, not a number that "
                                  f"fits a float") from None
    if parameter_count(cfg) > MAX_PARAMETERS:
        raise CheckpointError(f"{file}: field '{field}' describes a model of {parameter_count(cfg):,} parameters; "
                              f"herd builds models of at most 2**40")


def model_field(manifest: dict) -> str:
    """Where a manifest describes its model: an import's (or average's) meta.model, else a run's meta.config."""
    return "meta.model" if "model" in manifest["meta"] else "meta.config"


def _weight_files(hf_dir: Path, config: dict) -> Tuple[List[Path], Optional[dict]]:
    """The safetensors files to read, and the index's tensor -> file map (None for one model.safetensors)."""
    index, single = hf_dir / "model.safetensors.index.json", hf_dir / "model.safetensors"
    weight_map = None
    if index.is_file():
        weight_map = read_json(index, "safetensors index")
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: 'weight_map' must be an object of tensor name -> file name")
        if single.is_file():  # transformers reads model.safetensors, other tools the shards
            raise CheckpointError(f"{hf_dir}: holds both model.safetensors and model.safetensors.index.json (with "
                                  f"its shards), two sets of weights; remove the one that is not this model's")
        names, chosen = sorted(set(weight_map.values())), index.name
    elif single.is_file():
        names, chosen = ["model.safetensors"], single.name
    elif list(hf_dir.glob("*.bin")):
        raise CheckpointError(f"{hf_dir}: only pickle-based .bin weights found; herd loads safetensors only "
                              f"(they cannot run code); convert them with transformers' save_pretrained")
    else:
        raise CheckpointError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
    explicit = config.get("transformers_weights")  # transformers then loads that file instead
    if explicit is not None and explicit != chosen:
        raise CheckpointError(f"{hf_dir / 'config.json'}: 'transformers_weights' is {show(explicit)}; herd reads "
                              f"{chosen}: remove the key or the file that is not this model's")
    files = []
    for name in names:
        path = hf_dir / name
        if Path(name).name != name or path.is_symlink() or not path.is_file():
            raise CheckpointError(f"{hf_dir}: weight file '{name}' is missing or not a plain file in the directory")
        files.append(path)
    return files, weight_map


def _load_safetensors(file: Path) -> Dict[str, torch.Tensor]:
    """Every tensor of one file; a truncated or garbage file is one line naming it (safetensors parses only its
    own header: no code runs)."""
    from safetensors.torch import load_file
    try:
        str(file).encode("utf-8")
    except UnicodeEncodeError:  # safetensors takes UTF-8 paths only
        raise CheckpointError(f"{file.parent}: the path is not valid UTF-8; rename the directory") from None
    try:
        open(file, "rb").close()  # no permission and the like: said as such, not as safetensors' "no such file"
    except OSError as e:
        raise CheckpointError(f"{file}: cannot be read ({e.strerror or e})") from None
    try:
        return load_file(str(file))
    except Exception as e:  # SafetensorError, and OSError for a file cut inside a tensor
        raise CheckpointError(f"{file}: not a readable safetensors file ({str(e).splitlines()[0]})") from None


_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _checked(file: Path, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as fp32, if that is the same weights: integer, bool, fp8 (quantized: scales elsewhere) or
    complex values cast to fp32 are another model, and a NaN or inf would only surface later in training."""
    if tensor.dtype not in _FLOAT_DTYPES:
        raise CheckpointError(f"{file}: tensor '{name}' is {str(tensor.dtype).replace('torch.', '')}; herd imports "
                              f"float32, bfloat16, float16 or float64 weights only (a cast would be another model)")
    tensor = tensor.float()
    if not torch.isfinite(tensor).all():
        raise CheckpointError(f"{file}: tensor '{name}' holds inf or nan values")
    return tensor


def _read_tensors(files: List[Path], weight_map: Optional[dict]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Every weight under its herd name, and where it came from ("FILE: tensor 'NAME'", for messages). A tensor in
    a file other than the one the index names for it (a stale or duplicate copy) is refused."""
    state, origin = {}, {}
    for file in files:
        for name, tensor in _load_safetensors(file).items():
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if weight_map is not None and weight_map.get(name) != file.name:
                listed = f"lists it in '{weight_map[name]}'" if name in weight_map else "does not list it"
                raise CheckpointError(f"{file}: holds tensor '{name}', but model.safetensors.index.json {listed}")
            try:
                herd = hf_to_herd_name(name)
            except KeyError:
                raise CheckpointError(f"{file}: unexpected tensor '{name}' for a Llama model") from None
            if herd in state:
                raise CheckpointError(f"{file}: tensor '{name}' is also in {origin[herd]}")
            state[herd], origin[herd] = _checked(file, name, tensor), f"{file}: tensor '{name}'"
    return state, origin


def read_hf(hf_dir: Path) -> Tuple[ModelConfig, Dict[str, torch.Tensor]]:
    """The model config and every weight under its herd name, as fp32 full tensors."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise CheckpointError(f"{hf_dir}: not a directory (a Hugging Face model directory)")
    if not (hf_dir / "config.json").is_file():
        raise CheckpointError(f"{hf_dir}: no config.json")
    raw = read_json(hf_dir / "config.json", "config.json")
    model_cfg = model_config_from_hf(raw, hf_dir / "config.json")
    try:
        validate_model(model_cfg)
    except ConfigError as e:
        raise CheckpointError(f"{hf_dir / 'config.json'}: describes no valid Llama model ({e})") from None
    if parameter_count(model_cfg) > MAX_PARAMETERS:
        raise CheckpointError(f"{hf_dir / 'config.json'}: describes a model of {parameter_count(model_cfg):,} "
                              f"parameters; herd converts models of at most 2**40")
    tied = raw.get("tie_word_embeddings", False)  # transformers' LlamaConfig default
    if not isinstance(tied, bool):  # transformers refuses it too: "no" is not false
        raise CheckpointError(f"{hf_dir / 'config.json'}: 'tie_word_embeddings' must be true or false, got "
                              f"{show(tied)}")
    state, origin = _read_tensors(*_weight_files(hf_dir, raw))
    if tied and "tok_embeddings.weight" in state:
        # transformers computes a tied head with the embedding (a saved lm_head is ignored); herd's head is untied,
        # so it starts as a copy: the same function at step 0
        state["output.weight"] = state["tok_embeddings.weight"].clone()
    expected = {n: tuple(p.shape) for n, p in build_meta_model(model_cfg).named_parameters()}
    extra = sorted(set(state) - set(expected))
    if extra:
        raise CheckpointError(f"{origin[extra[0]]} is not a parameter of the model config.json describes "
                              f"({model_cfg.n_layers} layers)")
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{hf_dir}: weights missing for {missing[0]} (and {len(missing) - 1} more)")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise CheckpointError(f"{hf_dir}: {herd_to_hf_name(name)} has shape {tuple(state[name].shape)}, "
                                  f"config.json implies {shape}")
    return model_cfg, state


def os_error_of(error: BaseException) -> BaseException:
    """What DCP's CheckpointException wraps (its own text, "CheckpointException ranks:...", says nothing): the
    first OSError in the first failure's chain (a failed write raises inside torch's writer with the OSError as
    its context), else that failure itself."""
    failures = list(getattr(error, "failures", {}).values())
    first = failures[0][0] if failures and isinstance(failures[0], tuple) else error
    seen = first
    while seen is not None and not isinstance(seen, OSError):
        seen = seen.__cause__ or seen.__context__
    return seen if seen is not None else OSError(str(first).strip().splitlines()[0] if str(first).strip() else
                                                 type(first).__name__)


def import_hf(hf_dir: Path, out_root: Path) -> Path:
    """Write a weights-only herd checkpoint (step 0) of the HF model at `hf_dir` into `out_root`, a new or empty
    directory outside `hf_dir`. Everything is read and checked first; the checkpoint is written into a staging
    directory beside out_root that takes its place only when complete (engine/checkpoint/staging.py): a refused
    or failed import (no space: one line naming out_root) leaves out_root as it was and no directory it made."""
    from torch.distributed.checkpoint.api import CheckpointException
    hf_dir, out_root = Path(hf_dir), Path(out_root)
    check_destination(out_root, "hf-to-herd")
    model_cfg, state = read_hf(hf_dir)  # first: what is wrong with the source is said before where it goes
    if hf_dir.resolve() in out_root.resolve().parents:
        raise CheckpointError(f"{out_root}: is inside the HF directory being imported ({hf_dir}); choose a "
                              f"directory outside it")
    meta = {"step": 0, "weights_only": True, "model": dataclasses.asdict(model_cfg), "source": str(hf_dir),
            TOKEN_IDS: hf_token_ids(hf_dir / "config.json")}

    def write(staging: Path) -> None:
        store = CheckpointStore(staging, keep_last=2)
        path = store.begin(0)
        try:
            save_sharded(path, {f"model.{k}": Box(v, (0,) * v.ndim, tuple(v.shape)) for k, v in state.items()})
        except CheckpointException as e:
            raise os_error_of(e) from None
        store.commit(0, describe_files(path, [f for f in path.rglob("*") if f.is_file()]), meta)
    install_staged(out_root, write, "import", (OSError, CheckpointException))
    return CheckpointStore(out_root).step_dir(0)


TOKEN_IDS = "hf_token_ids"  # an imported checkpoint's meta: the source's bos/eos ids, which export writes back
_TOKEN_KEYS = ("bos_token_id", "eos_token_id")


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _are_ids(value: object) -> bool:
    return _is_id(value) or (isinstance(value, list) and bool(value) and all(map(_is_id, value)))


def hf_token_ids(config_file: Path) -> dict:
    """bos_token_id / eos_token_id of a HF config.json (an id or a list of ids each). Absent, null, negative or
    empty ones are left out (transformers accepts them, warning); another type is refused, as transformers does."""
    raw = read_json(config_file, "config.json")
    out = {}
    for key in _TOKEN_KEYS:
        value = raw.get(key)
        ids = value if isinstance(value, list) else [value]
        if not all(i is None or (isinstance(i, int) and not isinstance(i, bool)) for i in ids):
            raise CheckpointError(f"{config_file}: '{key}' must be a token id or a list of them, got {show(value)}")
        if _are_ids(value):
            out[key] = value
    return out


def check_token_ids(manifest: dict, file: Path) -> dict:
    """`meta.hf_token_ids` as an import records it (absent: none), or one line naming the field: an export
    writes it into config.json and generation_config.json."""
    value = manifest["meta"].get(TOKEN_IDS, {})
    if not isinstance(value, dict) or set(value) - set(_TOKEN_KEYS) or not all(map(_are_ids, value.values())):
        raise CheckpointError(f"{file}: field 'meta.{TOKEN_IDS}' must be an object of bos_token_id / eos_token_id, "
                              f"each a token id >= 0 or a list of them, got {show(value)}")
    return value


EXPORT_MARK = "herd_export"  # a config.json key: this directory is an earlier export, which may be replaced
# every file name an export writes (hf_export.py): a directory holding any other is not only an export's
EXPORT_FILES = re.compile(r"(generation_)?config\.json|tokenizer(_config)?\.json|model\.safetensors(\.index\.json)?"
                          r"|model-\d{5}-of-\d{5}\.safetensors")


def is_earlier_export(dest: Path) -> bool:
    """`dest` holds an export and nothing else: config.json carries the export's mark, and every entry is a plain
    file of a name an export writes. A user's file beside them (or a forged mark) makes it the user's directory."""
    config = dest / "config.json"
    if config.is_symlink() or not config.is_file():
        return False
    try:
        mark = read_json(config, "config.json")
    except CheckpointError:
        return False
    if not isinstance(mark, dict) or not isinstance(mark.get(EXPORT_MARK), dict):
        return False
    return all(EXPORT_FILES.fullmatch(p.name) and not p.is_symlink() and p.is_file() for p in dest.iterdir())


def check_destination(dest: Path, direction: str, overwrite: bool = False) -> None:
    """Conversions write only into a new or empty directory, or over their own earlier export (R21): never
    into a directory of the user's, nor over a file, unless an export is asked to overwrite that directory."""
    dest = Path(dest)
    if dest.is_symlink():
        raise CheckpointError(f"{dest}: is a symbolic link; choose a new destination")
    check_directory(str(dest), "dest")  # neither a file nor under one
    if not dest.exists() or not any(dest.iterdir()):
        return
    if direction == "herd-to-hf" and (overwrite or is_earlier_export(dest)):
        return
    hint = " (or pass --overwrite to replace it)" if direction == "herd-to-hf" else ""
    raise CheckpointError(f"{dest}: exists, is not empty and was not written by this command; choose a new "
                          f"or empty directory{hint}")
