"""Native FP8 linear layers on torch._scaled_mm (Micikevicius et al. 2022, "FP8 Formats for Deep Learning").

Each of the three GEMMs of a linear layer runs in FP8 with per-tensor scales:
    forward  y  = x  @ W^T    x: e4m3 [M, K], W: e4m3 [N, K]
    dgrad    dx = dy @ W      dy: e5m2 (or e4m3) [M, N], W^T copy [K, N]
    wgrad    dW = dy^T @ x    dy^T copy [N, M], x^T copy [K, M]
A tensor t is quantized as saturate(t * s) with s = fp8_max / amax(t), and the GEMM is told 1/s for each operand
(torch._scaled_mm's scale_a/scale_b dequantize). The transposed copies come out of the same cast kernel
(engine/ops fp8_cast), because _scaled_mm wants its first operand row-major and its second column-major.

Two recipes (config `fp8.recipe`):
- tensorwise (current scaling): amax of the tensor itself, measured just before its cast (one extra read).
- delayed: the scale comes from the largest amax in a window of the last `amax_history_len` steps; the cast
  measures the current amax in the same pass and pushes it into the window afterwards (TransformerEngine's
  DelayedScaling). A value above the scaled range saturates to the format's max instead of overflowing to inf,
  and the next scale shrinks because the window now holds the larger amax. A non-finite amax (the step is lost
  anyway, e.g. a loss spike to inf) is not recorded, so one bad step cannot poison the window. A window that has
  never been filled (a fresh run, or a resumed one: this state is not checkpointed) scales that one step by the
  current amax.

Amaxes are max-reduced over the groups `set_amax_groups` is given (tensor and context parallel ranks): every rank
that holds a piece of the same logical tensor then uses the same scale, so a sharded run quantizes exactly as one
process would. Data-parallel ranks hold different tensors and keep their own scales.
"""

import collections
import contextlib
import weakref
from typing import Callable, Deque, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from engine import ops  # noqa: F401  (defines the herd:: ops)
from engine.ops.fp8_cast import fp8_amax, fp8_cast, fp8_delayed_update
from engine.config import FP8Config
from engine.ops.reference import FP8_MAX, FP8_TINY_AMAX

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


class Used(NamedTuple):
    """What one quantization of a checkpointed forward used: the delayed scale and the 1/scale its GEMM took (None:
    the tensor's own amax), and whether a fused op (engine/fp8/fused_cast.py) cast it."""

    scale: Optional[torch.Tensor]
    inv: Optional[torch.Tensor]
    fused: bool


class ScalingState(nn.Module):
    """Scale of one tensor role (input, weight or grad) of one layer. Buffers live on the layer's device and are
    never read on the host, so no step synchronizes with the GPU."""

    def __init__(self, dtype: torch.dtype, recipe: str, history_len: int, device=None):
        super().__init__()
        self.dtype, self.recipe = dtype, recipe
        self.register_buffer("amax_history", torch.zeros(history_len, device=device), persistent=False)  # [H]
        self.register_buffer("scale", torch.ones((), device=device), persistent=False)
        self.register_buffer("overflows", torch.zeros((), dtype=torch.int64, device=device), persistent=False)
        self.groups: List[dist.ProcessGroup] = []
        self.filled = False  # has a step recorded its amax yet
        self.gate = None  # an object with `open` (set_recording_gate): while it is closed nothing is recorded
        # activation checkpointing (recompute_contexts): the forward appends what each quantization used, the
        # recomputation takes it back in the same order; None outside those two contexts
        self.capture: Optional[Deque[Used]] = None
        self.replay: Optional[Deque[Used]] = None

    @torch.no_grad()
    def reset_tables(self) -> None:
        """Zero the window (called by init_weights after the model is materialized from the meta device)."""
        self.amax_history.zero_()
        self.scale.fill_(1.0)
        self.overflows.zero_()
        self.filled = False

    def reduce(self, amax: torch.Tensor) -> torch.Tensor:
        for group in self.groups:
            dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
        return amax

    @property
    def recording(self) -> bool:
        """False while a computation that is not one of the training step's runs: torch's pipeline shape
        inference (the gate) and evaluation (the layer in eval mode): their amaxes would shift the next steps'
        scales."""
        return (self.gate is None or self.gate.open) and self.training

    def quantize(self, t: torch.Tensor, transpose: bool):
        """t [M, K] -> (t_fp8 [M, K], t_fp8^T [K, M] or empty, 1/scale fp32 scalar). While not `recording`, t is
        scaled by its own amax and the window, scale and counters are left as they are. A recomputation
        (`replay`) quantizes as its forward did and records nothing."""
        if self.replay is not None:
            used = self.replayed()
            if used.scale is not None:
                out, out_t, _ = fp8_cast(t, used.scale, self.dtype, transpose)
                return out, out_t, used.inv
        elif self.recipe == "tensorwise" or not self.recording:
            if self.capture is not None:
                self.capture.append(Used(None, None, fused=False))
        else:
            if not self.filled:  # never filled: this one step uses current scaling (a host flag: no GPU sync)
                self.scale.copy_(FP8_MAX[self.dtype] / self.reduce(fp8_amax(t)).clamp(min=FP8_TINY_AMAX))
                self.filled = True
            return self.cast_delayed(lambda scale: fp8_cast(t, scale, self.dtype, transpose))
        amax = self.reduce(fp8_amax(t))
        scale = FP8_MAX[self.dtype] / amax.clamp(min=FP8_TINY_AMAX)
        out, out_t, _ = fp8_cast(t, scale, self.dtype, transpose)
        return out, out_t, scale.reciprocal()

    def replayed(self) -> Used:
        """The next of what the forward being recomputed used."""
        if not self.replay:
            raise RuntimeError("herd: a recomputed forward quantized a tensor its forward did not (activation "
                               "checkpointing with delayed FP8: the two passes took different paths)")
        return self.replay.popleft()

    def replays_fused(self) -> bool:
        """In a recomputation: whether its forward's next quantization ran in a fused op (fused_cast.py), which the
        recomputation must repeat: it saves other tensors for backward than the unfused ops."""
        return bool(self.replay) and self.replay[0].fused

    def cast_delayed(self, cast: Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                     fused: bool = False):
        """The delayed recipe once the window holds a step: `cast(scale)` -> (t_fp8, t_fp8^T or empty, amax of t)
        quantizes with this step's scale and measures the amax in the same pass (fp8_cast, or an op with the cast
        fused in: engine/fp8/fused_cast.py); then the window takes the amax. -> (t_fp8, t_fp8^T, 1/scale used).
        In a recomputation the forward's scale is used and nothing recorded."""
        if self.replay is not None:
            used = self.replayed()
            out, out_t, _ = cast(used.scale)
            return out, out_t, used.inv
        scale = self.scale.clone() if self.capture is not None else self.scale  # the update overwrites self.scale
        out, out_t, amax = cast(scale)
        # push amax into the window, count an overflow, set the next scale; returns 1/scale of the one just used
        inv_used = fp8_delayed_update(self.amax_history, self.scale, self.overflows, self.reduce(amax),
                                      FP8_MAX[self.dtype])
        if self.capture is not None:
            self.capture.append(Used(scale, inv_used, fused))
        return out, out_t, inv_used


Quantized = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (t_fp8, its transposed copy or empty, 1/scale)


class InputShare:
    """One quantization of the input that sibling layers read: wq, wk and wv all read the attention's normed input,
    w1 and w3 the MLP's, and share one input ScalingState (their amaxes and windows would be identical anyway).
    The first sibling quantizes x and leaves the result here; the others take it while x is the same tensor,
    unchanged (same object, same version counter), so the input is read, cast and transposed once, and autograd
    saves one transposed copy for the three weight gradients. After the last sibling the result is dropped."""

    def __init__(self, siblings: int):
        self.siblings = siblings
        self._key, self._value, self._left = None, None, 0

    def lookup(self, x: torch.Tensor, transpose: bool) -> Optional[Quantized]:
        if self._key is None:
            return None
        ref, version, wanted = self._key
        if ref() is not x or x._version != version or wanted != transpose:
            return None
        value = self._value
        self._left -= 1
        if self._left <= 0:
            self._key, self._value = None, None
        return value

    def store(self, x: torch.Tensor, transpose: bool, value: Quantized) -> None:
        if self.siblings > 1:  # a lone layer (w2, a fused wqkv) keeps nothing: no sibling would drop it
            self._key, self._value, self._left = (weakref.ref(x), x._version, transpose), value, self.siblings - 1

    def offer(self, x: torch.Tensor, transpose: bool, value: Quantized) -> None:
        """The op that produced x quantized it already (engine/fp8/fused_cast.py): every sibling takes it."""
        self._key, self._value, self._left = (weakref.ref(x), x._version, transpose), value, self.siblings


def _gemm_ok(*sizes: int) -> bool:
    """torch._scaled_mm on CUDA needs every GEMM dimension to be a multiple of 16."""
    return all(size % 16 == 0 for size in sizes)


class _FP8Linear(torch.autograd.Function):
    """y = x @ W^T with all three GEMMs in FP8; saves only the FP8 transposed copies for backward. Input and weight
    come in quantized (Float8Linear.quantized_input / quantized_weight: the FP8 tensor, its transposed copy, 1/scale)
    and in high precision (x and `weight`: the autograd edges and the gradients' dtypes)."""

    @staticmethod
    def forward(ctx, x, weight, layer, out_dtype, x_fp8, x_t, x_inv, w_fp8, w_t, w_inv):
        # x: [M, K]; weight: [N, K]; x_t: [K, M] (empty without a weight gradient); w_t: [K, N]
        y = torch._scaled_mm(x_fp8, w_fp8.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=out_dtype)  # [M, N]
        ctx.save_for_backward(x_t, x_inv, w_t, w_inv)
        ctx.layer, ctx.x_dtype, ctx.w_dtype, ctx.dy_quantized = layer, x.dtype, weight.dtype, None
        return y

    @staticmethod
    def backward(ctx, dy):
        x_t, x_inv, w_t, w_inv = ctx.saved_tensors
        want_dx, want_dw = (ctx.needs_input_grad[i] and _pass_reaches(ctx.next_functions[i][0]) for i in (0, 1))
        # Zero-bubble pipeline schedules split a backward into an input-gradient pass and a weight-gradient pass that
        # both run this node: dy is quantized (its amax recorded) once, in the first, and kept for the second.
        quantized = ctx.dy_quantized or ctx.layer.grad_scaling.quantize(dy.contiguous(), transpose=x_t.numel() > 0)
        dy_fp8, dy_t, dy_inv = quantized
        later = ctx.needs_input_grad[1] and not want_dw  # the weight gradient comes in a later pass
        ctx.dy_quantized = quantized if later else None
        dx = dw = None
        if want_dx:  # dgrad: [M, N] @ [N, K]; the second operand is W^T's row-major copy seen as column-major W
            dx = torch._scaled_mm(dy_fp8, w_t.t(), scale_a=dy_inv, scale_b=w_inv,
                                  out_dtype=dy.dtype).to(ctx.x_dtype)
        if want_dw:  # wgrad: [N, M] @ [M, K], fp32 out so accumulation stays fp32
            dw = torch._scaled_mm(dy_t, x_t.t(), scale_a=dy_inv, scale_b=x_inv,
                                  out_dtype=torch.float32).to(ctx.w_dtype)
        return dx, dw, None, None, None, None, None, None, None, None


def _pass_reaches(node) -> bool:
    """Whether the running backward pass needs the gradient flowing into `node` (torch's engine knows which nodes it
    will run). Asked about a leaf's accumulator that autograd.grad is collecting, the engine raises: needed."""
    if node is None:
        return False
    try:
        return torch._C._will_engine_execute_node(node)
    except RuntimeError:
        return True


class Float8Linear(nn.Linear):
    """nn.Linear (no bias) whose matmuls run in FP8. The weight stays a plain high-precision Parameter named
    `weight`, so checkpoints, tensor parallel sharding and FSDP work on it unchanged; FSDP all-gathers it in its
    own dtype and the cast to FP8 happens after the gather, in forward.

    Inside `weight_cache` (the train module opens it around one optimizer step's micro-batches when
    `fp8.cache_weights` is on) the weight is quantized by the first micro-batch's forward and that FP8 copy serves
    every later micro-batch and recomputation of the step: the weights cannot change before the optimizer step,
    and the scope closes before it (TransformerEngine's is_first_microbatch). Outside it (evaluation, generation)
    every forward quantizes."""

    def __init__(self, in_features: int, out_features: int, cfg: FP8Config, device=None):
        super().__init__(in_features, out_features, bias=False, device=device)
        grad_dtype = E5M2 if cfg.grad_dtype == "e5m2" else E4M3
        weight_recipe = cfg.recipe if cfg.weight_recipe == "same" else cfg.weight_recipe
        self.input_scaling = ScalingState(E4M3, cfg.recipe, cfg.amax_history_len, device)
        self.weight_scaling = ScalingState(E4M3, weight_recipe, cfg.amax_history_len, device)
        self.grad_scaling = ScalingState(grad_dtype, cfg.recipe, cfg.amax_history_len, device)
        self.input_share: Optional[InputShare] = None  # set by convert() for wq/wk/wv and w1/w3
        self.caching = False  # inside weight_cache
        self._step_weight: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None

    def set_amax_groups(self, groups: Sequence[dist.ProcessGroup]) -> None:
        for state in (self.input_scaling, self.weight_scaling, self.grad_scaling):
            state.groups = list(groups)

    def quantized_input(self, x: torch.Tensor, x2d: torch.Tensor, transpose: bool) -> Quantized:
        """(x_fp8 [M, K], x_t [K, M] or empty, 1/scale) of x2d = x as [M, K]: a sibling's or the producing op's
        (InputShare), or new."""
        share = self.input_share if not x.is_inference() else None  # inference tensors have no version counter
        found = share.lookup(x, transpose) if share is not None else None
        if found is not None:
            return found
        if is_fp8_carrier(x):
            raise RuntimeError("herd: an FP8-only activation (fp8.fuse_norm_cast / fuse_swiglu_cast) reached a layer "
                               "that was not offered its quantization; it holds no values")
        with torch.no_grad():
            quantized = self.input_scaling.quantize(x2d.contiguous(), transpose=transpose)
        if share is not None:
            share.store(x, transpose, quantized)
        return quantized

    def quantized_weight(self) -> Quantized:
        """(w_fp8 [N, K], w_t [K, N], 1/scale) of the weight: quantized now, or the step's copy (weight_cache)."""
        if self.caching and self._step_weight is not None:
            return self._step_weight
        with torch.no_grad():  # a cast for the FP8 GEMMs; the weight's gradient comes from _FP8Linear.backward
            quantized = self.weight_scaling.quantize(self.weight, transpose=True)
        if self.caching and self.weight_scaling.recording:  # a shape-inference pass's copy must not serve the step
            self._step_weight = quantized
        return quantized

    # Not traced under train.compile: the input share (an identity and version check), the scaling state and
    # the replay are host state; traced, each layer graph-broke inside and recompiled until dynamo's limit.
    # One clean break per layer; the norms, RoPE and SwiGLU between the GEMMs still compile.
    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        out_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        x2d = x.reshape(-1, x.shape[-1])  # [M, K]
        n, k = self.weight.shape
        if x.is_cuda and not _gemm_ok(x2d.shape[0], n, k):  # cuBLASLt FP8 shape rule: fall back to bf16
            if is_fp8_carrier(x):  # engine/fp8/fused_cast.py checks the shapes first: this is a bug, not data
                raise RuntimeError("herd: an FP8-only activation reached a GEMM shape that needs its bf16 values")
            return nn.functional.linear(x, self.weight)
        with torch.autocast(device_type, enabled=False):  # x2d stays a view: an FP8 carrier has no values to copy
            x_q = self.quantized_input(x, x2d, transpose=self.weight.requires_grad)
            y = _FP8Linear.apply(x2d, self.weight, self, out_dtype, *x_q, *self.quantized_weight())  # [M, N]
        return y.view(*x.shape[:-1], n)


def fp8_carrier(like: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """The autograd edge of an activation that exists only in FP8 (engine/fp8/fused_cast.py): a [*shape] tensor of
    `dtype` with all strides 0 over one NaN element (one element of memory). Its consumers find the FP8
    values in their InputShare; its gradient is an ordinary [*shape] tensor."""
    # one NaN element seen at every index: anything other than a Float8Linear that reads it (a hook, a stray
    # consumer) gets NaN, not the garbage of uninitialized memory
    carrier = torch.full((1,), float("nan"), dtype=dtype, device=like.device).as_strided(tuple(shape),
                                                                                        (0,) * len(shape))
    carrier._herd_fp8_carrier = True
    return carrier


def is_fp8_carrier(x: torch.Tensor) -> bool:
    return getattr(x, "_herd_fp8_carrier", False)


def float8_layers(parts: Sequence[nn.Module]) -> List[Float8Linear]:
    return [m for part in parts for m in part.modules() if isinstance(m, Float8Linear)]


@contextlib.contextmanager
def weight_cache(layers: Sequence[Float8Linear]) -> Iterator[int]:
    """Within this scope each of `layers` (float8_layers of the model parts) quantizes its weight once and reuses
    it (see Float8Linear); the copies are dropped when it closes. Open it around the micro-batches of one optimizer
    step only. Yields the number of layers it covers."""
    for layer in layers:
        layer.caching, layer._step_weight = True, None
    try:
        yield len(layers)
    finally:
        for layer in layers:
            layer.caching, layer._step_weight = False, None


def _swap(parent: nn.Module, name: str, cfg: FP8Config) -> None:
    old = getattr(parent, name)
    new = Float8Linear(old.in_features, old.out_features, cfg, device=old.weight.device)
    new.weight = old.weight  # same Parameter (meta or materialized): no copy, names unchanged
    for attr in ("fused_parts", "split_sizes"):  # a fused projection (wqkv, w13) keeps its parts
        if hasattr(old, attr):
            setattr(new, attr, getattr(old, attr))
    setattr(parent, name, new)


def _share_input(layers: Sequence[Float8Linear]) -> None:
    """Sibling layers that read one tensor: one input ScalingState and one InputShare."""
    share, state = InputShare(len(layers)), layers[0].input_scaling
    for layer in layers:
        layer.input_scaling, layer.input_share = state, share


def convert(model: nn.Module, cfg: FP8Config, share_inputs: bool = True) -> List[str]:
    """Swap the projections of the transformer blocks for Float8Linear in place; the output head, the embedding
    and (by config) the first and last blocks stay in bf16. wq/wk/wv and w1/w3 quantize their common input once
    (InputShare; `share_inputs=False` only for tests comparing against separate quantizations). A fused wqkv or
    w13 is one Float8Linear: one GEMM with one scale per tensor role for the fused weight (the largest amax of its
    parts, as TransformerEngine's fused QKV layer quantizes), so its FP8 rounding differs from three separately
    scaled projections. Returns the names of the converted layers."""
    layer_ids = list(model.layers.keys())
    keep = {layer_ids[0], layer_ids[-1]} if cfg.bf16_first_last_layers and len(layer_ids) > 2 else set()
    converted = []
    for layer_id, block in model.layers.items():
        if layer_id in keep:
            continue
        for region, names in (("attention", ("wqkv", "wq", "wk", "wv", "wo")),
                              ("feed_forward", ("w13", "w1", "w3", "w2"))):
            for name in (n for n in names if hasattr(getattr(block, region), n)):
                _swap(getattr(block, region), name, cfg)
                converted.append(f"layers.{layer_id}.{region}.{name}")
        if share_inputs and not (block.attention.fused or block.feed_forward.fused):
            attention, mlp = block.attention, block.feed_forward
            _share_input([attention.wq, attention.wk, attention.wv])
            _share_input([mlp.w1, mlp.w3])
        if layer_id not in keep and (cfg.fuse_norm_cast or cfg.fuse_swiglu_cast):
            from engine.fp8 import fused_cast
            fused_cast.attach(block, cfg)
    return converted


def set_recording_gate(parts: Sequence[nn.Module], gate) -> int:
    """Every ScalingState of the parts' Float8Linears records only while `gate.open` (parallel/pipeline_parallel.py
    ScheduleGate: closed while torch's pipelining runs a stage on the first micro-batch or on uninitialized tensors
    to infer shapes; a delayed window filled from that pass differed between two identical runs, step-1 loss nan
    in one). Returns how many layers got it."""
    layers = float8_layers(parts)
    for layer in layers:
        for state in (layer.input_scaling, layer.weight_scaling, layer.grad_scaling):
            state.gate = gate
    return len(layers)


class _Attached:
    """Sets `field` ("capture" or "replay") of each state to its queue on entry and back to None on exit. Entered
    once per use, and again for every recomputation of the same checkpointed forward (zero-bubble pipeline
    schedules recompute a block for the input gradient and again for the weight gradient): a replay gets a fresh
    copy of what the forward captured each time."""

    def __init__(self, states: List[ScalingState], queues: List[Deque[Used]], field: str):
        self.states, self.queues, self.field = states, queues, field

    def __enter__(self) -> None:
        for state, queue in zip(self.states, self.queues):
            setattr(state, self.field, collections.deque(queue) if self.field == "replay" else queue)

    def __exit__(self, *exc) -> bool:
        for state in self.states:
            setattr(state, self.field, None)
        return False


def recompute_contexts(block: nn.Module) -> Optional[Callable[[], Tuple[_Attached, _Attached]]]:
    """torch.utils.checkpoint's `context_fn` for a checkpointed block holding native delayed-scaling FP8 layers,
    else None. Each call (one checkpointed forward) gives the forward a context in which every quantization of the
    block records what it used (Used: the delayed scale and 1/scale, or None for the tensor's own amax), and the
    recomputation a context in which each quantization takes those back in order: the recomputed activations are
    bitwise the forward's (the delayed scale moved on when the forward recorded its amax), and the windows get each
    forward amax once, not once more per recomputation. TransformerEngine keeps the forward's FP8 scaling for the
    recompute the same way."""
    states = list({id(state): state for layer in float8_layers([block])  # siblings share one input state
                   for state in (layer.input_scaling, layer.weight_scaling, layer.grad_scaling)}.values())
    if not any(state.recipe == "delayed" for state in states):  # current scaling recomputes the same by itself
        return None

    def contexts() -> Tuple[_Attached, _Attached]:
        queues = [collections.deque() for _ in states]
        return _Attached(states, queues, "capture"), _Attached(states, queues, "replay")
    return contexts


def set_amax_groups(model: nn.Module, groups: Sequence[Optional[dist.ProcessGroup]]) -> int:
    """Give every Float8Linear the groups its amaxes are max-reduced over; returns how many layers got them."""
    real = [g for g in groups if g is not None]
    layers = float8_layers([model])
    for layer in layers:
        layer.set_amax_groups(real)
    return len(layers)
