"""Peak memory and time of forward + backward of one attention call under document masks, by sequence length:
herd's blockwise kernel (engine/model/attention.py) against the dense-mask reference it replaced.

    python -m benchmarks.attention_memory [--lengths 8192 32768 131072] [--device cpu|cuda] [--save NAME]

One call: q [1, s, heads, head_dim], k/v [1, s, kv_heads, head_dim] (leaf tensors, so the projections' memory
is not counted), document ids of a packed sequence whose document lengths are drawn from an exponential
distribution (mean --mean-doc tokens, seeded), and the gradient of a random output. Memory:
- cpu: each measurement runs in a fresh process; the figure is the process's peak resident set (getrusage
  ru_maxrss) minus its resident set just before the call, with the inputs already allocated;
- cuda: torch.cuda.max_memory_allocated during the call minus the memory allocated before it.
The dense path runs only up to --dense-up-to tokens (its [s, s] mask alone is 16 GiB at 128K).
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 2 ** 20


def packed_documents(seq: int, mean_length: float, seed: int) -> torch.Tensor:
    """[1, seq] document ids: a new document starts at each token with probability 1 / mean_length."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.rand(1, seq, generator=gen) < 1.0 / mean_length
    starts[:, 0] = False
    return torch.cumsum(starts.long(), dim=1)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(seq: int, path: str, args) -> dict:
    """Forward + backward of one call on this process's device; returns peak bytes above the inputs and seconds."""
    from engine.model.attention import DocumentMask, causal_attention, document_causal_mask
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    make = lambda heads: torch.randn(1, seq, heads, args.head_dim, generator=gen).to(device, dtype)  # noqa: E731
    q, k, v = (make(h).requires_grad_() for h in (args.heads, args.kv_heads, args.kv_heads))
    grad = make(args.heads)
    docs = packed_documents(seq, args.mean_doc, seed=seq).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _resident_bytes()
    start = time.perf_counter()
    mask = DocumentMask(docs) if path == "blockwise" else document_causal_mask(None, docs)
    out = causal_attention(q, k, v, mask)
    torch.autograd.grad(out, (q, k, v), grad)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    seconds = time.perf_counter() - start
    row = {"seq": seq, "path": path, "peak_mib": round(peak / MIB, 1), "seconds": round(seconds, 2),
           "documents": int(docs.max()) + 1, "inputs_mib": round(sum(t.numel() * t.element_size() for t in (q, k, v, grad)) / MIB, 1)}
    if path == "blockwise":
        plan = mask.plan(device)
        blocks = -(-seq // mask.block)
        row["pairs_share"] = round(plan.pairs() / blocks ** 2, 4)
    return row


def run_one_in_subprocess(seq: int, path: str, args) -> dict:
    """CPU peaks are per process: each measurement gets a fresh one."""
    command = [sys.executable, "-m", "benchmarks.attention_memory", "--one", str(seq), path, "--device", args.device,
               "--heads", str(args.heads), "--kv-heads", str(args.kv_heads), "--head-dim", str(args.head_dim),
               "--mean-doc", str(args.mean_doc)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        return {"seq": seq, "path": path, "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows, args, command: str) -> str:
    device = torch.cuda.get_device_name() if args.device == "cuda" else \
        f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
    lines = [f"# Attention memory under document masks ({args.device})", "",
             f"Machine: {device}; torch {torch.__version__}. Command: `{command}`.", "",
             f"One attention call, forward + backward: 1 x s tokens, {args.heads} query heads on {args.kv_heads} KV "
             f"heads of {args.head_dim}, {'bf16' if args.device == 'cuda' else 'fp32'}; packed documents with "
             f"exponential lengths (mean {args.mean_doc:g} tokens, seeded). Peak: memory above the inputs during "
             f"the call ({'max_memory_allocated' if args.device == 'cuda' else 'peak resident set, fresh process'})."
             " Inputs: q, k, v and the output gradient. Pairs: share of (query block, key block) pairs the "
             "blockwise plan computes.", "",
             "| s | path | documents | inputs MiB | peak above inputs MiB | seconds | pairs computed |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['seq']} | {r['path']} | | | failed: {r['error']} | | |")
            continue
        share = f"{100 * r['pairs_share']:.1f}%" if "pairs_share" in r else ""
        lines.append(f"| {r['seq']} | {r['path']} | {r['documents']} | {r['inputs_mib']} | {r['peak_mib']} | "
                     f"{r['seconds']} | {share} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--dense-up-to", type=int, default=8192, help="longest s for the dense reference")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--mean-doc", type=float, default=2048.0)
    parser.add_argument("--save", default=None, help="write results/<SAVE>.md and .json")
    parser.add_argument("--one", nargs=2, metavar=("SEQ", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(int(args.one[0]), args.one[1], args)))
        return
    rows = []
    for seq in args.lengths:
        for path in (["dense"] if seq <= args.dense_up_to else []) + ["blockwise"]:
            row = measure(seq, path, args) if args.device == "cuda" else run_one_in_subprocess(seq, path, args)
            print(json.dumps(row), flush=True)
            rows.append(row)
    command = "python -m benchmarks.attention_memory " + " ".join(argv if argv is not None else sys.argv[1:])
    text = table(rows, args, command.strip())
    print(text)
    if args.save:
        (RESULTS / f"{args.save}.md").write_text(text)
        (RESULTS / f"{args.save}.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
