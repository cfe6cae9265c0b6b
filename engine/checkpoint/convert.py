"""`herd convert`: HF Llama checkpoints <-> herd checkpoints.

Import reads a HF directory (config.json and model.safetensors, or shards listed by model.safetensors.index.json;
pickle-based .bin weights are refused) and writes a committed, weights-only herd checkpoint at step 0 whose
boxes are the full tensors, so any layout loads it (`checkpoint.load_weights=<dir>`). Export loads the newest
complete herd checkpoint (any layout wrote it) into one process and writes safetensors shards, their index and a
config.json that `transformers` loads. herd's RoPE uses HF's half-split layout, so q/k need no permutation.
"""

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Dict, Tuple

import torch

from engine.checkpoint.sharded import Box, load_sharded, save_sharded
from engine.checkpoint.store import CheckpointError, CheckpointStore, describe_files
from engine.config import ModelConfig, RopeScalingConfig, load_config
from engine.hf_interop import herd_to_hf_name, hf_config_dict, hf_to_herd_name
from engine.model import build_meta_model


def model_config_from_hf(config: dict, source: Path) -> ModelConfig:
    """herd's ModelConfig for a transformers LlamaConfig dict (one-line error naming the file and key)."""
    try:
        # transformers 5 keeps theta and scaling in rope_parameters; 4.x in rope_theta and rope_scaling
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        theta = config.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = RopeScalingConfig()
        if rope.get("rope_type", rope.get("type")) == "llama3":
            scaling = RopeScalingConfig(True, rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"],
                                        rope["original_max_position_embeddings"])
        return ModelConfig(name=config.get("_name_or_path") or "hf", dim=config["hidden_size"],
                           n_layers=config["num_hidden_layers"], n_heads=config["num_attention_heads"],
                           n_kv_heads=config.get("num_key_value_heads", config["num_attention_heads"]),
                           ffn_dim=config["intermediate_size"], vocab_size=config["vocab_size"],
                           norm_eps=config.get("rms_norm_eps", 1e-6), rope_theta=theta,
                           rope_scaling=scaling, max_seq_len=config.get("max_position_embeddings", 8192))
    except KeyError as e:
        raise CheckpointError(f"{source}: missing key {e} in config.json") from None


def _weight_files(hf_dir: Path) -> list:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
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


def read_hf(hf_dir: Path) -> Tuple[ModelConfig, Dict[str, torch.Tensor]]:
    """The model config and every weight under its herd name, as fp32 full tensors."""
    from safetensors.torch import load_file
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise CheckpointError(f"{hf_dir}: no config.json")
    raw = json.loads((hf_dir / "config.json").read_text())
    model_cfg = model_config_from_hf(raw, hf_dir / "config.json")
    state = {}
    for file in _weight_files(hf_dir):
        for name, tensor in load_file(str(file)).items():
            if name.endswith("rotary_emb.inv_freq"):
                continue
            try:
                state[hf_to_herd_name(name)] = tensor.float()
            except KeyError:
                raise CheckpointError(f"{file}: unexpected tensor '{name}' for a Llama model") from None
    if "output.weight" not in state and raw.get("tie_word_embeddings"):
        state["output.weight"] = state["tok_embeddings.weight"].clone()  # herd's head is untied: copy it
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
                            "source": str(hf_dir)})
    return path


def _model_config_of(manifest: dict) -> ModelConfig:
    meta = manifest["meta"]
    if "model" in meta:
        m = dict(meta["model"])
        m["rope_scaling"] = RopeScalingConfig(**m["rope_scaling"])
        return ModelConfig(**m)
    with tempfile.TemporaryDirectory() as tmp:  # a training checkpoint: the run's resolved config
        (Path(tmp) / "config.yaml").write_text(meta["config"])
        return load_config(str(Path(tmp) / "config.yaml"), ["data.train=[]", "data.valid=[]"]).model


def export_hf(ckpt_root: Path, out_dir: Path, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write the newest complete checkpoint under `ckpt_root` as a HF Llama directory."""
    from safetensors.torch import save_file
    store = CheckpointStore(Path(ckpt_root), keep_last=2)
    step = store.latest_step()
    if step is None:
        raise CheckpointError(f"{ckpt_root}: no complete checkpoint")
    model_cfg = _model_config_of(store.verify(step))
    model = build_meta_model(model_cfg).to_empty(device="cpu")
    boxes = {f"model.{n}": Box(p.data, (0,) * p.ndim, tuple(p.shape)) for n, p in model.named_parameters()}
    load_sharded(store.step_dir(step), boxes)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards, current, size = [], {}, 0
    for name, param in model.named_parameters():
        tensor = param.detach().contiguous()
        if current and size + tensor.numel() * tensor.element_size() > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[herd_to_hf_name(name)] = tensor
        size += tensor.numel() * tensor.element_size()
    shards.append(current)
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for s in shards for t in s.values())},
                 "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32",
              **hf_config_dict(model_cfg)}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir
