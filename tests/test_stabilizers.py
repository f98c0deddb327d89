"""Stabilisers: dual clip, RPO, KL-adaptive learning rate, value-target normalisation / PopArt, asymmetric critic."""

from __future__ import annotations

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

from sb3_ppo_ext import ClippedPPO, losses
from sb3_ppo_ext.backends import AutogradBackend, select_backend
from sb3_ppo_ext.errors import ConfigurationError, ConfigurationWarning
from sb3_ppo_ext.optim import KLAdaptiveLearningRate
from sb3_ppo_ext.stabilizers.value_normalization import ValueNormalizer
from tests.conftest import DictObsEnv

SMALL = dict(n_steps=64, batch_size=32, n_epochs=2, device="cpu")

# -- dual clip ------------------------------------------------------------------------------------------------


def test_dual_clip_surrogate_and_gradient_at_chosen_ratios() -> None:
    ratio = th.tensor([0.5, 2.0, 5.0, 5.0, 0.9], dtype=th.float64, requires_grad=True)
    advantages = th.tensor([-1.0, -1.0, -1.0, 1.0, 2.0], dtype=th.float64)
    # by hand, eps = 0.2, c = 3: A < 0: max(min(rA, clip(r)A), cA); A > 0: min(rA, clip(r)A)
    objective = [-0.8, -2.0, -3.0, 1.2, 1.8]
    loss = losses.clipped_surrogate_loss(ratio, advantages, 0.2, dual_clip=3.0)
    assert loss.item() == pytest.approx(-np.mean(objective))
    # d loss / d log pi = r * dloss/dr: only r = 2 (A = -1, unclipped, under c) and r = 0.9 (A = 2) move
    expected = th.tensor([0.0, 2.0, 0.0, 0.0, -1.8], dtype=th.float64) / 5
    closed = losses.clipped_surrogate_grad(ratio.detach(), advantages, 0.2, dual_clip=3.0)
    th.testing.assert_close(closed, expected)
    (grad,) = th.autograd.grad(loss, ratio)
    th.testing.assert_close(grad * ratio.detach(), expected)
    without = losses.clipped_surrogate_loss(ratio, advantages, 0.2)
    assert without.item() == pytest.approx(-np.mean([-0.8, -2.0, -5.0, 1.2, 1.8]))


def test_dual_clip_fraction_counts_negative_advantages_past_c() -> None:
    ratio = th.tensor([0.5, 2.0, 3.0, 4.0, 5.0, 6.0])
    advantages = th.tensor([-1.0, -1.0, -1.0, -1.0, 1.0, 0.0])
    # by hand, c = 3: only r = 4 with A = -1 is bounded (r = 3 ties c A, r = 5 and 6 have A >= 0)
    assert losses.dual_clip_fraction(ratio, advantages, 3.0).item() == pytest.approx(1 / 6)
    assert losses.dual_clip_fraction(ratio, advantages, 10.0).item() == 0.0


def test_dual_clip_keeps_the_closed_form_path_and_trains(monkeypatch) -> None:
    model = ClippedPPO("MlpPolicy", "CartPole-v1", seed=0, dual_clip=3.0, **SMALL)
    assert type(select_backend(model.policy, model.fast_update)).__name__ == "ClosedFormBackend"
    # every minibatch reports a bounded share of 0.25 (one per row of a stack): the logged value is their mean
    monkeypatch.setattr(losses, "dual_clip_fraction", lambda ratio, advantages, c: th.full(ratio.shape[:-1], 0.25))
    model.learn(128)
    assert model.logger.name_to_value["train/dual_clip_fraction"] == pytest.approx(0.25)
    plain = ClippedPPO("MlpPolicy", "CartPole-v1", seed=0, **SMALL)
    plain.learn(64)
    assert "train/dual_clip_fraction" not in plain.logger.name_to_value


# -- KL-adaptive learning rate ------------------------------------------------------------------------------------


def test_adaptive_rule_gives_the_hand_computed_learning_rates() -> None:
    rule = KLAdaptiveLearningRate(1e-3, target=0.01, bounds=(1e-4, 2e-3))
    kls = [0.05, 0.05, 0.001, 0.015, 0.001, 0.001, 0.001] + [0.5] * 10
    expected, lr = [], 1e-3
    for kl in kls:
        if kl > 0.02:
            lr = max(lr / 1.5, 1e-4)
        elif kl < 0.005:
            lr = min(lr * 1.5, 2e-3)
        expected.append(lr)
    assert [rule.update(kl) for kl in kls] == pytest.approx(expected)
    assert expected[-1] == 1e-4 and max(expected) == 2e-3  # both bounds reached


@pytest.mark.parametrize("every", ["epoch", "minibatch"])
def test_adaptive_learning_rate_drives_the_optimizer_and_is_logged(every, monkeypatch) -> None:
    # every minibatch reports a KL of 1, far above twice the target: the rate falls by 1.5 at each adaptation
    monkeypatch.setattr(losses, "approx_kl", lambda ratio, log_ratio: th.ones(ratio.shape[:-1]))
    model = ClippedPPO("MlpPolicy", "CartPole-v1", seed=0, adaptive_lr_kl=0.01, adaptive_lr_every=every, **SMALL)
    model.learn(128)
    updates = model.n_epochs * (2 if every == "minibatch" else 1) * 2  # 2 rollouts, 2 minibatches per epoch
    expected = max(3e-4 / 1.5**updates, 1e-5)
    assert model.policy.optimizer.param_groups[0]["lr"] == pytest.approx(expected)
    assert model.logger.name_to_value["train/learning_rate"] == pytest.approx(expected)


# -- value-target normalisation and PopArt ----------------------------------------------------------------------


def test_popart_preserves_the_value_heads_outputs_exactly() -> None:
    head = th.nn.Linear(8, 1).double()
    normalizer = ValueNormalizer(popart=True)
    normalizer.update(np.random.default_rng(0).normal(5.0, 2.0, 500))
    latents = th.randn(64, 8, dtype=th.float64)
    before = normalizer.denormalize(head(latents)).detach()
    normalizer.update(np.random.default_rng(1).normal(-40.0, 30.0, 500), value_head=head)
    after = normalizer.denormalize(head(latents)).detach()
    th.testing.assert_close(after, before, rtol=1e-10, atol=1e-10)
    assert normalizer.mean < 0 and normalizer.std > 10  # the statistics did move


def test_normalized_critic_values_enter_gae_in_reward_units() -> None:
    model = ClippedPPO("MlpPolicy", "Pendulum-v1", seed=0, normalize_value_targets=True, **SMALL)
    normalizer = model.value_normalizer
    normalizer.statistics.mean, normalizer.statistics.var = np.float64(100.0), np.float64(400.0)
    _, callback = model._setup_learn(64)
    model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
    obs = th.as_tensor(model.rollout_buffer.observations.reshape(64, -1))
    with th.no_grad():
        raw = model.policy.predict_values(obs).flatten().numpy()
    np.testing.assert_allclose(model.rollout_buffer.values.reshape(-1), raw * 20.0 + 100.0, rtol=1e-5, atol=1e-4)


def test_the_critic_is_trained_on_normalized_targets(monkeypatch) -> None:
    seen = []
    original = losses.value_loss

    def spy(values, old_values, returns, *args):
        seen.append(returns.detach().clone())
        return original(values, old_values, returns, *args)

    monkeypatch.setattr(losses, "value_loss", spy)
    model = ClippedPPO("MlpPolicy", "Pendulum-v1", seed=0, normalize_value_targets=True, fast_update=False, **SMALL)
    model.learn(64)
    targets = th.cat(seen)
    raw = th.as_tensor(model.rollout_buffer.returns.reshape(-1))
    assert raw.abs().mean() > 10 * targets.abs().mean()  # Pendulum's returns are in the hundreds
    normalized = model.value_normalizer.normalize(raw)
    th.testing.assert_close(targets.sort().values, normalized.repeat(model.n_epochs).sort().values)


def test_normalizer_and_adaptive_rate_are_saved_with_the_model(tmp_path) -> None:
    model = ClippedPPO(
        "MlpPolicy", "Pendulum-v1", seed=0, normalize_value_targets=True, popart=True, adaptive_lr_kl=1e-6, **SMALL
    )
    model.learn(128)
    model.save(tmp_path / "model")
    loaded = ClippedPPO.load(tmp_path / "model", device="cpu")
    assert loaded.value_normalizer.mean == model.value_normalizer.mean
    assert loaded.value_normalizer.popart and loaded._adaptive_lr.value == model._adaptive_lr.value


# -- RPO --------------------------------------------------------------------------------------------------------


def test_rpo_shifts_the_mean_by_at_most_alpha_during_updates_only() -> None:
    model = ClippedPPO("MlpPolicy", "Pendulum-v1", seed=0, rpo_alpha=0.3, **SMALL)
    policy = model.policy
    obs, actions = th.randn(256, 3), th.randn(256, 1)
    policy.set_training_mode(False)
    _, _, _, plain = policy.evaluate_with_params(obs, actions)
    policy.set_training_mode(True)
    _, _, _, noisy = policy.evaluate_with_params(obs, actions)
    shift = noisy[0] - plain[0]
    assert shift.abs().max() <= 0.3 and shift.abs().max() > 0.2 and shift.std() > 0.1
    th.testing.assert_close(noisy[1], plain[1])  # the std is not perturbed
    assert isinstance(select_backend(policy, fast_update=True), AutogradBackend)
    model.learn(128)


# -- asymmetric actor-critic ----------------------------------------------------------------------------------


def test_the_critic_sees_only_its_keys_and_predict_needs_only_the_actors() -> None:
    env = VecNormalize(DummyVecEnv([DictObsEnv]), norm_obs_keys=["vec", "other"])
    model = ClippedPPO(
        "MultiInputPolicy",
        env,
        seed=0,
        policy_kwargs=dict(actor_keys=["vec"], critic_keys=["other", "index"]),
        **SMALL,
    )
    seen: dict[str, set[str]] = {"pi": set(), "vf": set()}
    policy = model.policy
    policy.pi_features_extractor.register_forward_pre_hook(lambda _m, args: seen["pi"].update(args[0].keys()))
    policy.vf_features_extractor.register_forward_pre_hook(lambda _m, args: seen["vf"].update(args[0].keys()))
    model.learn(64)
    assert seen == {"pi": {"vec"}, "vf": {"other", "index"}}
    action, _ = model.predict({"vec": np.zeros(3, np.float32)}, deterministic=True)
    full, _ = model.predict(
        {"vec": np.zeros(3, np.float32), "other": np.ones((2, 2), np.float32), "index": 2}, deterministic=True
    )
    assert action == full  # the critic-only keys do not change the action


def test_stabilizer_arguments_get_clear_errors() -> None:
    cases = [
        (dict(dual_clip=1.0), "dual_clip=1.0 is invalid"),
        (dict(dual_clip=-3), "dual_clip=-3 is invalid"),
        (dict(rpo_alpha=0.0), "rpo_alpha=0.0 is invalid"),
        (dict(rpo_alpha=1.5), "rpo_alpha=1.5 is invalid"),
        (dict(adaptive_lr_kl=0.0), "adaptive_lr_kl=0.0 is invalid"),
        (dict(adaptive_lr_kl=0.01, adaptive_lr_every="rollout"), "adaptive_lr_every='rollout' is invalid"),
        (dict(adaptive_lr_kl=0.01, adaptive_lr_bounds=(1e-2, 1e-5)), "adaptive_lr_bounds"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ConfigurationError, match=match):
            ClippedPPO("MlpPolicy", "Pendulum-v1", **kwargs)
    # popart without normalize_value_targets does nothing: a ConfigurationWarning, as for every inactive setting
    with pytest.warns(ConfigurationWarning, match="Pass normalize_value_targets=True"):
        ClippedPPO("MlpPolicy", "Pendulum-v1", popart=True)
    with pytest.raises(ConfigurationError, match="RPO perturbs the mean of Gaussian actions"):
        ClippedPPO("MlpPolicy", "CartPole-v1", rpo_alpha=0.5)
    with pytest.raises(ValueError, match="unknown keys"):
        ClippedPPO("MultiInputPolicy", DictObsEnv(), policy_kwargs=dict(critic_keys=["state"]))
    with pytest.raises(ValueError, match="Dict observation space"):
        ClippedPPO("MlpPolicy", "CartPole-v1", policy_kwargs=dict(actor_keys=["x"]))
