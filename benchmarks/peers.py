"""herd's peers on one GPU: other training stacks on the same 4-layer Llama-3-8B proxy as benchmarks/mfu.py.

Same shapes, tokens, step structure and metrics as benchmarks/mfu.py (its model_config, make_batches and
train_steps are reused, so --layers/--seq-len/--accum... mean the same): each peer builds its own model, loss and
optimizer and trains on the same random token batches. Peers:

  hf-eager        transformers' LlamaForCausalLM, SDPA attention, bf16 autocast, fp32 master weights and fused AdamW
                  (benchmarks/mfu.py's hf-bf16, built by the same function)
  hf-compile      the same with each decoder layer under torch.compile (inductor, default mode), as torchtitan and
                  herd's compile step wrap per block
  hf-liger        the same with Liger-Kernel's Triton ops (apply_liger_kernel_to_llama: RMSNorm, RoPE, SwiGLU and
                  the fused linear cross entropy that never materializes the logits), eager otherwise
  titan-compile   torchtitan's Llama 3 model (its 8B layer recipe cut to --layers, FlexAttention with its causal
                  block mask) through its parallelize_llama: FSDP2 on a 1-GPU mesh with bf16 parameters / fp32
                  reduction, per-block torch.compile, no activation checkpointing; its chunked cross entropy and its
                  AdamW optimizer container (torchtitan's llama3_8b training recipe otherwise)
  titan-fp8       titan-compile with torchtitan's Float8 converter (torchao float8 training, recipe "rowwise"), the
                  output head kept in bf16 as herd-fp8 keeps it
  megatron-local  Megatron-core's GPTModel with the local layer spec (Megatron's own modules: no
                  TransformerEngine, which cannot be installed here, so unfused DotProductAttention), bf16 parameters,
                  Megatron's DDP with fp32 gradient buffers and its mixed-precision optimizer (fp32 main weights;
                  torch AdamW where neither TransformerEngine nor apex is installed)

Each peer runs in a fresh subprocess under a timeout (benchmarks/mfu.py's isolation: its own process group, killed
with its children at the timeout, killed when the parent dies). A peer that cannot run still gets a row, with why:
'missing dependency' (a package it imports is not installed), 'import error', 'out of memory', 'timeout' or
'failed', and the error line. With --herd-results, rows of herd (and HF eager) measured earlier in the same call at
the same settings are put beside the peers, so the table states herd against the best peer.

    python -m benchmarks.peers [--peers hf-compile,hf-liger,...] [--accum 8] [--steps 3] [--warmup 2] [--timeout 90]
                               [--herd-results benchmarks/results/mfu_<card>_accum8.json] [--save]
    python -m benchmarks.peers --peer hf-liger --json-out row.json ...     (one child, as the parent runs it)
"""

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Tuple

from benchmarks import mfu, step_profile
from benchmarks.report import publish

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Peer:
    name: str
    # (module imported, the package that provides it): checked before anything is built, so a missing one is a
    # 'missing dependency' row naming the package
    needs: Tuple[Tuple[str, str], ...]
    builder: str  # the name of this module's function (cfg, device, args, info) -> (loss_fn, optimizer, context)
    note: str  # what the table says the peer is


PEERS: Dict[str, Peer] = {p.name: p for p in (
    Peer("hf-eager", (("transformers", "transformers"),), "build_hf_eager",
         "transformers LlamaForCausalLM, SDPA, eager"),
    Peer("hf-compile", (("transformers", "transformers"),), "build_hf_compile",
         "transformers + torch.compile per decoder layer"),
    Peer("hf-liger", (("transformers", "transformers"), ("liger_kernel", "liger-kernel"), ("triton", "triton")),
         "build_hf_liger", "transformers + Liger-Kernel Triton ops (RMSNorm, RoPE, SwiGLU, fused linear CE)"),
    Peer("titan-compile", (("torchtitan", "torchtitan"), ("spmd_types", "spmd-types"), ("tyro", "tyro"),
                           ("torch_checkpointing", "torch-checkpointing")),
         "build_titan_bf16", "torchtitan Llama 3: FSDP2 (1 GPU) + per-block compile, FlexAttention, bf16"),
    Peer("titan-fp8", (("torchtitan", "torchtitan"), ("spmd_types", "spmd-types"), ("tyro", "tyro"),
                       ("torch_checkpointing", "torch-checkpointing"), ("torchao", "torchao")),
         "build_titan_fp8", "torchtitan Llama 3 + torchao float8 (rowwise), FSDP2 + compile, head bf16"),
    Peer("megatron-local", (("megatron.core", "megatron-core"),), "build_megatron",
         "Megatron-core GPTModel, local spec (no TransformerEngine), bf16 params + fp32 main grads"),
)}
DEFAULT_PEERS = ("hf-eager", "hf-compile", "hf-liger", "titan-compile", "titan-fp8", "megatron-local")


class PeerUnavailable(RuntimeError):
    """A peer's package is missing: the row says which, and no time is spent building."""


def parse_args(argv: Optional[List[str]] = None) -> Tuple[argparse.Namespace, argparse.Namespace]:
    """(peers' own options, benchmarks/mfu.py's shape and timing options, parsed by mfu.parse_args)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
    p.add_argument("-h", "--help", action="store_true")
    p.add_argument("--peers", default=",".join(DEFAULT_PEERS), help="comma list (parent mode)")
    p.add_argument("--peer", default=None, help="run this one peer in this process (child mode)")
    p.add_argument("--json-out", default=None, help="child mode: write the row here")
    p.add_argument("--timeout", type=float, default=150.0, help="seconds each child may run before it is killed")
    p.add_argument("--budget", type=float, default=0.0,
                   help="seconds for all peers together (0: no limit): each child's timeout is cut to what is left, "
                        "and a peer with under 15 s left is not started (its row says so); the table is always "
                        "written, so a caller's own time limit should leave a few seconds beyond this")
    p.add_argument("--log-dir", default=None, help="children's logs and JSON (default: a new temporary folder)")
    p.add_argument("--herd-results", default=None,
                   help="an mfu results JSON of the same call and settings: its rows join the table")
    p.add_argument("--save", action="store_true", help="write benchmarks/results/peers_<card><suffix>.{md,json}")
    p.add_argument("--results-suffix", default="", help="with --save: a suffix for the results name")
    own, rest = p.parse_known_args(argv)
    if own.help:
        p.print_help()
        print("\nShape and timing options are benchmarks/mfu.py's:")
        mfu.parse_args(["--help"])
    return own, mfu.parse_args(rest)


# ---------------------------------------------------------------------------------------------- child: one peer

def check_needs(peer: Peer) -> None:
    import importlib
    for module, package in peer.needs:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            raise PeerUnavailable(f"missing dependency: {package} ({err})") from err


def _optimizer(model, device):
    """The optimizer herd and hf-bf16 use: AdamW over fp32 master weights, fused on CUDA (engine/optim.py)."""
    from engine.config import OptimConfig
    from engine.optim import build_optimizer
    return build_optimizer(model, OptimConfig(), device)


def build_hf_eager(cfg, device, args, info):
    model, loss_fn, context = mfu.build_hf(cfg, device, args.seed, info)
    return loss_fn, _optimizer(model, device), context


def build_hf_compile(cfg, device, args, info):
    import torch
    model, loss_fn, context = mfu.build_hf(cfg, device, args.seed, info)
    for layer in model.model.layers:  # per block: one compiled graph reused by every layer
        layer.compile()
    info["compile"] = f"torch.compile per decoder layer ({len(model.model.layers)}), inductor, torch {torch.__version__}"
    return loss_fn, _optimizer(model, device), context


def build_hf_liger(cfg, device, args, info):
    import liger_kernel
    from liger_kernel.transformers import apply_liger_kernel_to_llama
    # class-level patching before the model exists (this process builds only this peer): Liger's RMSNorm, SwiGLU
    # MLP and RoPE, and LlamaForCausalLM.forward computing the loss with its fused linear cross entropy
    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=True)
    info["liger_kernel"] = getattr(liger_kernel, "__version__", None) or _dist_version("liger-kernel")
    model, loss_fn, context = mfu.build_hf(cfg, device, args.seed, info)
    return loss_fn, _optimizer(model, device), context


def _dist_version(package: str) -> Optional[str]:
    from importlib import metadata
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _init_single_process_group(device) -> None:
    """A one-rank process group (FSDP2 and Megatron need one): NCCL on CUDA, gloo on CPU."""
    import socket
    import torch.distributed as dist
    if dist.is_initialized():
        return
    with socket.socket() as s:  # a free port on this machine
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1,
                            device_id=device if device.type == "cuda" else None)


def build_titan_bf16(cfg, device, args, info):
    return _build_titan(cfg, device, args, info, fp8=False)


def build_titan_fp8(cfg, device, args, info):
    return _build_titan(cfg, device, args, info, fp8=True)


def _titan_model_config(cfg, fp8: bool, compile_model: bool):
    """torchtitan's Llama 3 8B model config (models/llama3 `_8b`) at cfg's shape: its layer recipe
    (_build_llama3_layers: fused QKV, depth-scaled init, Llama 3.1 RoPE scaling at theta cfg.rope_theta), its
    FlexAttention default, an untied head; and the Float8 converter for fp8 (head left in bf16)."""
    from torchtitan.models import llama3
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.llama3.model import Llama3Model
    init = llama3._EMBEDDING_INIT
    model_cfg = Llama3Model.Config(
        dim=cfg.dim, vocab_size=cfg.vocab_size,
        tok_embeddings=Embedding.Config(num_embeddings=cfg.vocab_size, embedding_dim=cfg.dim, param_init=init),
        norm=RMSNorm.Config(normalized_shape=cfg.dim, param_init=llama3._NORM_INIT),
        lm_head=Linear.Config(in_features=cfg.dim, out_features=cfg.vocab_size,
                              param_init=llama3._output_linear_init(cfg.dim)),
        layers=llama3._build_llama3_layers(
            fuse_qkv=True, n_layers=cfg.n_layers, dim=cfg.dim, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
            hidden_dim=cfg.ffn_dim, attn_backend="flex",
            rope=ComplexRoPE.Config(dim=cfg.dim // cfg.n_heads, max_seq_len=max(131072, cfg.max_seq_len),
                                    theta=cfg.rope_theta, scaling="llama")))
    if fp8:
        from torchtitan.components.quantization import Float8LinearConverter
        converter = Float8LinearConverter.Config(recipe_name="rowwise", filter_fqns=["lm_head"],
                                                 model_compile_enabled=compile_model)
        model_cfg = converter.build().convert(model_cfg)
    return model_cfg


def _titan_recipe(cfg, args, compile_model: bool):
    """The parts of torchtitan's llama3_8b training recipe (models/llama3/config_registry.py, whose module also
    imports the data loaders and their packages) this benchmark uses: training, parallelism and compile configs,
    the chunked cross entropy over the full vocabulary, AdamW at lr 3e-4 (default_adamw)."""
    from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
    from torchtitan.components.optimizer import default_adamw
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
    training = TrainingConfig(local_batch_size=args.batch_size, seq_len=args.seq_len, steps=1000)
    loss = ChunkedLossWrapper.Config(loss_fn=CrossEntropyLoss.Config(global_vocab_size=cfg.vocab_size))
    return (training, ParallelismConfig(), CompileConfig(enable=compile_model, components=["model", "loss"]), loss,
            default_adamw(lr=3e-4))


def _build_titan(cfg, device, args, info, fp8: bool):
    """torchtitan's own path from its Trainer.__init__: meta build, parallelize_llama (FSDP2 + compile), to_empty
    and init_weights on the device, its loss (chunked cross entropy) and its optimizer container."""
    import torch
    import torchtitan
    from torchtitan.components.loss import ChunkedLossWrapper
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed import utils as dist_utils
    from torchtitan.models.llama3 import parallelize_llama
    compile_model = device.type == "cuda"  # inductor on the CPU smoke test would only cost minutes
    training, parallelism, compile_config, loss_config, optimizer_config = _titan_recipe(cfg, args, compile_model)
    model_cfg = _titan_model_config(cfg, fp8, compile_model)
    model_cfg.update_from_config(config=SimpleNamespace(training=training, parallelism=parallelism,
                                                        compile=compile_config))
    _init_single_process_group(device)
    torch.autograd.set_multithreading_enabled(False)  # as torchtitan's init_distributed does
    dist_utils.set_spmd_backend(parallelism.spmd_backend)
    if device.type != "cuda":  # CPU smoke test: torchtitan picks its mesh's device type at import ("cuda")
        import torchtitan.distributed.parallel_dims as titan_dims
        titan_dims.device_type = device.type
    parallel_dims = ParallelDims.from_config(parallelism, world_size=1)
    torch.manual_seed(args.seed)
    with torch.device("meta"):
        model = model_cfg.build()
    model = parallelize_llama(model, parallel_dims=parallel_dims, training=training, parallelism=parallelism,
                              compile_config=compile_config, ac_config=None,
                              dump_folder=tempfile.mkdtemp(prefix="herd-titan-"))
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    model.train()
    loss = loss_config.build(compile_config=compile_config)
    if isinstance(loss, ChunkedLossWrapper):  # as Trainer.__init__: the loss applies the head chunk by chunk
        loss.set_lm_head(model.lm_head)
        model._skip_lm_head = True
    optimizers = optimizer_config.build(model_parts=[model])
    info.update(torchtitan=getattr(torchtitan, "__version__", None) or _dist_version("torchtitan"),
                spmd_backend=parallelism.spmd_backend, compile=compile_model,
                mixed_precision=f"{training.mixed_precision_param} params, {training.mixed_precision_reduce} reduce")
    if fp8:
        info["torchao"] = _dist_version("torchao")
    positions = torch.arange(args.seq_len, device=device)[None].expand(args.batch_size, -1)  # one document each

    # as torchtitan's trainer: the loss is a token sum over the tokens of the whole optimizer step (all its
    # micro-batches), and the chunked loss hands the decoder its gradient whatever the gradient of its output is;
    # so the step's tokens go in here and the value comes back times accum, which train_steps divides again
    step_tokens = torch.tensor(args.accum * args.batch_size * args.seq_len, device=device)

    def loss_fn(inputs, targets, mask):
        masks = model.get_attention_masks(positions=positions)  # causal: block-causal over one document
        pred = model(inputs, positions=positions, attention_masks=masks)
        value, _ = loss(pred, targets, step_tokens)
        return value * args.accum
    return loss_fn, _ZeroGradToNone(optimizers), contextlib.nullcontext


class _ZeroGradToNone:
    """benchmarks/mfu.py's train_steps calls zero_grad(set_to_none=True); optimizer containers differ in its
    signature."""

    def __init__(self, optimizer, before_step: Callable[[], None] = lambda: None,
                 after_zero: Callable[[], None] = lambda: None):
        self.optimizer, self.before_step, self.after_zero = optimizer, before_step, after_zero

    def step(self):
        self.before_step()
        self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True):
        self.optimizer.zero_grad()
        self.after_zero()


def build_megatron(cfg, device, args, info):
    """Megatron-core's GPTModel on the local spec, wrapped as Megatron trains it: its DDP (fp32 main_grad buffers)
    and its mixed-precision optimizer over fp32 main weights."""
    import torch
    import torch.nn.functional as F
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.transformer_config import TransformerConfig
    _init_single_process_group(device)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    # the fusions Megatron enables by default need apex or TransformerEngine kernels, absent here: off
    config = TransformerConfig(
        num_layers=cfg.n_layers, hidden_size=cfg.dim, ffn_hidden_size=cfg.ffn_dim, num_attention_heads=cfg.n_heads,
        num_query_groups=cfg.n_kv_heads, kv_channels=cfg.dim // cfg.n_heads, gated_linear_unit=True,
        activation_func=F.silu, normalization="RMSNorm", layernorm_epsilon=cfg.norm_eps, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=cfg.init_std, bf16=True,
        params_dtype=torch.bfloat16, attention_softmax_in_fp32=True, use_cpu_initialization=device.type != "cuda",
        bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False)
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                     vocab_size=cfg.vocab_size, max_sequence_length=cfg.max_seq_len, pre_process=True,
                     post_process=True, share_embeddings_and_output_weights=False, position_embedding_type="rope",
                     rotary_base=int(cfg.rope_theta))
    model.to(device)
    ddp = DistributedDataParallel(config=config, module=model, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False))
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=3e-4, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, bf16=True,
        params_dtype=torch.bfloat16, use_distributed_optimizer=False, clip_grad=0.0), [ddp])
    info.update(megatron_core=_dist_version("megatron-core"), transformer_engine=_dist_version("transformer-engine"),
                optimizer=type(getattr(optimizer, "optimizer", optimizer)).__name__)
    position_ids = torch.arange(args.seq_len, device=device)[None].expand(args.batch_size, -1)

    def loss_fn(inputs, targets, mask):
        per_token = ddp(inputs, position_ids, attention_mask=None, labels=targets)  # [b, s] fp32
        return per_token.float().sum() / targets.numel()
    return loss_fn, _ZeroGradToNone(optimizer, before_step=ddp.finish_grad_sync,
                                     after_zero=ddp.zero_grad_buffer), contextlib.nullcontext


def measure_peer(name: str, args: argparse.Namespace, info: dict) -> None:
    """Build the peer, warm up, time args.steps optimizer steps; the row's numbers as benchmarks/mfu.py's."""
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r} (known: {', '.join(PEERS)})")
    check_needs(PEERS[name])
    import torch
    from engine.flops import device_peak_tflops, flops_per_token
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    info.update(device_name=torch.cuda.get_device_name(device) if cuda else "cpu", torch=torch.__version__)
    cfg = mfu.model_config(args)
    start = time.perf_counter()
    loss_fn, optimizer, step_context = globals()[PEERS[name].builder](cfg, device, args, info)
    batches = mfu.make_batches(args, device)
    info["build_s"] = time.perf_counter() - start
    start = time.perf_counter()
    losses = mfu.train_steps(loss_fn, optimizer, batches, 0, args.warmup, args.accum, step_context)
    if cuda:
        torch.cuda.synchronize(device)
    info["warmup_s"] = time.perf_counter() - start  # compile time lands here
    start = time.perf_counter()
    losses += mfu.train_steps(loss_fn, optimizer, batches, args.warmup, args.steps, args.accum, step_context)
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    values = [float(x) for x in torch.stack([torch.as_tensor(v).float() for v in losses]).cpu()]
    tokens = args.steps * args.accum * args.batch_size * args.seq_len
    peak = args.peak_tflops or device_peak_tflops(info["device_name"], "bf16")
    fpt = flops_per_token(cfg, args.seq_len, causal=False)
    tps = tokens / seconds
    info.update(seconds=seconds, tokens_per_step=args.accum * args.batch_size * args.seq_len, tokens_per_s=tps,
                ms_per_step=1000.0 * seconds / args.steps, flops_per_token=fpt, tflops=fpt * tps / 1e12,
                peak_tflops=peak, peak_dtype="bf16", mfu=(fpt * tps / 1e12) / peak if peak > 0 else None,
                peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
                first_loss=values[0], last_loss=values[-1], loss_finite=all(math.isfinite(v) for v in values))
    if args.profile and cuda:
        try:
            info["profile"] = step_profile.profile_step(
                lambda: mfu.train_steps(loss_fn, optimizer, batches, args.warmup + args.steps, 1, args.accum,
                                        step_context))
        except Exception as err:  # a profiler problem must not cost the measured row
            info["profile"] = {"error": mfu.error_line(f"{type(err).__name__}: {err}")}


def classify(error: str) -> str:
    """Why a peer has no numbers, in the words the table uses."""
    text = error.lower()
    if text.startswith("missing dependency") or "modulenotfounderror" in text:
        return "missing dependency"
    if "importerror" in text or "cannot import" in text:
        return "import error"
    if "out of memory" in text or "outofmemoryerror" in text:
        return "out of memory"
    if text.startswith("timed out") or text.startswith("not run: the time budget"):
        return "timeout"
    return "failed"


def run_child(name: str, args: argparse.Namespace) -> dict:
    info = {"variant": name, "peer": name, "note": PEERS[name].note if name in PEERS else None,
            "steps": args.steps, "warmup": args.warmup, "seq_len": args.seq_len, "batch_size": args.batch_size,
            "accum": args.accum, "layers": args.layers, "dim": args.dim, "ffn_dim": args.ffn_dim,
            "heads": args.heads, "kv_heads": args.kv_heads, "vocab": args.vocab, "error": None}
    try:
        measure_peer(name, args, info)
    except PeerUnavailable as err:
        info["error"] = mfu.error_line(str(err))
    except Exception as err:  # OOM, an API the installed version lacks...: the row says so, the parent goes on
        traceback.print_exc()
        info["error"] = mfu.error_line(f"{type(err).__name__}: {err}")
    if info["error"]:
        info["why"] = classify(info["error"])
    return info


# ---------------------------------------------------------------------------------------------- parent: all peers

def child_command(args: argparse.Namespace, name: str, json_out: Path) -> List[str]:
    cmd = [sys.executable, "-m", "benchmarks.peers", "--peer", name, "--json-out", str(json_out)]
    for flag, attr in mfu.FORWARDED:
        cmd += [flag, str(getattr(args, attr))]
    return cmd


def run_peer(args: argparse.Namespace, name: str, log_dir: Path, timeout: float) -> dict:
    """One peer in a fresh subprocess (own process group) with a hard timeout: its row, or a row saying why not."""
    json_out, log = log_dir / f"{name}.json", log_dir / f"{name}.log"
    if json_out.exists():
        json_out.unlink()
    start = time.perf_counter()
    with open(log, "w") as log_file:
        proc = subprocess.Popen(child_command(args, name, json_out), cwd=ROOT, env=dict(os.environ),
                                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=mfu._die_with_parent)
        try:
            rc, timed_out = proc.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            mfu._kill_group(proc)
            rc, timed_out = proc.wait(), True
        except BaseException:  # the parent stopped: leave no child holding the GPU
            mfu._kill_group(proc)
            raise
    row = {"variant": name, "peer": name, "note": PEERS[name].note if name in PEERS else None, "error": None}
    if json_out.exists() and not timed_out:
        try:
            row = json.loads(json_out.read_text())
        except ValueError as err:
            row["error"] = f"unreadable result {json_out}: {err}"
    if timed_out:
        row["error"] = f"timed out after {timeout:g} s (killed)"
    elif row.get("error") is None and rc != 0:
        how = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
        row["error"] = mfu.error_line(f"{how}: {mfu.last_line(log) or 'no output'}")
    if row.get("error"):
        row["why"] = classify(row["error"])
    row.update(wall_s=time.perf_counter() - start, log=str(log))
    return row


def herd_rows(path: Optional[str], args: argparse.Namespace) -> List[dict]:
    """The rows of an mfu results file measured at these settings (others would not compare), marked as such."""
    if not path:
        return []
    try:
        rows = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        print(f"[peers] --herd-results {path}: not read ({type(err).__name__}: {err})", flush=True)
        return []
    keys = ("seq_len", "batch_size", "accum", "layers", "dim", "ffn_dim", "heads", "kv_heads", "vocab")
    out = []
    for r in rows if isinstance(rows, list) else []:
        if not isinstance(r, dict) or r.get("error"):
            continue
        if any(r.get(k, 1 if k == "accum" else None) != getattr(args, k) for k in keys):
            continue
        out.append(dict(r, source=f"benchmarks/mfu.py ({Path(path).name})"))
    return out


def _cell(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def make_table(rows: List[dict]) -> str:
    """Markdown: every row's throughput and MFU, herd-bf16 against the fastest peer, notes on what each peer is."""
    peers_ok = [r for r in rows if r.get("peer") and not r.get("error")]
    best = max(peers_ok, key=lambda r: r["tokens_per_s"], default=None)
    herd = next((r for r in rows if r.get("variant") == "herd-bf16" and not r.get("error")), None)
    lines = ["| variant | tokens/s | ms/step | MFU | peak GiB | vs best peer | loss first -> last | what |",
             "|---|---|---|---|---|---|---|---|"]
    notes = []
    for r in rows:
        what = r.get("note") or r.get("source") or ""
        if r.get("error"):
            lines.append(f"| {r['variant']} | {r.get('why', 'failed')} | - | - | - | - | - | {what} |")
            why = r.get("why", "failed")
            notes.append(f"{r['variant']} did not run: {r['error']}" if r["error"].startswith(why)
                         else f"{r['variant']} did not run ({why}): {r['error']}")
            continue
        ratio = f"{r['tokens_per_s'] / best['tokens_per_s']:.2f}x" if best else "-"
        star = "*" if "fp8" in r["variant"] else ""
        mfu_cell = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%{star}"
        loss = f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}" + ("" if r.get("loss_finite", True) else " NOT FINITE")
        lines.append(f"| {r['variant']} | {r['tokens_per_s']:,.0f} | {r['ms_per_step']:.1f} | {mfu_cell} | "
                     f"{_cell(r.get('peak_mem_gib'), '.1f')} | {ratio} | {loss} | {what} |")
    notes.insert(0, "MFU: PaLM convention (engine/flops.py, causal=False) against the dense bf16 peak; * fp8 rows "
                    "against the same bf16 peak. hf-* peers' loss covers seq_len - 1 tokens per sequence (labels "
                    "shifted by transformers); the others' all seq_len.")
    if best and herd:
        notes.insert(1, f"herd-bf16 / best peer ({best['variant']}): "
                        f"{herd['tokens_per_s'] / best['tokens_per_s']:.2f}x (issue 20 target: >= 1.15x).")
    notes.append("megatron-local runs without TransformerEngine (not installable on this machine): Megatron's "
                 "local spec, unfused attention and no fused kernels; it is not Megatron's fast path.")
    profiles = step_profile.markdown(rows)
    return ("\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes)
            + (f"\n\n## One profiled step per peer\n\n{profiles}" if profiles else ""))


def run_parent(own: argparse.Namespace, args: argparse.Namespace) -> List[dict]:
    names = [n.strip() for n in own.peers.split(",") if n.strip()]
    log_dir = Path(own.log_dir) if own.log_dir else Path(tempfile.mkdtemp(prefix="herd-peers-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"[peers] {len(names)} peers, {args.warmup} warm-up + {args.steps} timed steps of {args.accum} x "
          f"[{args.batch_size}, {args.seq_len}], timeout {own.timeout:g} s each, logs in {log_dir}", flush=True)
    rows = herd_rows(own.herd_results, args)
    start = time.perf_counter()
    for name in names:
        left = own.budget - (time.perf_counter() - start) if own.budget > 0 else own.timeout
        if left < 15:
            rows.append({"variant": name, "peer": name, "note": PEERS[name].note if name in PEERS else None,
                         "error": f"not run: the time budget of {own.budget:g} s was spent", "why": "timeout"})
            print(f"[peers] {name}: not run (time budget spent)", flush=True)
            continue
        row = run_peer(args, name, log_dir, min(own.timeout, left))
        rows.append(row)
        if row.get("error"):
            print(f"[peers] {name}: {row['why']} ({row['wall_s']:.0f} s): {row['error']} (log: {row['log']})",
                  flush=True)
        else:
            print(f"[peers] {name}: {row['tokens_per_s']:,.0f} tokens/s, {row['ms_per_step']:.1f} ms/step "
                  f"({row['wall_s']:.0f} s)", flush=True)
    ok = next((r for r in rows if not r.get("error") and r.get("peer")), {})
    description = (f"`python -m benchmarks.peers {' '.join(sys.argv[1:])}` on {ok.get('device_name', 'unknown')}, "
                   f"torch {ok.get('torch', '?')}, {time.strftime('%Y-%m-%d')}: benchmarks/mfu.py's proxy "
                   f"({args.layers} layers of dim {args.dim}, FFN {args.ffn_dim}, {args.heads}/{args.kv_heads} heads, "
                   f"vocab {args.vocab}), {args.accum} x [{args.batch_size}, {args.seq_len}] tokens per optimizer "
                   f"step, {args.warmup} warm-up + {args.steps} timed steps, each peer in a fresh process.")
    publish(f"peers_{mfu.card_slug(rows)}{own.results_suffix}", rows, make_table(rows),
            "herd against other training stacks, one GPU", description, own.save)
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    own, args = parse_args(argv)
    if own.peer is None:
        signal.signal(signal.SIGTERM, mfu._raise_on_sigterm)
        rows = run_parent(own, args)
        return 0 if all(not r.get("error") for r in rows) else 1
    row = run_child(own.peer, args)
    text = json.dumps(row, indent=2, default=str)
    print(text, flush=True)
    if own.json_out:
        Path(own.json_out).write_text(text + "\n")
    return 0 if row["error"] is None else 1


if __name__ == "__main__":
    sys.exit(main())
