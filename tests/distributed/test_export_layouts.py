"""`herd convert herd-to-hf` (issue 16): checkpoints written under the parity harness's CI-tier layouts (tp2, pp2
with virtual stages, FSDP dp_shard2, cp2, tp2 x pp2) export through the command into
complete Hugging Face directories whose logits in transformers equal the one-process herd model's, and whose
tokenizer, bos/eos ids, generation config and chat template are herd's own."""

import json

import pytest
import torch

from engine.model import build_model
from launch.cli import main
from parallel.multiprocess import run_on_ranks
from tests.distributed import ranks
from tests.distributed.test_parity import corpus  # noqa: F401 (fixture)
from tests.distributed.test_parity_4d import layout
from tests.helpers import parity_config

transformers = pytest.importorskip("transformers")

# 4 layers, so pp=2 can run two virtual stages per rank (a layer split unlike the one-process model's)
LAYOUTS = {2: [layout(tp=2), layout(pp=2, schedule="Interleaved1F1B"), layout(dp_shard=2), layout(cp=2),
               # fused q/k/v and gate/up: the checkpoint holds wq/wk/wv, w1/w3 all the same (Parallelized.pieces)
               layout(tp=2) + ["train.fused_projections=true"]],
           4: [layout(tp=2, pp=2)]}
SAVE = ["model.n_layers=4", "train.steps=2", "checkpoint.every=2"]


@pytest.fixture(scope="module")
def exported(corpus, tmp_path_factory):  # noqa: F811
    """Per layout: (overrides, consolidated final parameters on rank 0, the exported directory)."""
    root = tmp_path_factory.mktemp("layouts")
    out = []
    for world, layouts in LAYOUTS.items():
        results = run_on_ranks(ranks.train_layouts, world, str(corpus), str(root / f"w{world}"),
                               [SAVE + lay for lay in layouts], timeout=600)[0]
        for index, (lay, result) in enumerate(zip(layouts, results)):
            ckpt = root / f"w{world}" / f"layout{index}" / "p" / "checkpoints"
            dest = root / f"hf-w{world}-{index}"
            assert main(["convert", "herd-to-hf", str(ckpt), str(dest)]) == 0
            out.append((lay, result["params"], dest))
    return out


def test_every_layout_exports_with_one_process_logits(corpus, exported, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    from engine.hf_interop import hf_to_herd_name
    cfg = parity_config(corpus, tmp_path / "one", SAVE)
    tokens = torch.randint(0, 510, (2, 32), generator=torch.Generator().manual_seed(3))
    for lay, params, dest in exported:
        saved = {hf_to_herd_name(k): v for f in dest.glob("*.safetensors") for k, v in load_file(str(f)).items()}
        assert saved.keys() == params.keys()
        for name, value in params.items():  # what the ranks held, consolidated, is what was exported
            assert torch.equal(saved[name], value), (lay, name)
        model = build_model(cfg.model, torch.device("cpu"), seed=0)
        model.load_state_dict(params, strict=False)
        hf = transformers.AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32).eval()
        with torch.no_grad():
            diff = (model.eval()(tokens) - hf(tokens).logits).abs().max().item()
        print(f"{' '.join(lay)}: exported model in transformers vs one-process herd: max |logit diff| {diff:.2e}")
        assert diff < 1e-4, lay


def test_export_is_a_complete_hf_model(corpus, exported, tmp_path):  # noqa: F811
    from align.chat import ChatFormat
    from engine.data.tokenizer import HFTokenizer
    dest = exported[0][2]
    ours = HFTokenizer(str(corpus / "tok.json"))
    ids = {name: ours.token_id(name) for name in ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")}
    config = json.loads((dest / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (ids["<|begin_of_text|>"], ids["<|end_of_text|>"])
    tok = transformers.AutoTokenizer.from_pretrained(dest)
    assert (tok.bos_token_id, tok.eos_token_id) == (config["bos_token_id"], config["eos_token_id"])
    text = "def f(x):\n    return x * 2  # ünïcode\n"
    assert tok(text, add_special_tokens=False).input_ids == ours.encode_batch([text])[0]
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a json function."}]
    chat = tok.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert chat["input_ids"] == ChatFormat(ours).generation_prompt(dialog).tokens
    model = transformers.AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32).eval()
    assert model.generation_config.eos_token_id == [ids["<|end_of_text|>"], ids["<|eot_id|>"]]
    prompt = torch.tensor([chat["input_ids"]])
    generated = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert generated.shape[1] > prompt.shape[1] and torch.equal(generated[0, :prompt.shape[1]], prompt[0])
    # greedy decoding in transformers picks herd's argmax for the first new token
    one = build_model(parity_config(corpus, tmp_path / "one", SAVE).model, torch.device("cpu"), seed=0)
    one.load_state_dict(exported[0][1], strict=False)
    with torch.no_grad():
        assert generated[0, prompt.shape[1]].item() == one.eval()(prompt)[0, -1].argmax().item()
