"""Tests for larpo_ray/losses.py: hand-computed values, equivalences, invariances, DP sharding."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from larpo_ray.losses import LOSSES, active_prompts, implicit_rewards, lambdarank_loss, strict_pair_mask

NAMES = list(LOSSES)  # the config's choices (larpo_ray.choices.LOSS_SPECS): tests/test_config.py checks they agree
# Every loss, lambdarank also with its |DeltaNDCG| weights: (name, options).
VARIANTS = [(name, {}) for name in NAMES] + [("lambdarank", {"ndcg_weights": True})]
VARIANT_IDS = [name + ("-ndcg" if options else "") for name, options in VARIANTS]


def softplus(x: float) -> float:
    """-log sigmoid(-x) = log(1 + e^x)."""
    return math.log1p(math.exp(x))


def logsumexp(*xs: float) -> float:
    return math.log(sum(math.exp(x) for x in xs))


def random_lists(batch: int, slots: int, seed: int, dtype=torch.float64):
    """Random lists whose best and worst candidates are unique, with ties in the middle."""
    gen = torch.Generator().manual_seed(seed)
    policy_BK = -5 * torch.rand(batch, slots, generator=gen, dtype=dtype)
    ref_BK = -5 * torch.rand(batch, slots, generator=gen, dtype=dtype)
    rewards_BK = torch.randint(1, 3, (batch, slots), generator=gen).to(dtype)
    rewards_BK[:, 0], rewards_BK[:, 1] = 5.0, 0.0
    return policy_BK, ref_BK, rewards_BK, torch.ones(batch, slots, dtype=torch.bool)


# Hand-computed values. One prompt whose rewards [0, 2, 1] are not sorted, and one all-tied prompt
# that must not count. Log-ratios are [-1, 1, 0.5], beta = 0.5, so g = [-0.5, 0.5, 0.25]:
# best g_w = 0.5, middle g_m = 0.25, worst g_l = -0.5.
HAND_POLICY = torch.tensor([[-2.0, -1.0, -1.5], [-1.0, -2.0, -3.0]], dtype=torch.float64)
HAND_REF = torch.tensor([[-1.0, -2.0, -2.0], [-1.0, -1.0, -1.0]], dtype=torch.float64)
HAND_REWARDS = torch.tensor([[0.0, 2.0, 1.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
HAND_MASK = torch.ones(2, 3, dtype=torch.bool)
G_W, G_M, G_L = 0.5, 0.25, -0.5
HAND_EXPECTED = {
    # -log sigmoid(g_w - g_l) = log(1 + e^-(g_w - g_l))
    "pairwise": softplus(-(G_W - G_L)),
    # positive g_w against both lower candidates
    "contrastive": logsumexp(G_W, G_M, G_L) - G_W,
    # pairs (w, m), (w, l), (m, l)
    "lambdarank": softplus(-(G_W - G_M)) + softplus(-(G_W - G_L)) + softplus(-(G_M - G_L)),
    # Plackett-Luce: w first out of {w, m, l}, then m out of {m, l}; the last term is log 1 = 0
    "listmle": (logsumexp(G_W, G_M, G_L) - G_W) + (logsumexp(G_M, G_L) - G_M),
    # h = 1 - (-1) = 2 unscaled, tau = beta = 0.5: (2 - 1 / (2 * 0.5))^2 = 1
    "ipo": 1.0,
}


@pytest.mark.parametrize("name", NAMES)
def test_hand_computed_value(name):
    loss, metrics = LOSSES[name](HAND_POLICY, HAND_REF, HAND_REWARDS, HAND_MASK, 0.5)
    assert loss.item() == pytest.approx(HAND_EXPECTED[name], rel=1e-12)
    # Three strict pairs, all with g in reward order: margins 0.25, 1.0, 0.75.
    assert metrics == pytest.approx(
        {
            "n_prompts": 2.0,
            "n_active": 1.0,
            "n_no_pair": 1.0,
            "n_pairs": 3.0,
            "reward_accuracy": 1.0,
            "margin": 2.0 / 3.0,
            "chosen_reward": G_W,
            "rejected_reward": G_L,
        }
    )


def test_lambdarank_ndcg_weights_hand_computed():
    # Rewards [3, 1, 2]: ranks [1, 3, 2], linear gains r - min r = [2, 0, 1],
    # discounts 1 / log2(1 + rank) = [1, 1/2, 1/log2(3)], IDCG = 2 * 1 + 1 / log2(3).
    # w_ij = |G_i - G_j| * |D_i - D_j| / IDCG on the pairs (0, 1), (0, 2), (2, 1).
    inv_log2_3 = 1 / math.log2(3)
    idcg = 2 + inv_log2_3
    w01, w02, w21 = 2 * 0.5 / idcg, 1 * (1 - inv_log2_3) / idcg, 1 * (inv_log2_3 - 0.5) / idcg
    policy = torch.tensor([[0.3, -0.2, 0.1]], dtype=torch.float64)
    ref = torch.zeros(1, 3, dtype=torch.float64)
    rewards = torch.tensor([[3.0, 1.0, 2.0]], dtype=torch.float64)
    loss, _ = lambdarank_loss(policy, ref, rewards, torch.ones(1, 3, dtype=torch.bool), 1.0, ndcg_weights=True)
    g = [0.3, -0.2, 0.1]
    expected = w01 * softplus(-(g[0] - g[1])) + w02 * softplus(-(g[0] - g[2])) + w21 * softplus(-(g[2] - g[1]))
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    # Shifting and scaling the rewards leaves the weights, hence the loss, unchanged.
    moved, _ = lambdarank_loss(
        policy, ref, 10 * rewards - 7, torch.ones(1, 3, dtype=torch.bool), 1.0, ndcg_weights=True
    )
    assert moved.item() == pytest.approx(expected, rel=1e-12)


def test_lambdarank_ndcg_weights_with_ties_share_a_rank():
    # Rewards [2, 1, 1, 0]: competition ranks [1, 2, 2, 4], gains [2, 1, 1, 0],
    # discounts [1, 1/log2(3), 1/log2(3), 1/log2(5)], IDCG = 2 + 2 / log2(3).
    d1, d2, d4 = 1.0, 1 / math.log2(3), 1 / math.log2(5)
    idcg = 2 + 2 * d2
    weights = {
        (0, 1): 1 * (d1 - d2),
        (0, 2): 1 * (d1 - d2),
        (0, 3): 2 * (d1 - d4),
        (1, 3): 1 * (d2 - d4),
        (2, 3): 1 * (d2 - d4),
    }
    g = [0.1, -0.3, 0.2, 0.0]
    expected = sum(w / idcg * softplus(-(g[i] - g[j])) for (i, j), w in weights.items())
    loss, metrics = lambdarank_loss(
        torch.tensor([g], dtype=torch.float64),
        torch.zeros(1, 4, dtype=torch.float64),
        torch.tensor([[2.0, 1.0, 1.0, 0.0]], dtype=torch.float64),
        torch.ones(1, 4, dtype=torch.bool),
        1.0,
        ndcg_weights=True,
    )
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert metrics["n_pairs"] == 5.0


def test_pairwise_is_the_dpo_formula():
    policy, ref, rewards, mask = random_lists(6, 4, seed=0)
    beta = 0.1
    loss, _ = LOSSES["pairwise"](policy, ref, rewards, mask, beta)
    # random_lists puts the unique best in slot 0 and the unique worst in slot 1.
    pw, pl, rw, rl = policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1]
    expected = -F.logsigmoid(beta * ((pw - rw) - (pl - rl))).mean()
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("name", ["contrastive", "lambdarank", "listmle", "ipo"])
def test_two_candidates_reduce_to_pairwise(name):
    # K = 2: contrastive has one negative, lambdarank one pair, listmle one term.
    policy, ref, rewards, mask = random_lists(5, 2, seed=1)
    pairwise, _ = LOSSES["pairwise"](policy, ref, rewards, mask, 0.3)
    loss, _ = LOSSES[name](policy, ref, rewards, mask, 0.3)
    if name == "ipo":  # same pair, different link: check it is IPO of the DPO margin
        h = (policy[:, 0] - ref[:, 0]) - (policy[:, 1] - ref[:, 1])
        torch.testing.assert_close(loss, ((h - 1 / (2 * 0.3)) ** 2).mean())
    else:
        torch.testing.assert_close(loss, pairwise)


def test_contrastive_with_one_negative_in_a_longer_list_is_pairwise():
    # Best 2, worst 0 and a padded slot with a higher reward: exactly one negative.
    policy, ref, _, _ = random_lists(1, 3, seed=2)
    rewards = torch.tensor([[2.0, 0.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False]])
    contrastive, _ = LOSSES["contrastive"](policy, ref, rewards, mask, 0.2)
    pairwise, _ = LOSSES["pairwise"](policy, ref, rewards, mask, 0.2)
    torch.testing.assert_close(contrastive, pairwise)


@pytest.mark.parametrize(("name", "options"), VARIANTS, ids=VARIANT_IDS)
def test_gradcheck(name, options):
    policy, ref, rewards, mask = random_lists(3, 5, seed=3)
    mask[1, 3:] = False  # a shorter list
    rewards[2] = 1.0  # an all-tied prompt

    def loss_of(policy_BK, ref_BK):
        return LOSSES[name](policy_BK, ref_BK, rewards, mask, 0.7, **options)[0]

    assert torch.autograd.gradcheck(loss_of, (policy.requires_grad_(), ref.requires_grad_()))


def permute_rows(x_BK, perm_BK):
    return x_BK.gather(1, perm_BK)


@pytest.mark.parametrize(("name", "options"), VARIANTS, ids=VARIANT_IDS)
def test_shuffling_candidates_changes_nothing(name, options):
    policy, ref, rewards, mask = random_lists(4, 6, seed=4)
    mask[0, 4:] = False
    gen = torch.Generator().manual_seed(5)
    perm_BK = torch.stack([torch.randperm(6, generator=gen) for _ in range(4)])
    policy.requires_grad_()
    loss, metrics = LOSSES[name](policy, ref, rewards, mask, 0.5, **options)
    (grad,) = torch.autograd.grad(loss, policy)
    shuffled = [permute_rows(x, perm_BK) for x in (policy, ref, rewards, mask)]
    loss_s, metrics_s = LOSSES[name](*shuffled, 0.5, **options)
    (grad_s,) = torch.autograd.grad(loss_s, policy)
    torch.testing.assert_close(loss_s, loss)
    assert metrics_s == pytest.approx(metrics)
    torch.testing.assert_close(grad_s, grad)


@pytest.mark.parametrize(("name", "options"), VARIANTS, ids=VARIANT_IDS)
def test_padding_garbage_changes_neither_loss_nor_gradients(name, options):
    policy, ref, rewards, mask = random_lists(3, 4, seed=6)
    # Interleave two padded slots per row holding NaN / inf garbage in logps and rewards.
    garbage = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30], dtype=torch.float64)
    slots = [0, "pad", 1, 2, "pad", 3]
    real = [s for s in slots if s != "pad"]

    def padded(x_BK, pad_value):
        columns = [x_BK[:, s] if s != "pad" else torch.full_like(x_BK[:, 0], pad_value) for s in slots]
        return torch.stack(columns, dim=1)

    policy_p = padded(policy, garbage[0]).requires_grad_()
    ref_p = padded(ref, garbage[1]).requires_grad_()
    rewards_p, mask_p = padded(rewards, garbage[0]), padded(mask, False)
    rewards_p[0, 1] = garbage[3]  # a huge reward in a padded slot must not become the best
    policy.requires_grad_(), ref.requires_grad_()

    loss, metrics = LOSSES[name](policy, ref, rewards, mask, 0.5, **options)
    loss_p, metrics_p = LOSSES[name](policy_p, ref_p, rewards_p, mask_p, 0.5, **options)
    grads = torch.autograd.grad(loss, (policy, ref))
    grads_p = torch.autograd.grad(loss_p, (policy_p, ref_p))
    torch.testing.assert_close(loss_p, loss)
    assert metrics_p == pytest.approx(metrics)
    for grad, grad_p in zip(grads, grads_p):
        is_real = torch.tensor([s != "pad" for s in slots])
        torch.testing.assert_close(grad_p[:, is_real], grad[:, real])
        assert torch.equal(grad_p[:, ~is_real], torch.zeros_like(grad_p[:, ~is_real]))


@pytest.mark.parametrize(("name", "options"), VARIANTS, ids=VARIANT_IDS)
def test_all_tied_prompt_gets_no_gradient_and_is_counted(name, options):
    policy, ref, rewards, mask = random_lists(3, 4, seed=7)
    rewards[1] = 2.0  # all tied
    mask[2, 1:] = False  # a single candidate: no pair either
    policy.requires_grad_()
    loss, metrics = LOSSES[name](policy, ref, rewards, mask, 0.5, **options)
    (grad,) = torch.autograd.grad(loss, policy)
    assert torch.equal(grad[1:], torch.zeros_like(grad[1:]))
    assert (metrics["n_active"], metrics["n_no_pair"]) == (1.0, 2.0)
    alone, _ = LOSSES[name](policy[:1], ref[:1], rewards[:1], mask[:1], 0.5, **options)
    torch.testing.assert_close(loss, alone)


@pytest.mark.parametrize(("name", "options"), VARIANTS, ids=VARIANT_IDS)
def test_no_active_prompt_gives_zero_loss_with_a_graph(name, options):
    policy, ref, _, mask = random_lists(2, 3, seed=8)
    policy.requires_grad_()
    loss, metrics = LOSSES[name](policy, ref, torch.ones(2, 3, dtype=torch.float64), mask, 0.5, **options)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(policy.grad, torch.zeros_like(policy))
    assert metrics["n_no_pair"] == 2.0 and metrics["reward_accuracy"] == 0.0


@pytest.mark.parametrize("name", ["lambdarank", "listmle"])
def test_swapping_tied_candidates_leaves_the_loss_unchanged(name):
    # Two tied at the top, and two tied at the bottom.
    policy = torch.tensor([[0.4, -0.3, 0.1, -0.6, 0.2]], dtype=torch.float64)
    ref = torch.zeros(1, 5, dtype=torch.float64)
    rewards = torch.tensor([[2.0, 2.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.ones(1, 5, dtype=torch.bool)
    loss, _ = LOSSES[name](policy, ref, rewards, mask, 1.0)
    for i, j in ((0, 1), (3, 4)):
        swapped = policy.clone()
        swapped[0, [i, j]] = policy[0, [j, i]]
        loss_s, _ = LOSSES[name](swapped, ref, rewards, mask, 1.0)
        torch.testing.assert_close(loss_s, loss)


def test_tied_candidates_form_no_pair():
    g = [0.4, -0.3, 0.1]
    policy = torch.tensor([g], dtype=torch.float64, requires_grad=True)
    ref = torch.zeros(1, 3, dtype=torch.float64)
    rewards = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    assert strict_pair_mask(rewards, mask)[0].tolist() == [
        [False, False, True],
        [False, False, True],
        [False, False, False],
    ]
    # lambdarank: only the pairs (0, 2) and (1, 2).
    loss, metrics = LOSSES["lambdarank"](policy, ref, rewards, mask, 1.0)
    assert loss.item() == pytest.approx(softplus(-(g[0] - g[2])) + softplus(-(g[1] - g[2])))
    assert metrics["n_pairs"] == 2.0
    # contrastive: slot 0 (first of the tied best) is the positive, slot 2 the only negative;
    # the tied slot 1 is neither, so it gets no gradient.
    loss, _ = LOSSES["contrastive"](policy, ref, rewards, mask, 1.0)
    assert loss.item() == pytest.approx(logsumexp(g[0], g[2]) - g[0])
    (grad,) = torch.autograd.grad(loss, policy)
    assert grad[0, 1].item() == 0.0
    # pairwise: also the first of the tied best.
    loss, _ = LOSSES["pairwise"](policy, ref, rewards, mask, 1.0)
    assert loss.item() == pytest.approx(softplus(-(g[0] - g[2])))
    # listmle (Breslow): both tied tops are drawn from {0, 1, 2}; the last group has no term.
    loss, _ = LOSSES["listmle"](policy, ref, rewards, mask, 1.0)
    lse = logsumexp(*g)
    assert loss.item() == pytest.approx((lse - g[0]) + (lse - g[1]))


def test_listmle_tied_bottom_group_has_no_term():
    g = [0.4, -0.3, 0.1]
    policy = torch.tensor([g], dtype=torch.float64)
    rewards = torch.tensor([[2.0, 0.0, 0.0]], dtype=torch.float64)
    loss, _ = LOSSES["listmle"](
        policy, torch.zeros(1, 3, dtype=torch.float64), rewards, torch.ones(1, 3, dtype=torch.bool), 1.0
    )
    assert loss.item() == pytest.approx(logsumexp(*g) - g[0])


@pytest.mark.parametrize("shards", [2, 3])
@pytest.mark.parametrize(("name", "options"), VARIANTS, ids=VARIANT_IDS)
def test_sharded_ranks_reduce_to_the_global_loss(name, options, shards):
    policy, ref, rewards, mask = random_lists(7, 5, seed=9)
    rewards[[1, 4]] = 1.0  # inactive prompts, unevenly spread over the shards
    mask[3, 2:] = False
    policy.requires_grad_()
    loss, _ = LOSSES[name](policy, ref, rewards, mask, 0.5, **options)
    (grad,) = torch.autograd.grad(loss, policy)

    bounds = torch.tensor_split(torch.arange(7), shards)
    n_active = [active_prompts(rewards[b], mask[b]).sum() for b in bounds]
    n_total = sum(n_active)
    weighted_sum, grad_sum = 0.0, torch.zeros_like(policy)
    for rows, n in zip(bounds, n_active):
        shard = policy[rows].detach().requires_grad_()
        loss_r, metrics_r = LOSSES[name](shard, ref[rows], rewards[rows], mask[rows], 0.5, **options)
        assert metrics_r["n_active"] == n.item()
        (grad_r,) = torch.autograd.grad(loss_r * n / n_total, shard)  # per-rank backward
        grad_sum[rows] += grad_r
        weighted_sum = weighted_sum + loss_r.detach() * n
    torch.testing.assert_close(weighted_sum / n_total, loss.detach())
    torch.testing.assert_close(grad_sum, grad)


def test_helpers():
    policy, ref, rewards, mask = random_lists(3, 3, seed=10)
    torch.testing.assert_close(implicit_rewards(policy, ref, 0.1), 0.1 * (policy - ref))
    rewards[1] = 0.0
    mask[2, 1:] = False
    assert active_prompts(rewards, mask).tolist() == [True, False, False]
    assert strict_pair_mask(rewards, mask).shape == (3, 3, 3)


def bad_input_cases():
    policy, ref, rewards, mask = random_lists(2, 3, seed=11)
    nan_rewards = rewards.clone()
    nan_rewards[0, 2] = float("nan")
    return [
        ((policy, ref[:, :2], rewards, mask, 0.1), "ref_logps must have the shape"),
        ((policy, ref, rewards[:1], mask, 0.1), "rewards must have the shape"),
        ((policy, ref, rewards, mask[:, :2], 0.1), "mask must have the shape"),
        ((policy, ref, rewards, mask.float(), 0.1), "mask must be a bool tensor"),
        ((policy, ref, rewards, mask, 0.0), "beta must be > 0"),
        ((policy, ref, rewards, mask, -1.0), "beta must be > 0"),
        ((policy[0], ref[0], rewards[0], mask[0], 0.1), r"policy_logps must have shape \[B, K\]"),
        ((policy.long(), ref, rewards, mask, 0.1), "policy_logps must be a floating-point"),
        ((policy, ref.tolist(), rewards, mask, 0.1), "ref_logps must be a floating-point"),
        ((policy, ref, nan_rewards, mask, 0.1), "rewards must not be NaN where mask is True"),
    ]


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_raise_value_error_naming_the_problem(name):
    for args, message in bad_input_cases():
        with pytest.raises(ValueError, match=message):
            LOSSES[name](*args)


def test_ndcg_weights_need_finite_rewards():
    policy, ref, rewards, mask = random_lists(2, 3, seed=12)
    rewards[0, 0] = float("inf")
    with pytest.raises(ValueError, match="rewards must be finite"):
        lambdarank_loss(policy, ref, rewards, mask, 0.1, ndcg_weights=True)


def test_import_is_light():
    code = (
        "import larpo_ray.losses, sys; "
        "assert not any(m.split('.')[0] in ('ray','vllm','deepspeed') for m in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_best_nll_is_the_per_token_nll_of_each_active_lists_best_candidate():
    from larpo_ray.losses import best_nll

    policy = torch.tensor([[-6.0, -2.0, -9.0], [-4.0, -4.0, float("nan")], [-3.0, -1.0, -2.0]], requires_grad=True)
    lengths = torch.tensor([[3.0, 2.0, 3.0], [4.0, 4.0, 0.0], [1.0, 1.0, 1.0]])
    rewards = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.5, 0.2, 0.9]])
    mask = torch.tensor([[True, True, True], [True, True, False], [True, True, True]])
    # prompt 0: best is slot 0 (-6 over 3 tokens); prompt 1 is all tied among its valid slots
    # (inactive, and its padded NaN never reaches the loss); prompt 2: best is slot 2 (-2 / 1)
    loss = best_nll(policy, lengths, rewards, mask)
    assert loss.item() == pytest.approx((6.0 / 3 + 2.0 / 1) / 2)
    loss.backward()
    expected = torch.zeros(3, 3)
    expected[0, 0], expected[2, 2] = -1.0 / 3 / 2, -1.0 / 2
    assert torch.equal(policy.grad, expected)  # only the best candidates of active prompts
    none_active = best_nll(policy.detach(), lengths, torch.zeros(3, 3), mask)
    assert none_active.item() == 0.0


def test_sft_weight_is_a_checked_config_knob():
    from larpo_ray.config import ConfigError, load_config

    assert load_config(overrides=["--loss.sft_weight", "0.5"]).loss.sft_weight == 0.5
    assert load_config().loss.sft_weight == 0.0  # off by default: the paper's losses as printed
    with pytest.raises(ConfigError, match="loss.sft_weight = -1.0 is not allowed: >= 0"):
        load_config(overrides=["--loss.sft_weight", "-1"])
