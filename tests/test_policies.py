"""Our actor-critic policies: orthogonal init gains, architecture conventions and the evaluation path."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common import policies as sb3_policies
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.torch_layers import NatureCNN
from torch import nn

from sb3_ppo_ext import ClippedPPO, optim, policies
from sb3_ppo_ext.policies import (
    HIDDEN_GAIN,
    POLICY_HEAD_GAIN,
    VALUE_HEAD_GAIN,
    ActorCriticCnnPolicy,
    ActorCriticPolicy,
    MultiInputActorCriticPolicy,
)
from sb3_ppo_ext.recurrent import policies as recurrent_policies

OBS = spaces.Box(-1.0, 1.0, shape=(6,), dtype=np.float32)
IMAGE = spaces.Box(0, 255, shape=(3, 36, 36), dtype=np.uint8)  # channel-first, as VecTransposeImage hands it over
ACTION_SPACES = {
    "box": spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32),
    "discrete": spaces.Discrete(4),
    "multidiscrete": spaces.MultiDiscrete([3, 2]),
    "multibinary": spaces.MultiBinary(3),
}


def lr(_: float) -> float:
    return 1e-3


def singular_values(module: nn.Module) -> th.Tensor:
    weight = module.weight.detach()
    return th.linalg.svdvals(weight.reshape(weight.shape[0], -1).double())


def assert_orthogonal_with_gain(module: nn.Module, gain: float) -> None:
    # an orthogonal W scaled by g has every singular value (min(rows, cols) of them) equal to g
    sv = singular_values(module)
    assert len(sv) == min(module.weight.shape[0], int(np.prod(module.weight.shape[1:])))
    th.testing.assert_close(sv, th.full_like(sv, gain), rtol=1e-5, atol=1e-6)
    assert th.count_nonzero(module.bias) == 0


def linear_layers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


# -- orthogonal initialisation ------------------------------------------------------------------------------


@pytest.mark.parametrize("action_space", ACTION_SPACES.values(), ids=ACTION_SPACES.keys())
def test_orthogonal_init_gains_by_singular_values(action_space: spaces.Space) -> None:
    policy = ActorCriticPolicy(OBS, action_space, lr, net_arch=dict(pi=[64, 32], vf=[64, 64]))
    hidden = linear_layers(policy.mlp_extractor)
    assert len(hidden) == 4
    for layer in hidden:
        assert_orthogonal_with_gain(layer, HIDDEN_GAIN)
    assert_orthogonal_with_gain(policy.action_net, POLICY_HEAD_GAIN)
    assert_orthogonal_with_gain(policy.value_net, VALUE_HEAD_GAIN)
    assert HIDDEN_GAIN == pytest.approx(np.sqrt(2)) and POLICY_HEAD_GAIN == 0.01 and VALUE_HEAD_GAIN == 1.0


@pytest.mark.parametrize("share", [True, False])
def test_orthogonal_init_of_nature_cnn_features_extractor(share: bool) -> None:
    policy = ActorCriticCnnPolicy(IMAGE, spaces.Discrete(3), lr, share_features_extractor=share)
    assert isinstance(policy.features_extractor, NatureCNN)
    extractors = {policy.pi_features_extractor, policy.vf_features_extractor}
    assert len(extractors) == (1 if share else 2)
    for extractor in extractors:
        layers = linear_layers(extractor)
        assert len(layers) == 4  # three convolutions and the linear layer
        for layer in layers:
            assert_orthogonal_with_gain(layer, HIDDEN_GAIN)
    assert_orthogonal_with_gain(policy.action_net, POLICY_HEAD_GAIN)
    assert_orthogonal_with_gain(policy.value_net, VALUE_HEAD_GAIN)


def test_without_ortho_init_singular_values_are_not_the_gains() -> None:
    th.manual_seed(0)
    policy = ActorCriticPolicy(OBS, spaces.Discrete(4), lr, ortho_init=False)
    for layer, gain in [
        (policy.mlp_extractor.policy_net[2], HIDDEN_GAIN),
        (policy.action_net, POLICY_HEAD_GAIN),
        (policy.value_net, VALUE_HEAD_GAIN),
    ]:
        sv = singular_values(layer)
        assert not th.allclose(sv, th.full_like(sv, gain), rtol=1e-2)
    # PyTorch's default uniform init of a square 64x64 layer is far from orthogonal
    sv = singular_values(policy.mlp_extractor.policy_net[2])
    assert sv.max() / sv.min() > 2
    assert th.count_nonzero(policy.value_net.bias) == 1


def test_ortho_init_gives_near_uniform_initial_policy() -> None:
    policy = ActorCriticPolicy(OBS, spaces.Discrete(4), lr)
    dist = policy.get_distribution(th.as_tensor(np.stack([OBS.sample() for _ in range(16)])))
    probs = dist.distribution.probs
    th.testing.assert_close(probs, th.full_like(probs, 0.25), atol=0.02, rtol=0)


# -- architecture conventions (same as SB3's policy) --------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        dict(net_arch=[32]),
        dict(net_arch=dict(pi=[8], vf=[16, 16])),
        dict(share_features_extractor=False),
        dict(use_sde=True),
        dict(activation_fn=nn.ReLU, log_std_init=-1.0),
    ],
    ids=["default", "shared-list", "dict", "unshared", "sde", "relu"],
)
def test_same_parameter_names_and_shapes_as_sb3_policy(kwargs: dict) -> None:
    action_space = ACTION_SPACES["box"]
    ours = ActorCriticPolicy(OBS, action_space, lr, **kwargs)
    sb3 = sb3_policies.ActorCriticPolicy(OBS, action_space, lr, **kwargs)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in sb3.state_dict().items()}


def test_net_arch_list_and_dict_build_the_requested_layers() -> None:
    shared = ActorCriticPolicy(OBS, spaces.Discrete(2), lr, net_arch=[32, 16], activation_fn=nn.ReLU)
    sizes = [m.out_features for m in shared.mlp_extractor.policy_net if isinstance(m, nn.Linear)]
    assert sizes == [32, 16]
    assert [m.out_features for m in shared.mlp_extractor.value_net if isinstance(m, nn.Linear)] == [32, 16]
    assert sum(isinstance(m, nn.ReLU) for m in shared.mlp_extractor.modules()) == 4
    split = ActorCriticPolicy(OBS, spaces.Discrete(2), lr, net_arch=dict(pi=[8], vf=[4, 4]))
    assert [m.out_features for m in split.mlp_extractor.policy_net if isinstance(m, nn.Linear)] == [8]
    assert [m.out_features for m in split.mlp_extractor.value_net if isinstance(m, nn.Linear)] == [4, 4]
    assert split.action_net.in_features == 8 and split.value_net.in_features == 4
    with pytest.warns(UserWarning, match="deprecated"):
        old_style = ActorCriticPolicy(OBS, spaces.Discrete(2), lr, net_arch=[dict(pi=[8], vf=[4])])
    assert old_style.net_arch == dict(pi=[8], vf=[4])


def test_default_optimizer_is_adam_with_eps_1e_5() -> None:
    policy = ActorCriticPolicy(OBS, spaces.Discrete(2), lr)
    assert isinstance(policy.optimizer, th.optim.Adam)
    assert policy.optimizer.defaults["eps"] == 1e-5
    assert policy.optimizer.defaults["lr"] == 1e-3
    sgd = ActorCriticPolicy(OBS, spaces.Discrete(2), lr, optimizer_class=th.optim.SGD)
    assert isinstance(sgd.optimizer, th.optim.SGD)


def test_policy_accepts_every_sb3_policy_argument_and_records_it() -> None:
    ours = inspect.signature(ActorCriticPolicy.__init__).parameters
    sb3 = inspect.signature(sb3_policies.ActorCriticPolicy.__init__).parameters
    for name, param in sb3.items():
        assert name in ours, name
        assert ours[name].default == param.default, name
    constructor = ActorCriticPolicy(OBS, ACTION_SPACES["box"], lr)._get_constructor_parameters()
    assert set(ours) - {"self"} <= set(constructor)


def test_aliases_are_our_classes_and_base_policies() -> None:
    assert ClippedPPO.policy_aliases == {
        "MlpPolicy": ActorCriticPolicy,
        "CnnPolicy": ActorCriticCnnPolicy,
        "MultiInputPolicy": MultiInputActorCriticPolicy,
        "MlpLstmPolicy": recurrent_policies.RecurrentActorCriticPolicy,
        "CnnLstmPolicy": recurrent_policies.RecurrentActorCriticCnnPolicy,
        "MultiInputLstmPolicy": recurrent_policies.RecurrentMultiInputActorCriticPolicy,
        "MlpGruPolicy": recurrent_policies.GruActorCriticPolicy,
        "CnnGruPolicy": recurrent_policies.GruActorCriticCnnPolicy,
        "MultiInputGruPolicy": recurrent_policies.GruMultiInputActorCriticPolicy,
    }
    for cls in ClippedPPO.policy_aliases.values():
        assert issubclass(cls, BasePolicy)
        assert not issubclass(cls, sb3_policies.ActorCriticPolicy)
    assert policies.MlpPolicy is ActorCriticPolicy


# -- evaluation path -----------------------------------------------------------------------------------------


def _obs_batch(n: int = 16) -> th.Tensor:
    return th.as_tensor(np.stack([OBS.sample() for _ in range(n)]))


@pytest.mark.parametrize("action_space", ACTION_SPACES.values(), ids=ACTION_SPACES.keys())
def test_forward_evaluate_and_predict_values_agree(action_space: spaces.Space) -> None:
    th.manual_seed(0)
    policy = ActorCriticPolicy(OBS, action_space, lr, log_std_init=-0.3)
    obs = _obs_batch()
    with th.no_grad():
        actions, values, log_prob = policy(obs)
        eval_values, eval_log_prob, entropy = policy.evaluate_actions(obs, actions)
        dist = policy.get_distribution(obs)
    assert actions.shape == (16, *action_space.shape)
    assert values.shape == (16, 1) and log_prob.shape == (16,) and entropy.shape == (16,)
    th.testing.assert_close(eval_values, values)
    th.testing.assert_close(policy.predict_values(obs), values)
    th.testing.assert_close(eval_log_prob, log_prob)
    assert isinstance(dist, Distribution)
    th.testing.assert_close(dist.log_prob(actions), log_prob)
    th.testing.assert_close(dist.entropy(), entropy)


@pytest.mark.parametrize(
    ("action_space", "use_sde"),
    [(space, False) for space in ACTION_SPACES.values()] + [(ACTION_SPACES["box"], True)],
    ids=[*ACTION_SPACES.keys(), "box-sde"],
)
def test_same_weights_give_sb3_policy_outputs(action_space: spaces.Space, use_sde: bool) -> None:
    """Loading an SB3 policy's weights gives the same values, log-probabilities, entropies and modes."""
    th.manual_seed(1)
    sb3 = sb3_policies.ActorCriticPolicy(OBS, action_space, lr, use_sde=use_sde, log_std_init=-0.5)
    with th.no_grad():  # move the heads away from their near-zero init so that the comparison means something
        for p in sb3.parameters():
            p.add_(0.3 * th.randn_like(p))
    ours = ActorCriticPolicy(OBS, action_space, lr, use_sde=use_sde)
    ours.load_state_dict(sb3.state_dict())
    obs = _obs_batch()
    with th.no_grad():
        actions, _, _ = sb3(obs)
        sb3_out = sb3.evaluate_actions(obs, actions)
        our_out = ours.evaluate_actions(obs, actions)
        th.testing.assert_close(our_out[0], sb3_out[0])
        th.testing.assert_close(our_out[1], sb3_out[1])
        if sb3_out[2] is None:
            assert our_out[2] is None
        else:
            th.testing.assert_close(our_out[2], sb3_out[2])
        th.testing.assert_close(ours._predict(obs, deterministic=True), sb3._predict(obs, deterministic=True))


def test_state_dependent_std_head_outputs_mean_and_log_std() -> None:
    policy = ActorCriticPolicy(OBS, ACTION_SPACES["box"], lr, state_dependent_std=True, log_std_init=-1.0)
    assert not hasattr(policy, "log_std")
    assert policy.action_net.out_features == 4  # [B, 2 x action_dim], the seed's layout
    obs = _obs_batch()
    mean, log_std = policy._head_params(policy._actor_latent(obs))
    assert mean.shape == log_std.shape == (16, 2)
    # the 0.01-gain head starts every state's std near exp(log_std_init)
    th.testing.assert_close(log_std, th.full_like(log_std, -1.0), atol=0.05, rtol=0)
    # the std really depends on the state once the head's weights do
    with th.no_grad():
        policy.action_net.weight[2:].normal_()
    _, log_std = policy._head_params(policy._actor_latent(obs))
    assert log_std.std(dim=0).min() > 1e-3
    with pytest.raises(ValueError):
        ActorCriticPolicy(OBS, spaces.Discrete(2), lr, state_dependent_std=True)


def test_state_independent_log_std_parameter_and_init() -> None:
    policy = ActorCriticPolicy(OBS, ACTION_SPACES["box"], lr, log_std_init=-2.0)
    assert isinstance(policy.log_std, nn.Parameter)
    th.testing.assert_close(policy.log_std.detach(), th.full((2,), -2.0))
    # the std is shared by all states
    dist = policy.get_distribution(_obs_batch())
    th.testing.assert_close(dist.distribution.stddev, th.full((16, 2), float(np.exp(-2.0))))


def test_gsde_policy_reset_noise_changes_actions_and_plain_policy_refuses() -> None:
    th.manual_seed(0)
    policy = ActorCriticPolicy(OBS, ACTION_SPACES["box"], lr, use_sde=True, log_std_init=0.0)
    obs = _obs_batch(4)
    with th.no_grad():
        a1 = policy._predict(obs)
        a2 = policy._predict(obs)
        policy.reset_noise(4)
        a3 = policy._predict(obs)
    th.testing.assert_close(a1, a2)  # same exploration matrix: same noise for the same state
    assert not th.allclose(a1, a3)
    with pytest.raises(ValueError):
        ActorCriticPolicy(OBS, spaces.Discrete(2), lr).reset_noise()
    with pytest.raises(ValueError):
        ActorCriticPolicy(OBS, spaces.Discrete(2), lr, use_sde=True)


def test_squash_output_needs_sde_and_bounds_actions() -> None:
    with pytest.raises(ValueError):
        ActorCriticPolicy(OBS, ACTION_SPACES["box"], lr, squash_output=True)
    policy = ActorCriticPolicy(OBS, ACTION_SPACES["box"], lr, use_sde=True, squash_output=True, log_std_init=2.0)
    with th.no_grad():
        actions, _, _ = policy(_obs_batch(64))
    assert actions.abs().max() <= 1.0


def test_unshared_feature_extractors_are_separate_modules() -> None:
    policy = ActorCriticPolicy(OBS, spaces.Discrete(2), lr, share_features_extractor=False)
    assert policy.pi_features_extractor is not policy.vf_features_extractor
    shared = ActorCriticPolicy(OBS, spaces.Discrete(2), lr)
    assert shared.pi_features_extractor is shared.vf_features_extractor


def test_multi_input_policy_uses_combined_extractor() -> None:
    from stable_baselines3.common.torch_layers import CombinedExtractor

    obs_space = spaces.Dict({"a": spaces.Box(-1, 1, (3,)), "b": spaces.Discrete(4)})
    policy = MultiInputActorCriticPolicy(obs_space, spaces.Discrete(2), lr)
    assert isinstance(policy.features_extractor, CombinedExtractor)
    obs = {"a": th.rand(5, 3), "b": th.randint(0, 4, (5,))}
    actions, values, log_prob = policy(obs)
    assert actions.shape == (5,) and values.shape == (5, 1)


def test_unsupported_action_space_is_rejected() -> None:
    with pytest.raises(TypeError):
        ActorCriticPolicy(OBS, spaces.Tuple([spaces.Discrete(2)]), lr)


def test_adam_is_fused_where_torch_supports_it() -> None:
    policy = ActorCriticPolicy(OBS, spaces.Discrete(2), lr)
    assert bool(policy.optimizer.defaults.get("fused")) == optim.fused_adam_supported("cpu")
    chosen = ActorCriticPolicy(OBS, spaces.Discrete(2), lr, optimizer_kwargs=dict(foreach=True))
    assert not chosen.optimizer.defaults.get("fused")  # the caller's choice of implementation stays


def test_adam_falls_back_to_unfused_where_torch_lacks_fused_adam(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch 2.3 has no fused Adam on CPU: the optimizer must build, and train, without it."""
    monkeypatch.setattr(optim, "fused_adam_supported", lambda device_type: False)
    assert optim.fast_optimizer_kwargs(th.optim.Adam, {"eps": 1e-5}) == {"eps": 1e-5}
    policy = ActorCriticPolicy(OBS, spaces.Discrete(2), lr)
    assert not policy.optimizer.defaults.get("fused")
    _, values, _ = policy(_obs_batch(8))
    values.sum().backward()
    policy.optimizer.step()
