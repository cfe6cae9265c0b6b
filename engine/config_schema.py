"""The configuration schema: one typed dataclass per component, nested in JobConfig.

Plain dataclasses with defaults and a comment per field; loading, merging and validation live in engine/config.py,
which re-exports every class here (import them from there).
"""

from dataclasses import dataclass, field
from typing import List


@dataclass
class RopeScalingConfig:
    """Llama 3.1's RoPE frequency scaling for long context (wavelength-dependent interpolation)."""

    enabled: bool = False  # apply the scaling; presets of Llama 3.1 turn it on
    factor: float = 8.0  # long-wavelength frequencies are divided by this
    low_freq_factor: float = 1.0  # wavelengths above original_max_seq_len / low_freq_factor are fully scaled
    high_freq_factor: float = 4.0  # wavelengths below original_max_seq_len / high_freq_factor are untouched
    original_max_seq_len: int = 8192  # context length the unscaled model was pretrained at


@dataclass
class ModelConfig:
    """Shape of the dense Llama 3 decoder (paper Table 3)."""

    name: str = "debug"  # preset name, for logs
    dim: int = 256  # model (residual stream) width
    n_layers: int = 4  # transformer blocks
    n_heads: int = 8  # query heads
    n_kv_heads: int = 4  # key/value heads (GQA); must divide n_heads
    ffn_dim: int = 768  # SwiGLU hidden width
    vocab_size: int = 4096  # rows of the embedding and the output head
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 500000.0  # RoPE base frequency (Llama 3: 500,000)
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    max_seq_len: int = 8192  # longest sequence RoPE tables are built for (the RoPE limit)
    init_std: float = 0.02  # std of the normal init of weight matrices


# The fields that say what a model's weights are: a checkpoint (a resume, a recipe's next stage, an alignment
# stage's init) fits only a model with the same values. RoPE and max_seq_len may change (long context: Llama 3
# section 3.4.2), and init_std matters only before the first step.
MODEL_SHAPE_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "norm_eps")


@dataclass
class ParallelConfig:
    """Degrees of the parallel dimensions; their product is the world size."""

    dp_replicate: int = 1  # HSDP replicas (outermost)
    dp_shard: int = -1  # FSDP shards; -1 takes whatever the world size leaves
    pp: int = 1  # pipeline stages
    cp: int = 1  # context-parallel ranks
    tp: int = 1  # tensor-parallel ranks (innermost, Llama 3's [TP, CP, PP, DP] order)
    sequence_parallel: bool = True  # with tp > 1, split norms and residuals along the sequence across tp
    activation_checkpointing: str = "none"  # none | full (every block) | selective (every ac_every-th block)
    ac_every: int = 2  # selective activation checkpointing: recompute blocks 0, n, 2n, ...
    reshard_after_forward: bool = True  # FSDP: free gathered block parameters after forward (ZeRO-3)
    # pipeline: schedule, model chunks per rank, and how the layers are split over the pp * virtual stages
    pp_schedule: str = "1F1B"  # GPipe | 1F1B | Interleaved1F1B | InterleavedZeroBubble | ZBVZeroBubble | DualPipeV
    pp_virtual_stages: int = 1  # stages per pp rank (>1 for interleaved schedules; the V schedules need 2)
    pp_layers: List[int] = field(default_factory=list)  # transformer layers per stage; empty: balanced by cost
    pp_embedding_cost: float = 1.0  # the embedding counts as this many layers when balancing (Llama 3: one)
    pp_head_cost: float = 1.0  # the final norm + output head count as this many layers
    cp_attention: str = "all_gather"  # all_gather (K/V gathered, Llama 3) | ring (K/V passed around, P2P)


@dataclass
class DatasetConfig:
    """One tokenized dataset (a `.bin`/`.idx` pair) in a blend."""

    path: str = ""  # prefix of the .bin/.idx pair written by `herd prepare-data`
    weight: float = 1.0  # relative share of samples drawn from it


@dataclass
class TokenizerConfig:
    """Which tokenizer the data was made with (the model's vocab must cover it)."""

    kind: str = "hf"  # hf (a tokenizers tokenizer.json) or llama3 (the real Llama 3 tiktoken model)
    path: str = ""  # tokenizer.json for kind=hf


@dataclass
class DataStageConfig:
    """An earlier stage of a recipe as the data stream needs it to continue exactly: no sample seen twice or
    skipped when the sequence length or the blend changes (engine/data/stages.py). The recipe runner writes
    these (engine/recipe); a plain run has none."""

    start_sample: int = 0  # global sample count at which the stage began
    seq_len: int = 0  # its data.seq_len
    train: List[DatasetConfig] = field(default_factory=list)  # its training blend


@dataclass
class DataConfig:
    """Token data, packing, batching and bad-data policy."""

    train: List[DatasetConfig] = field(default_factory=list)  # the training blend
    valid: List[DatasetConfig] = field(default_factory=list)  # held-out blend for validation loss
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    seq_len: int = 256  # tokens per packed sequence
    micro_batch_size: int = 8  # sequences per forward/backward on one rank
    global_batch_size: int = 8  # sequences per optimizer step over all data-parallel ranks
    seed: int = 1234  # shuffling seed (documents and samples)
    document_mask: bool = True  # tokens never attend across document boundaries inside a packed sequence
    eod_mask_loss: bool = True  # no loss where the input token is end-of-document (it predicts another document)
    on_bad_data: str = "error"  # error: stop naming file and line; skip: leave the document out and count it
    stages: List[DataStageConfig] = field(default_factory=list)  # earlier recipe stages, oldest first
    stage_start_sample: int = 0  # global sample count at which this run's stage begins (after data.stages)


@dataclass
class OptimConfig:
    """AdamW (fused on CUDA, foreach on CPU) over fp32 master weights."""

    lr: float = 3e-4  # peak learning rate
    weight_decay: float = 0.1  # decoupled weight decay on matrices (not on norms)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # clip by global gradient norm; 0 disables


@dataclass
class ScheduleConfig:
    """Learning-rate schedule over train.steps optimizer steps."""

    kind: str = "cosine"  # cosine | wsd (warmup-stable-decay) | linear (decay to min, e.g. annealing) | constant
    warmup_steps: int = 0  # linear warmup from 0 to optim.lr
    min_lr_ratio: float = 0.1  # final LR as a fraction of optim.lr (Llama 3 405B: 8e-7 / 8e-5 = 0.01)
    decay_fraction: float = 0.2  # wsd only: share of the steps spent in the final linear decay
    # A recipe's schedule counts tokens, so it stays continuous when the batch changes between stages (the recipe
    # runner, engine/recipe, writes these; total_tokens 0 keeps the step schedule above).
    total_tokens: int = 0  # the main schedule's horizon: kind decays to min_lr_ratio at this many tokens
    warmup_tokens: int = 0  # linear warmup over this many tokens
    anneal_start_tokens: int = 0  # > 0: from this token count the LR falls linearly from its value there ...
    anneal_tokens: int = 0  # ... to 0 over this many tokens (Llama 3's annealing)
    stage_start_step: int = 0  # global optimizer step at which this run's stage began
    stage_start_tokens: int = 0  # tokens trained before that step


@dataclass
class TrainConfig:
    """The run itself."""

    steps: int = 100  # optimizer steps
    seed: int = 1234  # model init and RNG seed
    dtype: str = "bf16"  # autocast compute dtype: bf16 or fp32 (weights and grads stay fp32)
    device: str = "auto"  # auto (cuda if present), cpu or cuda
    eval_every: int = 0  # validation loss every N steps (0: only at the end, if data.valid is set)
    eval_batches: int = 8  # validation micro-batches per evaluation in all, whatever the layout (a multiple of dp)
    compile: bool = False  # torch.compile each transformer block (parallel/parallelize.py step 6)
    fused_projections: bool = False  # q/k/v and gate/up as one GEMM each (wqkv, w13); checkpoints keep the names
    grad_accum_fusion: bool = False  # add weight grads into the fp32 grads inside the backward GEMM (tp/pp layouts)


@dataclass
class CheckpointConfig:
    """Where and how often the run is saved."""

    dir: str = ""  # checkpoint root; empty means <log.run_dir>/<log.name>/checkpoints
    every: int = 0  # save every N steps (0: never)
    keep_last: int = 2  # complete checkpoints kept; at least 2 so one always survives a failed save
    resume: str = "auto"  # auto: newest complete checkpoint if any; never: start fresh
    async_save: bool = False  # write, hash and commit in a background thread (training blocks only for a copy)
    verify_sample: int = 0  # on load, hash every file (0) or all small files plus this many large ones
    load_weights: str = ""  # a checkpoint root (e.g. from `herd convert hf-to-herd`) whose newest model weights
    #                         initialize a run that has no checkpoint of its own; optimizer and data start fresh
    on_foreign: str = "refuse"  # dir holds another run's (log.name's) checkpoints: refuse | new_lineage (save
    #                             beside them in <dir>/lineages/<log.name>; theirs are never resumed or deleted)


@dataclass
class FP8Config:
    """FP8 training (engine/fp8)."""

    backend: str = "none"  # none | native (torch._scaled_mm) | te (TransformerEngine)
    recipe: str = "tensorwise"  # tensorwise (current scaling) | delayed (amax history)
    amax_history_len: int = 16  # delayed scaling window
    grad_dtype: str = "e5m2"  # e5m2 | e4m3 for gradients
    bf16_first_last_layers: bool = True  # keep the first and last transformer blocks in bf16
    cache_weights: bool = True  # native, without FSDP: quantize each weight once per step, reuse it per micro-batch
    # native only, off until measured on a GPU (docs/throughput.md "FP8 overheads"):
    weight_recipe: str = "same"  # same (as recipe) | tensorwise | delayed: delayed drops the weight amax pass
    fuse_norm_cast: bool = False  # RMSNorm writes its FP8 consumers' e4m3 input directly (recipe delayed, tp 1)
    fuse_swiglu_cast: bool = False  # SwiGLU writes w2's e4m3 input directly (recipe delayed, tp 1)


@dataclass
class GuardConfig:
    """Runtime guards agreed across ranks: non-finite values, loss spikes, stragglers, GPU telemetry
    (engine/callbacks/guards.py, telemetry.py; docs/reliability.md)."""

    nonfinite: str = "skip"  # NaN/Inf in the loss or a gradient: skip (no update) | rollback | stop
    spike: str = "skip"  # a loss spike: skip | rollback | stop
    spike_factor: float = 0.0  # a loss above this x the median of the last spike_window losses is a spike; 0: off
    spike_window: int = 50  # good steps whose median loss a step is compared with (checked once this many seen)
    max_consecutive_skips: int = 5  # stop the run when more steps than this in a row are skipped
    max_rollbacks: int = 3  # stop the run when it would roll back more often than this
    straggler_every: int = 10  # gather per-rank section timings every N steps (0: off)
    straggler_threshold: float = 0.1  # slower than the median by this fraction of the median step time
    straggler_patience: int = 3  # ... in this many consecutive windows flags the rank
    telemetry_every: int = 10  # read NVML (clocks, temperature, power, throttle, ECC, XID) every N steps; 0: off


@dataclass
class WatchdogConfig:
    """Hang watchdog: collective timeouts, a heartbeat and the merged hang report (engine/callbacks/watchdog.py,
    docs/reliability.md)."""

    enabled: bool = True  # heartbeat thread, collective recorder and hang report (the timeout below applies anyway)
    collective_timeout: float = 1800.0  # seconds a collective may block before the backend fails it (every group)
    timeout: float = 600.0  # seconds without progress (step, section or collective) before a hang is declared;
    #                         keep it below collective_timeout on NCCL, whose own timeout aborts the process
    heartbeat_every: float = 10.0  # seconds between <run>/heartbeat/rank<r>.json writes (and hang-trigger checks)
    dump_wait: float = 20.0  # seconds the reporting rank waits for the other ranks' dumps before merging
    trace_buffer: int = 2000  # torch flight recorder entries (TORCH_FR_BUFFER_SIZE) unless set in the environment


@dataclass
class SlurmConfig:
    """What `herd launch --slurm` renders into the sbatch script (launch/slurm.py, docs/launch.md)."""

    shape: str = "torchrun"  # torchrun: one task per node runs torchrun (c10d rendezvous on the first node);
    #                          srun: one task per rank, SLURM_PROCID/SLURM_LOCALID become RANK/LOCAL_RANK
    nodes: int = 1  # nodes to allocate
    gpus_per_node: int = 8  # ranks per node: one per GPU (with train.device=cpu: CPU processes per node)
    cpus_per_task: int = 0  # --cpus-per-task; 0 leaves SLURM's default
    job_name: str = ""  # --job-name (%x in the log names); empty uses log.name
    partition: str = ""  # --partition; empty: the cluster's default
    account: str = ""  # --account; empty: none
    qos: str = ""  # --qos; empty: none
    time: str = ""  # --time limit as HH:MM:SS or D-HH:MM:SS (e.g. 04:00:00); empty: the partition's limit
    signal_seconds: int = 300  # SIGUSR1 this many seconds before the time limit (saves and requeues)
    requeue: bool = True  # --requeue, and `scontrol requeue` when herd exits with 75 (preempted)
    env_file: str = ""  # per-cluster environment sourced before the ranks start (launch/clusters/*.env)
    master_port: int = 0  # rendezvous / MASTER_PORT; 0 derives it from the job id (20000 + id % 10000)
    sbatch_args: List[str] = field(default_factory=list)  # extra `#SBATCH` options, e.g. ["--exclusive"]


@dataclass
class LogConfig:
    """What the user sees: console lines, TensorBoard, metrics.jsonl."""

    run_dir: str = "runs"  # parent of every run's directory
    name: str = "debug"  # this run's directory name under run_dir (letters, digits, . _ -)
    every: int = 1  # console line every N steps
    tensorboard: bool = True  # write TensorBoard event files under <run>/tb
    jsonl: bool = True  # write <run>/metrics.jsonl, one JSON object per step
    peak_tflops: float = 0.0  # per-device peak for MFU; 0 looks the device up (H100 SXM bf16: 989.4)


@dataclass
class AlignConfig:
    """Post-training (align/, docs/alignment.md): what one step learns from. kind lm is pretraining on data.train;
    sft, rm and dpo read the JSONL files below (TRL's row formats) and use the rest of the job as it is."""

    kind: str = "lm"  # lm | sft (assistant tokens only) | rm (reward model) | dpo
    train_file: str = ""  # JSONL: sft {"messages": [...]} or prompt/completion; rm/dpo prompt/chosen/rejected
    valid_file: str = ""  # held-out rows of the same format (validation loss, RM and DPO accuracy)
    on_too_long: str = "truncate"  # a row over data.seq_len + 1 tokens: truncate it, or skip it (counted)
    dpo_beta: float = 0.1  # DPO's KL coefficient beta (Rafailov et al. 2023, eq. 7)
    dpo_loss: str = "sigmoid"  # sigmoid (DPO) or ipo (Azar et al. 2023)
    dpo_nll_alpha: float = 0.2  # NLL on the chosen response added to DPO (Llama 3 paper section 4.1.4)
    dpo_label_smoothing: float = 0.0  # conservative DPO's label noise epsilon (sigmoid loss only)
    reference: str = ""  # DPO's frozen reference: a checkpoint root; empty = the weights the run starts from


@dataclass
class LongContextEvalConfig:
    """A long-context stage's evaluations (engine/eval/long_context.py), run at the start and the end of a run:
    short-context validation loss (has it recovered?) and needle-in-a-haystack retrieval that herd generates,
    scored as multiple choice. Results: <run>/long_eval.jsonl, metrics.jsonl and TensorBoard (long_eval/...)."""

    enabled: bool = False  # evaluate at fit start (see at_start) and when the run has done its steps
    at_start: bool = True  # also before the first step (the pre-stage value); the recipe runner turns it off for a
    #                        stage's later chunks
    short_seq_len: int = 0  # sequence length of the short-context validation loss on data.valid (0: not measured)
    short_batches: int = 8  # validation micro-batches of that length in all (a multiple of dp)
    needle_lengths: List[int] = field(default_factory=list)  # haystack lengths in tokens (empty: data.seq_len)
    needle_depths: List[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # needle position as
    #                        a share of the filler before it: 0 first token, 1 right before the question
    needle_trials: int = 4  # haystacks per (length, depth); 0: no needle evaluation
    needle_candidates: int = 10  # answers scored per haystack, the true one among them (chance: 1 / this)
    filler: str = ""  # UTF-8 text file whose sentences fill the haystacks; empty: herd's built-in sentences
    seed: int = 0  # picks names, values, distractors and filler offsets (the same on every rank and run)


@dataclass
class JobConfig:
    """A whole training job."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    fp8: FP8Config = field(default_factory=FP8Config)
    log: LogConfig = field(default_factory=LogConfig)
    guards: GuardConfig = field(default_factory=GuardConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    long_eval: LongContextEvalConfig = field(default_factory=LongContextEvalConfig)


@dataclass
class StageConfig:
    """One stage of an alignment pipeline (`herd align`, docs/alignment.md). References to other stages are
    written "@name": that stage's checkpoints (init, reward) or output rows (data), from this round if it already
    ran in it, else from the round before."""

    name: str = ""  # unique within the pipeline; the stage's run directory is <run_dir>/r<round>-<name>
    kind: str = "sft"  # sft | rm | dpo | rejection_sampling
    data: str = ""  # training rows (JSONL) or "@stage" (the rows a rejection-sampling stage wrote)
    valid: str = ""  # held-out rows of the same format (optional)
    init: str = ""  # starting weights: a checkpoint root or "@stage"; empty = the latest policy (sft or dpo)
    reward: str = ""  # rejection sampling's reward model: root or "@stage"; empty = the latest rm stage
    prompts: str = ""  # rejection sampling: JSONL rows {"prompt": ...} or {"messages": [...]}
    samples: int = 4  # rejection sampling: completions per prompt (Llama 3 paper section 4.2.2: 10 to 30)
    max_new_tokens: int = 128  # rejection sampling: longest completion
    temperature: float = 0.7  # rejection sampling: sampling temperature (0: greedy)
    top_p: float = 0.9  # rejection sampling: nucleus
    overrides: List[str] = field(default_factory=list)  # job overrides for this stage, e.g. train.steps=50


@dataclass
class PipelineConfig:
    """An ordered list of post-training stages run `rounds` times on one engine (Llama 3 paper section 4.1)."""

    name: str = "align"
    config: str = ""  # the job YAML every stage starts from (model, layout, optimizer, data.tokenizer, ...)
    overrides: List[str] = field(default_factory=list)  # job overrides for every stage
    run_dir: str = "runs/align"  # stage runs, checkpoints and generated rows go under it
    init: str = ""  # checkpoint root of the first policy (empty: the model's random initialization)
    rounds: int = 1
    stages: List[StageConfig] = field(default_factory=list)


@dataclass
class DownstreamTaskConfig:
    """The offline multiple-choice task of `herd scaling` (scaling/downstream.py): given a held-out document's text
    up to a line, which of `choices` lines comes next? The other choices are lines of other held-out documents."""

    enabled: bool = True  # score every finished run on the task (needs its final checkpoint)
    items: int = 200  # questions
    choices: int = 4  # candidate lines per question (chance accuracy: 1 / choices)
    context_tokens: int = 128  # tokens of the document before the line the model sees
    min_line_chars: int = 16  # a line shorter than this (stripped) is neither asked nor used as a distractor
    seed: int = 0  # which lines are asked and which distractors are drawn


@dataclass
class ScalingConfig:
    """An IsoFLOP sweep (`herd scaling`, scaling/, docs/scaling.md): every budget x model size is a herd job."""

    name: str = "scaling"  # the sweep's directory under run_dir (letters, digits, . _ -)
    run_dir: str = "runs"  # parent of the sweep's directory
    job: str = ""  # the job YAML every run starts from (data, tokenizer, optimizer, dtype, ...)
    overrides: List[str] = field(default_factory=list)  # job overrides for every run
    budgets: List[float] = field(default_factory=list)  # compute budgets C in FLOPs (C = 6 N D)
    dims: List[int] = field(default_factory=list)  # model widths of the size grid (depth and heads follow)
    head_dim: int = 32  # fixed per-head width: n_heads = dim / head_dim
    aspect_ratio: int = 32  # fixed dim / n_layers
    kv_group: int = 2  # query heads per key/value head (GQA); 1 = multi-head attention
    ffn_multiplier: float = 1.3  # Llama 3's ffn_dim_multiplier: ffn = multiple_of-rounded 8/3 dim x this
    ffn_multiple_of: int = 32  # Llama 3 8B: 1024
    batch_sizes: List[int] = field(default_factory=list)  # sequences per step, one per budget; empty: the job's
    lrs: List[float] = field(default_factory=list)  # peak LR, one per dim; empty: the job's optim.lr
    warmup_fraction: float = 0.1  # warmup steps: this share of a run's steps ...
    warmup_steps: int = 2000  # ... but at most this many (Llama 3's scaling runs: 2,000)
    min_lr_ratio: float = 0.1  # cosine decay to this share of the peak (Llama 3: 0.1)
    weight_decay: float = 0.1  # AdamW's decoupled decay: each step shrinks weights by weight_decay x that step's LR
    min_steps: int = 20  # a (budget, size) with fewer optimizer steps is not run; the smallest size must reach it
    eval_batches: int = 16  # validation micro-batches of the final loss
    jobs: int = 1  # runs at once on this machine (herd scaling without --slurm)
    targets: List[float] = field(default_factory=list)  # budgets to predict the compute-optimal model for
    downstream: DownstreamTaskConfig = field(default_factory=DownstreamTaskConfig)


@dataclass
class RecipeGateConfig:
    """When a long-context stage may end (Llama 3 section 3.4.2: moved on when short-context performance had
    recovered and needle-in-a-haystack was solved). Measured by long_eval (engine/eval/long_context.py)."""

    enabled: bool = False  # off: the stage runs its tokens; its evaluations are still recorded when long_eval is on
    check_every_tokens: float = 0  # evaluate after every this many tokens (0: only when the budget is spent)
    short_loss_tolerance: float = 0.02  # pass: short-context loss <= (1 + this) x its value before the stage
    needle_accuracy: float = 1.0  # pass: mean needle accuracy >= this


@dataclass
class RecipeStageConfig:
    """One stage of a pretraining recipe: a normal run of the job with these overrides, continuing the one before
    (same checkpoint lineage, optimizer, data stream and token-based LR schedule)."""

    name: str = ""  # unique; letters, digits, . _ -
    kind: str = "pretrain"  # pretrain | long_context | anneal (LR linear to 0 over the stage's tokens)
    tokens: float = 0  # tokens this stage trains (a gated stage's budget); it starts where the last one ended
    overrides: List[str] = field(default_factory=list)  # job overrides: data.seq_len, data.global_batch_size,
    #                     data.train (the blend), parallel.*, model.rope_*, checkpoint.every, long_eval.*, ...
    gate: RecipeGateConfig = field(default_factory=RecipeGateConfig)
    average: bool = False  # anneal: average the checkpoints this stage saved into <run_dir>/averaged


@dataclass
class RecipeConfig:
    """A staged pretraining run (Llama 3 section 3.4: initial pretraining with batch/sequence ramps and mix
    changes, long-context stages, annealing with checkpoint averaging), run by `herd recipe`."""

    name: str = "recipe"
    config: str = ""  # the job YAML every stage starts from (model, layout, optimizer, data, checkpoint.every)
    overrides: List[str] = field(default_factory=list)  # job overrides for every stage
    run_dir: str = "runs/recipe"  # the run (metrics, TensorBoard, checkpoints) is <run_dir>/train
    total_tokens: float = 0  # the main schedule's horizon (cosine to schedule.min_lr_ratio); 0: all stages' tokens
    #                          before the anneal stage
    warmup_tokens: float = 0  # linear warmup over this many tokens ...
    warmup_steps: int = 0  # ... or over this many optimizer steps of the stages it spans (Llama 3: 8,000)
    export_hf: bool = False  # export the averaged model (or the last checkpoint) to <run_dir>/hf for transformers
    stages: List[RecipeStageConfig] = field(default_factory=list)
