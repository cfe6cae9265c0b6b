"""The one place that spreads a plain model over the mesh, in a fixed order:

    1. pipeline parallelism: split into stages (parallel/pipeline_parallel.py); steps 2-7 apply to each stage
    2. context parallelism: attention across cp shards (parallel/context_parallel.py)
    3. tensor + sequence parallelism (parallel/tensor_parallel.py)
    4. FP8 linears (the engine swaps them in before parallelize: engine/fp8)
    5. activation checkpointing (full, or every n-th block)
    6. torch.compile, per transformer block (options.compile)
    7. data parallelism: FSDP2 / HSDP (parallel/data_parallel.py)

Stages are cut first (every later step works on a stage module), TP must come before FSDP (FSDP shards the TP
shards), activation checkpointing wraps the TP-sharded blocks, compile takes each block as the steps before left it
(its TP hooks and checkpoint wrapper are traced with it), and FSDP goes last so its units are the final blocks.
`Parallelized` carries what the training step needs of the layout: the loss over vocabulary shards, the dp
reductions, gradient sync and the global gradient norm.
"""

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.utils.checkpoint import checkpoint

from parallel.context_parallel import apply_context_parallel
from parallel.data_parallel import apply_fsdp
from parallel.mesh import Mesh
from parallel.pipeline_parallel import Pipeline, split_layers, stage_module, stage_to_rank
from parallel.tensor_parallel import TPPlan, apply_tensor_parallel, tp_local


@dataclass
class ParallelizeOptions:
    sequence_parallel: bool = True
    activation_checkpointing: str = "none"  # none | full | selective (every `ac_every`-th block)
    ac_every: int = 2
    param_dtype: Optional[torch.dtype] = None  # FSDP compute dtype (None: keep fp32)
    reshard_after_forward: bool = True  # ignored under pp (parameters stay gathered across microbatches)
    pp_schedule: str = "1F1B"
    pp_virtual_stages: int = 1
    pp_layers: Tuple[int, ...] = ()
    pp_embedding_cost: float = 1.0
    pp_head_cost: float = 1.0
    pp_microbatches: int = 1  # microbatches per step on each rank (the schedule's n_microbatches)
    cp_attention: str = "all_gather"
    compile: bool = False  # torch.compile each transformer block (step 6)
    # block -> torch.utils.checkpoint context_fn or None: what a recomputed forward must repeat of its forward
    # (engine/fp8 recompute_contexts: the delayed FP8 scales it used); the engine passes it, parallel/ knows no FP8
    recompute_contexts: Optional[Callable[[nn.Module], Optional[Callable]]] = None


def recomputed(index: int, mode: str, every: int) -> bool:
    """Whether activation checkpointing recomputes block `index` (global layer index)."""
    return mode == "full" or (mode == "selective" and index % every == 0)


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int,
                                   recompute_contexts: Optional[Callable[[nn.Module], Optional[Callable]]] = None
                                   ) -> None:
    """Recompute a block's activations in backward instead of storing them (keeps parameter names). Selective
    picks blocks by global layer index, so the same blocks recompute under any pipeline split."""
    for index, block in model.layers.items():
        if recomputed(int(index), mode, every):
            contexts = recompute_contexts(block) if recompute_contexts is not None else None
            block.forward = _checkpointed(block.forward, {"context_fn": contexts} if contexts is not None else {})


def _checkpointed(forward: Callable, options: dict) -> Callable:
    """The block's forward under non-reentrant checkpointing; apply_compile finds `forward` and `options` on it."""
    def checkpointed_forward(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **options, **kwargs)
    checkpointed_forward.herd_checkpointed = (forward, options)
    return checkpointed_forward


def apply_compile(model: nn.Module) -> None:
    """torch.compile every transformer block of `model` in place (the block stays in its ModuleDict, so parameter
    names get no `_orig_mod.` prefix and checkpoints are unchanged).

    Per block, as torchtitan does, not the whole model: the blocks run the same code, so dynamo compiles the block
    once and reuses the graph for every layer (compile time does not grow with depth), and FSDP's per-block
    hooks stay at block boundaries (dynamo runs FSDP2's hooks eagerly). The tensor-parallel collectives inside a
    block are autograd Functions calling c10d: where dynamo cannot trace one it splits the graph there and runs
    it eagerly, which costs speed, never correctness. Compiled kernels fuse and reorder float operations, so
    results equal eager ones to rounding, not bitwise (tests/distributed/test_parity_compile.py states the bound).

    A checkpointed block (apply_activation_checkpointing) is compiled inside its checkpoint: the checkpoint stays
    eager around the compiled forward and the recomputation runs the same compiled graphs. Compiled around the
    checkpoint, dynamo would take it as a higher-order op that cannot hold a graph break, and a block holds some
    (document-masked attention, native FP8's GEMMs): such blocks would run wholly eager. (`block.compile()` over a
    forward that calls checkpoint directly compiles nothing at all: dynamo starts at the first frame below the
    module call, torch.utils.checkpoint's, which it does not trace.) Eager, the checkpoint also keeps its
    `context_fn` (the delayed FP8 replay), which dynamo refuses.
    """
    for block in model.layers.values():
        checkpointed = getattr(block.forward, "herd_checkpointed", None)
        if checkpointed is None:
            block.compile()
        else:
            forward, options = checkpointed
            block.forward = _checkpointed(torch.compile(forward), options)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class Piece(NamedTuple):
    """A piece of this rank's tensor in layout-free coordinates: rows [offsets, offsets + local.shape) of the full
    tensor `name` (a fused projection's tensor is several pieces, one per part, under the unfused names)."""

    name: str  # the parameter's checkpoint name (wq/wk/wv, w1/w3 for the parts of wqkv, w13)
    local: torch.Tensor  # a view of this rank's tensor
    offsets: tuple  # where `local` starts in the full tensor
    full_shape: tuple  # the full tensor's shape (unpadded)
    copies: int  # consecutive tp ranks holding the same values (KV heads shared by several tp ranks)


def fused_parameters(parts: List[nn.Module]) -> Dict[str, Tuple[Tuple[str, str, int], ...]]:
    """Fused projections (modules with `fused_parts`, engine/model/llama.py fused_linear): parameter name -> its
    parts in row order as (part, the unfused parameter's name, full rows)."""
    fused = {}
    for part in parts:
        for module_name, module in part.named_modules():
            if getattr(module, "fused_parts", None):
                parent = _fqn(module_name).rpartition(".")[0]
                fused[_fqn(f"{module_name}.weight")] = tuple((short, f"{parent}.{short}.weight", rows)
                                                             for short, rows in module.fused_parts)
    return fused


class Parallelized:
    """A model after parallelize(): this rank's stage modules (`parts`; one without pipeline parallelism), the
    pipeline that runs them, and the layout-aware pieces of a training step.

    A fused projection (wqkv, w13) is one parameter here but several tensors outside: checkpoints, full_parameters
    and exports see its parts under the unfused names (wq/wk/wv, w1/w3) in the unfused model's coordinates, so a
    checkpoint written fused resumes unfused and the other way round, under any layout (`pieces`)."""

    def __init__(self, parts: List[nn.Module], mesh: Optional[Mesh], tp_plan: Optional[TPPlan], fsdp: bool,
                 loss_sum: Callable, pipeline: Optional[Pipeline] = None):
        self.parts, self.mesh, self.tp_plan, self.fsdp = parts, mesh, tp_plan, fsdp
        self.loss_sum, self.pipeline = loss_sum, pipeline
        self.fused = fused_parameters(parts)
        # FSDP averages gradients over dp x cp; a loss already normalized by the global token count needs the sum
        self.loss_scale = float(mesh.data_ranks) if fsdp else 1.0

    @property
    def model(self) -> nn.Module:
        """The whole model (without pipeline parallelism, where it is the only part)."""
        if self.pipeline is not None:
            raise RuntimeError("under pipeline parallelism the model is split into parts; run it via .pipeline")
        return self.parts[0]

    def named_parameters(self) -> Iterator[Tuple[str, nn.Parameter]]:
        for part in self.parts:
            yield from part.named_parameters()

    def parameters(self) -> List[nn.Parameter]:
        return [p for _, p in self.named_parameters()]

    def train(self, mode: bool = True) -> None:
        for part in self.parts:
            part.train(mode)

    def sum_over_data(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks that hold different tokens, dp x cp (identity on one process)."""
        if self.mesh is not None and self.mesh.data_ranks > 1:
            dist.all_reduce(value, group=self.mesh.data_mesh.get_group())
        return value

    def set_gradient_sync(self, enabled: bool) -> None:
        """FSDP reduce-scatters only on the last micro-batch of a step; earlier ones accumulate locally (under pp
        the pipeline stage does this itself)."""
        if self.fsdp and self.pipeline is None:
            self.model.set_requires_gradient_sync(enabled)

    def finish_gradients(self) -> None:
        """Sum the gradients that tp ranks computed only in part: sequence-parallel norm weights (each saw one
        sequence chunk) over all of tp, and shared KV heads (each rank saw its own query heads) over the ranks
        sharing the head."""
        if self.tp_plan is None:
            return
        names = set(self.tp_plan.partial_grad_names)
        for name, param in self.named_parameters():
            if param.grad is None:
                continue
            info = self.tp_plan.shards.get(_fqn(name))
            if _fqn(name) in names:
                dist.all_reduce(_local(param.grad), group=self.tp_plan.group)
            elif info is not None and info.replicas > 1:
                self._sum_over_replicas(_local(param.grad), info.replicas)
            elif _fqn(name) in self.fused:  # the K and V rows of a fused wqkv, when KV heads are shared
                for piece in self.pieces(name, param.grad):
                    if piece.copies > 1:
                        self._sum_over_replicas(piece.local, piece.copies)

    def _sum_over_replicas(self, grad: torch.Tensor, replicas: int) -> None:
        """Each rank puts its gradient in its KV head's slot of a [heads, ...] buffer; one all-reduce over tp sums
        every head's copies (KV weights are small under GQA, so the zero slots cost little)."""
        group = self.tp_plan.group
        head, heads = dist.get_rank(group) // replicas, dist.get_world_size(group) // replicas
        buffer = grad.new_zeros((heads, *grad.shape))
        buffer[head] = grad
        dist.all_reduce(buffer, group=group)
        grad.copy_(buffer[head])

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Global L2 norm over every gradient of the model, counted once whatever the layout; clip to max_norm.

        Each distinct gradient element is counted on exactly one rank: TP-replicated parameters only on tp rank
        0, HSDP replicas only on dp_replicate rank 0 (FSDP shards over dp_shard x cp are disjoint, pipeline
        stages hold disjoint parameters); the squares are then summed over the world.
        """
        params = [p for p in self.parameters() if p.grad is not None]
        if self.mesh is None:
            return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf, foreach=True)
        copies = self._tp_copies()
        tp_rank, replica = self.mesh.rank("tp"), self.mesh.rank("dp_replicate")
        squares = torch.zeros((), device=params[0].device, dtype=torch.float32)
        fused = {id(p): name for name, p in self.named_parameters() if _fqn(name) in self.fused}
        for p in params:
            if id(p) in fused:  # per part: K/V rows may be held by several tp ranks, Q rows by one
                for piece in self.pieces(fused[id(p)], p.grad):
                    if replica == 0 and tp_rank % piece.copies == 0:
                        squares += piece.local.float().pow(2).sum()
            elif replica == 0 and tp_rank % copies.get(id(p), 1) == 0:
                squares += _local(p.grad).float().pow(2).sum()
        dist.all_reduce(squares)
        norm = squares.sqrt()
        if max_norm > 0:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for p in params:
                _local(p.grad).mul_(coef)
        return norm

    def _tp_copies(self) -> Dict[int, int]:
        """id(parameter) -> how many consecutive tp ranks hold the same values (all of tp for replicated ones)."""
        if self.tp_plan is None:
            return {}
        tp = dist.get_world_size(self.tp_plan.group)
        return {id(p): (self.tp_plan.shards[_fqn(n)].replicas if _fqn(n) in self.tp_plan.shards else tp)
                for n, p in self.named_parameters()}

    def full_shape(self, name: str, param: torch.Tensor) -> tuple:
        """The unsharded shape of a parameter (its tensor-parallel full shape; FSDP's DTensor shape is already
        unsharded over dp)."""
        info = self.tp_plan.shards.get(_fqn(name)) if self.tp_plan is not None else None
        return info.full_shape if info is not None else tuple(param.shape)

    def init_parameter(self, name: str, param: torch.Tensor, full: torch.Tensor) -> None:
        """Copy this rank's part of `full` into `param`: its tensor-parallel cut, then its FSDP shard."""
        info = self.tp_plan.shards.get(_fqn(name)) if self.tp_plan is not None else None
        local = tp_local(full, info, self.tp_plan.group) if info is not None else full
        if isinstance(param, DTensor):  # every rank holds the same value: cut locally, no communication
            local = distribute_tensor(local, param.device_mesh, param.placements, src_data_rank=None).to_local()
        _local(param).copy_(local)

    def checkpoint_box(self, name: str, tensor: torch.Tensor) -> Optional[Tuple[torch.Tensor, tuple, tuple]]:
        """This rank's piece of parameter `name` (or of optimizer state shaped like it) as a box of the full,
        unpadded tensor: (local view, offsets, full shape), or None when the rank holds only padding.

        The box is the FSDP shard's place inside the tensor-parallel shard, plus the tp shard's place inside the
        full tensor (consecutive tp ranks sharing a KV head share a box), clipped to the unpadded vocabulary.
        Boxes are layout-free coordinates, so a checkpoint written under one layout loads under any other.
        """
        local = _local(tensor)
        offsets = [0] * local.ndim
        if isinstance(tensor, DTensor):
            _, global_offsets = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh,
                                                                      tensor.placements)
            offsets = list(global_offsets)
        info = self.tp_plan.shards.get(_fqn(name)) if self.tp_plan is not None else None
        full_shape = tuple(info.full_shape) if info is not None else tuple(tensor.shape)
        if info is not None and info.dim is not None:
            index = dist.get_rank(self.tp_plan.group) // info.replicas
            offsets[info.dim] += index * tensor.shape[info.dim]
        sizes = [max(0, min(o + n, f) - o) for o, n, f in zip(offsets, local.shape, full_shape)]
        if any(n == 0 for n in sizes):
            return None
        return local[tuple(slice(0, n) for n in sizes)], tuple(offsets), full_shape

    def checkpoint_boxes(self, name: str, tensor: torch.Tensor) -> List[Piece]:
        """checkpoint_box for any parameter: one piece (none when only padding), or a fused one's parts."""
        if _fqn(name) in self.fused:
            return self.pieces(name, tensor)
        box = self.checkpoint_box(name, tensor)
        return [] if box is None else [Piece(_fqn(name), *box, copies=1)]

    def pieces(self, name: str, tensor: torch.Tensor) -> List[Piece]:
        """The parts of fused parameter `name` (or of its gradient or optimizer state) that this rank's `tensor`
        holds. Tensor parallelism gives each rank [part_0 chunk; part_1 chunk; ...] (parallel/tensor_parallel.py
        _shard_fused) and FSDP rows [first, first + held) of that; each part's overlap with those rows is one
        piece, placed at its chunk's offset inside the unfused parameter."""
        local, first = _local(tensor), 0
        if isinstance(tensor, DTensor):
            first = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)[1][0]
        info = self.tp_plan.shards.get(_fqn(name)) if self.tp_plan is not None else None
        tp, tp_rank = (dist.get_world_size(self.tp_plan.group), dist.get_rank(self.tp_plan.group)) \
            if info is not None else (1, 0)
        replicas = {short: r for short, _, r in info.parts} if info is not None else {}
        pieces, start = [], 0
        for short, part, rows in self.fused[_fqn(name)]:
            copies = replicas.get(short, 1)
            chunk = rows // (tp // copies)  # this part's rows in the tp shard
            lo, hi = max(first, start), min(first + local.shape[0], start + chunk)
            if hi > lo:
                offsets = ((tp_rank // copies) * chunk + lo - start,) + (0,) * (local.ndim - 1)
                pieces.append(Piece(part, local.narrow(0, lo - first, hi - lo), offsets,
                                    (rows, *tensor.shape[1:]), copies))
            start += chunk
        return pieces

    def _unfuse(self, name: str, value: torch.Tensor, info) -> Dict[str, torch.Tensor]:
        """The full tensors of a fused parameter's parts from this rank's tp shard `value` (a collective over tp)."""
        shards = [value]
        if info is not None:
            shards = [torch.empty_like(value) for _ in range(dist.get_world_size(self.tp_plan.group))]
            dist.all_gather(shards, value.contiguous(), group=self.tp_plan.group)
        replicas = {short: r for short, _, r in info.parts} if info is not None else {}
        out, start = {}, 0
        for short, part, rows in self.fused[name]:
            copies = replicas.get(short, 1)
            chunk = rows // (len(shards) // copies)
            out[part] = torch.cat([s.narrow(0, start, chunk) for s in shards[::copies]]).detach().clone()
            start += chunk
        return out

    def full_parameters(self) -> Dict[str, torch.Tensor]:
        """Every parameter as its full, unsharded, unpadded tensor, on every rank (a collective: call on all); a
        fused projection's parts under their unfused names."""
        full = {}
        for name, p in self.named_parameters():
            value = p.full_tensor() if isinstance(p, DTensor) else p.detach()
            info = self.tp_plan.shards.get(_fqn(name)) if self.tp_plan is not None else None
            if _fqn(name) in self.fused:
                full.update(self._unfuse(_fqn(name), value, info))
                continue
            if info is not None and info.dim is not None:
                parts = [torch.empty_like(value) for _ in range(dist.get_world_size(self.tp_plan.group))]
                dist.all_gather(parts, value.contiguous(), group=self.tp_plan.group)
                value = torch.cat(parts[::info.replicas], dim=info.dim).narrow(info.dim, 0, info.full_size)
            full[_fqn(name)] = value.detach().clone()
        if self.pipeline is not None:  # each pp rank holds other layers: exchange them
            stages: List[Dict[str, torch.Tensor]] = [{} for _ in range(self.mesh.dims.pp)]
            dist.all_gather_object(stages, {k: v.cpu() for k, v in full.items()}, group=self.mesh.group("pp"))
            full = {k: v.to(self.parts[0].rope.cos.device) for stage in stages for k, v in stage.items()}
        return full


def _fqn(name: str) -> str:
    """The model's own parameter name, without wrapper prefixes."""
    return name.replace("_checkpoint_wrapped_module.", "")


def _split_stages(model: nn.Module, mesh: Mesh, options: ParallelizeOptions) -> Tuple[List[nn.Module], List[int],
                                                                                         List[int], int]:
    """This pp rank's stage modules, their stage indices, every stage's rank, and the number of stages."""
    n_stages = mesh.dims.pp * options.pp_virtual_stages
    layers = split_layers(model.cfg.n_layers, n_stages, options.pp_embedding_cost, options.pp_head_cost,
                          list(options.pp_layers))
    ranks = stage_to_rank(n_stages, mesh.dims.pp, options.pp_schedule)
    mine = [s for s in range(n_stages) if ranks[s] == mesh.rank("pp")]
    parts = [stage_module(model, layers[s], s == 0, s == n_stages - 1) for s in mine]
    return parts, mine, ranks, n_stages


def parallelize(model: nn.Module, mesh: Optional[Mesh], options: ParallelizeOptions,
                reference_loss_sum: Callable) -> Parallelized:
    """Apply the dimensions of `mesh` to `model` in the fixed order above. The model may be on the meta device
    (then materialize with `to_empty` and initialize through `init_parameter`) or already initialized."""
    pp = mesh is not None and mesh.dims.pp > 1
    parts, stage_ids, ranks, n_stages = _split_stages(model, mesh, options) if pp else ([model], [0], [0], 1)
    tp_plan, loss_sum = None, reference_loss_sum
    fsdp = mesh is not None and mesh.data_ranks > 1
    for part in parts:
        if mesh is not None and mesh.dims.cp > 1:
            apply_context_parallel(part, mesh.group("cp"), options.cp_attention)
        if mesh is not None and mesh.dims.tp > 1:
            plan = apply_tensor_parallel(part, mesh.tp_group, options.sequence_parallel)
            tp_plan = plan if tp_plan is None else tp_plan.merge(plan)
            # the loss from this rank's vocabulary shard (engine/ops cross_entropy_sum with a group)
            loss_sum = partial(reference_loss_sum, vocab_size=model.cfg.vocab_size, group=mesh.tp_group)
        if options.activation_checkpointing != "none":
            apply_activation_checkpointing(part, options.activation_checkpointing, options.ac_every,
                                           options.recompute_contexts)
        if options.compile:
            apply_compile(part)
        if fsdp:  # under pp, parameters stay gathered across the step's microbatches (Llama 3)
            apply_fsdp(part, mesh, options.param_dtype, options.reshard_after_forward and not pp)
    pipeline = None
    if pp:
        device = torch.device(mesh.device_mesh.device_type, torch.cuda.current_device()) \
            if mesh.device_mesh.device_type == "cuda" else torch.device("cpu")
        pipeline = Pipeline(parts, stage_ids, n_stages, ranks, mesh.group("pp"), device, options.pp_schedule,
                            options.pp_microbatches)
    return Parallelized(parts, mesh, tp_plan, fsdp, loss_sum, pipeline)
