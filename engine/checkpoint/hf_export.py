"""`herd convert herd-to-hf`: a herd checkpoint of any layout as a complete Hugging Face Llama directory.

The newest complete checkpoint is loaded into one process (its boxes are layout free: DCP reads the pieces any
tp / pp / cp / FSDP layout wrote into whole tensors) and written as safetensors shards with their index, a
config.json carrying the tokenizer's real bos/eos ids, a generation_config.json, and the tokenizer's files when the
run's tokenizer can be found. Everything is checked before anything is written, and the files are written into a
staging directory next to the destination that replaces it only once complete: a refused or failed export leaves
the destination as it was.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from engine.checkpoint.convert import (EXPORT_MARK, TOKEN_IDS, check_destination, check_model_size, check_token_ids,
                                       model_field)
from engine.checkpoint.manifest import configs_of
from engine.checkpoint.sharded import Box, load_sharded
from engine.checkpoint.staging import install_staged
from engine.checkpoint.ownership import LOCK
from engine.checkpoint.store import _STEP_DIR, MANIFEST, MARKER, CheckpointError, CheckpointStore
from engine.config import ModelConfig, TokenizerConfig
from engine.errors import ConfigError
from engine.hf_interop import herd_to_hf_name, hf_config_dict

BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
LLAMA3_BOS = 128000  # after Llama 3's 128,000 regular tokens: begin_of_text +0, end_of_text +1, eot_id +9

# herd's chat format (align/chat.py) as a transformers chat template: begin_of_text, then per message a header,
# the stripped content and eot; a generation prompt opens an assistant header.
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}"
                 "<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
                 "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


@dataclass
class Export:
    """What an export wrote, and what it could not (printed by `herd convert`)."""

    path: Path
    step: int
    tokenizer: Optional[str] = None  # where the tokenizer files came from, None if none were written
    notes: List[str] = field(default_factory=list)


def _hf_tokenizer_file(path: Path):
    from tokenizers import Tokenizer
    try:
        return Tokenizer.from_file(str(path)), path.read_bytes()
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise CheckpointError(f"{path}: the run's tokenizer is not a tokenizers JSON file "
                              f"({str(e).splitlines()[0]})") from None


def _llama3_tokenizer():
    from engine.checkpoint.tiktoken_json import llama3_tokenizers_json
    from tokenizers import Tokenizer
    text = llama3_tokenizers_json()
    return Tokenizer.from_str(text), text.encode("utf-8")


@dataclass
class TokenizerExport:
    files: Dict[str, bytes]  # tokenizer.json and tokenizer_config.json, or nothing
    bos: object  # config.json's bos_token_id / eos_token_id: an id, a list of ids, or None (null)
    eos: object
    stop: object  # generation_config.json's eos_token_id: where generation stops
    source: Optional[str] = None
    notes: List[str] = field(default_factory=list)


def export_tokenizer(tok_cfg: Optional[TokenizerConfig], meta: dict, model_cfg: ModelConfig) -> TokenizerExport:
    """The tokenizer files and special ids of the export. Without a tokenizer the ids are those an imported
    model's config.json had, or null: never transformers' defaults (1 and 2), which are other tokens in a Llama 3
    vocabulary."""
    if tok_cfg is None:
        ids = dict(meta.get(TOKEN_IDS) or {})
        bos, eos = ids.get("bos_token_id"), ids.get("eos_token_id")
        return TokenizerExport({}, bos, eos, eos, notes=[
            "no tokenizer files: an imported checkpoint does not hold its tokenizer; copy tokenizer.json and "
            "tokenizer_config.json from the model it was imported from"])
    if tok_cfg.kind == "llama3":
        try:
            tok, data = _llama3_tokenizer()
        except ConfigError as e:  # llama-models is not installed here; Llama 3's special ids are fixed
            return TokenizerExport({}, LLAMA3_BOS, LLAMA3_BOS + 1, [LLAMA3_BOS + 1, LLAMA3_BOS + 9], notes=[
                f"no tokenizer files: {e}"])
        source = "llama3 (the llama-models tokenizer file, converted to tokenizer.json)"
    else:
        path = Path(tok_cfg.path)
        if not path.is_file():
            what = "is not a file" if path.exists() else "is not there"
            return TokenizerExport({}, None, None, None, notes=[
                f"no tokenizer files: the run's tokenizer {path} {what} (relative paths are from the "
                f"directory herd runs in); bos_token_id and eos_token_id are null in config.json"])
        tok, data = _hf_tokenizer_file(path)
        source = str(path)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    if vocab > model_cfg.vocab_size:
        raise CheckpointError(f"{source}: the tokenizer has {vocab} tokens, more than the model's vocab_size "
                              f"{model_cfg.vocab_size}: not this model's tokenizer")
    special = {name: tok.token_to_id(name) for name in (BOS, EOS, EOT)}
    for name in (BOS, EOS):
        if special[name] is None:
            raise CheckpointError(f"{source}: the tokenizer has no '{name}' token")
    eos = [special[EOS]] + ([special[EOT]] if special[EOT] is not None else [])
    chat = all(tok.token_to_id(name) is not None for name in (EOT, "<|start_header_id|>", "<|end_header_id|>"))
    files = {"tokenizer.json": data, "tokenizer_config.json": _json({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
        "model_max_length": model_cfg.max_seq_len, "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        **({"chat_template": CHAT_TEMPLATE} if chat else {})})}
    return TokenizerExport(files, special[BOS], special[EOS], eos, source)


def _json(obj) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode("utf-8")


def load_weights(store: CheckpointStore, step: int, manifest: dict, model_cfg: ModelConfig) -> torch.nn.Module:
    """The checkpoint's model on one process (parameters only: buffers are not exported)."""
    from engine.model import build_meta_model
    model = build_meta_model(model_cfg).to_empty(device="cpu")
    boxes = {f"model.{n}": Box(p.data, (0,) * p.ndim, tuple(p.shape)) for n, p in model.named_parameters()}
    load_sharded(store.step_dir(step), boxes, manifest["files"])  # reads only what the manifest lists
    return model


def write_weights(model: torch.nn.Module, out: Path, max_shard_bytes: int) -> None:
    """The model as safetensors shards in `out` (with their index when there are several)."""
    from safetensors.torch import save_file
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
        save_file(shard, str(out / name), metadata={"format": "pt"})
    if len(shards) > 1:
        (out / "model.safetensors.index.json").write_bytes(_json({
            "metadata": {"total_size": sum(t.numel() * t.element_size() for s in shards for t in s.values())},
            "weight_map": {k: n for n, s in zip(names, shards) for k in s}}))


def _checkpoint_state(directory: Path, depth: Optional[int] = None) -> Optional[Path]:
    """The first herd checkpoint state found in `directory` or below it (up to `depth` levels when given;
    symlinks not followed): a checkpoint directory's lock file, or a step directory holding a manifest or commit
    marker. Replacing a directory deletes everything below it, so by default the whole tree is searched: the
    walk costs no more than the deletion it guards."""
    top = len(directory.parts)
    for here, dirs, names in os.walk(directory):
        if LOCK in names:
            return Path(here) / LOCK
        for name in dirs:
            step = Path(here) / name
            if _STEP_DIR.fullmatch(name) and ((step / MARKER).exists() or (step / MANIFEST).exists()):
                return step
        if depth is not None and len(Path(here).parts) - top >= depth:
            dirs[:] = []
    return None


def _refuse_replacing_a_parent(out_dir: Path, ckpt_root: Path) -> None:
    """Replacing the destination deletes what it held: never the checkpoint being exported, nor the directory
    herd runs in (or one above either), nor any run's checkpoints (a live run's locked directory, a run
    directory, or one above them), --overwrite or not."""
    dest = out_dir.resolve()
    for inside, what in ((Path(ckpt_root).resolve(), "the checkpoint being exported"),
                         (Path.cwd().resolve(), "the current directory")):
        if dest == inside or dest in inside.parents:
            raise CheckpointError(f"{out_dir}: holds {what}; an export replaces its destination, choose another")
    found = _checkpoint_state(dest)
    if found is not None:
        raise CheckpointError(f"{out_dir}: holds herd checkpoint state ({found}); an export replaces its "
                              f"destination, choose another")


def _install(files: Dict[str, bytes], write_more: Callable[[Path], None], out_dir: Path) -> None:
    """Write the files (and whatever write_more writes) into a staging directory that then takes out_dir's place
    (engine/checkpoint/staging.py): a failure to write is one line naming out_dir, and leaves out_dir as it was
    and no directory the export made."""
    from safetensors import SafetensorError

    def write(staging: Path) -> None:
        for name, data in files.items():
            with open(staging / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        write_more(staging)
    install_staged(out_dir, write, "export", (OSError, SafetensorError))


def export_hf(ckpt_root: Path, out_dir: Path, max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> Export:
    """Write the newest complete checkpoint under `ckpt_root` (any layout) as a HF Llama directory `out_dir`:
    a new or empty directory, an earlier export, or (overwrite=True) any directory, whose content is replaced."""
    out_dir = Path(out_dir)
    check_destination(out_dir, "herd-to-hf", overwrite)
    if Path(ckpt_root).resolve() in out_dir.resolve().parents:  # a run's purge would delete it with the step
        raise CheckpointError(f"{out_dir}: is inside the checkpoint being exported ({ckpt_root}); choose a "
                              f"directory outside it")
    if out_dir.exists():
        _refuse_replacing_a_parent(out_dir, Path(ckpt_root))
    store = CheckpointStore(Path(ckpt_root), keep_last=2)
    step = store.latest_step()
    if step is None:
        raise CheckpointError(f"{ckpt_root}: no complete checkpoint ({store.why_none_complete()})")
    manifest = store.verify(step)
    manifest_file = store.step_dir(step) / "manifest.json"
    model_cfg, tok_cfg = configs_of(manifest, manifest_file)  # checked: one line
    check_model_size(model_cfg, manifest_file, model_field(manifest))  # before a model of it is built
    check_token_ids(manifest, manifest_file)
    tok = export_tokenizer(tok_cfg, manifest["meta"], model_cfg)
    model = load_weights(store, step, manifest, model_cfg)  # before anything is written: a bad file refuses
    files = dict(tok.files)
    files["config.json"] = _json({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                  "torch_dtype": "float32", **hf_config_dict(model_cfg),
                                  "bos_token_id": tok.bos, "eos_token_id": tok.eos,
                                  EXPORT_MARK: {"step": step, "source": str(ckpt_root)}})
    # generation stops at end of text (a base model's documents) or at end of turn (a chat model's answers)
    files["generation_config.json"] = _json({"bos_token_id": tok.bos, "eos_token_id": tok.stop,
                                             "pad_token_id": tok.eos[0] if isinstance(tok.eos, list) else tok.eos})
    _install(files, lambda staging: write_weights(model, staging, max_shard_bytes), out_dir)
    return Export(out_dir, step, tok.source, tok.notes)
