"""Delayed FP8 scaling's windows hold the training step's amaxes and nothing else: an evaluation forward (module in
eval mode) quantizes with its own amax and records nothing, and activation checkpointing's recomputed forward
quantizes with the scales its original forward used and records nothing (TransformerEngine keeps the forward's
FP8 scaling for the recompute the same way). Both shown on the CPU with runs that must equal, bitwise, the run
without the evaluation or without the recomputation."""

import io
from pathlib import Path

import pytest
import torch

from engine.config import FP8Config
from engine.fp8 import native
from engine.fp8.native import Float8Linear
from tests.unit.test_fp8_native import debug_model

DELAYED = ["fp8.backend=native", "fp8.recipe=delayed", "fp8.bf16_first_last_layers=false", "train.dtype=bf16"]


def windows(model: torch.nn.Module) -> dict:
    return {f"{name}.{role}": (getattr(layer, role).amax_history.clone(), getattr(layer, role).scale.clone())
            for name, layer in model.named_modules() if isinstance(layer, Float8Linear)
            for role in ("input_scaling", "weight_scaling", "grad_scaling")}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(x, y) for k in a for x, y in zip(a[k], b[k]))


def test_an_eval_forward_leaves_the_windows_as_they_were():
    model = debug_model(n_layers=2)
    native.convert(model, FP8Config(backend="native", recipe="delayed", bf16_first_last_layers=False))
    tokens = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # fill the windows
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(tokens).float().logsumexp(-1).mean().backward()
    before = windows(model)
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(tokens * 3 % 256)
    assert same(windows(model), before)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(tokens).float().logsumexp(-1).mean().backward()
    assert not same(windows(model), before)  # a training step does record


@pytest.mark.parametrize("extra,reference", [
    (["train.eval_every=1"], ["train.eval_every=0"]),  # an evaluation after every step (and before the first)
    (["parallel.activation_checkpointing=full"], ["parallel.activation_checkpointing=none"]),
    (["parallel.activation_checkpointing=full", "fp8.cache_weights=false"],
     ["parallel.activation_checkpointing=none", "fp8.cache_weights=false"]),
    (["parallel.activation_checkpointing=full", "fp8.fuse_norm_cast=true", "fp8.fuse_swiglu_cast=true"],
     ["parallel.activation_checkpointing=none", "fp8.fuse_norm_cast=true", "fp8.fuse_swiglu_cast=true"]),
], ids=["eval", "recompute", "recompute-uncached", "recompute-fused"])
def test_delayed_fp8_run_is_bitwise_the_run_without_eval_or_recompute(tmp_path, extra, reference):
    """4 steps of 2 micro-batches on the delayed recipe: losses, parameters and every window equal."""
    from engine.run import train
    from tests.helpers import make_corpus, tiny_config
    corpus = make_corpus(tmp_path / "c")
    runs = [train(tiny_config(corpus, tmp_path / name, ["train.steps=4", *DELAYED, *overrides]),
                  stream=io.StringIO()) for name, overrides in (("a", extra), ("b", reference))]
    (a, b) = runs
    assert a.last_metrics["loss"] == b.last_metrics["loss"]
    params_a, params_b = dict(a.module.model.named_parameters()), dict(b.module.model.named_parameters())
    assert all(torch.equal(params_a[n], params_b[n]) for n in params_b)
    assert same(windows(a.module.model), windows(b.module.model))


def split_backward_run(checkpointed: bool, split: bool = True, device: str = "cpu") -> tuple:
    """3 steps of a 2-block delayed-FP8 stage (no embedding: it takes activations) whose backward is split as the
    zero-bubble pipeline schedules split it: input gradients, then weight gradients, each in its own autograd pass,
    so a checkpointed block is recomputed twice per forward and every FP8 GEMM's backward node runs twice (or, not
    `split`, one plain backward)."""
    from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight
    from parallel.parallelize import apply_activation_checkpointing
    model = debug_model(n_layers=2)
    native.convert(model, FP8Config(backend="native", recipe="delayed", bf16_first_last_layers=False))
    model.to(device)
    if checkpointed:
        apply_activation_checkpointing(model, "full", 1, native.recompute_contexts)
    model.tok_embeddings = None
    positions = torch.arange(64, device=device).expand(2, 64)
    losses = []
    for step in range(3):
        x = torch.randn(2, 64, 64, generator=torch.Generator().manual_seed(step))  # [b, s, dim]
        x = x.to(device).requires_grad_()
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(x, positions).float().logsumexp(-1).mean()
        if split:
            _, groups = stage_backward_input([loss], None, [x], model.parameters())
            stage_backward_weight(model.parameters(), groups)
        else:
            loss.backward()
        losses.append(loss.item())
    return losses, {n: p.grad.clone() for n, p in model.named_parameters()}, windows(model)


@pytest.mark.parametrize("checkpointed", [True, False], ids=["recomputed", "stored"])
def test_the_zero_bubble_split_backward_is_bitwise_one_backward(checkpointed):
    """The split backward with or without recomputation equals one plain backward without: losses, gradients and
    windows. Each output gradient is quantized once, in the input pass, and the weight pass takes that quantization
    (before, it quantized again: every gradient amax recorded twice, the weight gradient made with the next scale);
    each pass computes only the GEMMs it needs. And a block recomputed twice replays its forward both times (before
    the replay context could be entered again, ZBVZeroBubble, InterleavedZeroBubble and DualPipeV failed with full
    checkpointing and delayed FP8)."""
    (losses_ac, grads_ac, windows_ac), (losses, grads, windows_plain) = (split_backward_run(checkpointed),
                                                                         split_backward_run(False, split=False))
    assert losses_ac == losses
    assert all(torch.equal(grads_ac[n], grads[n]) for n in grads)
    assert same(windows_ac, windows_plain)


def compiled_checkpointing_vs_none(rank: int, world: int, root: str, fp8: bool) -> dict:
    """In a process of its own (run_on_ranks): inductor's compile thread pool outlives the compilation, and the test
    process must not keep threads (tests/conftest.py)."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from engine.run import train
    from tests.helpers import make_corpus, tiny_config
    root = Path(root)
    corpus = make_corpus(root / "c")
    base = ["train.steps=3", "train.eval_every=0", "train.compile=true"] + (DELAYED if fp8 else ["train.dtype=bf16"])
    torch._dynamo.reset()
    counters.clear()
    checkpointed = train(tiny_config(corpus, root / "ac", [*base, "parallel.activation_checkpointing=full"]),
                         stream=io.StringIO())
    graphs = counters["stats"]["unique_graphs"]
    stored = train(tiny_config(corpus, root / "none", [*base, "parallel.activation_checkpointing=none"]),
                   stream=io.StringIO())
    params_a, params_b = (dict(t.module.model.named_parameters()) for t in (checkpointed, stored))
    return {"graphs": graphs, "losses": (checkpointed.last_metrics["loss"], stored.last_metrics["loss"]),
            "params_equal": all(torch.equal(params_a[n], params_b[n]) for n in params_b),
            "windows_equal": same(windows(checkpointed.module.model), windows(stored.module.model))}


@pytest.mark.parametrize("fp8", [True, False], ids=["delayed-fp8", "bf16"])
def test_compiled_checkpointed_blocks_are_compiled_and_recompute_exactly(tmp_path, fp8):
    """Under train.compile a checkpointed block is compiled inside its checkpoint (parallel/parallelize.py
    apply_compile): dynamo compiles graphs for it (before, a checkpointed block was never compiled: dynamo does not
    trace torch.utils.checkpoint's frame), the recomputation runs the same compiled graphs, and with delayed FP8 it
    replays its forward's scales (before, it quantized with the next scale and recorded every amax twice): the run
    with full checkpointing is bitwise the run without, windows included."""
    from parallel.multiprocess import run_on_ranks
    result = run_on_ranks(compiled_checkpointing_vs_none, 1, str(tmp_path), fp8, timeout=900)[0]
    assert result["graphs"] > 0  # the checkpointed blocks were compiled
    assert result["losses"][0] == result["losses"][1]
    assert result["params_equal"] and result["windows_equal"]
