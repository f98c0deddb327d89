"""The closed-form update path (sb3_ppo_ext.fast.kernel) gives the same losses and updates as a plain reference.

The reference uses ``torch.distributions``, ``torch.nn.utils.clip_grad_norm_``, a non-fused Adam and an
entropy term that always stays in the graph: the textbook PPO step that SB3 also takes.
"""

import copy

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.logger import configure

from sb3_ppo_ext import ClippedPPO, matmul
from sb3_ppo_ext.backends import ClosedFormBackend, select_backend
from sb3_ppo_ext.fast.kernel import MLPActorCriticKernel


def _collect(model: ClippedPPO) -> None:
    model.set_logger(configure(folder=None, format_strings=[]))
    _, callback = model._setup_learn(model.n_steps * model.n_envs, None, True, "test", False)
    model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)


def _reference_step(policy, buffer, model: ClippedPPO, lr: float) -> dict[str, float]:
    obs = th.as_tensor(buffer.observations.reshape(-1, *buffer.obs_shape))
    actions = th.as_tensor(buffer.actions.reshape(-1, buffer.action_dim))
    old_values = th.as_tensor(buffer.values.reshape(-1))
    old_log_prob = th.as_tensor(buffer.log_probs.reshape(-1))
    advantages = th.as_tensor(buffer.advantages.reshape(-1))
    returns = th.as_tensor(buffer.returns.reshape(-1))
    optimizer = th.optim.Adam(policy.parameters(), lr=lr, eps=1e-5, foreach=False)
    # continue from the model's optimizer state, with the plain per-tensor Adam implementation
    optimizer.load_state_dict(copy.deepcopy(model.policy.optimizer.state_dict()))
    for group in optimizer.param_groups:
        group.update(fused=None, foreach=False, lr=lr)

    latent_pi, latent_vf = policy.mlp_extractor(policy.extract_features(obs, policy.features_extractor))
    values = policy.value_net(latent_vf).flatten()
    head = policy.action_net(latent_pi)
    if isinstance(model.action_space, __import__("gymnasium").spaces.Discrete):
        dist = th.distributions.Categorical(logits=head)
        log_prob = dist.log_prob(actions.long().flatten())
        entropy = dist.entropy()
    elif policy.state_dependent_std:
        mean, log_std = head.chunk(2, dim=-1)
        dist = th.distributions.Normal(mean, th.exp(log_std))
        log_prob = dist.log_prob(actions).sum(-1)
        entropy = dist.entropy().sum(-1)
    else:
        dist = th.distributions.Normal(head, th.exp(policy.log_std))
        log_prob = dist.log_prob(actions).sum(-1)
        entropy = dist.entropy().sum(-1)

    adv = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    eps = model.clip_range(1.0)
    ratio = th.exp(log_prob - old_log_prob)
    policy_loss = -th.min(ratio * adv, th.clamp(ratio, 1 - eps, 1 + eps) * adv).mean()
    if model.clip_range_vf is None:
        value_loss = th.nn.functional.mse_loss(returns, values)
    else:
        eps_vf = model.clip_range_vf(1.0)
        clipped = old_values + th.clamp(values - old_values, -eps_vf, eps_vf)
        if model.vf_clip_mode == "sb3":
            value_loss = th.nn.functional.mse_loss(returns, clipped)
        else:
            value_loss = th.max((values - returns) ** 2, (clipped - returns) ** 2).mean()
    entropy_loss = -entropy.mean()
    loss = policy_loss + model.ent_coef * entropy_loss + model.vf_coef * value_loss
    optimizer.zero_grad()
    loss.backward()
    th.nn.utils.clip_grad_norm_(policy.parameters(), model.max_grad_norm)
    optimizer.step()
    return {
        "train/policy_gradient_loss": policy_loss.item(),
        "train/value_loss": value_loss.item(),
        "train/entropy_loss": entropy_loss.item(),
        "train/loss": loss.item(),
    }


@pytest.mark.parametrize(
    "env_id, kwargs",
    [
        ("CartPole-v1", dict(ent_coef=0.0)),
        ("CartPole-v1", dict(ent_coef=0.01, clip_range_vf=0.2)),
        ("CartPole-v1", dict(ent_coef=0.05, clip_range_vf=0.05, vf_clip_mode="sb3", clip_range=0.01)),
        ("CartPole-v1", dict(policy_kwargs=dict(activation_fn=th.nn.ReLU, net_arch=dict(pi=[32], vf=[16, 8])))),
        ("CartPole-v1", dict(policy_kwargs=dict(net_arch=[], share_features_extractor=False))),
        ("Pendulum-v1", dict(ent_coef=0.01, max_grad_norm=0.05)),
        ("Pendulum-v1", dict(ent_coef=0.01, clip_range_vf=0.1, policy_kwargs=dict(state_dependent_std=True))),
        ("Pendulum-v1", dict(clip_range=0.02, policy_kwargs=dict(log_std_init=-1.0, ortho_init=False))),
        # 256-unit layers at batch 64: large enough for the oneDNN matrix products (sb3_ppo_ext.matmul)
        (
            "Pendulum-v1",
            dict(ent_coef=0.01, policy_kwargs=dict(activation_fn=th.nn.ReLU, net_arch=[256, 256], onednn_matmul=True)),
        ),
    ],
)
@pytest.mark.parametrize("fast_update, numpy_head", [(True, "0"), (True, "1"), (False, "0")])
def test_update_matches_reference(env_id: str, kwargs: dict, fast_update: bool, numpy_head: str, monkeypatch) -> None:
    # the heads and the layers in torch and in NumPy (fast/numpy_head.py, fast/numpy_layers.py), whatever this CPU picks
    monkeypatch.setenv("SB3_PPO_EXT_NUMPY_HEAD", numpy_head)
    monkeypatch.setenv("SB3_PPO_EXT_NUMPY_LAYERS", numpy_head)
    lr = 1e-3
    model = ClippedPPO(
        "MlpPolicy",
        env_id,
        n_steps=64,
        batch_size=64,
        n_epochs=1,
        learning_rate=lr,
        seed=3,
        device="cpu",
        fast_update=fast_update,
        **kwargs,
    )
    assert isinstance(select_backend(model.policy, model.fast_update), ClosedFormBackend) == fast_update
    _collect(model)
    # a few steps of training first, so that ratios leave 1 and clipping is exercised
    model.n_epochs = 3
    model.batch_size = 16
    model._current_progress_remaining = 1.0
    model.train()
    model.n_epochs, model.batch_size = 1, 64
    reference_policy = copy.deepcopy(model.policy)
    reference_policy.set_training_mode(True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(matmul._state, "enabled", False)  # the reference is the plain BLAS product
        expected = _reference_step(reference_policy, model.rollout_buffer, model, lr)

    model._current_progress_remaining = 1.0
    model.train()
    logged = model.logger.name_to_value
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    ours = dict(model.policy.named_parameters())
    changed = 0
    for name, ref in reference_policy.named_parameters():
        np.testing.assert_allclose(
            ours[name].detach().numpy(), ref.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=name
        )
        changed += 1
    assert changed > 0
    # the step really moved the parameters (so equality above is not trivial)
    fresh = ClippedPPO("MlpPolicy", env_id, n_steps=64, batch_size=64, seed=3, device="cpu", **kwargs)
    assert any(not th.allclose(p, dict(fresh.policy.named_parameters())[n]) for n, p in model.policy.named_parameters())


def test_kernel_is_used_only_where_it_is_exact() -> None:
    model = ClippedPPO("MlpPolicy", "CartPole-v1", n_steps=16, batch_size=16, device="cpu")
    assert MLPActorCriticKernel.supports(model.policy)
    model.policy.value_net.weight.requires_grad_(False)
    assert not MLPActorCriticKernel.supports(model.policy)
    sde = ClippedPPO("MlpPolicy", "Pendulum-v1", n_steps=16, batch_size=16, use_sde=True, device="cpu")
    assert not MLPActorCriticKernel.supports(sde.policy)
    gelu = ClippedPPO(
        "MlpPolicy", "CartPole-v1", n_steps=16, batch_size=16, policy_kwargs=dict(activation_fn=th.nn.GELU)
    )
    assert not MLPActorCriticKernel.supports(gelu.policy)
