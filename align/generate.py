"""Batched sampling with a KV cache, for rejection sampling (Llama 3 paper section 4.2.2: K = 10-30 outputs per
prompt, scored by a reward model, the best kept).

The model knows nothing of caches. Generation adapts it from outside, the way context parallelism does: for the
duration of one `generate` call every layer's `Attention.core` is replaced by a cache-aware core and
`Transformer.attention_mask` by a function handing out this forward's `StepMask`; both are restored on exit, even
after an exception, and the caches are dropped with the context.

Layout of a batch. Prompts are LEFT-padded to a common length L, so every row writes the same cache slot at each
step: one integer `start` locates a forward's tokens in the cache for all rows, decoding needs no per-row
scatter, and a row's pad slots are simply the slots before its first real token (`first_valid`). Position ids
count from the first real token of each row (pads get position 0), so RoPE sees exactly what an unpadded run
sees; a key padding mask hides pad slots from real queries. A pad query attends to its own slot only: a query
that sees no key would give NaN, and a NaN value, even under a zero weight, poisons every query that reads it.

Tensor parallelism. Tokens and sampling are replicated over tp: every tp rank holds the same prompts, gathers the
full-vocabulary logits (the head is vocabulary-parallel: [b, s, V_padded / tp] per rank, zero-padded rows
dropped after the gather) and samples from generators seeded identically on every rank, so all ranks pick the
same tokens. Under sequence parallelism the embedding reduce-scatters along the sequence, so every forward must
carry a multiple of tp tokens: the prompt is padded (on the left) to a multiple of tp, and a decode step carries
the new token followed by tp - 1 copies of it in the slots after it. Those filler slots lie beyond the query's
position, so the causal mask hides them, and the next step overwrites them before anyone may read them.

FSDP (dp_shard > 1 or cp > 1 in the mesh) all-gathers parameters inside every forward, so all data ranks must run
the same number of forwards although each generates its own prompts: the ranks agree every step whether anyone
still decodes, and a rank whose rows are all finished keeps running one finished row whose tokens it discards.
Context parallelism needs nothing more: its attention is replaced like any other, each cp rank then decodes its
prompts on its own (parameters are replicated over cp). Pipeline parallelism is not supported.

Randomness. Row r draws from its own CPU torch.Generator seeded from (seed, prompt index, sample index), exactly one
uniform per decoding step (inverse-CDF sampling over the nucleus), so a row's samples depend only on its seed and
its logits, not on which other rows share its batch. Batch composition (padding, batch size) changes the logits
only by floating-point rounding, which can change a token only where two candidates are within rounding of a
sampling boundary.
"""

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn

from engine.model.llama import causal_attention
from parallel.parallelize import Parallelized


@dataclass
class SamplingConfig:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0: greedy (argmax)
    top_p: float = 1.0  # nucleus: keep the smallest set of most likely tokens whose probability reaches top_p
    stop_ids: Sequence[int] = ()  # e.g. <|eot_id|>; a row stops after producing one (it is kept in the output)
    seed: int = 0


@dataclass
class Generation:
    tokens: List[List[int]]  # per prompt, the generated tokens (the prompt excluded, a final stop id included)
    logits: Optional[List[torch.Tensor]] = None  # per prompt [n_generated, vocab] fp32: what each token came from


def derive_seed(seed: int, prompt_index: int, sample_index: int = 0) -> int:
    """A 63-bit generator seed that is a pure function of its arguments (Python's hash() is salted per process)."""
    digest = hashlib.sha256(f"herd-sample:{seed}:{prompt_index}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ---------------------------------------------------------------------------------------------------------------
# What generation needs to know of the (possibly parallelized) model


@dataclass
class _Target:
    module: nn.Module  # the whole Transformer, or this rank's tensor-parallel shard of it
    vocab_size: int  # the real vocabulary (the head may hold padding rows beyond it)
    tp_group: Optional[dist.ProcessGroup]  # the head's vocabulary is split over it (None: full logits)
    step_width: int  # every forward's token count must be a multiple of it (tp under sequence parallelism)
    lockstep_group: Optional[dist.ProcessGroup]  # ranks that must run equally many forwards (FSDP), or None


def _resolve(model: Union[nn.Module, Parallelized]) -> _Target:
    lockstep = None
    plan = None
    if isinstance(model, Parallelized):
        if model.pipeline is not None:
            raise NotImplementedError("generation under pipeline parallelism is not supported")
        plan = model.tp_plan
        if model.fsdp:
            lockstep = model.mesh.data_mesh.get_group()
        module = model.model
    else:
        module = model
        plan = getattr(module.tok_embeddings, "plan", None)  # a module sharded by apply_tensor_parallel directly
    tp_group = plan.group if plan is not None and dist.get_world_size(plan.group) > 1 else None
    width = dist.get_world_size(tp_group) if tp_group is not None and plan.sequence_parallel else 1
    return _Target(module, module.cfg.vocab_size, tp_group, width, lockstep)


def full_vocab_logits(logits: torch.Tensor, vocab_size: int,
                      tp_group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """[b, V_local] logits of this rank's vocabulary shard -> [b, vocab_size] fp32, the same on every tp rank.

    The head's rows are the vocabulary zero-padded to a multiple of tp, cut into tp equal chunks in rank order;
    the padding columns (logit 0) are dropped so they can never be sampled.
    """
    if tp_group is not None:
        shards = [torch.empty_like(logits) for _ in range(dist.get_world_size(tp_group))]
        dist.all_gather(shards, logits.contiguous(), group=tp_group)
        logits = torch.cat(shards, dim=-1)  # [b, V_padded]
    return logits[..., :vocab_size].float()


# ---------------------------------------------------------------------------------------------------------------
# The KV cache, installed into the model from outside


@dataclass
class StepMask:
    """What every layer's core needs for one forward: where its tokens go in the cache and what each may see."""

    start: int  # cache slot of this forward's first token
    allowed: torch.Tensor  # bool [b, 1, s, start + s]: query i may attend cache slot j


@dataclass
class _LayerCache:
    keys: Optional[torch.Tensor] = None  # [b, capacity, kv, d], allocated at the first write (shapes known then)
    values: Optional[torch.Tensor] = None


class CachedAttention:
    """Context manager: while open, `module` attends through per-layer KV caches of `capacity` slots.

    forward(tokens, position_ids, start) runs the model on tokens occupying cache slots [start, start + s).
    """

    def __init__(self, module: nn.Module, first_valid: torch.Tensor, capacity: int):
        self.module, self.capacity = module, capacity
        self.first_valid = first_valid  # [b] the first cache slot of each row that holds a real token
        self.caches: List[_LayerCache] = []
        self._mask: Optional[StepMask] = None
        self._saved: list = []

    def __enter__(self) -> "CachedAttention":
        attentions = [block.attention for block in self.module.layers.values()]
        self._saved = [(self.module, "attention_mask", self.module.attention_mask)]
        self._saved += [(attention, "core", attention.core) for attention in attentions]
        self.caches = [_LayerCache() for _ in attentions]
        try:
            self.module.attention_mask = self._current_mask
            for attention, cache in zip(attentions, self.caches):
                attention.core = self._make_core(cache)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for owner, name, value in reversed(self._saved):
            setattr(owner, name, value)
        self._saved, self.caches, self._mask = [], [], None  # nothing keeps the cache memory alive

    def _current_mask(self, position_ids: torch.Tensor, doc_ids: Optional[torch.Tensor]) -> StepMask:
        return self._mask  # built by forward(), before the model asks for it

    def _make_core(self, cache: _LayerCache):
        def core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: StepMask) -> torch.Tensor:
            # q: [b, s, h, d], k/v: [b, s, kv, d] (this rank's heads) -> [b, s, h, d]
            if cache.keys is None:
                shape = (k.shape[0], self.capacity, *k.shape[2:])
                cache.keys, cache.values = k.new_zeros(shape), v.new_zeros(shape)
            end = mask.start + k.shape[1]
            cache.keys[:, mask.start:end] = k
            cache.values[:, mask.start:end] = v
            return causal_attention(q, cache.keys[:, :end], cache.values[:, :end], mask.allowed)
        return core

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor, start: int) -> torch.Tensor:
        """tokens, position_ids: [b, s] in slots [start, start + s) -> the model's logits [b, s, V_local]."""
        s = tokens.shape[1]
        if start + s > self.capacity:
            raise ValueError(f"KV cache overflow: slots up to {start + s} of {self.capacity}")
        query_slot = torch.arange(start, start + s, device=tokens.device)  # [s]
        key_slot = torch.arange(start + s, device=tokens.device)  # [start + s]
        causal = key_slot[None, :] <= query_slot[:, None]  # [s, start + s]
        real_key = key_slot[None, :] >= self.first_valid[:, None]  # [b, start + s]
        own_slot = key_slot[None, :] == query_slot[:, None]  # [s, start + s]: keeps pad queries finite
        allowed = causal[None] & (real_key[:, None, :] | own_slot[None])  # [b, s, start + s]
        self._mask = StepMask(start, allowed.unsqueeze(1))
        return self.module(tokens, position_ids=position_ids)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Continue with only these batch rows (indices into the current batch): finished rows stop costing."""
        self.first_valid = self.first_valid[rows]
        for cache in self.caches:
            if cache.keys is not None:
                cache.keys, cache.values = cache.keys[rows], cache.values[rows]


@contextlib.contextmanager
def _inference(module: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd, the module's training flag restored afterwards."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


# ---------------------------------------------------------------------------------------------------------------
# Sampling


def sample_tokens(logits: torch.Tensor, generators: List[torch.Generator], temperature: float,
                  top_p: float) -> torch.Tensor:
    """logits [b, V] fp32 (full vocabulary) -> token ids [b]; row r draws one uniform from generators[r].

    Greedy when temperature == 0. Otherwise nucleus sampling (Holtzman et al. 2020): softmax(logits / T), keep
    the most likely tokens up to the first whose cumulative probability reaches top_p (the most likely always
    kept), renormalize, and invert the CDF at u ~ U[0, 1). The sort is stable so ties break the same everywhere.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits / temperature  # [b, V]
    if not bool(torch.isfinite(scaled).all()):  # so small a T that logits / T overflows: softmax gave NaN and the
        return logits.argmax(dim=-1)  # least likely token was drawn (helper H44); the limit T -> 0 is greedy
    probs = torch.softmax(scaled, dim=-1)  # [b, V]
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)  # [b, V]
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [b, V]
    # the most likely token stays in the nucleus for any top_p > 0 (mass_before is 0 there, but a top_p below
    # fp32's smallest value compared as 0 and emptied the nucleus)
    keep = mass_before < top_p  # [b, V]
    keep[:, 0] = True
    nucleus = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
    cdf = nucleus.cumsum(dim=-1)  # [b, V]
    draws = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])  # [b]
    u = draws.to(cdf.device, cdf.dtype) * cdf[:, -1]  # [b], in [0, total mass)
    picked = torch.searchsorted(cdf, u.unsqueeze(1), right=True).clamp(max=cdf.shape[1] - 1)  # [b, 1]
    return order.gather(1, picked).squeeze(1)


# ---------------------------------------------------------------------------------------------------------------
# Generation


@dataclass
class _Batch:
    tokens: torch.Tensor  # [b, L] left-padded prompts (pad id 0), L a multiple of the step width
    positions: torch.Tensor  # [b, L] position ids, 0 on padding
    first_valid: torch.Tensor  # [b] slot of each row's first real token
    lengths: torch.Tensor  # [b] prompt lengths


def _left_pad(prompts: List[List[int]], multiple: int, device: torch.device) -> _Batch:
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    width = -(-int(lengths.max()) // multiple) * multiple
    tokens = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long, device=device)
    first_valid = width - lengths  # [b]
    positions = (torch.arange(width, device=device)[None, :] - first_valid[:, None]).clamp(min=0)  # [b, L]
    return _Batch(tokens, positions, first_valid, lengths)


def _check(prompts: List[List[int]], cfg: SamplingConfig, target: _Target) -> None:
    if cfg.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {cfg.max_new_tokens}")
    if cfg.temperature < 0 or not 0 < cfg.top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {cfg.temperature}, {cfg.top_p}")
    limit = target.module.cfg.max_seq_len
    for index, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {index} is empty (start it with <|begin_of_text|>)")
        if len(prompt) + cfg.max_new_tokens > limit:
            raise ValueError(f"prompt {index}: {len(prompt)} tokens + max_new_tokens={cfg.max_new_tokens} exceed "
                             f"model.max_seq_len={limit} (the RoPE tables)")
        if min(prompt) < 0 or max(prompt) >= target.vocab_size:
            raise ValueError(f"prompt {index} holds token ids outside [0, {target.vocab_size})")


def _anyone_decoding(active: bool, target: _Target, device: torch.device) -> bool:
    """Whether this rank, or under FSDP any rank that must run forwards with it, still has unfinished rows."""
    if target.lockstep_group is None:
        return active
    flag = torch.tensor([int(active)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=target.lockstep_group)
    return bool(flag.item())


@dataclass
class _Rows:
    """Per-prompt results, and which prompts the current (compacted) batch rows are."""

    tokens: List[List[int]]
    logits: List[List[torch.Tensor]]
    finished: List[bool]
    in_batch: List[int]  # batch row -> prompt index


def _record(rows: _Rows, picked: torch.Tensor, full: torch.Tensor, cfg: SamplingConfig, keep_logits: bool) -> None:
    """Append each unfinished row's new token (and logits); mark rows that hit a stop id or the length limit."""
    stop = set(cfg.stop_ids)
    for batch_row, token in enumerate(picked.tolist()):
        prompt = rows.in_batch[batch_row]
        if rows.finished[prompt]:  # a row kept only so this rank runs forwards in lockstep (FSDP)
            continue
        rows.tokens[prompt].append(token)
        if keep_logits:
            rows.logits[prompt].append(full[batch_row].cpu())
        rows.finished[prompt] = token in stop or len(rows.tokens[prompt]) >= cfg.max_new_tokens


def generate_with_logits(model: Union[nn.Module, Parallelized], prompts: List[List[int]], cfg: SamplingConfig,
                         row_seeds: Optional[List[int]] = None, keep_logits: bool = False) -> Generation:
    """Generate a completion for every prompt (see the module docstring for layout and randomness).

    model: a Transformer (whole, or a tensor-parallel shard) or the Parallelized object of parallelize();
    under tp every rank of the tp group must call this with the same prompts and config.
    row_seeds: one generator seed per prompt (default derive_seed(cfg.seed, i, 0) for prompt i).
    keep_logits: also return, per prompt, the full-vocabulary logits of every step (before temperature).
    """
    target = _resolve(model)
    _check(prompts, cfg, target)
    seeds = row_seeds if row_seeds is not None else [derive_seed(cfg.seed, i) for i in range(len(prompts))]
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} row seeds for {len(prompts)} prompts")
    if not prompts and target.lockstep_group is None:
        return Generation([], [] if keep_logits else None)
    rows = _Rows([[] for _ in prompts], [[] for _ in prompts], [False] * len(prompts), list(range(len(prompts))))
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    if not prompts:  # an FSDP rank without prompts still runs its share of forwards, on one finished dummy row
        rows = _Rows([[]], [[]], [True], [0])
        generators = [torch.Generator()]
    device = target.module.rope.cos.device
    batch = _left_pad(prompts or [[0]], target.step_width, device)
    capacity = batch.tokens.shape[1] + cfg.max_new_tokens + target.step_width
    with _inference(target.module), CachedAttention(target.module, batch.first_valid, capacity) as cache:
        _decode(cache, batch, rows, generators, cfg, target, keep_logits)
    real = len(prompts)  # the dummy row is not returned
    logits = [torch.stack(steps) if steps else torch.zeros(0, target.vocab_size) for steps in rows.logits[:real]]
    return Generation(rows.tokens[:real], logits if keep_logits else None)


def _decode(cache: CachedAttention, batch: _Batch, rows: _Rows, generators: List[torch.Generator],
            cfg: SamplingConfig, target: _Target, keep_logits: bool) -> None:
    """Prefill, then one token per forward until every row (of every lockstep rank) is finished."""
    width, max_position = target.step_width, target.module.cfg.max_seq_len - 1
    next_position = batch.lengths.clone()  # [b] position id of the token each row feeds next
    logits = cache.forward(batch.tokens, batch.positions, start=0)[:, -1]  # [b, V_local]
    slot = batch.tokens.shape[1]  # cache slot the next fed token goes to (the same for every row)
    while True:
        full = full_vocab_logits(logits, target.vocab_size, target.tp_group)  # [b, vocab]
        picked = sample_tokens(full, [generators[p] for p in rows.in_batch], cfg.temperature, cfg.top_p)  # [b]
        _record(rows, picked, full, cfg, keep_logits)
        alive = [i for i, p in enumerate(rows.in_batch) if not rows.finished[p]]
        if not _anyone_decoding(bool(alive), target, picked.device):
            return
        keep = alive or [0]  # an all-finished FSDP rank keeps one row to run its share of the forwards
        if len(keep) < len(rows.in_batch):
            index = torch.tensor(keep, device=picked.device)
            cache.keep_rows(index)
            picked, next_position = picked[index], next_position[index]
            rows.in_batch = [rows.in_batch[i] for i in keep]
        # a step of `width` tokens: the new token, then fillers the causal mask hides and the next step overwrites
        step_tokens = picked[:, None].expand(-1, width)  # [b, width]
        step_positions = next_position.clamp(max=max_position)[:, None].expand(-1, width)  # [b, width]
        logits = cache.forward(step_tokens, step_positions, start=slot)[:, 0]  # [b, V_local]
        slot += 1
        next_position = next_position + 1


def generate(model: Union[nn.Module, Parallelized], prompts: List[List[int]], cfg: SamplingConfig,
             row_seeds: Optional[List[int]] = None) -> List[List[int]]:
    """Per prompt, the generated tokens (prompt excluded; a final stop id included). See generate_with_logits."""
    return generate_with_logits(model, prompts, cfg, row_seeds).tokens


def sample_k(model: Union[nn.Module, Parallelized], prompts: List[List[int]], k: int, cfg: SamplingConfig,
             prompt_ids: Optional[List[int]] = None, batch_size: int = 0) -> List[List[List[int]]]:
    """K completions per prompt, for rejection sampling: result[i][j] is sample j of prompts[i].

    Sample j of prompt i draws from derive_seed(cfg.seed, prompt_ids[i], j); prompt_ids defaults to the position
    in `prompts`. Pass global ids (e.g. dataset indices) and a sample depends only on (seed, prompt id, j), the
    prompt and the model, not on how prompts are split over ranks or batches (up to rounding, module docstring).
    batch_size: rows (prompt copies) per generate call, 0 for all at once; it bounds the cache memory.
    Under FSDP every data rank must make the same number of generate calls: keep batch_size 0 there.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    ids = prompt_ids if prompt_ids is not None else list(range(len(prompts)))
    if len(ids) != len(prompts):
        raise ValueError(f"{len(ids)} prompt ids for {len(prompts)} prompts")
    pairs = [(i, j) for i in range(len(prompts)) for j in range(k)]  # repeated prompts, sample-major per prompt
    step = batch_size if batch_size > 0 else max(1, len(pairs))
    results: List[List[List[int]]] = [[[] for _ in range(k)] for _ in prompts]
    for begin in range(0, max(1, len(pairs)), step):
        chunk = pairs[begin:begin + step]
        seeds = [derive_seed(cfg.seed, ids[i], j) for i, j in chunk]
        outputs = generate(model, [prompts[i] for i, _ in chunk], cfg, row_seeds=seeds)
        for (i, j), tokens in zip(chunk, outputs):
            results[i][j] = tokens
    return results
