"""KL regularisation to a reference policy: closed-form KLs, the controller, both modes, save/load, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from sb3_contrib.common.envs import InvalidActionEnvDiscrete
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from torch.distributions import Bernoulli, Categorical, Normal, kl_divergence

from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext.distributions import BernoulliHead, CategoricalHead, DiagGaussianHead, MultiCategoricalHead
from sb3_ppo_ext.errors import ConfigurationError
from sb3_ppo_ext.losses import PolicyEvaluation, PPOBatch, PPOLoss, sampled_kl
from sb3_ppo_ext.rlhf.penalty import RewardKLPenalty
from sb3_ppo_ext.rlhf.reference import AdaptiveKLController

SMALL = dict(n_steps=128, batch_size=64, n_epochs=4, device="cpu")


@pytest.fixture(scope="module")
def cartpole_reference() -> ClippedPPO:
    model = ClippedPPO("MlpPolicy", "CartPole-v1", seed=1, **SMALL)
    model.learn(256)
    return model


# -- closed-form KL against torch.distributions ----------------------------------------------------------------


def test_categorical_and_multicategorical_kl_match_torch() -> None:
    logits, other = th.randn(32, 5), th.randn(32, 5)
    th.testing.assert_close(
        CategoricalHead(5).kl((logits,), (other,)), kl_divergence(Categorical(logits=logits), Categorical(logits=other))
    )
    head = MultiCategoricalHead(np.array([2, 3]))
    expected = kl_divergence(Categorical(logits=logits[:, :2]), Categorical(logits=other[:, :2])) + kl_divergence(
        Categorical(logits=logits[:, 2:]), Categorical(logits=other[:, 2:])
    )
    th.testing.assert_close(head.kl((logits,), (other,)), expected)


def test_masked_categorical_kl_is_over_the_valid_actions() -> None:
    head = CategoricalHead(4)
    logits, other = th.randn(16, 4), th.randn(16, 4)
    masks = th.tensor([[True, True, False, True]]).expand(16, 4)
    kl = head.kl(head.mask((logits,), masks), head.mask((other,), masks))
    valid = [0, 1, 3]
    expected = kl_divergence(Categorical(logits=logits[:, valid]), Categorical(logits=other[:, valid]))
    th.testing.assert_close(kl, expected)


def test_bernoulli_and_gaussian_kl_match_torch() -> None:
    logits, other = th.randn(32, 3), th.randn(32, 3)
    expected = kl_divergence(Bernoulli(logits=logits), Bernoulli(logits=other)).sum(-1)
    th.testing.assert_close(BernoulliHead(3).kl((logits,), (other,)), expected)
    mean, other_mean = th.randn(32, 2), th.randn(32, 2)
    log_std, other_log_std = th.randn(2), th.randn(32, 2)  # a shared and a per-state std
    expected = kl_divergence(Normal(mean, log_std.exp()), Normal(other_mean, other_log_std.exp())).sum(-1)
    th.testing.assert_close(DiagGaussianHead(2).kl((mean, log_std), (other_mean, other_log_std)), expected)


def test_sampled_kl_is_unbiased_for_the_true_kl_and_never_negative() -> None:
    th.manual_seed(0)
    p, q = Categorical(logits=th.randn(6)), Categorical(logits=th.randn(6))
    actions = p.sample((200_000,))
    estimate = sampled_kl(p.log_prob(actions), q.log_prob(actions))
    assert (estimate >= 0).all()
    assert estimate.mean().item() == pytest.approx(kl_divergence(p, q).item(), rel=0.03)


def test_the_loss_adds_beta_times_the_mean_kl() -> None:
    batch = PPOBatch(None, None, th.zeros(8), th.zeros(8), th.randn(8), th.randn(8))
    evaluation = PolicyEvaluation(th.randn(8), th.randn(8) * 0.1, th.rand(8), th.rand(8))
    without = PPOLoss(0.2, ref_kl_coef=0.0)(evaluation, batch)
    with_term = PPOLoss(0.2, ref_kl_coef=0.7)(evaluation, batch)
    assert with_term.loss.item() == pytest.approx(without.loss.item() + 0.7 * evaluation.ref_kl.mean().item())
    assert with_term.ref_kl.item() == pytest.approx(evaluation.ref_kl.mean().item())
    # its derivative with respect to each sample's KL: beta / n (the head carries it to its parameters)
    terms, grads = PPOLoss(0.2, ref_kl_coef=0.7).with_gradients(evaluation, batch)
    assert terms.loss.item() == pytest.approx(with_term.loss.item())
    assert th.allclose(grads.ref_kl, th.full((8,), 0.7 / 8))
    assert PPOLoss(0.2, ref_kl_coef=0.0).with_gradients(evaluation, batch)[1].ref_kl is None


# -- the controller ------------------------------------------------------------------------------------------------


def test_adaptive_controller_follows_ziegler_et_al() -> None:
    controller = AdaptiveKLController(0.1, target=0.02, horizon=1000)
    beta = 0.1
    for kl in [0.05, 0.0, 0.021, 0.019, 1.0]:
        controller.update(kl, n_steps=100)
        error = np.clip(kl / 0.02 - 1, -0.2, 0.2)
        beta *= 1 + error * 100 / 1000
        assert controller.value == pytest.approx(beta)


# -- ClippedPPO with a reference -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["reward", "loss"])
def test_beta_zero_trains_bit_for_bit_as_without_a_reference(cartpole_reference, mode) -> None:
    plain = ClippedPPO("MlpPolicy", "CartPole-v1", seed=0, **SMALL)
    plain.learn(512)
    regularised = ClippedPPO(
        "MlpPolicy", "CartPole-v1", seed=0, ref_policy=cartpole_reference, ref_kl_coef=0.0, ref_kl_mode=mode, **SMALL
    )
    regularised.learn(512)
    for a, b in zip(plain.policy.parameters(), regularised.policy.parameters(), strict=True):
        assert th.equal(a, b)


def _kl_to(model: ClippedPPO, reference: ClippedPPO, obs: th.Tensor) -> float:
    policy, ref = model.policy, reference.policy
    with th.no_grad():
        params = policy._head_params(policy._actor_latent(obs))
        ref_params = ref._head_params(ref._actor_latent(obs))
        return policy.action_head.kl(params, ref_params).mean().item()


@pytest.mark.parametrize("mode", ["reward", "loss"])
def test_a_large_beta_holds_the_policy_at_the_reference_while_plain_ppo_drifts(cartpole_reference, mode) -> None:
    obs = th.as_tensor(np.random.default_rng(0).uniform(-0.5, 0.5, (256, 4)), dtype=th.float32)
    kls = {}
    for beta in (0.0, 50.0):
        model = ClippedPPO("MlpPolicy", "CartPole-v1", seed=0, learning_rate=1e-3, **SMALL)
        model.policy.load_state_dict(cartpole_reference.policy.state_dict())  # start at the reference
        kwargs = dict(ref_policy=cartpole_reference, ref_kl_coef=beta, ref_kl_mode=mode)
        tuned = ClippedPPO("MlpPolicy", "CartPole-v1", seed=0, learning_rate=1e-3, **kwargs, **SMALL)
        tuned.policy.load_state_dict(model.policy.state_dict())
        tuned.learn(2048)
        kls[beta] = _kl_to(tuned, cartpole_reference, obs)
    assert kls[0.0] > 0.01
    assert kls[50.0] < 0.2 * kls[0.0]


@pytest.mark.parametrize(("batch_size", "calls_per_update"), [(128, 1), (32, 4 * 3)])
def test_loss_mode_asks_the_reference_once_per_update_when_one_minibatch_holds_the_rollout(
    cartpole_reference, monkeypatch, batch_size, calls_per_update
) -> None:
    settings = dict(n_steps=64, n_envs=2, n_epochs=3, batch_size=batch_size, seed=0)
    env = make_vec_env("CartPole-v1", n_envs=settings.pop("n_envs"), seed=0)
    model = ClippedPPO("MlpPolicy", env, ref_policy=cartpole_reference, ref_kl_mode="loss", **settings)
    calls = []
    targets = model._reference.targets
    monkeypatch.setattr(model._reference, "targets", lambda *a: (calls.append(1), targets(*a))[1])
    model.learn(256)  # two updates
    assert len(calls) == 2 * calls_per_update  # the whole rollout: once per update, not once per epoch
    # and the memo changes nothing: the same run asking the reference at every epoch ends with the same weights
    if batch_size == 128:
        fresh = ClippedPPO(
            "MlpPolicy", make_vec_env("CartPole-v1", n_envs=2, seed=0), ref_policy=cartpole_reference,
            ref_kl_mode="loss", **settings,
        )  # fmt: skip
        get = fresh.rollout_buffer.get
        # new observation tensors at every epoch: the memo misses, the reference is asked every time
        fresh.rollout_buffer.get = lambda *a: (b._replace(observations=b.observations.clone()) for b in get(*a))
        fresh_calls = []
        fresh_targets = fresh._reference.targets
        monkeypatch.setattr(fresh._reference, "targets", lambda *a: (fresh_calls.append(1), fresh_targets(*a))[1])
        fresh.learn(256)
        assert len(fresh_calls) == 2 * 3
        for a, b in zip(model.policy.parameters(), fresh.policy.parameters(), strict=True):
            assert th.equal(a, b)


def test_reward_mode_subtracts_beta_times_the_log_ratio_of_each_step(cartpole_reference) -> None:
    model = ClippedPPO("MlpPolicy", "CartPole-v1", seed=0, ref_policy=cartpole_reference, ref_kl_coef=0.5, **SMALL)
    _, callback = model._setup_learn(128)
    model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
    buffer = model.rollout_buffer
    obs = th.as_tensor(buffer.observations.reshape(-1, 4))
    actions = th.as_tensor(buffer.actions.reshape(-1)).long()
    ref = cartpole_reference.policy
    with th.no_grad():
        ref_log_prob = ref.action_head.log_prob(ref._head_params(ref._actor_latent(obs)), actions).numpy()
    # CartPole pays 1 per step; a time-limit truncation would add a bootstrap, but 128 steps end none
    expected = 1.0 - 0.5 * (buffer.log_probs.reshape(-1) - ref_log_prob)
    np.testing.assert_allclose(buffer.rewards.reshape(-1), expected, rtol=1e-5, atol=1e-6)
    assert model.extension(RewardKLPenalty).rollout_kl == pytest.approx(
        float(np.mean(buffer.log_probs.reshape(-1) - ref_log_prob)), rel=1e-4
    )


def test_reference_is_saved_and_restored_with_the_controller(tmp_path, cartpole_reference) -> None:
    model = ClippedPPO(
        "MlpPolicy",
        "CartPole-v1",
        seed=0,
        ref_policy=cartpole_reference,
        ref_kl_coef="adaptive",
        ref_kl_target=1e-4,
        ref_kl_horizon=500,
        ref_kl_mode="loss",
        **SMALL,
    )
    model.learn(256)
    assert model.ref_kl_coef != pytest.approx(0.1)  # the controller moved
    model.save(tmp_path / "model")
    loaded = ClippedPPO.load(tmp_path / "model", device="cpu")
    assert loaded.ref_kl_coef == model.ref_kl_coef and loaded.ref_kl_mode == "loss"
    for a, b in zip(loaded.ref_policy.parameters(), cartpole_reference.policy.parameters(), strict=True):
        assert th.equal(a, b) and not a.requires_grad
    loaded.set_env(make_vec_env("CartPole-v1", n_envs=1, seed=3))
    loaded.learn(256)  # continues, reference frozen
    for a, b in zip(loaded.ref_policy.parameters(), cartpole_reference.policy.parameters(), strict=True):
        assert th.equal(a, b)


def test_references_from_a_path_an_sb3_model_and_a_policy(tmp_path) -> None:
    sb3_model = PPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=32, seed=0, device="cpu")
    sb3_model.save(tmp_path / "sb3_ppo")
    for source in (str(tmp_path / "sb3_ppo.zip"), sb3_model, sb3_model.policy):
        model = ClippedPPO("MlpPolicy", "CartPole-v1", seed=0, ref_policy=source, ref_kl_mode="loss", **SMALL)
        model.learn(128)
        assert np.isfinite(model.logger.name_to_value["train/ref_kl"])
        for a, b in zip(model.ref_policy.parameters(), sb3_model.policy.parameters(), strict=True):
            assert th.equal(a, b) and a is not b


def test_masks_reach_the_reference_and_gsde_uses_the_sampled_estimator() -> None:
    env = InvalidActionEnvDiscrete(dim=6, n_invalid_actions=3)
    reference = ClippedPPO("MlpPolicy", env, seed=1, **SMALL)
    model = ClippedPPO("MlpPolicy", env, seed=0, ref_policy=reference, **SMALL)
    model.learn(256)
    assert np.isfinite(model.rollout_buffer.rewards).all() and np.isfinite(model.extension(RewardKLPenalty).rollout_kl)
    # the reference scores actions under the same masks: its probabilities over the valid actions sum to 1
    obs = th.as_tensor(model.rollout_buffer.observations[:1, 0])
    masks = th.as_tensor(model.rollout_buffer.action_masks[:1, 0])
    valid = th.nonzero(masks[0]).flatten()
    log_probs = th.stack([model._reference.log_prob(obs, a.view(1), masks) for a in valid])
    assert th.logsumexp(log_probs.flatten(), 0).item() == pytest.approx(0.0, abs=1e-5)
    reference = ClippedPPO("MlpPolicy", "Pendulum-v1", use_sde=True, seed=1, **SMALL)
    model = ClippedPPO(
        "MlpPolicy", "Pendulum-v1", use_sde=True, seed=0, ref_policy=reference, ref_kl_mode="loss", **SMALL
    )
    model.learn(256)
    assert model.logger.name_to_value["train/ref_kl"] >= 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(ref_kl_coef=-1.0), "ref_kl_coef=-1.0 is invalid"),
        (dict(ref_kl_coef=float("nan")), "ref_kl_coef=nan is invalid"),
        (dict(ref_kl_coef="adaptive"), "ref_kl_target=None is invalid"),
        (dict(ref_kl_coef="adaptive", ref_kl_target=0.0), "ref_kl_target=0.0 is invalid"),
        (dict(ref_kl_mode="penalty"), "ref_kl_mode='penalty' is invalid"),
    ],
)
def test_bad_arguments_are_refused_before_training(cartpole_reference, kwargs, match) -> None:
    with pytest.raises(ConfigurationError, match=match):
        ClippedPPO("MlpPolicy", "CartPole-v1", ref_policy=cartpole_reference, **kwargs)


def test_a_reference_for_other_spaces_or_of_another_kind_is_refused(cartpole_reference, tmp_path) -> None:
    with pytest.raises(ConfigurationError, match="does not fit this env.*observation_space"):
        ClippedPPO("MlpPolicy", "Acrobot-v1", ref_policy=cartpole_reference)
    with pytest.raises(ConfigurationError, match="ref_policy=42 is invalid"):
        ClippedPPO("MlpPolicy", "CartPole-v1", ref_policy=42)
    with pytest.raises(ConfigurationError, match="no such file"):
        ClippedPPO("MlpPolicy", "CartPole-v1", ref_policy=str(tmp_path / "missing.zip"))
    lstm = ClippedPPO("MlpLstmPolicy", "CartPole-v1", policy_kwargs=dict(lstm_hidden_size=8), **SMALL)
    with pytest.raises(ConfigurationError, match="recurrent reference is not supported"):
        ClippedPPO("MlpPolicy", "CartPole-v1", ref_policy=lstm)
    assert spaces.Discrete(2) == cartpole_reference.action_space
