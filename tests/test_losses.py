"""
The loss math of DPO, the reward model, GRPO and PPO checked against hand-computed values (no training).

    python -m pytest tests/test_losses.py
"""

import math

import pytest
import torch

from tests.helpers import tiny_model


def test_dpo_sigmoid_loss_matches_the_paper_and_is_log2_at_the_reference():
    from trainer.dpo import dpo_loss

    # h = (-3 - -4) - (-5 - -4.5) = 1.5; loss = -log sigmoid(0.1 * 1.5) = log(1 + e^-0.15)
    losses, r_c, r_r = dpo_loss(
        torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.5]), beta=0.1
    )
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-0.15)), abs=1e-6)
    assert r_c.item() == pytest.approx(0.1) and r_r.item() == pytest.approx(-0.05)
    pi = torch.tensor([-7.0, -2.0, -11.5])
    same, _, _ = dpo_loss(pi, pi - 1, pi, pi - 1, beta=0.3)  # policy == reference
    assert torch.allclose(same, torch.full((3,), math.log(2)))


def test_dpo_variants_ipo_label_smoothing_hinge():
    from trainer.dpo import dpo_loss

    args = (torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.5]))
    # IPO averages each reply's log-ratio over its tokens: chosen 1/2 per token, rejected -0.5/5 -> h' = 0.6,
    # (h' - 1/(2 beta))^2 = (0.6 - 1)^2. Summed log-ratios (h = 1.5) would give 0.25 and grow with reply length.
    ipo, _, _ = dpo_loss(
        *args, beta=0.5, loss_type="ipo", chosen_tokens=torch.tensor([2]), rejected_tokens=torch.tensor([5])
    )
    assert ipo.item() == pytest.approx(0.16)
    with pytest.raises(ValueError, match="reply lengths"):
        dpo_loss(*args, beta=0.5, loss_type="ipo")
    smooth, _, _ = dpo_loss(*args, beta=0.1, loss_type="sigmoid", label_smoothing=0.2)
    expected = 0.8 * math.log(1 + math.exp(-0.15)) + 0.2 * math.log(1 + math.exp(0.15))
    assert smooth.item() == pytest.approx(expected, abs=1e-6)
    hinge, _, _ = dpo_loss(*args, beta=0.1, loss_type="hinge")  # max(0, 1 - 0.15)
    assert hinge.item() == pytest.approx(0.85)
    with pytest.raises(ValueError):
        dpo_loss(*args, beta=0.1, loss_type="nope")


def test_bradley_terry_loss():
    from trainer.reward import bradley_terry_loss

    loss = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0]), center_coef=0.0)
    assert torch.allclose(loss, torch.tensor([math.log(1 + math.exp(-1)), math.log(2)]))
    centred = bradley_terry_loss(torch.tensor([2.0]), torch.tensor([1.0]), center_coef=0.1)
    assert centred.item() == pytest.approx(math.log(1 + math.exp(-1)) + 0.1 * 9)


def test_grpo_group_advantages():
    from trainer.grpo import group_advantages

    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 5.0, 5.0, 5.0, 5.0])
    adv = group_advantages(r, 4)
    groups = adv.view(2, 4)
    assert torch.allclose(groups.mean(1), torch.zeros(2), atol=1e-6)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()  # unbiased, as DeepSeekMath's torch code does
    assert torch.allclose(groups[0], (torch.tensor([1.0, 0, 0, 1]) - 0.5) / (std + 1e-4))
    assert torch.equal(groups[1], torch.zeros(4))  # all replies equal: no signal
    assert torch.allclose(group_advantages(r, 4, scale=False)[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_kl_estimators():
    from trainer.logprobs import kl_estimate

    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert torch.allclose(kl_estimate(logp, ref, "k1"), torch.tensor([0.5, -1.0]))
    assert torch.allclose(kl_estimate(logp, ref, "k2"), torch.tensor([0.125, 0.5]))
    k3 = kl_estimate(logp, ref, "k3")
    assert torch.allclose(k3, torch.tensor([math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0]))
    assert (k3 >= 0).all() and kl_estimate(logp, logp, "k3").abs().max() == 0
    # k3 is unbiased: over samples from p, its mean is KL(p || q)
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    exact = (p * (p / q).log()).sum()
    assert (p * kl_estimate(p.log(), q.log(), "k3")).sum().item() == pytest.approx(exact.item(), abs=1e-6)


def test_ppo_gae_matches_hand_computation():
    from trainer.ppo import gae

    # one reply of 3 tokens at targets 1..3 (target 0 is prompt, 4 is padding)
    mask = torch.tensor([[0.0, 1, 1, 1, 0]])
    rewards = torch.tensor([[0.0, 0.1, 0.2, 1.0, 0.0]])
    values = torch.tensor([[9.0, 0.5, 0.4, 0.3, 9.0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # lam = gamma = 1: A_t = sum of rewards from t on - V_t
    assert torch.allclose(adv, torch.tensor([[0.0, 1.3 - 0.5, 1.2 - 0.4, 1.0 - 0.3, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[0.0, 1.3, 1.2, 1.0, 0.0]]))
    adv, _ = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    d3 = 1.0 - 0.3
    d2 = 0.2 + 0.9 * 0.3 - 0.4
    d1 = 0.1 + 0.9 * 0.4 - 0.5
    a2 = d2 + 0.45 * d3
    assert torch.allclose(adv[0, 1:4], torch.tensor([d1 + 0.45 * a2, a2, d3]))


def test_sequence_logprobs_sum_over_masked_targets_only():
    from trainer.logprobs import sequence_logprobs, token_logprobs

    model = tiny_model(64, num_hidden_layers=1).eval()
    ids = torch.randint(0, 64, (2, 7))
    mask = torch.zeros(2, 6)
    mask[0, 3:] = 1
    mask[1, 2:5] = 1
    with torch.no_grad():
        logits = model(input_ids=ids).logits.log_softmax(-1)
        by_hand = [sum(logits[b, t, ids[b, t + 1]] for t in range(6) if mask[b, t]) for b in range(2)]
        got = sequence_logprobs(model, ids, mask)
        assert torch.allclose(got, torch.stack(by_hand), atol=1e-5)
        assert token_logprobs(model, ids).shape == (2, 6)
