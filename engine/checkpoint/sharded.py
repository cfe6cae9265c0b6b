"""Model and optimizer state through torch.distributed.checkpoint (DCP), in layout-free coordinates.

Each rank offers DCP its pieces of every parameter and of AdamW's two moments as `Box`es: the piece's place in
the full, unpadded tensor (Parallelized.checkpoint_box). DCP writes the boxes (one copy of each: replicas are
deduplicated by their offsets) and, on load, reads into each rank's boxes whatever saved boxes overlap them, so a
checkpoint written under any tp / pp / cp / dp_shard / dp_replicate layout loads under any other.

Only tensors go through DCP (no pickled objects: DCP would load those with full unpickling). DCP's own `.metadata`
file is a pickle, so it is read with an allowlist unpickler that can only build DCP's metadata classes, torch
sizes and dtypes: a planted payload fails to load instead of running (shared/TESTING.md R15).
"""

import io
import pickle
import warnings
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex, TensorProperties,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import LoadPlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from engine.checkpoint.store import CheckpointError, CheckpointStore
from engine.secrets import scrub
from parallel.parallelize import Parallelized

# DCP warns on every save and load outside a process group that it "assumes the intent is to save in a single
# process": herd's one-process runs, imports, exports and averages mean exactly that; two lines of stderr per
# checkpoint only hid the lines that matter
warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized",
                        category=UserWarning)

_SAFE_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"), ("builtins", "set"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),  # StorageMeta.checkpoint_id: a path, inert
}


class _AllowlistUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                  torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


class SafeReader(dcp.FileSystemReader):
    """FileSystemReader whose metadata pickle may only build DCP metadata (never arbitrary callables), and whose
    reads stay within the files the manifest lists: `files` is the verified manifest's {relative path: {bytes,
    sha256}}. DCP opens whatever `relative_path` each storage item names, so every one is checked before DCP
    plans a read: a listed plain file inside the step directory (no absolute path, `..` or symlink), the item's
    byte range inside its recorded size, no storage transforms (herd writes none)."""

    def __init__(self, path: str, files: Dict[str, dict]):
        super().__init__(path)
        self.files = files

    def read_metadata(self, *args: Any, **kwargs: Any):
        path = Path(self.path) / ".metadata"
        if ".metadata" not in self.files:
            raise CheckpointError(f"{path}: not listed in the manifest; refusing to read an unverified file")
        try:
            metadata = _AllowlistUnpickler(io.BytesIO(path.read_bytes())).load()
        except (pickle.UnpicklingError, AttributeError, EOFError, TypeError, ValueError, IndexError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"{path}: not a DCP metadata file ({reason})") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: not a DCP metadata file (holds a {type(metadata).__name__})")
        self.check_storage(metadata)
        if getattr(metadata, "storage_meta", None) is not None:
            metadata.storage_meta.load_id = self.load_id
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.check_storage(metadata)  # every rank, whichever rank read the metadata
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)

    def check_storage(self, metadata: Metadata) -> None:
        where = Path(self.path) / ".metadata"
        state = getattr(metadata, "state_dict_metadata", None)
        storage = getattr(metadata, "storage_data", None)
        if not isinstance(state, dict) or not isinstance(storage, dict):
            raise CheckpointError(f"{where}: field 'state_dict_metadata' / 'storage_data' must be a mapping")
        for index, info in storage.items():
            name = getattr(info, "relative_path", None)
            what = f"{where}: field 'storage_data[{getattr(index, 'fqn', '?')}]"
            if not isinstance(info, _StorageInfo) or not isinstance(name, str):
                raise CheckpointError(f"{what}' is not a storage entry with a relative path")
            if name not in self.files:
                raise CheckpointError(f"{what}.relative_path' names '{scrub(name)[:200]}', which the manifest does "
                                      f"not list; refusing to read an unverified file")
            CheckpointStore._inside(Path(self.path), name)  # no absolute path, `..` or symlink
            offset, length = info.offset, info.length
            if not (_is_count(offset) and _is_count(length)) or offset + length > self.files[name]["bytes"]:
                raise CheckpointError(f"{what}' reads bytes {offset!r}+{length!r} of '{name}', which has "
                                      f"{self.files[name]['bytes']}")
            if getattr(info, "transform_descriptors", None):
                raise CheckpointError(f"{what}.transform_descriptors' is set; herd writes no storage transforms")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class Box:
    """DCP's checkpointable protocol for one local piece of a full tensor: `tensor` sits at `offsets`."""

    def __init__(self, tensor: torch.Tensor, offsets: tuple, full_shape: tuple):
        self.tensor, self.offsets, self.full_shape = tensor, torch.Size(offsets), torch.Size(full_shape)

    def size(self) -> torch.Size:
        return self.full_shape

    def __create_write_items__(self, fqn: str, obj: Any):
        chunk = ChunkStorageMetadata(offsets=self.offsets, sizes=self.tensor.shape)
        return [WriteItem(index=MetadataIndex(fqn, self.offsets), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=chunk, size=self.full_shape,
                                                      properties=TensorProperties.create_from_tensor(self.tensor)))]

    def __create_chunk_list__(self):
        return [ChunkStorageMetadata(offsets=self.offsets, sizes=self.tensor.shape)]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        return self.tensor


class _BoxSavePlanner(dcp.DefaultSavePlanner):
    def lookup_object(self, index: MetadataIndex) -> Any:
        obj = self.state_dict[index.fqn]
        return obj.tensor if isinstance(obj, Box) else super().lookup_object(index)


class _BoxLoadPlanner(dcp.DefaultLoadPlanner):
    """Reads, for each local box, the parts of the saved boxes that overlap it (DCP's resharding). The state
    dict is flat and holds only boxes, so DCP's own set-up (which rebuilds tensor leaves) is skipped."""

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        self.original_state_dict = self.state_dict = state_dict
        self.metadata, self.is_coordinator = metadata, is_coordinator

    def create_local_plan(self) -> LoadPlan:
        requests = []
        saved = self.metadata.state_dict_metadata
        for fqn, box in self.state_dict.items():
            if fqn not in saved:
                raise CheckpointError(f"the checkpoint has no '{fqn}' (saved from another model?)")
            if not isinstance(saved[fqn], TensorStorageMetadata):
                raise CheckpointError(f"'{fqn}' is not a tensor in the checkpoint's metadata")
            if saved[fqn].size != box.full_shape:
                raise CheckpointError(f"'{fqn}' has shape {tuple(saved[fqn].size)} in the checkpoint, "
                                      f"{tuple(box.full_shape)} in this model")
            requests += create_read_items_for_chunk_list(fqn, saved[fqn], box.__create_chunk_list__())
        self.plan = LoadPlan(requests)
        return self.plan

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        obj = self.state_dict[index.fqn]
        return obj.tensor if isinstance(obj, Box) else super().lookup_tensor(index)


def param_key(param_name: str) -> str:
    return param_name.replace("_checkpoint_wrapped_module.", "")


def sharded_state(parallel: Parallelized, optimizer: Optional[torch.optim.Optimizer]) -> Dict[str, Box]:
    """`model.<name>`, `optim.<name>.exp_avg|exp_avg_sq|step` as boxes of this rank (views: loading fills them);
    model weights only when `optimizer` is None. A fused projection (wqkv, w13) is saved as its parts under the
    unfused names (wq/wk/wv, w1/w3; Parallelized.pieces), so what is on disk does not depend on the fusion."""
    state: Dict[str, Box] = {}
    for name, param in parallel.named_parameters():
        key = param_key(name)
        tensors = {"model": param}
        for moment in ("exp_avg", "exp_avg_sq") if optimizer is not None else ():
            if moment in optimizer.state.get(param, {}):
                tensors[moment] = optimizer.state[param][moment]
        for role, tensor in tensors.items():
            for piece in parallel.checkpoint_boxes(key, tensor):
                fqn = f"model.{piece.name}" if role == "model" else f"optim.{piece.name}.{role}"
                state[fqn] = Box(piece.local, piece.offsets, piece.full_shape)
        step = optimizer.state.get(param, {}).get("step") if optimizer is not None else None
        if step is not None:  # a scalar, equal everywhere (a fused parameter's parts share it)
            names = [part for _, part, _ in parallel.fused[key]] if key in parallel.fused else [key]
            for saved_name in names:
                state[f"optim.{saved_name}.step"] = Box(step.view(1), (0,), (1,))
    return state


def saved_shape(root: Path, fqn: str) -> Optional[tuple]:
    """The full shape of tensor `fqn` (e.g. 'model.output.weight') in the newest complete checkpoint under `root`,
    read from its verified DCP metadata only; None when there is no such checkpoint or tensor."""
    store = CheckpointStore(Path(root))
    step = store.latest_step()
    if step is None:
        return None
    files = store.verify(step, only=(".metadata",)).get("files", {})  # the one file read here, not the shards
    entry = SafeReader(str(store.step_dir(step)), files).read_metadata().state_dict_metadata.get(fqn)
    return tuple(entry.size) if isinstance(entry, TensorStorageMetadata) else None


class _Writer(dcp.FileSystemWriter):
    """DCP records the checkpoint's path in `.metadata` (StorageMeta.checkpoint_id); a path can hold a secret
    value (R17), so it is scrubbed. Loading never reads it."""

    def storage_meta(self):
        meta = super().storage_meta()
        if meta is not None and meta.checkpoint_id is not None:
            meta.checkpoint_id = scrub(str(meta.checkpoint_id))
        return meta


def save_sharded(path: Path, state: Dict[str, Box], process_group: Optional[Any] = None) -> None:
    dcp.save(state, storage_writer=_Writer(str(path), sync_files=True), planner=_BoxSavePlanner(flatten_state_dict=False),
             process_group=process_group)


@torch.no_grad()
def load_sharded(path: Path, state: Dict[str, Box], files: Dict[str, dict], process_group: Optional[Any] = None
                 ) -> None:
    """Fill this rank's boxes from the checkpoint at `path`, already verified against its manifest, whose
    `files` bound what may be read (SafeReader)."""
    SafeReader(str(path), files).read_metadata()  # a bad metadata file fails here, with its name, on every rank
    try:
        dcp.load(state, storage_reader=SafeReader(str(path), files),
                 planner=_BoxLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False),
                 process_group=process_group)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # DCP wraps rank failures in its own exception types
        inner = _inner_checkpoint_error(e)
        if inner is not None:  # a check in the reader or planner, raised on some rank: its own line
            raise inner from None
        message = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot load into this model: {message}") from None


def _inner_checkpoint_error(error: BaseException) -> Optional[CheckpointError]:
    """The CheckpointError that DCP wrapped in its CheckpointException (failures by rank), if any."""
    for failure in getattr(error, "failures", {}).values():  # rank -> (exception, traceback)
        exception = failure[0] if isinstance(failure, tuple) and failure else failure
        if isinstance(exception, CheckpointError):
            return exception
    return error.__cause__ if isinstance(error.__cause__, CheckpointError) else None
