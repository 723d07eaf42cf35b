"""Ranking losses of LARPO (Jin et al., ICML 2025; the loss table in docs/algorithm.md). Pure torch.

Every loss has one signature and is looked up by name in `LOSSES`:

    loss, metrics = LOSSES[name](policy_logps, ref_logps, rewards, mask, beta, **options)

where `options` are the loss's own keywords, named in `larpo_ray.choices.LOSS_SPECS[name].options`.

Shapes use suffixes, B prompts by K candidate slots: `policy_logps`, `ref_logps` (log-probs summed
over response tokens) and `rewards` are float [B, K]; `mask` is bool [B, K], True for a real
candidate, so lists may have different lengths. Candidates may come in any order: each loss orders
a list by reward itself. Padded slots may hold anything, NaN and inf included; they are removed with
torch.where (never multiplied by 0) before any arithmetic, so they reach neither loss nor gradients.

The implicit reward of a response is g = beta * (log pi_theta(y|x) - log pi_ref(y|x)).

Ties carry no order. A strict pair (i, j) has r_i > r_j with i and j both valid, and only strict
pairs are trained; tied candidates are never trained as better or worse than each other. A prompt
with no strict pair (one candidate, or all tied) is inactive: it contributes nothing and is counted
in metrics["n_no_pair"]. The loss is the mean of the per-prompt losses over the active prompts
(0.0, with the graph intact, when there are none).

Data-parallel reduction. Because the mean is over active prompts, shards with different numbers of
active prompts must not be averaged uniformly. With n_r = active_prompts(rewards, mask).sum() on
rank r (also metrics["n_active"]) the global loss is

    global_loss = sum_r(loss_r * n_r) / sum_r(n_r)

so, with N = all_reduce_sum(n_r) computed before backward, each rank backpropagates
loss_r * n_r * world_size / N, and the mean gradient all-reduce of DDP / DeepSpeed then yields the
gradient of global_loss exactly. Gradient-accumulation micro-batches are shards in the same way
(count them in N too). To reduce metrics: `reward_accuracy` and `margin` are weighted by `n_pairs`,
`chosen_reward` and `rejected_reward` by `n_active`; the counts are summed.
"""

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

Metrics = dict[str, float]


def implicit_rewards(policy_logps: Tensor, ref_logps: Tensor, beta: float) -> Tensor:
    """g = beta * (policy_logp - ref_logp), any shape: DPO's implicit reward (docs/algorithm.md, losses)."""
    return beta * (policy_logps - ref_logps)


def strict_pair_mask(rewards: Tensor, mask: Tensor) -> Tensor:
    """bool [B, K, K]: True at (b, i, j) where i and j are valid candidates and r_i > r_j."""
    valid_BKK = mask[:, :, None] & mask[:, None, :]
    return valid_BKK & (rewards[:, :, None] > rewards[:, None, :])


def active_prompts(rewards: Tensor, mask: Tensor) -> Tensor:
    """bool [B]: prompts with at least one strict pair, the ones that contribute to the loss."""
    return strict_pair_mask(rewards, mask).flatten(1).any(dim=1)


class _Lists(NamedTuple):
    """What every loss needs about a validated batch of candidate lists."""

    g_BK: Tensor  # implicit rewards, 0.0 at padded slots
    pair_BKK: Tensor  # strict pairs r_i > r_j
    active_B: Tensor  # prompts with a strict pair
    best_B: Tensor  # index of the highest-reward valid candidate, lowest index on ties
    worst_B: Tensor  # index of the lowest-reward valid candidate, lowest index on ties


def _check_inputs(policy_logps, ref_logps, rewards, mask, beta) -> None:
    """Raise ValueError naming the argument and what is expected."""
    for name, x in (("policy_logps", policy_logps), ("ref_logps", ref_logps), ("rewards", rewards)):
        if not isinstance(x, Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a floating-point tensor [B, K], got {got}")
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a bool tensor [B, K] (True = real candidate), got {got}")
    if policy_logps.dim() != 2 or policy_logps.shape[1] == 0:
        raise ValueError(f"policy_logps must have shape [B, K] with K >= 1, got {tuple(policy_logps.shape)}")
    for name, x in (("ref_logps", ref_logps), ("rewards", rewards), ("mask", mask)):
        if x.shape != policy_logps.shape:
            raise ValueError(
                f"{name} must have the shape of policy_logps {tuple(policy_logps.shape)}, got {tuple(x.shape)}"
            )
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if torch.isnan(rewards[mask]).any():
        raise ValueError("rewards must not be NaN where mask is True; mask out unscored candidates")


def _pick(x_BK: Tensor, index_B: Tensor) -> Tensor:
    """x_BK[b, index_B[b]] for every b, shape [B]."""
    return x_BK.gather(1, index_B[:, None]).squeeze(1)


def _prepare(policy_logps, ref_logps, rewards, mask, beta) -> _Lists:
    """Validate the inputs, then order every list by reward (strict pairs, best and worst)."""
    _check_inputs(policy_logps, ref_logps, rewards, mask, beta)
    g_BK = torch.where(mask, implicit_rewards(policy_logps, ref_logps, beta), 0.0)
    pair_BKK = strict_pair_mask(rewards, mask)
    # The first valid slot holding the extreme reward: deterministic tie-break, NaN-proof padding.
    top_B1 = torch.where(mask, rewards, float("-inf")).amax(dim=1, keepdim=True)
    bottom_B1 = torch.where(mask, rewards, float("inf")).amin(dim=1, keepdim=True)
    best_B = (mask & (rewards == top_B1)).long().argmax(dim=1)
    worst_B = (mask & (rewards == bottom_B1)).long().argmax(dim=1)
    return _Lists(g_BK, pair_BKK, pair_BKK.flatten(1).any(dim=1), best_B, worst_B)


def _finish(loss_B: Tensor, lists: _Lists) -> tuple[Tensor, Metrics]:
    """Mean over active prompts (torch.where keeps the graph when none is active), plus metrics."""
    n_active = lists.active_B.sum()
    loss = torch.where(lists.active_B, loss_B, 0.0).sum() / n_active.clamp(min=1)
    return loss, _metrics(lists)


@torch.no_grad()
def _metrics(lists: _Lists) -> Metrics:
    """Counts, plus accuracy and margin over all strict pairs of the batch (same for every loss)."""
    g_BK, pair_BKK, active_B = lists.g_BK, lists.pair_BKK, lists.active_B
    diff_BKK = g_BK[:, :, None] - g_BK[:, None, :]
    n_pairs, n_active = float(pair_BKK.sum()), float(active_B.sum())
    return {
        "n_prompts": float(g_BK.shape[0]),
        "n_active": n_active,
        "n_no_pair": float(g_BK.shape[0]) - n_active,
        "n_pairs": n_pairs,
        "reward_accuracy": float((pair_BKK & (diff_BKK > 0)).sum()) / max(n_pairs, 1.0),
        "margin": float(diff_BKK[pair_BKK].sum()) / max(n_pairs, 1.0),
        "chosen_reward": float(_pick(g_BK, lists.best_B)[active_B].sum()) / max(n_active, 1.0),
        "rejected_reward": float(_pick(g_BK, lists.worst_B)[active_B].sum()) / max(n_active, 1.0),
    }


def pairwise_loss(
    policy_logps: Tensor, ref_logps: Tensor, rewards: Tensor, mask: Tensor, beta: float
) -> tuple[Tensor, Metrics]:
    """DPO on the best vs the worst valid candidate: -log sigmoid(g_w - g_l).

    The paper's pairwise setting is top-1 vs bottom-1 of the list (docs/algorithm.md, list building). When
    several candidates tie for the best (or worst) reward, the one in the lowest slot is used.
    """
    lists = _prepare(policy_logps, ref_logps, rewards, mask, beta)
    margin_B = _pick(lists.g_BK, lists.best_B) - _pick(lists.g_BK, lists.worst_B)
    return _finish(-F.logsigmoid(margin_B), lists)


def ipo_loss(
    policy_logps: Tensor, ref_logps: Tensor, rewards: Tensor, mask: Tensor, beta: float
) -> tuple[Tensor, Metrics]:
    """IPO (Azar et al. 2024) on the best vs the worst candidate: (h - 1 / (2 * tau))^2.

    h = (policy_logp_w - ref_logp_w) - (policy_logp_l - ref_logp_l), unscaled. `beta` is IPO's
    regulariser tau: it plays beta's role (larger = weaker pull from the reference). Tie-break as
    in `pairwise_loss`. Metrics still use g = beta * log-ratio.
    """
    lists = _prepare(policy_logps, ref_logps, rewards, mask, beta)
    h_B = (_pick(lists.g_BK, lists.best_B) - _pick(lists.g_BK, lists.worst_B)) / beta
    return _finish((h_B - 1 / (2 * beta)) ** 2, lists)


def contrastive_loss(
    policy_logps: Tensor, ref_logps: Tensor, rewards: Tensor, mask: Tensor, beta: float
) -> tuple[Tensor, Metrics]:
    """InfoNCE: -log(exp g_w / (exp g_w + sum_neg exp g_neg)) (docs/algorithm.md, contrastive).

    The positive is the best valid candidate (lowest slot on ties, as in `pairwise_loss`); the
    negatives are all valid candidates with a strictly lower reward. Candidates tied with the
    positive are neither positive nor negative, so they get no gradient.
    """
    lists = _prepare(policy_logps, ref_logps, rewards, mask, beta)
    batch, slots = lists.g_BK.shape
    negative_BK = lists.pair_BKK[torch.arange(batch, device=lists.g_BK.device), lists.best_B]
    in_softmax_BK = negative_BK | F.one_hot(lists.best_B, slots).bool()
    logits_BK = torch.where(in_softmax_BK, lists.g_BK, float("-inf"))
    return _finish(torch.logsumexp(logits_BK, dim=1) - _pick(lists.g_BK, lists.best_B), lists)


@torch.no_grad()
def _delta_ndcg(rewards: Tensor, mask: Tensor, pair_BKK: Tensor) -> Tensor:
    """|DeltaNDCG| of swapping i and j in the reward order, [B, K, K], 0 off the strict pairs.

    gain      G_i = r_i - min_valid(r)   (linear gain, shifted so the worst candidate gains 0)
    rank      rank_i = 1 + #{valid j : r_j > r_i}   (tied candidates share their group's best rank)
    discount  D_i = 1 / log2(1 + rank_i)
    weight    w_ij = |G_i - G_j| * |D_i - D_j| / IDCG,   IDCG = sum_valid G_i * D_i
    The same tied ranks enter the pair discounts and IDCG. w is unchanged by adding a constant to
    or rescaling the rewards, so raw reward-model scores can be used.
    """
    r_min_B1 = torch.where(mask, rewards, float("inf")).amin(dim=1, keepdim=True)
    gain_BK = torch.where(mask, rewards - r_min_B1, 0.0)
    rank_BK = 1 + pair_BKK.sum(dim=1).to(rewards.dtype)
    discount_BK = 1 / torch.log2(1 + rank_BK)
    idcg_B11 = (gain_BK * discount_BK).sum(dim=1)[:, None, None]
    idcg_B11 = torch.where(idcg_B11 > 0, idcg_B11, 1.0)  # 0 only when all tie: no pairs anyway
    gain_gap_BKK = (gain_BK[:, :, None] - gain_BK[:, None, :]).abs()
    discount_gap_BKK = (discount_BK[:, :, None] - discount_BK[:, None, :]).abs()
    return torch.where(pair_BKK, gain_gap_BKK * discount_gap_BKK / idcg_B11, 0.0)


def lambdarank_loss(
    policy_logps: Tensor, ref_logps: Tensor, rewards: Tensor, mask: Tensor, beta: float, *, ndcg_weights: bool = False
) -> tuple[Tensor, Metrics]:
    """-sum over strict pairs (r_i > r_j) of w_ij * log sigmoid(g_i - g_j) (docs/algorithm.md, LambdaRank).

    As printed in the paper w_ij = 1. With `ndcg_weights=True`, w_ij is the |DeltaNDCG| of the
    pair (LiPO-lambda, Liu et al. 2024), defined in `_delta_ndcg`. Tied pairs are not in the sum.
    """
    lists = _prepare(policy_logps, ref_logps, rewards, mask, beta)
    if ndcg_weights and torch.isinf(rewards[mask]).any():
        raise ValueError("rewards must be finite where mask is True when ndcg_weights=True")
    weight_BKK = _delta_ndcg(rewards, mask, lists.pair_BKK) if ndcg_weights else 1.0
    diff_BKK = lists.g_BK[:, :, None] - lists.g_BK[:, None, :]
    loss_BKK = torch.where(lists.pair_BKK, -F.logsigmoid(diff_BKK) * weight_BKK, 0.0)
    return _finish(loss_BKK.sum(dim=(1, 2)), lists)


def listmle_loss(
    policy_logps: Tensor, ref_logps: Tensor, rewards: Tensor, mask: Tensor, beta: float
) -> tuple[Tensor, Metrics]:
    """Plackett-Luce NLL of the reward order: -sum_i log(exp g_i / sum_{j>=i} exp g_j) (ListMLE).

    Ties use Breslow's rule: the denominator of candidate i sums over every valid j with
    r_j <= r_i (itself, its ties and all below), so tied candidates enter each other's terms
    symmetrically and the loss is unchanged by exchanging them: no tied candidate is trained above
    another. The lowest-reward group gets no term (nothing below it to be ranked above), hence an
    all-tied prompt contributes nothing, and a strict list of two equals `pairwise_loss`.
    """
    lists = _prepare(policy_logps, ref_logps, rewards, mask, beta)
    slots = lists.g_BK.shape[1]
    valid_BKK = mask[:, :, None] & mask[:, None, :]
    # (b, i, j): j is in i's denominator. The diagonal keeps padded rows finite (g = 0 there).
    eye_KK = torch.eye(slots, dtype=torch.bool, device=mask.device)
    below_BKK = (valid_BKK & ~lists.pair_BKK.transpose(1, 2)) | eye_KK
    logits_BKK = torch.where(below_BKK, lists.g_BK[:, None, :], float("-inf"))
    term_BK = torch.logsumexp(logits_BKK, dim=2) - lists.g_BK
    has_lower_BK = lists.pair_BKK.any(dim=2)
    return _finish(torch.where(has_lower_BK, term_BK, 0.0).sum(dim=1), lists)


def best_nll(policy_logps: Tensor, lengths: Tensor, rewards: Tensor, mask: Tensor) -> Tensor:
    """Mean over prompts with a strict pair of -log pi(y_best|x) / |y_best|: the per-token negative
    log-likelihood of each list's best candidate. Added with weight `loss.sft_weight` to any
    ranking loss, it keeps the chosen responses likely while their margin over the rest grows
    (RPO, Pang et al. 2024: iterative preference optimization for reasoning) [ours: not in LARPO].
    `lengths` [B, K] are response token counts (> 0 at valid slots)."""
    active_B = active_prompts(rewards, mask)
    top_B1 = torch.where(mask, rewards, float("-inf")).amax(dim=1, keepdim=True)
    best_B = (mask & (rewards == top_B1)).long().argmax(dim=1)
    per_token_B = _pick(torch.where(mask, policy_logps, 0.0), best_B) / _pick(lengths.clamp(min=1), best_B)
    return -torch.where(active_B, per_token_B, 0.0).sum() / active_B.sum().clamp(min=1)


# Keys: larpo_ray.choices.LOSS_SPECS, which says what the config and the learner need to know of each loss
# (listwise, options) without importing torch; tests/test_config.py checks the two agree.
LOSSES: dict[str, Callable[..., tuple[Tensor, Metrics]]] = {
    "pairwise": pairwise_loss,
    "contrastive": contrastive_loss,
    "lambdarank": lambdarank_loss,
    "listmle": listmle_loss,
    "ipo": ipo_loss,
}
