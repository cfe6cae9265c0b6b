"""align/losses.py against independent re-derivations: DPO, conservative DPO and IPO as TRL publishes them, computed
here in float64 numpy with log sigma(x) written out through log1p (never torch's logsigmoid); autograd gradients
against their closed forms; Llama 3's NLL term; the reward model's pairwise and ranking losses; metrics by hand. TRL's DPOTrainer itself, on a model and a batch:
test_align_trl.py."""

import math

import numpy as np
import pytest
import torch

from align import losses as L


# ---------------------------------------------------------------------------------------------- references (numpy)

def np_log_sigmoid(x):
    """log(1 / (1 + exp(-x))) in float64, split by sign so that exp never overflows."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(x >= 0, -np.log1p(np.exp(-np.abs(x))), x - np.log1p(np.exp(-np.abs(x))))


def np_sigmoid(x):
    return np.exp(np_log_sigmoid(x))


def np_dpo(pc, pr, rc, rr, beta, eps=0.0, ipo=False):
    """TRL's formulas: logits = (pc - pr) - (rc - rr); sigmoid with label smoothing eps, or IPO eq. 17."""
    logits = (np.float64(pc) - pr) - (np.float64(rc) - rr)
    if ipo:
        return (logits - 1.0 / (2.0 * beta)) ** 2
    return -(1.0 - eps) * np_log_sigmoid(beta * logits) - eps * np_log_sigmoid(-beta * logits)


def _logps(b, seed, scale=30.0, dtype=torch.float64):
    """Four [b] tensors shaped like summed response log-probs (negative, tens to hundreds)."""
    gen = torch.Generator().manual_seed(seed)
    return [(-scale * torch.rand(b, generator=gen, dtype=torch.float64) * 10).to(dtype) for _ in range(4)]


def _np(t):
    return t.detach().to(torch.float64).numpy()


# -------------------------------------------------------------------------------------------------- sequence_logps

def test_sequence_logps_sums_the_masked_tokens_only_and_counts_them():
    token_logps = torch.tensor([[-1.0, -2.0, float("-inf"), -4.0], [float("nan"), -0.5, -0.25, -8.0]])  # [2, 4]
    mask = torch.tensor([[True, True, False, True], [False, True, True, False]])
    total, count = L.sequence_logps(token_logps, mask)
    assert torch.equal(total, torch.tensor([-7.0, -0.75])) and torch.equal(count, torch.tensor([3, 2]))
    assert count.dtype == torch.int64


def test_sequence_logps_of_shards_add_up_to_the_whole_and_are_fp32_for_bf16():
    gen = torch.Generator().manual_seed(0)
    token_logps = -torch.rand(3, 16, generator=gen).to(torch.bfloat16)  # [3, 16]
    mask = torch.rand(3, 16, generator=gen) > 0.4
    whole_sum, whole_count = L.sequence_logps(token_logps, mask)
    halves = [L.sequence_logps(token_logps[:, i:i + 8], mask[:, i:i + 8]) for i in (0, 8)]  # two cp shards
    assert whole_sum.dtype == torch.float32
    torch.testing.assert_close(halves[0][0] + halves[1][0], whole_sum, rtol=1e-6, atol=1e-6)
    assert torch.equal(halves[0][1] + halves[1][1], whole_count)
    expected = (token_logps.double() * mask).sum(-1)
    torch.testing.assert_close(whole_sum.double(), expected, rtol=1e-6, atol=1e-6)


def test_sequence_logps_gives_masked_positions_no_gradient_even_when_they_are_nan():
    token_logps = torch.tensor([[-1.0, float("nan"), -3.0]], requires_grad=True)
    total, _ = L.sequence_logps(token_logps, torch.tensor([[True, False, True]]))
    total.sum().backward()
    assert torch.equal(token_logps.grad, torch.tensor([[1.0, 0.0, 1.0]]))


def test_sequence_logps_rejects_a_non_bool_mask_and_mismatched_shapes():
    with pytest.raises(TypeError):
        L.sequence_logps(torch.zeros(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError):
        L.sequence_logps(torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.bool))


def test_preference_logps_is_the_sum_for_sigmoid_and_the_mean_for_ipo():
    total, count = torch.tensor([-12.0, -3.0, 0.0]), torch.tensor([4, 3, 0])
    assert torch.equal(L.preference_logps(total, count, "sigmoid"), total)
    assert torch.equal(L.preference_logps(total, count, "ipo"), torch.tensor([-3.0, -1.0, 0.0]))
    with pytest.raises(ValueError):
        L.preference_logps(total, count, "hinge")


# ------------------------------------------------------------------------------------------------- DPO values

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_sigmoid_dpo_equals_trls_formula(dtype, eps):
    pc, pr, rc, rr = _logps(64, seed=1, dtype=dtype)
    out = L.dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=eps)
    expected = np_dpo(_np(pc), _np(pr), _np(rc), _np(rr), 0.1, eps)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(_np(out.losses), expected, rtol=tol, atol=tol)
    assert out.losses.dtype == dtype  # fp32 stays fp32, fp64 stays fp64


def test_sigmoid_dpo_with_extreme_logits_is_finite_and_exact():
    # beta * logits = +-50 and +-500: exp(500) overflows float64, the log1p form and logsigmoid do not.
    beta = 0.1
    logits = torch.tensor([500.0, -500.0, 5000.0, -5000.0, 0.0])
    pc, pr = torch.full((5,), -100.0) + logits, torch.full((5,), -100.0)
    rc = rr = torch.full((5,), -100.0)
    for eps in (0.0, 0.25):
        for requires in (pc, pr):
            requires.requires_grad_(True)
        out = L.dpo_loss(pc, pr, rc, rr, beta, label_smoothing=eps)
        out.losses.sum().backward()
        expected = np_dpo(_np(pc), _np(pr), _np(rc), _np(rr), beta, eps)
        assert np.isfinite(expected).all() and torch.isfinite(out.losses).all()
        np.testing.assert_allclose(_np(out.losses), expected, rtol=1e-6, atol=1e-30)
        assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
        pc, pr = pc.detach(), pr.detach()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ipo_equals_trls_formula_on_average_logps(dtype):
    pc, pr, rc, rr = _logps(32, seed=2, dtype=dtype)
    out = L.dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo")
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(_np(out.losses), np_dpo(_np(pc), _np(pr), _np(rc), _np(rr), 0.5, ipo=True),
                               rtol=tol, atol=tol)


def test_objective_feeds_ipo_per_token_averages_and_sigmoid_sums():
    pc, pr, rc, rr = _logps(8, seed=3)
    nc, nr = torch.arange(1, 9), torch.arange(3, 11)
    kwargs = dict(policy_chosen=pc, policy_rejected=pr, ref_chosen=rc, ref_rejected=rr, chosen_count=nc,
                  rejected_count=nr, beta=0.2, nll_alpha=0.0)
    ipo, _ = L.dpo_objective(loss_type="ipo", **kwargs)
    average = [_np(x) / _np(n) for x, n in ((pc, nc), (pr, nr), (rc, nc), (rr, nr))]
    assert math.isclose(ipo.item(), np_dpo(*average, 0.2, ipo=True).mean(), rel_tol=1e-12)
    sigmoid, _ = L.dpo_objective(loss_type="sigmoid", **kwargs)
    assert math.isclose(sigmoid.item(), np_dpo(_np(pc), _np(pr), _np(rc), _np(rr), 0.2).mean(), rel_tol=1e-12)


def test_rewards_are_beta_times_policy_minus_reference_and_detached():
    pc, pr, rc, rr = _logps(6, seed=4)
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    out = L.dpo_loss(pc, pr, rc, rr, beta=0.3)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    np.testing.assert_allclose(_np(out.chosen_rewards), 0.3 * (_np(pc) - _np(rc)), rtol=1e-13)
    np.testing.assert_allclose(_np(out.rejected_rewards), 0.3 * (_np(pr) - _np(rr)), rtol=1e-13)


def test_bad_arguments_are_refused():
    x = torch.zeros(3)
    for kwargs in (dict(beta=0.0), dict(beta=0.1, loss_type="hinge"), dict(beta=0.1, label_smoothing=0.5),
                   dict(beta=0.1, loss_type="ipo", label_smoothing=0.1)):
        with pytest.raises(ValueError):
            L.dpo_loss(x, x, x, x, **kwargs)
    with pytest.raises(ValueError):
        L.dpo_loss(x, x, x, torch.zeros(4), beta=0.1)
    with pytest.raises(ValueError):
        L.dpo_objective(policy_chosen=x, policy_rejected=x, ref_chosen=x, ref_rejected=x, chosen_count=x,
                        rejected_count=x, nll_alpha=-1.0)


# ---------------------------------------------------------------------------------------------------- gradients

def _leaf(t):
    return t.clone().requires_grad_(True)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_sigmoid_gradient_is_the_closed_form(eps):
    """d/d pc of mean_i[-(1-e) log s(b x_i) - e log s(-b x_i)] = (-(1-e) b s(-b x) + e b s(b x)) / n; pr: negated."""
    beta, b = 0.1, 16
    pc, pr, rc, rr = _logps(b, seed=5, scale=3.0)
    pc, pr, rc, rr = _leaf(pc), _leaf(pr), _leaf(rc), _leaf(rr)
    L.dpo_loss(pc, pr, rc, rr, beta, label_smoothing=eps).losses.mean().backward()
    x = (_np(pc) - _np(pr)) - (_np(rc) - _np(rr))
    closed = (-(1 - eps) * beta * np_sigmoid(-beta * x) + eps * beta * np_sigmoid(beta * x)) / b
    np.testing.assert_allclose(pc.grad.numpy(), closed, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(pr.grad.numpy(), -closed, rtol=1e-12, atol=1e-15)
    assert rc.grad is None and rr.grad is None  # the reference is a constant


def test_ipo_gradient_is_the_closed_form():
    beta, b = 0.25, 12
    pc, pr, rc, rr = (_leaf(t) for t in _logps(b, seed=6, scale=0.1))
    L.dpo_loss(pc, pr, rc, rr, beta, loss_type="ipo").losses.mean().backward()
    closed = 2.0 * (((_np(pc) - _np(pr)) - (_np(rc) - _np(rr))) - 1.0 / (2.0 * beta)) / b
    np.testing.assert_allclose(pc.grad.numpy(), closed, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(pr.grad.numpy(), -closed, rtol=1e-12, atol=1e-15)


def test_objective_gradient_adds_the_nll_term_per_chosen_token():
    """Through dpo_objective: d/d pc_i = DPO part - alpha / sum(n_c); for IPO the DPO part is divided by n_c[i]
    (it sees averages), and the NLL part is unchanged."""
    beta, alpha, b = 0.1, 0.2, 10
    base = _logps(b, seed=7, scale=3.0)
    nc, nr = torch.arange(2, 2 + b), torch.arange(5, 5 + b)
    for loss_type in ("sigmoid", "ipo"):
        pc, pr, rc, rr = (_leaf(t) for t in base)
        loss, _ = L.dpo_objective(policy_chosen=pc, policy_rejected=pr, ref_chosen=rc, ref_rejected=rr,
                                  chosen_count=nc, rejected_count=nr, beta=beta, loss_type=loss_type,
                                  nll_alpha=alpha)
        loss.backward()
        c, r = _np(nc), _np(nr)
        if loss_type == "sigmoid":
            x = (_np(pc) - _np(pr)) - (_np(rc) - _np(rr))
            d_chosen = -beta * np_sigmoid(-beta * x) / b
            d_rejected = -d_chosen
        else:
            x = (_np(pc) / c - _np(pr) / r) - (_np(rc) / c - _np(rr) / r)
            d_logits = 2.0 * (x - 1.0 / (2.0 * beta)) / b
            d_chosen, d_rejected = d_logits / c, -d_logits / r
        np.testing.assert_allclose(pc.grad.numpy(), d_chosen - alpha / c.sum(), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(pr.grad.numpy(), d_rejected, rtol=1e-12, atol=1e-15)


# -------------------------------------------------------------------------------------------------- DPO objective

def _three_examples():
    """pc - rc = [1, -1, 1], pr - rr = [-1, 1, -3]: with beta 0.5, beta * logits = [1, -1, 2]."""
    return dict(policy_chosen=torch.tensor([-10.0, -20.0, -5.0]), policy_rejected=torch.tensor([-12.0, -18.0, -9.0]),
                ref_chosen=torch.tensor([-11.0, -19.0, -6.0]), ref_rejected=torch.tensor([-11.0, -19.0, -6.0]),
                chosen_count=torch.tensor([4, 5, 1]), rejected_count=torch.tensor([3, 3, 3]), beta=0.5)


def test_objective_and_metrics_by_hand_on_three_examples():
    loss, metrics = L.dpo_objective(**_three_examples())  # nll_alpha defaults to Llama 3's 0.2
    # -log s(1) = log(1 + e^-1), -log s(-1) = log(1 + e), -log s(2) = log(1 + e^-2)
    dpo = (0.31326168751822286 + 1.3132616875182228 + 0.12692801104297263) / 3
    nll = 35.0 / 10.0  # -(-10 - 20 - 5) over 4 + 5 + 1 chosen tokens
    assert math.isclose(loss.item(), dpo + 0.2 * nll, rel_tol=1e-6)
    expected = {"rewards/chosen": (0.5 - 0.5 + 0.5) / 3, "rewards/rejected": (-0.5 + 0.5 - 1.5) / 3,
                "rewards/accuracies": 2 / 3, "rewards/margins": (1.0 - 1.0 + 2.0) / 3, "nll": nll, "loss/dpo": dpo}
    assert set(metrics) == set(expected)
    for name, value in expected.items():
        assert math.isclose(metrics[name].item(), value, rel_tol=1e-6, abs_tol=1e-7), name
        assert not metrics[name].requires_grad


def test_objective_without_nll_is_the_mean_dpo_loss_and_ties_are_not_accurate():
    example = _three_examples()
    example["policy_rejected"] = torch.tensor([-10.0, -18.0, -9.0])  # row 0 now a tie: rewards 0.5 and 0.5
    example["ref_rejected"] = torch.tensor([-11.0, -19.0, -6.0])
    loss, metrics = L.dpo_objective(nll_alpha=0.0, **example)
    out = L.dpo_loss(*(example[k] for k in ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")),
                     beta=0.5)
    assert torch.equal(loss, out.losses.mean())
    assert math.isclose(metrics["rewards/accuracies"].item(), 1 / 3, rel_tol=1e-6)


def test_objective_on_shard_sums_equals_the_unsharded_objective_and_honours_step_totals():
    gen = torch.Generator().manual_seed(8)
    token_logps = [-torch.rand(4, 12, generator=gen, dtype=torch.float64) for _ in range(4)]  # pc, pr, rc, rr
    masks = [torch.rand(4, 12, generator=gen) > 0.3 for _ in range(2)]  # chosen, rejected

    def per_sequence(columns):  # (sum, count) of pc, pr, rc, rr over these positions
        return [L.sequence_logps(t[:, columns], masks[i % 2][:, columns]) for i, t in enumerate(token_logps)]

    whole = per_sequence(slice(None))
    shards = [per_sequence(slice(0, 5)), per_sequence(slice(5, 12))]  # one sequence split over two cp ranks
    summed = [(a[0] + b[0], a[1] + b[1]) for a, b in zip(*shards)]  # what the caller's all-reduce makes

    def run(parts, **totals):
        return L.dpo_objective(policy_chosen=parts[0][0], policy_rejected=parts[1][0], ref_chosen=parts[2][0],
                               ref_rejected=parts[3][0], chosen_count=parts[0][1], rejected_count=parts[1][1],
                               **totals)[0]

    torch.testing.assert_close(run(summed), run(whole), rtol=1e-13, atol=0)
    # Normalizing by a step twice this batch (sequences and chosen tokens) halves both terms.
    doubled = run(whole, sequences_total=8, chosen_tokens_total=2 * int(whole[0][1].sum()))
    torch.testing.assert_close(doubled, run(whole) / 2, rtol=1e-13, atol=0)


def test_objective_computes_in_fp32_for_bf16_inputs():
    example = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) if torch.is_tensor(v) else v
               for k, v in _three_examples().items()}
    loss, metrics = L.dpo_objective(**example)
    assert loss.dtype == torch.float32 and metrics["nll"].dtype == torch.float32


# ---------------------------------------------------------------------------------------------------- reward model

def test_pairwise_reward_loss_is_minus_log_sigmoid_of_the_difference_with_margin():
    gen = torch.Generator().manual_seed(10)
    chosen, rejected = 20 * torch.randn(32, generator=gen), 20 * torch.randn(32, generator=gen)
    chosen[:2] = torch.tensor([60.0, -60.0])  # extreme differences stay finite
    rejected[:2] = torch.tensor([-60.0, 60.0])
    np.testing.assert_allclose(_np(L.pairwise_reward_loss(chosen, rejected)),
                               -np_log_sigmoid(_np(chosen) - _np(rejected)), rtol=1e-5, atol=1e-30)
    margin = torch.rand(32, generator=gen) * 3
    np.testing.assert_allclose(_np(L.pairwise_reward_loss(chosen, rejected, margin)),
                               -np_log_sigmoid(_np(chosen) - _np(rejected) - _np(margin)), rtol=1e-5, atol=1e-30)
    scalar = L.pairwise_reward_loss(torch.tensor([1.0]), torch.tensor([0.0]), margin=1.0)
    assert math.isclose(scalar.item(), math.log(2.0), rel_tol=1e-6)  # difference 1 - margin 1 = 0
    assert L.pairwise_reward_loss(chosen.bfloat16(), rejected.bfloat16()).dtype == torch.float32


def test_ranking_with_three_valid_responses_is_the_mean_of_its_three_pairs():
    rewards = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]], dtype=torch.float64)  # [edited, chosen, rejected]
    out = L.ranking_reward_loss(rewards, torch.ones(2, 3, dtype=torch.bool))
    for row in range(2):
        e, c, r = rewards[row]
        pairs = [L.pairwise_reward_loss(a[None], b[None]) for a, b in ((e, c), (e, r), (c, r))]
        assert math.isclose(out.losses[row].item(), torch.cat(pairs).mean().item(), rel_tol=1e-13)
    assert torch.equal(out.pair_counts, torch.tensor([3, 3]))


def test_ranking_without_an_edited_response_is_the_single_pair_and_ignores_the_padded_slot():
    rewards = torch.tensor([[float("nan"), 0.5, -1.0], [7.0, 2.0, 1.0]], requires_grad=True)
    valid = torch.tensor([[False, True, True], [True, True, True]])
    out = L.ranking_reward_loss(rewards, valid)
    assert math.isclose(out.losses[0].item(), -np_log_sigmoid(1.5).item(), rel_tol=1e-6)
    assert torch.equal(out.pair_counts, torch.tensor([1, 3]))
    out.losses.mean().backward()
    assert torch.isfinite(rewards.grad).all() and rewards.grad[0, 0] == 0.0
    # closed form for row 0: d/dr_c of -log s(r_c - r_r) / 2 rows = -s(r_r - r_c) / 2
    assert math.isclose(rewards.grad[0, 1].item(), -np_sigmoid(-1.5).item() / 2, rel_tol=1e-6)


def test_ranking_with_two_columns_equals_pairwise_and_metrics_by_hand():
    rewards = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0]])  # [chosen, rejected]
    out = L.ranking_reward_loss(rewards, torch.ones(3, 2, dtype=torch.bool))
    torch.testing.assert_close(out.losses, L.pairwise_reward_loss(rewards[:, 0], rewards[:, 1]))
    assert math.isclose(out.metrics["rewards/accuracies"].item(), 2 / 3, rel_tol=1e-6)
    assert math.isclose(out.metrics["rewards/margins"].item(), (1.0 - 2.0 + 2.0) / 3, rel_tol=1e-6)
    metrics = L.reward_metrics(rewards[:, 0], rewards[:, 1])
    assert set(metrics) == {"rewards/accuracies", "rewards/margins"}


def test_ranking_metrics_compare_chosen_with_rejected_not_the_edited_response():
    rewards = torch.tensor([[-5.0, 1.0, 0.0], [9.0, 0.0, 4.0]])  # edited is ignored by the metrics
    out = L.ranking_reward_loss(rewards, torch.tensor([[True, True, True], [False, True, True]]))
    assert out.metrics["rewards/accuracies"].item() == 0.5
    assert math.isclose(out.metrics["rewards/margins"].item(), (1.0 - 4.0) / 2, rel_tol=1e-6)


def test_ranking_rejects_bad_shapes():
    with pytest.raises(ValueError):
        L.ranking_reward_loss(torch.zeros(2, 1), torch.ones(2, 1, dtype=torch.bool))
    with pytest.raises(ValueError):
        L.ranking_reward_loss(torch.zeros(2, 3), torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(TypeError):
        L.ranking_reward_loss(torch.zeros(2, 3), torch.ones(2, 3))
