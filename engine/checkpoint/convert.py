"""`herd convert`: HF Llama checkpoints <-> herd checkpoints.

Import reads a HF directory (config.json and model.safetensors, or shards listed by model.safetensors.index.json;
pickle-based .bin weights are refused) and writes a committed, weights-only herd checkpoint at step 0 whose
boxes are the full tensors, so any layout loads it (`checkpoint.load_weights=<dir>`). A config that herd cannot
compute exactly (another activation, biases, another RoPE scaling...) is refused, naming the key, rather than
converted into another model. Export is engine/checkpoint/hf_export.py. herd's RoPE uses HF's half-split layout,
so q/k need no permutation.
"""

import dataclasses
import json
from pathlib import Path
from typing import Dict, Tuple

import torch

from engine.checkpoint.sharded import Box, save_sharded
from engine.checkpoint.store import CheckpointError, CheckpointStore, describe_files
from engine.config import ModelConfig, RopeScalingConfig, validate_model
from engine.config_checks import check_directory
from engine.errors import ConfigError
from engine.hf_interop import herd_to_hf_name, hf_to_herd_name
from engine.model import build_meta_model


_HF_INTS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


def read_json(path: Path, what: str) -> object:
    """A JSON file's content, or one line naming the file (not JSON, not UTF-8, unreadable)."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: nested too deep
        raise CheckpointError(f"{path}: not a valid {what} ({str(e).splitlines()[0]})") from None


def _hf_number(config: dict, key: str, source: Path, kind: type, default=None):
    """config[key] as a positive int (kind=int) or finite positive float, else one line naming the key."""
    import math
    value = config.get(key, default)
    if value is None and default is None:
        raise CheckpointError(f"{source}: missing key '{key}'")
    number_ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int and not (isinstance(value, int) and not isinstance(value, bool)):
        number_ok = False
    if not number_ok or not math.isfinite(value) or value <= 0:
        raise CheckpointError(f"{source}: '{key}' must be a positive {'integer' if kind is int else 'number'}, "
                              f"got {value!r}")
    return value


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
        refuse("rope_scaling" if "rope_scaling" in config and "rope_parameters" not in config else
               "rope_parameters", {"rope_type": rope_type}, "plain RoPE or Llama 3.1 scaling ('llama3')")
    heads, hidden = config.get("num_attention_heads"), config.get("hidden_size")
    head_dim = config.get("head_dim")
    if head_dim is not None and isinstance(heads, int) and isinstance(hidden, int) and heads > 0 \
            and head_dim != hidden // heads:
        refuse("head_dim", head_dim, f"heads of hidden_size / num_attention_heads = {hidden // heads}")


def model_config_from_hf(config: object, source: Path) -> ModelConfig:
    """herd's ModelConfig for a transformers LlamaConfig dict (one-line error naming the file and key)."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: must hold a JSON object (a transformers LlamaConfig)")
    # transformers 5 keeps theta and scaling in rope_parameters; 4.x in rope_theta and rope_scaling
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise CheckpointError(f"{source}: 'rope_scaling' / 'rope_parameters' must be an object, got {rope!r}")
    refuse_inexact(config, rope, source)
    ints = {key: _hf_number(config, key, source, int) for key in _HF_INTS}
    heads = ints["num_attention_heads"]
    theta = _hf_number({"rope_theta": config.get("rope_theta", rope.get("rope_theta", 10000.0))}, "rope_theta",
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


def _weight_files(hf_dir: Path) -> list:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, "safetensors index")
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: 'weight_map' must be an object of tensor name -> file name")
        names = sorted(set(weight_map.values()))
    elif (hf_dir / "model.safetensors").is_file():
        names = ["model.safetensors"]
    elif list(hf_dir.glob("*.bin")):
        raise CheckpointError(f"{hf_dir}: only pickle-based .bin weights found; herd loads safetensors only "
                              f"(they cannot run code); convert them with transformers' save_pretrained")
    else:
        raise CheckpointError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
    files = []
    for name in names:
        path = hf_dir / name
        if Path(name).name != name or path.is_symlink() or not path.is_file():
            raise CheckpointError(f"{hf_dir}: weight file '{name}' is missing or not a plain file in the directory")
        files.append(path)
    return files


def _load_safetensors(file: Path) -> Dict[str, torch.Tensor]:
    """Every tensor of one file; a truncated or garbage file is one line naming it (safetensors parses only its
    own header: no code runs)."""
    from safetensors.torch import load_file
    try:
        return load_file(str(file))
    except Exception as e:  # SafetensorError, and OSError for a file cut inside a tensor
        raise CheckpointError(f"{file}: not a readable safetensors file ({str(e).splitlines()[0]})") from None


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
    state = {}
    for file in _weight_files(hf_dir):
        for name, tensor in _load_safetensors(file).items():
            if name.endswith("rotary_emb.inv_freq"):
                continue
            try:
                state[hf_to_herd_name(name)] = tensor.float()
            except KeyError:
                raise CheckpointError(f"{file}: unexpected tensor '{name}' for a Llama model") from None
    if raw.get("tie_word_embeddings") and "tok_embeddings.weight" in state:
        # transformers computes a tied head with the embedding (a saved lm_head is ignored); herd's head is untied,
        # so it starts as a copy: the same function at step 0
        state["output.weight"] = state["tok_embeddings.weight"].clone()
    expected = {n: tuple(p.shape) for n, p in build_meta_model(model_cfg).named_parameters()}
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{hf_dir}: weights missing for {missing[0]} (and {len(missing) - 1} more)")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise CheckpointError(f"{hf_dir}: {herd_to_hf_name(name)} has shape {tuple(state[name].shape)}, "
                                  f"config.json implies {shape}")
    return model_cfg, state


def import_hf(hf_dir: Path, out_root: Path) -> Path:
    """Write a weights-only herd checkpoint (step 0) of the HF model at `hf_dir` into `out_root`."""
    model_cfg, state = read_hf(Path(hf_dir))
    store = CheckpointStore(Path(out_root), keep_last=2)
    path = store.begin(0)
    save_sharded(path, {f"model.{k}": Box(v, (0,) * v.ndim, tuple(v.shape)) for k, v in state.items()})
    files = describe_files(path, [f for f in path.rglob("*") if f.is_file()])
    store.commit(0, files, {"step": 0, "weights_only": True, "model": dataclasses.asdict(model_cfg),
                            "source": str(hf_dir), TOKEN_IDS: hf_token_ids(Path(hf_dir) / "config.json")})
    return path


TOKEN_IDS = "hf_token_ids"  # an imported checkpoint's meta: the source's bos/eos ids, which export writes back


def hf_token_ids(config_file: Path) -> dict:
    """bos_token_id / eos_token_id of a HF config.json (an id or a list of ids each; absent keys left out)."""
    raw = read_json(config_file, "config.json")
    out = {}
    for key in ("bos_token_id", "eos_token_id"):
        value = raw.get(key)
        ids = value if isinstance(value, list) else [value]
        if ids and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            out[key] = value
    return out


EXPORT_MARK = "herd_export"  # a config.json key: this directory is an earlier export, which may be replaced


def check_destination(dest: Path, direction: str, overwrite: bool = False) -> None:
    """Conversions write only into a new or empty directory, or over their own earlier export (R21): never
    into a directory of the user's, nor over a file, unless an export is asked to overwrite that directory."""
    dest = Path(dest)
    if dest.is_symlink():
        raise CheckpointError(f"{dest}: is a symbolic link; choose a new destination")
    check_directory(str(dest), "dest")  # neither a file nor under one
    if not dest.exists() or not any(dest.iterdir()):
        return
    if direction == "herd-to-hf":
        if overwrite:
            return
        if (dest / "config.json").is_file():
            config = read_json(dest / "config.json", "config.json")
            if isinstance(config, dict) and EXPORT_MARK in config:
                return
    hint = " (or pass --overwrite to replace it)" if direction == "herd-to-hf" else ""
    raise CheckpointError(f"{dest}: exists, is not empty and was not written by this command; choose a new "
                          f"or empty directory{hint}")
