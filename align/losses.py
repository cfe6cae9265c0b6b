"""Post-training losses: DPO (with IPO and Llama 3's NLL term) and the reward model's pairwise / ranking losses.

Contract. Every function here combines per-sequence numbers that the caller has already computed: summed
log-probabilities of a response's tokens, token counts, scalar rewards. None of them reduces over ranks. When a
sequence is split over tensor/context-parallel shards, each shard calls `sequence_logps` on its slice and the caller
all-reduces (SUM) the sums and the counts before calling the losses; the losses then see whole-sequence numbers.
Averages over data-parallel ranks (the batch mean) are likewise the caller's: pass `sequences_total` /
`chosen_tokens_total` to `dpo_objective` to normalize by the whole optimizer step instead of this micro-batch.

Precision. Inputs are cast to at least fp32 (bf16 -> fp32; fp64 stays fp64, which the gradient tests use), so
log-sigmoids of large logits and sums over long responses do not lose the bits a bf16 forward pass would.

Sum vs average log-probs. DPO's sigmoid loss (Rafailov et al. 2023, eq. 7) uses the *summed* log-probability of a
response. IPO, as TRL implements it (Azar et al. 2023, eq. 17), uses the *per-token average*. `dpo_loss` takes
whichever the loss type needs; `preference_logps` turns (sum, count) into it, and `dpo_objective`, the entry point a
train module should call, takes sums and counts only and converts them itself, so the two cannot be confused there.

Masks. The mask given to `sequence_logps` decides which tokens count: the response's tokens only (never the prompt),
and, following the Llama 3 paper (section 4.1.4), without the special formatting tokens (header and termination
tokens such as <|start_header_id|>, <|end_header_id|>, <|eot_id|>) in both chosen and rejected: they occur in both
responses, so DPO would push their likelihood up and down at once, which the paper found makes the model repeat its
tail or end its answers abruptly. Building that mask is the caller's job.
"""

from typing import Dict, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "ipo")
Number = Union[float, int, torch.Tensor]


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or float64 if it already is (bool/int counts become float32)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of the masked tokens of each sequence, and how many tokens there were.

    token_logps: [b, s] log p(token_t | tokens_<t) of each target token; mask: [b, s] bool, True where the token
    belongs to the scored response (see the module docstring for what to exclude).
    Returns (sum [b] in >= fp32, count [b] int64). Both are sums, so shards of one sequence add up.
    """
    if token_logps.shape != mask.shape:
        raise ValueError(f"token_logps {tuple(token_logps.shape)} and mask {tuple(mask.shape)} differ in shape")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool, got {mask.dtype}")
    # where (not multiply) so a -inf or nan at a masked position (padding logits) cannot leak into the sum.
    logps = torch.where(mask, _at_least_fp32(token_logps), 0.0)  # [b, s]
    return logps.sum(dim=-1), mask.sum(dim=-1)


def average_logps(logps_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Per-token mean log-probability [b] from (sum [b], count [b]). A row with no tokens gets 0, not nan: the
    data loader rejects such rows (shared/TESTING.md R14), and a nan here would poison the whole step."""
    return _at_least_fp32(logps_sum) / _at_least_fp32(count).clamp_min(1.0)


def preference_logps(logps_sum: torch.Tensor, count: torch.Tensor, loss_type: str) -> torch.Tensor:
    """What `dpo_loss` expects for `loss_type`: the sum for sigmoid (DPO eq. 7), the per-token mean for IPO."""
    _check_loss_type(loss_type)
    return average_logps(logps_sum, count) if loss_type == "ipo" else _at_least_fp32(logps_sum)


def _check_loss_type(loss_type: str) -> None:
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")


class DPOOutput(NamedTuple):
    losses: torch.Tensor  # [b] per-pair loss
    chosen_rewards: torch.Tensor  # [b] beta * (policy - ref) of the chosen response, detached
    rejected_rewards: torch.Tensor  # [b] the same for the rejected response, detached


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> DPOOutput:
    """Per-pair DPO or IPO loss. All inputs [b]; use `preference_logps` to make them (sums for sigmoid, per-token
    averages for IPO). The reference inputs are treated as constants (detached).

    logits = (pc - pr) - (rc - rr), the difference of the implicit rewards divided by beta.
    sigmoid (Rafailov et al. 2023, eq. 7), with conservative-DPO label smoothing eps as TRL defines it:
        -(1 - eps) log sigma(beta * logits) - eps log sigma(-beta * logits)
    ipo (Azar et al. 2023, eq. 17, beta playing the role of tau): (logits - 1 / (2 beta))^2
    """
    _check_loss_type(loss_type)
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if loss_type == "ipo" and label_smoothing != 0.0:
        raise ValueError("label_smoothing applies to the sigmoid loss only; IPO has no label-noise term")
    shapes = {tuple(t.shape) for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1:
        raise ValueError(f"the four log-prob tensors must share one shape, got {sorted(shapes)}")
    pc, pr = _at_least_fp32(policy_chosen), _at_least_fp32(policy_rejected)
    rc, rr = _at_least_fp32(ref_chosen).detach(), _at_least_fp32(ref_rejected).detach()
    logits = (pc - pr) - (rc - rr)  # [b]
    if loss_type == "sigmoid":
        # logsigmoid is the stable log(1 / (1 + exp(-x))): finite for |x| in the hundreds, where exp overflows.
        losses = (-(1.0 - label_smoothing) * F.logsigmoid(beta * logits)
                  - label_smoothing * F.logsigmoid(-beta * logits))
    else:
        losses = (logits - 1.0 / (2.0 * beta)) ** 2
    return DPOOutput(losses, beta * (pc - rc).detach(), beta * (pr - rr).detach())


def dpo_objective(*, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                  ref_rejected: torch.Tensor, chosen_count: torch.Tensor, rejected_count: torch.Tensor,
                  beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                  nll_alpha: float = 0.2, sequences_total: Optional[Number] = None,
                  chosen_tokens_total: Optional[Number] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Llama 3's DPO objective (paper section 4.1.4): mean DPO loss + nll_alpha * NLL of the chosen responses.

    All log-prob inputs are *summed* log-probs [b] from `sequence_logps` (never averages: IPO's averaging happens
    here); chosen_count / rejected_count [b] are the token counts that went into them (the reference's must have
    been computed under the same masks). Keyword-only, so chosen and rejected cannot be swapped by position.

    NLL follows TRL's rpo_alpha: the per-token mean over all chosen tokens of the batch,
    -sum_i pc_i / sum_i n_i, not a mean of per-sequence means.
    sequences_total / chosen_tokens_total replace the local denominators (b and sum_i n_i) when the caller
    normalizes by a whole optimizer step spread over micro-batches and data-parallel ranks.

    Returns (scalar loss, metrics): the metrics are detached means over this batch: rewards/chosen,
    rewards/rejected, rewards/accuracies (fraction with chosen reward > rejected reward), rewards/margins, nll,
    and loss/dpo (the preference term alone).
    """
    if nll_alpha < 0:
        raise ValueError(f"nll_alpha must be >= 0, got {nll_alpha}")
    out = dpo_loss(preference_logps(policy_chosen, chosen_count, loss_type),
                   preference_logps(policy_rejected, rejected_count, loss_type),
                   preference_logps(ref_chosen, chosen_count, loss_type),
                   preference_logps(ref_rejected, rejected_count, loss_type),
                   beta, loss_type, label_smoothing)
    sequences = out.losses.numel() if sequences_total is None else sequences_total
    dpo_term = out.losses.sum() / sequences
    tokens = _at_least_fp32(chosen_count).sum() if chosen_tokens_total is None else chosen_tokens_total
    # clamp: a batch of all-empty chosen responses contributes no NLL rather than nan.
    nll = -_at_least_fp32(policy_chosen).sum() / torch.as_tensor(tokens, dtype=dpo_term.dtype).clamp_min(1.0)
    loss = dpo_term + nll_alpha * nll
    metrics = preference_metrics(out.chosen_rewards, out.rejected_rewards)
    metrics["nll"] = nll.detach()
    metrics["loss/dpo"] = dpo_term.detach()
    return loss, metrics


def preference_metrics(chosen: torch.Tensor, rejected: torch.Tensor,
                       prefix: str = "rewards/") -> Dict[str, torch.Tensor]:
    """Batch means of chosen [b] and rejected [b] rewards, the fraction of pairs ranked right (strictly: a tie
    counts as wrong, as in TRL), and the mean margin. All detached."""
    chosen, rejected = _at_least_fp32(chosen).detach(), _at_least_fp32(rejected).detach()
    return {
        f"{prefix}chosen": chosen.mean(),
        f"{prefix}rejected": rejected.mean(),
        f"{prefix}accuracies": (chosen > rejected).to(chosen.dtype).mean(),
        f"{prefix}margins": (chosen - rejected).mean(),
    }


def pairwise_reward_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                         margin: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Bradley-Terry reward-model loss (Ouyang et al. 2022, eq. 1; Llama 2's margin variant, Touvron et al. 2023,
    eq. 2): -log sigma(r_c - r_r - margin), per pair [b]. Llama 3 (section 4.1.2) drops the margin: leave it None.

    r_chosen, r_rejected: [b] scalar rewards; margin: [b] or scalar, >= 0 for pairs rated further apart.
    """
    if r_chosen.shape != r_rejected.shape:
        raise ValueError(f"r_chosen {tuple(r_chosen.shape)} and r_rejected {tuple(r_rejected.shape)} differ")
    difference = _at_least_fp32(r_chosen) - _at_least_fp32(r_rejected)  # [b]
    if margin is not None:
        difference = difference - _at_least_fp32(torch.as_tensor(margin, device=difference.device))
    return -F.logsigmoid(difference)


class RankingOutput(NamedTuple):
    losses: torch.Tensor  # [b] mean of -log sigma(r_i - r_j) over the row's valid ordered pairs (0 if none)
    pair_counts: torch.Tensor  # [b] int64 number of valid ordered pairs in the row
    metrics: Dict[str, torch.Tensor]  # rewards/accuracies, rewards/margins (chosen vs rejected), detached


def ranking_reward_loss(rewards: torch.Tensor, valid: torch.Tensor) -> RankingOutput:
    """Reward-model loss over k responses to one prompt ranked best first (Llama 3 paper, section 4.1.2: edited >
    chosen > rejected, the three scored in one row). Every valid pair (i, j) with i ranked above j (i < j)
    contributes -log sigma(r_i - r_j); a row's loss is the mean over its pairs, so every annotated prompt weighs
    the same whether or not it has an edited response. The caller averages rows (e.g. losses.mean()).

    rewards: [b, k] scalar rewards, column 0 the best; valid: [b, k] bool. Convention: the last two columns are
    the chosen and the rejected response and are always valid; responses preferred over chosen (edited) come first
    and are invalid in rows that lack them. Metrics compare chosen (column k-2) with rejected (column k-1).
    """
    if rewards.dim() != 2 or rewards.shape != valid.shape or rewards.shape[1] < 2:
        raise ValueError(f"rewards and valid must both be [b, k>=2], got {tuple(rewards.shape)}, "
                         f"{tuple(valid.shape)}")
    if valid.dtype != torch.bool:
        raise TypeError(f"valid must be bool, got {valid.dtype}")
    rewards = _at_least_fp32(rewards)
    k = rewards.shape[1]
    better_first = torch.ones(k, k, dtype=torch.bool, device=rewards.device).triu(diagonal=1)  # [k, k]: i < j
    pair_valid = better_first & valid[:, :, None] & valid[:, None, :]  # [b, k, k]
    # Zero the invalid pairs before the log-sigmoid: a padded slot may hold any value (even nan), and where() would
    # still pass its nan gradient back through logsigmoid into rewards.
    difference = torch.where(pair_valid, rewards[:, :, None] - rewards[:, None, :], 0.0)  # [b, k, k]: r_i - r_j
    pair_losses = torch.where(pair_valid, -F.logsigmoid(difference), 0.0)  # [b, k, k]
    pair_counts = pair_valid.sum(dim=(1, 2))  # [b]
    losses = pair_losses.sum(dim=(1, 2)) / pair_counts.to(rewards.dtype).clamp_min(1.0)  # [b]
    return RankingOutput(losses, pair_counts, reward_metrics(rewards[:, -2], rewards[:, -1]))


def reward_metrics(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Reward-model accuracy (fraction with r_chosen > r_rejected) and mean margin r_chosen - r_rejected."""
    metrics = preference_metrics(r_chosen, r_rejected)
    return {"rewards/accuracies": metrics["rewards/accuracies"], "rewards/margins": metrics["rewards/margins"]}
