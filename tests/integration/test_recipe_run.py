"""A recipe run end to end on one CPU process: a sequence-length and mix change, annealing with averaging and the
HF export; a recipe killed anywhere (inside a stage, between stages, at the first step of a stage) resumes to the
bitwise result of an uninterrupted run (shared/TESTING.md: kill tests wait for states, not time)."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.config import load_recipe
from engine.schedule import lr_multiplier_tokens
from recipe.runner import RecipeRunner
from tests.helpers import make_corpus
from tests.slurm_cluster import slurm_cluster  # noqa: F401 (the session fixture, for the slow SLURM test)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("recipe-corpus"))


def write_recipe(root: Path, corpus: Path, run_dir: Path) -> Path:
    job = root / "job.yaml"
    job.write_text(f"""model: {{dim: 64, n_layers: 2, n_heads: 4, n_kv_heads: 2, ffn_dim: 128, vocab_size: 512,
         max_seq_len: 128}}
data:
  train: [{{path: {corpus}/corpus.train}}]
  tokenizer: {{kind: hf, path: {corpus}/tok.json}}
  micro_batch_size: 4
train: {{steps: 1, dtype: fp32, device: cpu}}
optim: {{lr: 3.0e-3}}
schedule: {{kind: cosine, min_lr_ratio: 0.1}}
checkpoint: {{every: 3}}
log: {{tensorboard: false}}
""")
    both = (f"data.train=[{{path: {corpus}/corpus.train, weight: 0.5}}, "
            f"{{path: {corpus}/corpus.valid, weight: 0.5}}]")
    recipe = root / "recipe.yaml"
    recipe.write_text(f"""name: tiny
config: {job}
run_dir: {run_dir}
warmup_steps: 2
export_hf: true
stages:
  - {{name: short, tokens: 1536, overrides: [data.seq_len=32, data.global_batch_size=8]}}
  - {{name: longer, tokens: 1536, overrides: [data.seq_len=64, data.global_batch_size=4, optim.lr=2.0e-3, "{both}"]}}
  - {{name: anneal, kind: anneal, tokens: 2048, average: true,
     overrides: [data.seq_len=64, data.global_batch_size=8, checkpoint.every=2, "{both}"]}}
""")
    return recipe


def last_per_step(run: Path) -> dict:
    """step -> the metrics record a (possibly resumed) run wrote last for it."""
    records = {}
    for line in (run / "train" / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "step" in record and "loss" in record:
            records[record["step"]] = record
    return records


def final_weights(run: Path) -> dict:
    files = sorted((run / "hf").glob("*.safetensors"))
    assert files, f"no export under {run / 'hf'}"
    weights = {}
    for f in files:
        weights.update(load_file(str(f)))
    return weights


def run_cli(recipe: Path, fault: str = "", nproc: int = 0) -> int:
    """`herd recipe RECIPE` in a child process (with --nproc: on that many local ranks), HERD_FAULT set or not."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("HERD_FAULT", None)
    if fault:
        env["HERD_FAULT"] = fault
    ranks = ["--nproc", str(nproc)] if nproc else []
    done = subprocess.run([sys.executable, "-m", "launch", "recipe", str(recipe), *ranks], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if not nproc:  # one process: it ends or is SIGKILLed at the fault (the launcher reports its own code)
        assert done.returncode in (0, -9), done.stdout[-2000:] + done.stderr[-3000:]
    return done.returncode


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe-ref")
    run_dir = root / "run"
    recipe = load_recipe(str(write_recipe(root, corpus, run_dir)))
    state = RecipeRunner(recipe).run()
    return run_dir, state


def test_stages_continue_one_run(uninterrupted):
    run_dir, state = uninterrupted
    stages = state["stages"]
    assert [stages[n]["done"] for n in ("short", "longer", "anneal")] == [True] * 3
    # 1,536 tokens at 8 x 32 = 6 steps; at 4 x 64 = 6 steps; 2,048 tokens at 8 x 64 = 4 steps
    assert stages["longer"]["start"] == {"step": 6, "tokens": 1536, "samples": 48}
    assert stages["anneal"]["start"] == {"step": 12, "tokens": 3072, "samples": 72}
    assert stages["anneal"]["end"] == {"step": 16, "tokens": 5120, "samples": 104}
    records = last_per_step(run_dir)
    assert sorted(records) == list(range(1, 17))
    # the LR of every update is the token schedule at the tokens trained after it, whatever the stage's batch
    cumulative = [256 * s for s in range(1, 13)] + [3072 + 512 * k for k in range(1, 5)]
    horizon = 3072  # every stage's tokens before the anneal stage
    from engine.config import ScheduleConfig
    main = ScheduleConfig(kind="cosine", min_lr_ratio=0.1, total_tokens=horizon, warmup_tokens=512)
    # annealing falls towards 0 over its 4 steps plus one: its updates get 4/5 .. 1/5 of the LR it starts from
    anneal = ScheduleConfig(**{**main.__dict__, "anneal_start_tokens": 3072, "anneal_tokens": 2560})
    peak = [3e-3] * 6 + [2e-3] * 6 + [3e-3] * 4  # the second stage's own optim.lr (a stage may change the peak)
    expected = [lr * lr_multiplier_tokens(t, main if i < 12 else anneal)
                for i, (lr, t) in enumerate(zip(peak, cumulative))]
    assert [records[s]["lr"] for s in range(1, 17)] == pytest.approx(expected, rel=1e-12)
    start = 3e-3 * lr_multiplier_tokens(3072, main)
    assert [records[s]["lr"] for s in range(13, 17)] == pytest.approx([start * k / 5 for k in (4, 3, 2, 1)])
    # the anneal stage's checkpoints (every 2 steps: 14 and 16) averaged, and the average exported
    assert [Path(p).name for p in state["averaged"]["sources"]] == ["step_00000014", "step_00000016"]
    assert (run_dir / "hf" / "config.json").is_file() and final_weights(run_dir)


def test_a_finished_recipe_is_skipped(uninterrupted):
    run_dir, state = uninterrupted
    before = (run_dir / "recipe_state.json").read_text()
    recipe = load_recipe(str(run_dir.parent / "recipe.yaml"))
    stream = io.StringIO()
    RecipeRunner(recipe, stream).run()
    out = stream.getvalue()
    assert out.count("finished earlier") == 3 and (run_dir / "recipe_state.json").read_text() == before


@pytest.mark.parametrize("fault", [
    pytest.param("after_backward:0:8", marks=pytest.mark.slow),  # inside the second stage (a plain resume)
    "recipe_stage_done:0:1",  # between the first and the second stage, its state just written
    "after_backward:0:13",  # the anneal stage's first step, right after a change of sequence length and mix
])
def test_killed_recipe_resumes_bitwise(uninterrupted, corpus, tmp_path, fault):
    reference_dir, _ = uninterrupted
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path, corpus, run_dir)
    assert run_cli(recipe, fault) == -9  # SIGKILLed at the fault point
    assert not (run_dir / "hf").exists()
    assert run_cli(recipe) == 0
    ours, reference = last_per_step(run_dir), last_per_step(reference_dir)
    assert [ours[s]["loss"] for s in sorted(ours)] == [reference[s]["loss"] for s in sorted(reference)]
    mine, theirs = final_weights(run_dir), final_weights(reference_dir)
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def write_layout_recipe(root: Path, corpus: Path, run_dir: Path) -> Path:
    """Two ranks: FSDP over both for short sequences, then context parallelism over both for longer ones."""
    recipe = write_recipe(root, corpus, run_dir)
    text = recipe.read_text()
    text = text.replace("overrides: [data.seq_len=32, data.global_batch_size=8]",
                        "overrides: [data.seq_len=32, data.global_batch_size=8, parallel.dp_shard=2]")
    text = text.replace("overrides: [data.seq_len=64, data.global_batch_size=4,",
                        "overrides: [data.seq_len=64, data.global_batch_size=4, parallel.cp=2, parallel.dp_shard=1,")
    text = text.replace("overrides: [data.seq_len=64, data.global_batch_size=8, checkpoint.every=2,",
                        "overrides: [data.seq_len=64, data.global_batch_size=8, checkpoint.every=2, parallel.cp=2, "
                        "parallel.dp_shard=1,")
    assert text.count("parallel.") == 5
    recipe.write_text(text)
    return recipe


@pytest.mark.slow
def test_killed_during_a_layout_change_resumes_bitwise(corpus, tmp_path):
    """FSDP x2 -> cp x2 between the first and second stage: killed at the second stage's first step (its first
    update under the new layout), the rerun ends where an uninterrupted 2-rank recipe ends, bitwise."""
    reference, resumed = tmp_path / "ref", tmp_path / "resumed"
    for root in (reference, resumed):
        root.mkdir()
    assert run_cli(write_layout_recipe(reference, corpus, reference / "run"), nproc=2) == 0
    recipe = write_layout_recipe(resumed, corpus, resumed / "run")
    assert run_cli(recipe, "after_backward:0:7", nproc=2) != 0  # rank 0 SIGKILLed; the launcher ends the other
    assert run_cli(recipe, nproc=2) == 0
    ours, theirs = last_per_step(resumed / "run"), last_per_step(reference / "run")
    assert [ours[s]["loss"] for s in sorted(ours)] == [theirs[s]["loss"] for s in sorted(theirs)]
    mine, ref = final_weights(resumed / "run"), final_weights(reference / "run")
    assert all(torch.equal(mine[k], ref[k]) for k in ref)


def test_an_edited_recipe_is_refused_against_its_state(uninterrupted, tmp_path):
    """Changing a finished stage (its tokens, or its batch) would continue from positions another plan made."""
    from engine.errors import ConfigError
    run_dir, _ = uninterrupted
    original = (run_dir.parent / "recipe.yaml").read_text()
    for old, new, key in (("tokens: 1536, overrides: [data.seq_len=32", "tokens: 2048, overrides: [data.seq_len=32",
                           "stages.short.tokens"),
                          ("data.seq_len=32, data.global_batch_size=8", "data.seq_len=32, data.global_batch_size=16",
                           "stages.short")):
        edited = tmp_path / "edited.yaml"
        edited.write_text(original.replace(old, new))
        before = (run_dir / "recipe_state.json").read_text()
        with pytest.raises(ConfigError) as e:
            RecipeRunner(load_recipe(str(edited)), io.StringIO()).run()
        assert e.value.key == key and (run_dir / "recipe_state.json").read_text() == before


def test_a_stage_shrunk_below_the_step_its_run_reached_is_refused(corpus, tmp_path):
    """Killed inside the second stage after its step-9 save, then given 512 tokens (2 steps: it would end at 8):
    the runner marked it done at step 8 with the model at 9, and the anneal stage after it trained nothing (H43)."""
    from engine.errors import ConfigError
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path, corpus, run_dir)
    assert run_cli(recipe, "after_backward:0:11") == -9
    shrunk = tmp_path / "shrunk.yaml"
    shrunk.write_text(recipe.read_text().replace("{name: longer, tokens: 1536", "{name: longer, tokens: 512")
                      .replace("warmup_steps: 2\n", "warmup_steps: 2\ntotal_tokens: 3072\n"))  # the same horizon
    before = (run_dir / "recipe_state.json").read_text()
    with pytest.raises(ConfigError, match=r"^stages\.longer\.tokens: the run is at step 9, past step 8, where the "
                                          r"stage now ends"):
        RecipeRunner(load_recipe(str(shrunk)), io.StringIO()).run()
    assert not json.loads((run_dir / "recipe_state.json").read_text())["stages"]["longer"].get("done")
    assert json.loads(before)["stages"]["short"]["done"]
    state = RecipeRunner(load_recipe(str(recipe)), io.StringIO()).run()  # the refusal released the run's locks
    assert all(record["done"] for record in state["stages"].values())


@pytest.mark.slow
def test_recipe_as_one_slurm_job(slurm_cluster, corpus, tmp_path):  # noqa: F811
    """`herd launch --slurm RECIPE` renders one job whose ranks run the whole recipe (FSDP x2 then cp x2); on the
    real test cluster it ends where `herd recipe --nproc 2` ends, bitwise."""
    reference = tmp_path / "ref"
    reference.mkdir()
    assert run_cli(write_layout_recipe(reference, corpus, reference / "run"), nproc=2) == 0
    root = tmp_path / "slurm"
    root.mkdir()
    recipe = write_layout_recipe(root, corpus, root / "run")
    recipe.write_text(recipe.read_text().replace(
        "export_hf: true\n", "export_hf: true\noverrides: [train.device=cpu, slurm.gpus_per_node=2, "
        f"slurm.job_name=recipe, slurm.env_file={REPO}/launch/clusters/local.env]\n"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rendered = subprocess.run([sys.executable, "-m", "launch", "launch", "--slurm", str(recipe), "--out",
                               str(root / "recipe.sbatch")], cwd=root, env=env, capture_output=True, text=True)
    assert rendered.returncode == 0, rendered.stderr
    job = int(slurm_cluster.run("sbatch", "--parsable", str(root / "recipe.sbatch"))
              .stdout.strip().split(";")[0])
    info = slurm_cluster.wait_for(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"))
    logs = "".join(f.read_text() for f in sorted(root.glob(f"recipe-{job}.*")))
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), logs[-3000:]
    ours, theirs = last_per_step(root / "run"), last_per_step(reference / "run")
    assert [ours[s]["loss"] for s in sorted(ours)] == [theirs[s]["loss"] for s in sorted(theirs)]
