"""Single-GPU training throughput and MFU of herd against Hugging Face transformers, on a Llama-3-8B layer proxy.

The model has Llama 3 8B's layer shape (dim 4096, SwiGLU width 14336, 32 query / 8 KV heads, vocabulary 128256)
with 4 layers, and trains on [1, 8192] sequences of random token ids (seeded; a few fixed batches cycled) with fp32
master weights, bf16 autocast, fused AdamW and no activation checkpointing. Variants:

  herd-bf16            herd's model and loss (engine.ops.cross_entropy_sum / tokens), csrc/ kernels where built
  herd-bf16-nokernels  the same with HERD_KERNELS=0: the pure-torch references, to show what the kernels buy
  herd-fp8             herd-bf16 after engine.fp8.apply_fp8(model, FP8Config(backend="native", recipe="tensorwise",
                       bf16_first_last_layers=False)): all 4 blocks' projections in FP8, the head in bf16
  herd-fp8-delayed     the same with recipe="delayed"
  herd-<base>-<opts>   herd-bf16, herd-fp8 or herd-fp8-delayed with options, any of (in this order): fused (train.
                       fused_projections: one GEMM for q/k/v, one for gate/up), gaf (train.grad_accum_fusion: weight
                       grads added into the fp32 grads inside the backward GEMM; not with compile), wdelayed (FP8
                       only: fp8.weight_recipe=delayed, no weight amax pass), fcast (herd-fp8-delayed only, not with
                       compile: fp8.fuse_norm_cast and fuse_swiglu_cast, engine/fp8/fused_cast.py), compile
                       (train.compile: torch.compile per block, parallel/parallelize.py apply_compile; the warm-up
                       steps pay the compilation). EXTRA_VARIANTS lists the ones measured; the default run leaves
                       them out (--variants names them)
  hf-bf16              the baseline: transformers' LlamaForCausalLM of the same shape (SDPA attention), loss from
                       its labels (it shifts them itself, so its loss covers seq_len - 1 tokens of each sequence)

Every variant runs in a fresh subprocess under a timeout, so an OOM, crash or hang in one cannot hide the others:
the parent collects each child's JSON, prints the error line of a failed one and goes on; the table comes last.

--accum N runs N micro-batches (each [batch, seq_len]) forward and backward per optimizer step, as training with
gradient accumulation or pipeline micro-batches does; the default 1 makes every micro-batch pay a whole AdamW
step over the fp32 master weights (about 14% of the 4-layer proxy's step on an H100).

tokens/s counts the input tokens of the timed steps (steps * accum * batch * seq_len / seconds, between two
torch.cuda.synchronize()). TFLOP/s = flops_per_token * tokens/s with engine/flops.py's PaLM convention (Chowdhery
et al. 2022, appendix B: 6N + 12*L*H*Q*T, the full T x T attention matrix, causal=False); MFU divides it by the
device's dense bf16 peak (H100 SXM: 989.4 TFLOP/s). fp8 rows are measured against the same bf16 peak, which the
table says.

    python -m benchmarks.mfu [--steps 20] [--warmup 5] [--variants herd-bf16,hf-bf16] [--timeout 150] [--save]
    python -m benchmarks.mfu --variant herd-bf16 --json-out row.json ...     (one child, as the parent runs it)
"""

import argparse
import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from benchmarks import step_profile
from benchmarks.report import publish

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("herd-bf16", "herd-bf16-nokernels", "herd-fp8", "herd-fp8-delayed", "hf-bf16")
FP8_RECIPES = {"herd-fp8": "tensorwise", "herd-fp8-delayed": "delayed"}
NO_KERNELS = "herd-bf16-nokernels"
OPTIONS = ("fused", "gaf", "wdelayed", "fcast", "compile")  # herd variant suffixes, in this order
EXTRA_VARIANTS = ("herd-bf16-compile", "herd-bf16-fused", "herd-bf16-fused-compile", "herd-bf16-gaf",
                  "herd-bf16-fused-gaf", "herd-fp8-compile", "herd-fp8-fused-compile", "herd-fp8-wdelayed",
                  "herd-fp8-delayed-fcast", "herd-fp8-delayed-fused-fcast")


def herd_options(variant: str) -> Tuple[str, Tuple[str, ...]]:
    """'herd-fp8-fused-compile' -> ('herd-fp8', ('fused', 'compile')); ValueError for an unknown name."""
    for base in sorted(FP8_RECIPES, key=len, reverse=True) + ["herd-bf16"]:
        if variant == base or variant.startswith(base + "-"):
            opts = tuple(variant[len(base) + 1:].split("-")) if variant != base else ()
            if all(o in OPTIONS for o in opts) and list(opts) == sorted(opts, key=OPTIONS.index) \
                    and len(set(opts)) == len(opts) and not {"gaf", "compile"} <= set(opts) \
                    and ("wdelayed" not in opts or base in FP8_RECIPES) \
                    and ("fcast" not in opts or (base == "herd-fp8-delayed" and "compile" not in opts)):
                return base, opts
    raise ValueError(f"unknown variant {variant!r} (known: {', '.join(VARIANTS + EXTRA_VARIANTS)}, or herd-<base>-"
                     f"<{'|'.join(OPTIONS)}>... in that order, gaf and compile not together, wdelayed with fp8, "
                     f"fcast with fp8-delayed and without compile)")
# child options forwarded by the parent: (flag, attribute)
FORWARDED = (("--steps", "steps"), ("--warmup", "warmup"), ("--seq-len", "seq_len"), ("--batch-size", "batch_size"),
             ("--layers", "layers"), ("--dim", "dim"), ("--ffn-dim", "ffn_dim"), ("--heads", "heads"),
             ("--kv-heads", "kv_heads"), ("--vocab", "vocab"), ("--n-batches", "n_batches"), ("--seed", "seed"),
             ("--device", "device"), ("--peak-tflops", "peak_tflops"), ("--profile", "profile"), ("--accum", "accum"))


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list (parent mode)")
    p.add_argument("--variant", default=None, help="run this one variant in this process (child mode)")
    p.add_argument("--json-out", default=None, help="child mode: write the result row here")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed optimizer steps before them")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=1, help="sequences per micro-batch")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step (gradient accumulation)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--ffn-dim", type=int, default=14336)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--n-batches", type=int, default=4, help="distinct random batches, cycled")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (smoke tests)")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="peak for MFU; 0 looks the device up (engine/flops.py, bf16)")
    p.add_argument("--timeout", type=float, default=150.0, help="seconds each child may run before it is killed")
    p.add_argument("--log-dir", default=None, help="children's logs and JSON (default: a new temporary folder)")
    p.add_argument("--profile", type=int, default=0,
                   help="1: after the timed steps, profile one more step (CUDA only; benchmarks/step_profile.py)")
    p.add_argument("--results-suffix", default="",
                   help="with --save: write benchmarks/results/mfu_<card><suffix>.{md,json} (e.g. _8layers)")
    p.add_argument("--save", action="store_true", help="write benchmarks/results/mfu_<card>.{md,json}")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.n_batches < 1:
        p.error("--steps must be >= 1, --warmup >= 0 and --n-batches >= 1")
    return args


# ---------------------------------------------------------------------------------------------- child: one variant

def model_config(args: argparse.Namespace):
    from engine.config import ModelConfig
    return ModelConfig(name=f"llama3-8b-layer-proxy-{args.layers}L", dim=args.dim, n_layers=args.layers,
                       n_heads=args.heads, n_kv_heads=args.kv_heads, ffn_dim=args.ffn_dim, vocab_size=args.vocab,
                       max_seq_len=max(8192, args.seq_len))


def make_batches(args: argparse.Namespace, device) -> List[Tuple]:
    """n_batches fixed (inputs, targets, loss_mask) triples of random ids, each [batch, seq_len]."""
    import torch
    g = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, args.vocab, (args.n_batches, args.batch_size, args.seq_len + 1), generator=g)
    out = []
    for t in tokens.to(device):  # t: [batch, seq_len + 1]
        out.append((t[:, :-1].contiguous(), t[:, 1:].contiguous(), torch.ones_like(t[:, 1:], dtype=torch.bool)))
    return out


def fast_model(cfg, device, seed: int, fused_projections: bool = False):
    """herd's model with random weights drawn on the device itself. engine.model.build_model draws each full
    parameter on the CPU (so every layout gets identical values), which for 1.9B parameters costs tens of seconds
    per variant; throughput does not depend on the values, so the benchmark draws them where they live."""
    import torch
    from engine.model import build_meta_model
    model = build_meta_model(cfg, fused_projections).to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, cfg.init_std, generator=generator)
    for module in model.modules():
        if hasattr(module, "reset_tables"):
            module.reset_tables()
    return model


def build_herd(variant: str, cfg, device, seed: int, info: dict) -> Tuple[object, Callable, Callable]:
    """herd's model (fp8-converted for the fp8 variants), its loss function (inputs, targets, mask) -> loss and the
    scope each optimizer step's micro-batches run in (engine.fp8.fp8_step_context: the FP8 weight cache)."""
    import torch
    from engine import ops
    base, opts = herd_options(variant) if variant != NO_KERNELS else ("herd-bf16", ())
    info["options"] = list(opts)
    model = fast_model(cfg, device, seed, fused_projections="fused" in opts)
    step_context = contextlib.nullcontext
    if base in FP8_RECIPES:
        import dataclasses
        from engine.config import FP8Config
        from engine.fp8 import apply_fp8, fp8_step_context
        # every block in FP8: the 4-layer proxy stands for the middle of the 32-layer stack (a full 8B run keeps only
        # its first and last blocks in bf16, 2 of 32); the output head stays bf16 as in training
        fp8_cfg = FP8Config(backend="native", recipe=FP8_RECIPES[base], bf16_first_last_layers=False,
                            weight_recipe="delayed" if "wdelayed" in opts else "same",
                            fuse_norm_cast="fcast" in opts, fuse_swiglu_cast="fcast" in opts)
        info["fp8_config"] = dataclasses.asdict(fp8_cfg)
        converted = apply_fp8(model, fp8_cfg)  # in place; returns the converted layer names
        if isinstance(converted, torch.nn.Module):  # (a version that returns the model works too)
            model = converted
        elif isinstance(converted, (list, tuple)):
            info["fp8_layers"] = len(converted)
        step_context = fp8_step_context(fp8_cfg, [model])
    if "gaf" in opts:
        from engine.ops.accum_linear import use_fused_accumulation
        info["grad_accum_fusion_layers"] = use_fused_accumulation(model)
    if "compile" in opts:
        from parallel.parallelize import apply_compile
        apply_compile(model)
    model.train()

    def loss_fn(inputs, targets, mask):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(inputs)  # [b, s, vocab]
        # summed token loss over the step's token count, as engine/train_module.py does (outside autocast)
        return ops.cross_entropy_sum(logits, targets, mask) / targets.numel()
    return model, loss_fn, step_context


def _init_parameters(klass) -> set:
    """Constructor argument names over the class and its bases (transformers 4.x and 5.x differ here)."""
    import inspect
    names = set()
    for base in klass.__mro__:
        if "__init__" in vars(base):
            try:
                names |= set(inspect.signature(base.__init__).parameters)
            except (TypeError, ValueError):
                pass
    return names


def hf_config(cfg):
    """A transformers LlamaConfig of cfg's shape: SDPA attention, untied head, fp32, RoPE theta 500k, no KV cache."""
    import torch
    from transformers import LlamaConfig
    known = _init_parameters(LlamaConfig)
    kwargs = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
                  num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                  num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_seq_len,
                  rms_norm_eps=cfg.norm_eps, initializer_range=cfg.init_std, tie_word_embeddings=False,
                  use_cache=False, attn_implementation="sdpa")
    if "rope_parameters" in known:  # transformers 5.x
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    else:  # 4.x
        kwargs["rope_theta"] = cfg.rope_theta
    kwargs["dtype" if "dtype" in known else "torch_dtype"] = torch.float32  # 4.56+ and 5.x: dtype
    return LlamaConfig(**kwargs)


def build_hf(cfg, device, seed: int, info: dict) -> Tuple[object, Callable, Callable]:
    import torch
    import transformers
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    with torch.device(device):  # initialize on the device (fast) rather than on the host and copy
        model = LlamaForCausalLM(hf_config(cfg))
    model.to(device=device, dtype=torch.float32).train()
    info["transformers"] = transformers.__version__
    info["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    if info["attn_implementation"] != "sdpa":
        raise RuntimeError(f"hf-bf16: attention implementation is {info['attn_implementation']!r}, not 'sdpa'")

    def loss_fn(inputs, targets, mask):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            # labels = the inputs: transformers shifts them itself (seq_len - 1 loss tokens per sequence)
            return model(input_ids=inputs, labels=inputs).loss
    return model, loss_fn, contextlib.nullcontext


def train_steps(loss_fn: Callable, optimizer, batches: List[Tuple], first: int, count: int, accum: int = 1,
                step_context: Callable = contextlib.nullcontext) -> list:
    """`count` optimizer steps of `accum` micro-batches each, starting at step `first` (batches cycled); returns each
    step's detached mean micro-batch loss (no host sync). Gradients are summed over the micro-batches of 1/accum
    of each loss: the step's gradient is that of the mean loss, as with gradient accumulation in training. The
    micro-batches run inside `step_context()`, as engine/train_module.py runs them (the FP8 weight cache)."""
    losses = []
    for i in range(first, first + count):
        step_loss = 0.0
        with step_context():
            for j in range(accum):
                inputs, targets, mask = batches[(i * accum + j) % len(batches)]
                loss = loss_fn(inputs, targets, mask) / accum
                loss.backward()
                step_loss = step_loss + loss.detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
    return losses


def measure(args: argparse.Namespace, info: dict) -> None:
    """Build the variant, warm up, time args.steps steps, and fill `info` with the row's numbers."""
    if args.variant not in VARIANTS:
        herd_options(args.variant)  # a ValueError naming the known ones
    if args.variant == NO_KERNELS:
        os.environ["HERD_KERNELS"] = "0"  # read when engine.ops is first imported (the parent sets it too)
    import torch
    from engine.config import OptimConfig
    from engine.flops import device_peak_tflops, flops_per_token
    from engine.ops import kernel_status
    from engine.optim import build_optimizer
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    info["device_name"] = torch.cuda.get_device_name(device) if cuda else "cpu"
    info["torch"] = torch.__version__
    if args.variant != "hf-bf16":
        info["kernel_status"] = kernel_status()
    if args.variant == NO_KERNELS and "cuda kernel" in info["kernel_status"].values():
        raise RuntimeError("herd-bf16-nokernels: engine.ops was imported before HERD_KERNELS=0 was set")
    cfg = model_config(args)
    start = time.perf_counter()
    build = build_hf if args.variant == "hf-bf16" else lambda *a: build_herd(args.variant, *a)
    model, loss_fn, step_context = build(cfg, device, args.seed, info)
    optimizer = build_optimizer(model, OptimConfig(), device)  # fused AdamW on CUDA, fp32 master weights
    batches = make_batches(args, device)
    info["build_s"] = time.perf_counter() - start
    losses = train_steps(loss_fn, optimizer, batches, 0, args.warmup, args.accum, step_context)
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    losses += train_steps(loss_fn, optimizer, batches, args.warmup, args.steps, args.accum, step_context)
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    values = [float(x) for x in torch.stack(losses).float().cpu()]
    tokens = args.steps * args.accum * args.batch_size * args.seq_len
    peak = args.peak_tflops or device_peak_tflops(info["device_name"], "bf16")
    fpt = flops_per_token(cfg, args.seq_len, causal=False)
    tps = tokens / seconds
    info.update(seconds=seconds, tokens_per_step=args.accum * args.batch_size * args.seq_len, tokens_per_s=tps,
                ms_per_step=1000.0 * seconds / args.steps, flops_per_token=fpt, tflops=fpt * tps / 1e12,
                peak_tflops=peak, peak_dtype="bf16", mfu=(fpt * tps / 1e12) / peak if peak > 0 else None,
                peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
                first_loss=values[0], last_loss=values[-1], loss_finite=all(math.isfinite(v) for v in values),
                expected_initial_loss=math.log(args.vocab))
    if args.profile and cuda:  # after the timing: the profiler slows the step it watches
        try:
            info["profile"] = step_profile.profile_step(
                lambda: train_steps(loss_fn, optimizer, batches, args.warmup + args.steps, 1, args.accum,
                                    step_context))
        except Exception as err:  # a profiler problem must not cost the measured row
            info["profile"] = {"error": error_line(f"{type(err).__name__}: {err}")}


def run_child(args: argparse.Namespace) -> dict:
    """One variant in this process; the row always comes back, with an `error` line instead of numbers on failure."""
    info = {"variant": args.variant, "steps": args.steps, "warmup": args.warmup, "seq_len": args.seq_len,
            "batch_size": args.batch_size, "accum": args.accum, "layers": args.layers, "dim": args.dim,
            "ffn_dim": args.ffn_dim, "heads": args.heads, "kv_heads": args.kv_heads, "vocab": args.vocab,
            "herd_kernels_env": os.environ.get("HERD_KERNELS"), "error": None}
    try:
        measure(args, info)
    except Exception as err:  # OOM, missing engine.fp8, a kernel failure...: report it, the parent goes on
        traceback.print_exc()
        info["error"] = error_line(f"{type(err).__name__}: {err}")
    return info


def error_line(text: str, limit: int = 400) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    line = lines[0] if lines else "no message"
    return line if len(line) <= limit else line[:limit - 3] + "..."


# ---------------------------------------------------------------------------------------------- parent: all variants

def child_command(args: argparse.Namespace, variant: str, json_out: Path) -> List[str]:
    cmd = [sys.executable, "-m", "benchmarks.mfu", "--variant", variant, "--json-out", str(json_out)]
    for flag, attr in FORWARDED:
        cmd += [flag, str(getattr(args, attr))]
    return cmd


def last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the parent dies (Linux prctl PR_SET_PDEATHSIG), so a parent
    killed from outside leaves no orphan holding the GPU."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's whole process group (it runs in its own session): workers it started die with it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # it exited meanwhile
        pass


def _raise_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def run_variant(args: argparse.Namespace, variant: str, log_dir: Path) -> dict:
    """One variant in a fresh subprocess (own process group) with a hard timeout; its row or an error row."""
    json_out, log = log_dir / f"{variant}.json", log_dir / f"{variant}.log"
    if json_out.exists():
        json_out.unlink()
    env = dict(os.environ)
    if variant == NO_KERNELS:
        env["HERD_KERNELS"] = "0"
    start = time.perf_counter()
    with open(log, "w") as log_file:
        proc = subprocess.Popen(child_command(args, variant, json_out), cwd=ROOT, env=env, stdout=log_file,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_die_with_parent)
        try:
            rc = proc.wait(timeout=args.timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc, timed_out = proc.wait(), True
        except BaseException:  # Ctrl-C or SIGTERM of the parent: leave no child holding the GPU
            _kill_group(proc)
            raise
    row = {"variant": variant, "error": None}
    if json_out.exists() and not timed_out:
        try:
            row = json.loads(json_out.read_text())
        except ValueError as err:
            row["error"] = f"unreadable result {json_out}: {err}"
    if timed_out:
        row["error"] = f"timed out after {args.timeout:g} s (killed)"
    elif row.get("error") is None and rc != 0:
        how = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
        row["error"] = error_line(f"{how}: {last_line(log) or 'no output'}")
    row["wall_s"] = time.perf_counter() - start
    row["log"] = str(log)
    return row


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _ratio(row: dict, base: Optional[dict]) -> str:
    if base is None or base.get("error") or not base.get("tokens_per_s"):
        return "-"
    return f"{row['tokens_per_s'] / base['tokens_per_s']:.2f}x"


def _kernels(row: dict) -> str:
    status = row.get("kernel_status")
    if status is None:
        return "n/a (transformers)" if row["variant"] == "hf-bf16" else "-"
    fused = sum(v == "cuda kernel" for v in status.values())
    reasons = {v[len("reference ("):-1] for v in status.values() if v.startswith("reference (")}
    return f"{fused}/{len(status)} ops" + (f" (others: {'; '.join(sorted(reasons))})" if reasons else "")


def make_table(rows: List[dict]) -> str:
    by_name = {r["variant"]: r for r in rows}
    hf, herd = by_name.get("hf-bf16"), by_name.get("herd-bf16")
    lines = ["| variant | tokens/s | ms/step | TFLOP/s | MFU | peak GiB | vs hf-bf16 | vs herd-bf16 | kernels "
             "| loss first -> last |", "|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['variant']} | failed | - | - | - | - | - | - | - | - |")
            notes.append(f"{r['variant']} failed: {r['error']}")
            continue
        star = "*" if r["variant"].startswith("herd-fp8") else ""
        mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%{star}"
        loss = f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}" + ("" if r["loss_finite"] else " NOT FINITE")
        lines.append(f"| {r['variant']} | {r['tokens_per_s']:,.0f} | {r['ms_per_step']:.1f} | {r['tflops']:.1f} | "
                     f"{mfu} | {_fmt(r.get('peak_mem_gib'), '.1f')} | {_ratio(r, hf)} | {_ratio(r, herd)} | "
                     f"{_kernels(r)} | {loss} |")
    peak = next((r.get("peak_tflops") for r in rows if not r.get("error")), None)
    notes.insert(0, f"MFU: PaLM convention (engine/flops.py, causal=False) against the dense bf16 peak"
                    f" ({_fmt(peak, '.1f')} TFLOP/s). * fp8 rows are measured against the same bf16 peak, not the"
                    f" fp8 peak (twice it).")
    for r in rows:
        if r.get("fp8_layers") is not None:
            keep = (r.get("fp8_config") or {}).get("bf16_first_last_layers")
            fp8 = r["fp8_config"]
            extras = [f"weights {fp8['weight_recipe']}"] if fp8.get("weight_recipe", "same") != "same" else []
            extras += [f"{k} on" for k in ("fuse_norm_cast", "fuse_swiglu_cast") if fp8.get(k)]
            notes.append(f"{r['variant']}: {r['fp8_layers']} linear layers in fp8 (recipe {fp8['recipe']}"
                         + "".join(f", {e}" for e in extras)
                         + ("; first and last blocks kept in bf16)" if keep else ")"))
    profiles = step_profile.markdown(rows)
    return ("\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes)
            + (f"\n\n## One profiled step per variant\n\n{profiles}" if profiles else ""))


def card_slug(rows: List[dict]) -> str:
    name = next((r["device_name"] for r in rows if r.get("device_name")), "unknown")
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "unknown"


def run_parent(args: argparse.Namespace) -> List[dict]:
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    log_dir = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="herd-mfu-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"[mfu] {len(variants)} variants, {args.warmup} warm-up + {args.steps} timed steps of "
          f"{args.accum} x [{args.batch_size}, {args.seq_len}] each, "
          f"timeout {args.timeout:g} s per child, logs in {log_dir}",
          flush=True)
    rows = []
    for variant in variants:
        row = run_variant(args, variant, log_dir)
        rows.append(row)
        if row.get("error"):
            print(f"[mfu] {variant} FAILED ({row['wall_s']:.0f} s): {row['error']} (log: {row['log']})", flush=True)
        else:
            print(f"[mfu] {variant}: {row['tokens_per_s']:,.0f} tokens/s, {row['ms_per_step']:.1f} ms/step, "
                  f"loss {row['first_loss']:.3f} -> {row['last_loss']:.3f} ({row['wall_s']:.0f} s)", flush=True)
    ok = next((r for r in rows if not r.get("error")), {})
    description = (f"`python -m benchmarks.mfu {' '.join(sys.argv[1:])}` on {ok.get('device_name', 'unknown')}, "
                   f"torch {ok.get('torch', '?')}, {time.strftime('%Y-%m-%d')}: {args.layers} layers of dim "
                   f"{args.dim}, FFN {args.ffn_dim}, {args.heads}/{args.kv_heads} heads, vocab {args.vocab}, "
                   f"[{args.batch_size}, {args.seq_len}] tokens per micro-batch, {args.accum} micro-batch(es) per "
                   f"optimizer step, fp32 master weights, bf16 autocast, "
                   f"fused AdamW, no activation checkpointing; {args.warmup} warm-up + {args.steps} timed steps, "
                   f"each variant in a fresh process.")
    publish(f"mfu_{card_slug(rows)}{args.results_suffix}", rows, make_table(rows),
            "Training throughput and MFU, one GPU", description, args.save)
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.accum < 1:
        raise SystemExit(f"--accum: at least 1 micro-batch per step, got {args.accum}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]*", args.results_suffix):
        raise SystemExit(f"--results-suffix: letters, digits, '_', '.', '-' only, got {args.results_suffix!r}")
    if args.variant is None:
        signal.signal(signal.SIGTERM, _raise_on_sigterm)  # so run_variant kills the running child first
        rows = run_parent(args)
        return 0 if all(not r.get("error") for r in rows) else 1
    row = run_child(args)
    text = json.dumps(row, indent=2)
    print(text, flush=True)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    return 0 if row["error"] is None else 1


if __name__ == "__main__":
    sys.exit(main())
