"""Losses and estimators against hand-computed numbers (specs/ppo.md, specs/apa.md)."""

import math

import pytest
import torch

from rlp_core import losses
from rlp_core.evaluate import paired_change, win_rate

approx = lambda x: pytest.approx(x, abs=1e-5)  # noqa: E731


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_bradley_terry_loss():
    # mean(−log σ(1), −log σ(0)) = mean(0.3132617, 0.6931472)
    assert losses.bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])).item() == approx(0.5032044)
    # weighted: (3·(−log σ(1)) + 1·(−log σ(0))) / 4 = (3·0.3132617 + 0.6931472) / 4
    weighted = losses.bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0]), torch.tensor([3.0, 1.0]))
    assert weighted.item() == approx(0.4082331)


def test_gae_three_steps():
    # γ=1, λ=0.95: δ2 = 1−0.7 = 0.3; δ1 = 0.7−0.6 = 0.1 → A1 = 0.1+0.95·0.3 = 0.385; A0 = 0.1+0.95·0.385 = 0.46575
    adv, ret = losses.gae(t([0, 0, 1]), t([0.5, 0.6, 0.7]), t([1, 1, 1]), gamma=1.0, lam=0.95)
    assert adv[0].tolist() == [approx(0.46575), approx(0.385), approx(0.3)]
    assert ret[0].tolist() == [approx(0.96575), approx(0.985), approx(1.0)]


def test_gae_ignores_values_after_the_last_token():
    # the padded value 9.0 must not leak into the bootstrap of the last valid token
    adv, _ = losses.gae(t([0, 1, 0]), t([0.5, 0.6, 9.0]), t([1, 1, 0]), gamma=1.0, lam=0.95)
    assert adv[0].tolist() == [approx(0.48), approx(0.4), approx(0.0)]


def test_whitening_ignores_padding():
    white = losses.masked_whiten(t([1, 2, 3, 100]), t([1, 1, 1, 0]))
    assert white[0].tolist() == [approx(-1.0), approx(0.0), approx(1.0), approx(0.0)]


def test_shaped_rewards_put_the_score_on_the_last_valid_token():
    rewards = losses.shaped_rewards(torch.tensor([1.0]), t([0.1, 0.2, 0.3]), t([1, 1, 0]), kl_coef=0.5)
    assert rewards[0].tolist() == [approx(-0.05), approx(0.9), approx(0.0)]


def test_ppo_policy_loss_clips_both_ways():
    logprobs = torch.log(t([1.5, 0.5]))
    loss, stats = losses.ppo_policy_loss(logprobs, torch.zeros(1, 2), t([1.0, -1.0]), t([1, 1]), clip_range=0.2)
    # token 0: max(−1.5, −1.2) = −1.2; token 1: max(0.5, 0.8) = 0.8; mean −0.2; both tokens clipped
    assert loss.item() == approx(-0.2)
    assert stats["clip_fraction"].item() == approx(1.0)


def test_ppo_gradient_at_ratio_one_is_the_policy_gradient():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    adv, mask = t([0.3, -1.2, 0.7]), t([1, 1, 0])
    loss, _ = losses.ppo_policy_loss(logprobs, logprobs.detach(), adv, mask, clip_range=0.2)
    (grad_ppo,) = torch.autograd.grad(loss, logprobs)
    pg = -losses.masked_mean(adv * logprobs, mask)
    (grad_pg,) = torch.autograd.grad(pg, logprobs)
    assert torch.allclose(grad_ppo, grad_pg)
    assert grad_ppo[0].tolist() == [approx(-0.15), approx(0.6), approx(0.0)]


def test_value_loss_is_clipped_around_old_values():
    loss, _ = losses.value_loss(t([1.0, 0.0]), t([0.5, 0.5]), t([0.0, 0.2]), t([1, 1]), clip=0.2)
    # token 0: max(1, 0.7²=0.49) = 1; token 1: max(0.04, (0.3−0.2)²=0.01) = 0.04 → ½·mean = 0.26
    assert loss.item() == approx(0.26)


def test_apa_loss():
    loss, _ = losses.apa_policy_loss(t([-1.0, -2.0]), t([-1.5, -1.0]), t([0.1, -0.2]), t([1, 1]), lam=0.1)
    # target = init + A/λ = [−0.5, −3.0]; squared errors [0.25, 1.0]
    assert loss.item() == approx(0.625)


def test_apa_loss_is_zero_at_its_target_policy():
    init, adv = t([-1.0, -0.3]), t([0.5, -0.5])
    loss, _ = losses.apa_policy_loss(init + adv / 2.0, init, adv, t([1, 1]), lam=2.0)
    assert loss.item() == approx(0.0)


def test_kl_is_zero_for_identical_policies():
    lp = t([-0.2, -1.3, -4.0])
    assert losses.masked_mean(losses.kl_per_token(lp, lp.clone()), t([1, 1, 1])).item() == 0.0


def test_win_rate_counts_ties_half_with_an_interval():
    res = win_rate([1, 0, 1, 1], [0, 0, 0, 1])
    assert (res.wins, res.ties, res.losses, res.n) == (2, 2, 0, 4)
    assert res.win_rate == approx(0.75)
    # sd of [1, .5, 1, .5] (n−1) = 0.288675; half-width 1.959964·0.288675/2 = 0.282896
    assert res.ci_low == approx(0.75 - 0.282896) and res.ci_high == approx(1.0)


def test_paired_change_of_the_mean_score_with_an_interval():
    res = paired_change([1, 0, 1, 1], [0, 0, 0, 1])
    # differences [1, 0, 1, 0]: mean 0.5, sd (n−1) 0.57735, half-width 1.959964·0.57735/2 = 0.565792
    assert (res.change, res.n) == (approx(0.5), 4)
    assert res.ci_low == approx(0.5 - 0.565792) and res.ci_high == approx(0.5 + 0.565792)


# --- GRPO and RLOO: group baselines and their losses --------------------------------------------------
def test_group_advantages_grpo_and_dr_grpo():
    from rlp_core.losses import group_advantages

    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    # group 1: mean 0.5, unbiased std sqrt(4·0.25/3) = 0.57735; group 2 all equal: no signal, no NaN
    expected = 0.5 / (3**-0.5 + 1e-4)
    assert torch.allclose(group_advantages(scores, 4), torch.tensor([expected, -expected, -expected, expected, 0, 0, 0, 0]))
    assert torch.allclose(group_advantages(scores, 4, scale=False), torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))


def test_leave_one_out_advantages_and_zero_signal_share():
    from rlp_core.losses import leave_one_out_advantages, zero_signal_share

    # r=1 against the others' mean 1/3; r=0 against 2/3; a pair (3, 1): ±2
    assert torch.allclose(leave_one_out_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4),
                          torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]))
    assert torch.allclose(leave_one_out_advantages(torch.tensor([3.0, 1.0, 5.0, 5.0]), 2), torch.tensor([2.0, -2.0, 0, 0]))
    assert zero_signal_share(torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]), 4) == 0.5


def test_k3_kl_estimator():
    from rlp_core.losses import k3_kl

    logp, ref = torch.log(torch.tensor([0.5, 0.3])), torch.log(torch.tensor([0.25, 0.3]))
    # δ = log(0.25/0.5): e^δ − δ − 1 = 0.5 + ln 2 − 1; equal probabilities: 0
    assert torch.allclose(k3_kl(logp, ref), torch.tensor([0.5 + math.log(2) - 1, 0.0]))


def test_grpo_loss_length_normalised_dr_grpo_and_kl_term():
    from rlp_core.losses import grpo_policy_loss

    logp = torch.log(torch.full((2, 3), 0.5))
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    adv = torch.tensor([1.0, -0.5])
    # ratio 1: per token −A. GRPO: each response's token mean (−1, +0.5), then their mean
    loss, stats = grpo_policy_loss(logp, logp, logp, adv, mask, 0.2, kl_coef=0.0)
    assert torch.isclose(loss, torch.tensor(-0.25)) and stats["clip_fraction"] == 0
    # Dr. GRPO: token sums over maxNewTokens = 3: (−3/3 + 0.5/3) / 2
    loss, _ = grpo_policy_loss(logp, logp, logp, adv, mask, 0.2, kl_coef=0.0, length_normalize=False, max_tokens=3)
    assert torch.isclose(loss, torch.tensor((-1 + 0.5 / 3) / 2))
    # β·k3 per token with π_ref = 2π: k3 = 2 − ln 2 − 1 on every token, β = 0.1
    loss, stats = grpo_policy_loss(logp, logp, logp + math.log(2), adv, mask, 0.2, kl_coef=0.1)
    assert torch.isclose(loss, torch.tensor(-0.25 + 0.1 * (1 - math.log(2))))
    assert torch.isclose(stats["k3_kl"], torch.tensor(1 - math.log(2)))
    with pytest.raises(ValueError, match="max_tokens"):
        grpo_policy_loss(logp, logp, logp, adv, mask, 0.2, kl_coef=0.0, length_normalize=False)


def test_grpo_and_rloo_losses_clip_the_ratio():
    from rlp_core.losses import grpo_policy_loss, rloo_policy_loss

    old = torch.log(torch.full((1, 2), 0.25))
    new = old + math.log(2)  # ratio 2 on both tokens; A > 0: clipped at 1 + ε = 1.2
    mask, adv = torch.ones(1, 2), torch.tensor([1.0])
    loss, stats = grpo_policy_loss(new, old, new, adv, mask, 0.2, kl_coef=0.0)
    assert torch.isclose(loss, torch.tensor(-1.2)) and stats["clip_fraction"] == 1
    loss, _ = rloo_policy_loss(new, old, adv, mask, 0.2)  # REINFORCE of the whole response: a sum over tokens
    assert torch.isclose(loss, torch.tensor(-2.4))


def test_rloo_loss_is_reinforce_of_the_whole_response():
    from rlp_core.losses import rloo_policy_loss

    logp = torch.log(torch.full((2, 3), 0.5)).requires_grad_()
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    loss, _ = rloo_policy_loss(logp, logp.detach(), torch.tensor([1.0, -0.5]), mask, 0.2)
    assert torch.isclose(loss, torch.tensor((-3 + 0.5) / 2))
    loss.backward()  # ∂/∂log π(y_t) = −A / B on valid tokens: the REINFORCE gradient, padding untouched
    assert torch.allclose(logp.grad, torch.tensor([[-0.5, -0.5, -0.5], [0.25, 0, 0]]))
