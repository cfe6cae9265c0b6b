"""herd's DPO against TRL's DPOTrainer (pinned in pyproject.toml's test extras, so this runs in CI and fails
without it), on one model and one batch. TRL builds the batch (its tokenization, EOS, right padding, completion
mask) and computes its loss with its own forward (its fused LM head's per-token log-probs) on a transformers
LlamaForCausalLM; herd computes its loss from the logits of its own model holding the same weights, through the
code its DPO stage runs: DPOTrainModule.row_logps (summed log-probs of the masked targets, one process) and
align/losses.dpo_objective. Compared: the per-sequence log-probs of policy and reference, the loss, and every
parameter's gradient.

Loss types: sigmoid (DPO), ipo (TRL length-normalizes the log-ratios, as herd does), and Llama 3's objective,
sigmoid plus 0.2 x NLL of the chosen responses, which is TRL's loss_type=["sigmoid", "sft"] with weights
[1, 0.2]. herd's conservative-DPO label smoothing has no counterpart in this TRL (its label_smoothing feeds other
loss types); test_align_losses.py checks it against the formula."""

from types import SimpleNamespace

import pytest
import torch

from align.losses import dpo_objective
from align.modules import DPOTrainModule
from engine.config import ModelConfig
from engine.hf_interop import herd_to_hf_state_dict, hf_config_dict
from engine.model import build_model
from engine.ops import cross_entropy_sum

ROWS = {"prompt": ["What does json.dumps do?", "Name a standard-library module.", "Say hi.", "2+2?"],
        "chosen": [" It serializes an object to a JSON formatted str.", " email", " Hello there!", " 4"],
        "rejected": [" It parses a file.", " the module named http.client, I think", " no", " 5, or maybe 22"]}
BETA = 0.1
CASES = {"sigmoid": (["sigmoid"], None, "sigmoid", 0.0), "ipo": (["ipo"], None, "ipo", 0.0),
         "llama3_sigmoid_nll": (["sigmoid", "sft"], [1.0, 0.2], "sigmoid", 0.2)}


@pytest.fixture(scope="module")
def setup(stdlib_bpe):
    """The tokenizer (a BPE from tests/conftest.py), and policy and reference as herd models and as
    transformers models with the same weights."""
    import transformers
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(stdlib_bpe), bos_token="<|begin_of_text|>",
                                               eos_token="<|eot_id|>", pad_token="<|end_of_text|>")
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=len(tok), max_seq_len=128)
    models = {}
    for name, seed in (("policy", 3), ("ref", 4)):
        herd_model = build_model(cfg, torch.device("cpu"), seed=seed)
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config_dict(cfg)))
        missing, unexpected = hf.load_state_dict(herd_to_hf_state_dict(herd_model.state_dict()), strict=False)
        assert not unexpected and all("rotary" in k for k in missing)
        models[name] = (herd_model, hf)
    return tok, models


def trl_trainer(tok, models, case, out_dir):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    loss_types, weights, _, _ = CASES[case]
    args = DPOConfig(output_dir=str(out_dir), per_device_train_batch_size=len(ROWS["prompt"]), beta=BETA,
                     loss_type=loss_types, loss_weights=weights, report_to="none", use_cpu=True, bf16=False,
                     max_length=None, precompute_ref_log_probs=False, dataloader_num_workers=0)
    return DPOTrainer(model=models["policy"][1], ref_model=models["ref"][1], args=args,
                      train_dataset=Dataset.from_dict(ROWS), processing_class=tok)


def herd_row_logps(model, input_ids, completion_mask):
    """DPOTrainModule.row_logps on one process (its loss_sum is herd's cross_entropy_sum), on herd's logits."""
    logits = model(input_ids)[:, :-1]
    targets, mask = input_ids[:, 1:], completion_mask[:, 1:].bool()
    one_process = SimpleNamespace(parallel=SimpleNamespace(loss_sum=cross_entropy_sum), cp_group=None)
    return DPOTrainModule.row_logps(one_process, logits, targets, mask)


@pytest.mark.parametrize("case", list(CASES))
def test_dpo_loss_and_gradients_equal_trl_dpo_trainer(setup, case, tmp_path):
    tok, models = setup
    trainer = trl_trainer(tok, models, case, tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))  # [chosen rows; rejected rows], right-padded
    ids, completion = batch["input_ids"], batch["completion_mask"]
    assert completion.sum() > 0 and (batch["attention_mask"] == 0).any()  # real completions, and padding
    rows = len(ROWS["prompt"])

    hf_policy = models["policy"][1]
    hf_policy.zero_grad(set_to_none=True)
    theirs = trainer.compute_loss(trainer.model, batch)
    theirs.backward()
    with torch.no_grad():  # TRL's own per-token log-probs (its fused LM head), summed over each completion
        labels = ids.masked_fill(completion == 0, -100)
        trl_logps = {name: models[name][1](input_ids=ids, attention_mask=batch["attention_mask"], labels=labels,
                                           fused_lm_head=True).log_probs.sum(dim=1) for name in ("policy", "ref")}

    herd_policy = models["policy"][0]
    herd_policy.zero_grad(set_to_none=True)
    logps, counts = herd_row_logps(herd_policy, ids, completion)
    with torch.no_grad():
        ref_logps, _ = herd_row_logps(models["ref"][0], ids, completion)
    _, _, loss_type, nll_alpha = CASES[case]
    ours, _ = dpo_objective(policy_chosen=logps[:rows], policy_rejected=logps[rows:], ref_chosen=ref_logps[:rows],
                            ref_rejected=ref_logps[rows:], chosen_count=counts[:rows], rejected_count=counts[rows:],
                            beta=BETA, loss_type=loss_type, nll_alpha=nll_alpha)
    ours.backward()

    torch.testing.assert_close(logps.detach(), trl_logps["policy"], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ref_logps, trl_logps["ref"], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-5, atol=1e-6)
    grads = herd_to_hf_state_dict({n: p.grad for n, p in herd_policy.named_parameters()})
    worst = 0.0
    for name, param in hf_policy.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)
        worst = max(worst, ((grads[name] - param.grad).abs().max() / param.grad.abs().max().clamp_min(1e-30)).item())
    print(f"{case}: loss herd {ours.item():.8f} vs TRL {theirs.item():.8f}; largest gradient difference "
          f"{worst:.1e} of the tensor's largest entry")
    assert theirs.item() != 0.0 and all(p.grad.abs().max() > 0 for p in hf_policy.parameters())
