"""Closed-form action heads against torch.distributions and SB3's distribution classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from torch import distributions as D

from sb3_ppo_ext.distributions import (
    BernoulliHead,
    CategoricalHead,
    DiagGaussianHead,
    MultiCategoricalHead,
    make_action_head,
)

B = 32


@pytest.fixture(autouse=True)
def _seed() -> None:
    th.manual_seed(0)


def test_categorical_head_matches_torch_categorical() -> None:
    head = CategoricalHead(5)
    logits = th.randn(B, 5) * 3
    actions = th.randint(0, 5, (B,))
    reference = D.Categorical(logits=logits)
    th.testing.assert_close(head.log_prob((logits,), actions), reference.log_prob(actions))
    th.testing.assert_close(head.entropy((logits,)), reference.entropy())
    sb3 = head.to_sb3((logits,))
    th.testing.assert_close(sb3.log_prob(actions), reference.log_prob(actions))
    th.testing.assert_close(head.sample((logits,), deterministic=True), logits.argmax(dim=-1))


def test_categorical_head_samples_follow_softmax() -> None:
    head = CategoricalHead(3)
    logits = th.log(th.tensor([[0.2, 0.5, 0.3]])).expand(20000, 3)
    samples = head.sample((logits,), deterministic=False)
    freq = th.bincount(samples, minlength=3).float() / 20000
    th.testing.assert_close(freq, th.tensor([0.2, 0.5, 0.3]), atol=0.02, rtol=0)


def test_multicategorical_head_matches_sum_of_categoricals_and_sb3() -> None:
    nvec = np.array([3, 2, 4])
    head = MultiCategoricalHead(nvec)
    assert head.n_outputs == 9
    logits = th.randn(B, 9) * 2
    actions = th.stack([th.randint(0, int(n), (B,)) for n in nvec], dim=1)
    chunks = th.split(logits, [3, 2, 4], dim=1)
    expected_lp = sum(D.Categorical(logits=c).log_prob(actions[:, i]) for i, c in enumerate(chunks))
    expected_h = sum(D.Categorical(logits=c).entropy() for c in chunks)
    th.testing.assert_close(head.log_prob((logits,), actions), expected_lp)
    th.testing.assert_close(head.entropy((logits,)), expected_h)
    sb3 = head.to_sb3((logits,))
    th.testing.assert_close(sb3.log_prob(actions), expected_lp)
    th.testing.assert_close(sb3.entropy(), expected_h)
    mode = head.sample((logits,), deterministic=True)
    th.testing.assert_close(mode, th.stack([c.argmax(dim=1) for c in chunks], dim=1))
    sample = head.sample((logits,), deterministic=False)
    assert sample.shape == (B, 3)
    assert all(int(sample[:, i].max()) < n for i, n in enumerate(nvec))


def test_bernoulli_head_matches_torch_bernoulli_and_sb3() -> None:
    head = BernoulliHead(4)
    logits = th.randn(B, 4) * 2
    actions = th.randint(0, 2, (B, 4)).float()
    reference = D.Bernoulli(logits=logits)
    th.testing.assert_close(head.log_prob((logits,), actions), reference.log_prob(actions).sum(dim=1))
    th.testing.assert_close(head.entropy((logits,)), reference.entropy().sum(dim=1))
    sb3 = head.to_sb3((logits,))
    th.testing.assert_close(sb3.log_prob(actions), reference.log_prob(actions).sum(dim=1))
    th.testing.assert_close(head.sample((logits,), deterministic=True), (logits > 0).float())
    # int8 actions, as a MultiBinary buffer stores them
    th.testing.assert_close(head.log_prob((logits,), actions.to(th.int8)), reference.log_prob(actions).sum(dim=1))


@pytest.mark.parametrize("state_dependent", [False, True])
def test_diag_gaussian_head_matches_torch_normal_and_sb3(state_dependent: bool) -> None:
    head = DiagGaussianHead(3, state_dependent_std=state_dependent)
    assert head.n_outputs == (6 if state_dependent else 3)
    mean = th.randn(B, 3)
    log_std = th.randn(B, 3) * 0.5 if state_dependent else th.tensor([-0.5, 0.0, 0.7])
    actions = th.randn(B, 3) * 2
    reference = D.Independent(D.Normal(mean, log_std.exp().expand_as(mean)), 1)
    th.testing.assert_close(head.log_prob((mean, log_std), actions), reference.log_prob(actions))
    th.testing.assert_close(head.entropy((mean, log_std)), reference.entropy())
    sb3 = head.to_sb3((mean, log_std))
    th.testing.assert_close(sb3.log_prob(actions), reference.log_prob(actions))
    th.testing.assert_close(sb3.entropy(), reference.entropy())
    th.testing.assert_close(head.sample((mean, log_std), deterministic=True), mean)


def test_diag_gaussian_head_samples_have_the_right_moments() -> None:
    head = DiagGaussianHead(2)
    mean = th.tensor([[1.0, -2.0]]).expand(20000, 2)
    log_std = th.log(th.tensor([0.5, 2.0]))
    samples = head.sample((mean, log_std), deterministic=False)
    th.testing.assert_close(samples.mean(0), th.tensor([1.0, -2.0]), atol=0.05, rtol=0)
    th.testing.assert_close(samples.std(0), th.tensor([0.5, 2.0]), atol=0.05, rtol=0)


def test_heads_have_gradients_wrt_their_parameters() -> None:
    mean = th.randn(B, 2, requires_grad=True)
    log_std = th.zeros(2, requires_grad=True)
    head = DiagGaussianHead(2)
    (head.log_prob((mean, log_std), th.randn(B, 2)).sum() + head.entropy((mean, log_std)).sum()).backward()
    assert mean.grad is not None and log_std.grad is not None
    assert log_std.grad.abs().sum() > 0


def test_make_action_head_per_space() -> None:
    assert isinstance(make_action_head(spaces.Discrete(4)), CategoricalHead)
    assert isinstance(make_action_head(spaces.MultiDiscrete([2, 3])), MultiCategoricalHead)
    binary = make_action_head(spaces.MultiBinary(5))
    assert isinstance(binary, BernoulliHead) and binary.n_outputs == 5
    box = make_action_head(spaces.Box(-1, 1, shape=(2, 3)))
    assert isinstance(box, DiagGaussianHead) and box.action_dim == 6
    assert make_action_head(spaces.Box(-1, 1, shape=(2,)), state_dependent_std=True).n_outputs == 4
    with pytest.raises(TypeError):
        make_action_head(spaces.Tuple([spaces.Discrete(2)]))
