"""Invalid-action masking: heads against sb3-contrib's masked distributions, rollouts, training, errors."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from sb3_contrib import MaskablePPO
from sb3_contrib.common.envs import InvalidActionEnvDiscrete, InvalidActionEnvMultiBinary, InvalidActionEnvMultiDiscrete
from sb3_contrib.common.maskable.distributions import (
    MaskableBernoulliDistribution,
    MaskableCategoricalDistribution,
    MaskableMultiCategoricalDistribution,
)
from sb3_contrib.common.maskable.evaluation import evaluate_policy
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.policies import ActorCriticPolicy as SB3ActorCriticPolicy

from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext.backends import AutogradBackend, ClosedFormBackend, select_backend
from sb3_ppo_ext.distributions import BernoulliHead, BinaryCategoricalHead, CategoricalHead, MultiCategoricalHead
from sb3_ppo_ext.errors import ActionMaskError, ConfigurationError
from sb3_ppo_ext.masking import check_action_masks, mask_groups

TINY = dict(n_steps=32, batch_size=16, n_epochs=2, device="cpu")


def _random_masks(rng: np.random.Generator, batch: int, groups: list[int]) -> np.ndarray:
    """Random masks with at least one valid outcome per group."""
    parts = []
    for size in groups:
        part = rng.random((batch, size)) < 0.5
        part[np.arange(batch), rng.integers(0, size, batch)] = True
        parts.append(part)
    return np.concatenate(parts, axis=1)


# -- heads against sb3-contrib ---------------------------------------------------------------------------


def test_masked_categorical_matches_sb3_contrib() -> None:
    rng = np.random.default_rng(0)
    logits = th.tensor(rng.normal(size=(64, 7)), dtype=th.float32)
    masks = th.as_tensor(_random_masks(rng, 64, [7]))
    head = CategoricalHead(7)
    params = head.mask((logits,), masks)
    actions = head.sample(params, deterministic=False)
    assert masks[th.arange(64), actions].all()
    theirs = MaskableCategoricalDistribution(7).proba_distribution(logits)
    theirs.apply_masking(masks)
    th.testing.assert_close(head.log_prob(params, actions), theirs.log_prob(actions))
    th.testing.assert_close(head.entropy(params), theirs.entropy())
    assert th.isfinite(head.entropy(params)).all()


def test_masked_multicategorical_matches_sb3_contrib() -> None:
    rng = np.random.default_rng(1)
    nvec = [3, 5, 2]
    logits = th.tensor(rng.normal(size=(64, sum(nvec))), dtype=th.float32)
    masks = th.as_tensor(_random_masks(rng, 64, nvec))
    head = MultiCategoricalHead(np.array(nvec))
    params = head.mask((logits,), masks)
    actions = head.sample(params, deterministic=False)
    theirs = MaskableMultiCategoricalDistribution(nvec).proba_distribution(logits)
    theirs.apply_masking(masks)
    th.testing.assert_close(head.log_prob(params, actions), theirs.log_prob(actions))
    th.testing.assert_close(head.entropy(params), theirs.entropy())


def test_masked_bernoulli_matches_sb3_contrib_on_the_equivalent_two_class_logits() -> None:
    """Our Bernoulli logit l is sb3-contrib's pair of class logits [0, l]."""
    rng = np.random.default_rng(2)
    n = 6
    logits = th.tensor(rng.normal(size=(64, n)), dtype=th.float32)
    masks = th.as_tensor(_random_masks(rng, 64, [2] * n))
    head = BernoulliHead(n)
    params = head.mask((logits,), masks)
    actions = head.sample(params, deterministic=False)
    pairs = th.stack([th.zeros_like(logits), logits], dim=-1).reshape(64, 2 * n)
    theirs = MaskableBernoulliDistribution(n).proba_distribution(pairs)
    theirs.apply_masking(masks)
    th.testing.assert_close(head.log_prob(params, actions), theirs.log_prob(actions), atol=1e-5, rtol=1e-5)
    th.testing.assert_close(head.entropy(params), theirs.entropy(), atol=1e-5, rtol=1e-5)


def test_two_logit_binary_head_is_maskableppos_multibinary_distribution() -> None:
    """multibinary_head="categorical": the same 2 n logits give sb3-contrib's MaskableBernoulliDistribution."""
    rng = np.random.default_rng(4)
    n = 6
    logits = th.tensor(rng.normal(size=(64, 2 * n)), dtype=th.float32)
    masks = th.as_tensor(_random_masks(rng, 64, [2] * n))
    head = BinaryCategoricalHead(n)
    params = head.mask((logits,), masks)
    actions = head.sample(params, deterministic=False)
    assert actions.dtype == th.float32 and set(actions.unique().tolist()) <= {0.0, 1.0}
    theirs = MaskableBernoulliDistribution(n).proba_distribution(logits)
    theirs.apply_masking(masks)
    th.testing.assert_close(head.log_prob(params, actions), theirs.log_prob(actions))
    th.testing.assert_close(head.entropy(params), theirs.entropy())
    # bit i is 1 with probability sigmoid(l1 - l0): the Bernoulli head on the logit differences agrees
    unmasked = (logits,)
    bernoulli = (logits[:, 1::2] - logits[:, 0::2],)
    th.testing.assert_close(head.log_prob(unmasked, actions), BernoulliHead(n).log_prob(bernoulli, actions))
    th.testing.assert_close(head.entropy(unmasked), BernoulliHead(n).entropy(bernoulli))


@pytest.mark.parametrize(
    ("head", "groups"),
    [
        (CategoricalHead(5), [5]),
        (MultiCategoricalHead(np.array([2, 4, 3])), [2, 4, 3]),
        (BernoulliHead(4), [2] * 4),
        (BinaryCategoricalHead(4), [2] * 4),
    ],
    ids=["discrete", "multidiscrete", "multibinary", "multibinary-two-logits"],
)
def test_sampled_and_deterministic_actions_are_never_masked_out(head, groups) -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        masks = th.as_tensor(_random_masks(rng, 128, groups))
        params = head.mask((th.tensor(rng.normal(scale=5.0, size=(128, head.n_outputs)), dtype=th.float32),), masks)
        for deterministic in (False, True):
            actions = head.sample(params, deterministic).long().reshape(128, -1)
            offsets = np.cumsum([0, *groups[:-1]])
            for component, offset in enumerate(offsets):
                assert masks[th.arange(128), offset + actions[:, component]].all()


# -- ClippedPPO with masked envs --------------------------------------------------------------------------


def _masked_envs() -> list[gym.Env]:
    return [
        InvalidActionEnvDiscrete(dim=8, n_invalid_actions=4),
        InvalidActionEnvMultiDiscrete(dims=[4, 3], n_invalid_actions=3),
        InvalidActionEnvMultiBinary(dims=4, n_invalid_actions=2),
    ]


@pytest.mark.parametrize("env", _masked_envs(), ids=["discrete", "multidiscrete", "multibinary"])
def test_rollout_stores_masks_and_only_takes_valid_actions(env) -> None:
    model = ClippedPPO("MlpPolicy", env, seed=0, **TINY)
    model.learn(64)
    buffer = model.rollout_buffer
    assert buffer.action_masks is not None and buffer.action_masks.shape[:2] == (32, 1)
    groups = mask_groups(env.action_space)
    offsets = np.cumsum([0, *groups[:-1]])
    actions = buffer.actions.reshape(32, -1).astype(int)
    masks = buffer.action_masks.reshape(32, -1)
    for component, offset in enumerate(offsets):
        assert masks[np.arange(32), offset + actions[:, component]].all()
    batch = next(buffer.get(8))
    assert batch.action_masks.dtype == th.bool and batch.action_masks.shape == (8, masks.shape[1])


def test_use_masking_false_ignores_the_masks() -> None:
    model = ClippedPPO("MlpPolicy", InvalidActionEnvDiscrete(dim=8, n_invalid_actions=4), seed=0, **TINY)
    model.learn(64, use_masking=False)
    assert model.rollout_buffer.action_masks is None


def test_closed_form_and_autograd_agree_with_masks() -> None:
    """The masked Categorical needs no new gradient: both backends give the same update."""
    params = {}
    for fast in (True, False):
        model = ClippedPPO(
            "MlpPolicy", InvalidActionEnvDiscrete(dim=8, n_invalid_actions=4), seed=0, fast_update=fast, **TINY
        )
        backend = select_backend(model.policy, model.fast_update)
        assert isinstance(backend, ClosedFormBackend if fast else AutogradBackend)
        model.learn(96)
        params[fast] = {name: p.detach().clone() for name, p in model.policy.named_parameters()}
    for name, value in params[True].items():
        th.testing.assert_close(value, params[False][name], rtol=1e-4, atol=1e-5, msg=name)


def test_saved_masked_model_predicts_the_same(tmp_path) -> None:
    env = InvalidActionEnvDiscrete(dim=8, n_invalid_actions=4)
    model = ClippedPPO("MlpPolicy", env, seed=0, **TINY)
    model.learn(64)
    model.save(tmp_path / "masked")
    loaded = ClippedPPO.load(tmp_path / "masked", device="cpu")
    rng = np.random.default_rng(0)
    obs = np.stack([env.observation_space.sample() for _ in range(16)])
    masks = _random_masks(rng, 16, [8])
    ours, _ = model.predict(obs, action_masks=masks, deterministic=True)
    theirs, _ = loaded.predict(obs, action_masks=masks, deterministic=True)
    np.testing.assert_array_equal(ours, theirs)
    assert masks[np.arange(16), ours].all()


def test_two_logit_multibinary_policy_trains_masked_and_survives_save_load(tmp_path) -> None:
    env = InvalidActionEnvMultiBinary(dims=4, n_invalid_actions=2)
    model = ClippedPPO("MlpPolicy", env, seed=0, policy_kwargs=dict(multibinary_head="categorical"), **TINY)
    assert model.policy.action_net.out_features == 8
    model.learn(64)
    actions = model.rollout_buffer.actions.reshape(32, 4).astype(int)
    masks = model.rollout_buffer.action_masks.reshape(32, 8)
    for bit in range(4):
        assert masks[np.arange(32), 2 * bit + actions[:, bit]].all()
    model.save(tmp_path / "two_logits")
    loaded = ClippedPPO.load(tmp_path / "two_logits", device="cpu")
    assert loaded.policy.multibinary_head == "categorical"
    obs = np.stack([env.observation_space.sample() for _ in range(16)])
    masks = _random_masks(np.random.default_rng(0), 16, [2] * 4)
    ours, _ = model.predict(obs, action_masks=masks, deterministic=True)
    theirs, _ = loaded.predict(obs, action_masks=masks, deterministic=True)
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize(
    ("env", "value", "match"),
    [
        (InvalidActionEnvMultiBinary(dims=4, n_invalid_actions=2), "softmax", "is not one of"),
        (InvalidActionEnvDiscrete(dim=8, n_invalid_actions=4), "categorical", "applies to MultiBinary"),
    ],
)
def test_bad_multibinary_head_is_refused(env, value, match) -> None:
    with pytest.raises(ValueError, match=match):
        ClippedPPO("MlpPolicy", env, policy_kwargs=dict(multibinary_head=value), **TINY)


class _ImageMaskedEnv(gym.Env):
    """A 36x36 grey image showing which of 4 actions pays; the masks rule out 2 others at random."""

    observation_space = spaces.Box(0, 255, (36, 36, 1), np.uint8)
    action_space = spaces.Discrete(4)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self._observe(), {}

    def _observe(self) -> np.ndarray:
        self.target = int(self.np_random.integers(4))
        others = self.np_random.permutation([a for a in range(4) if a != self.target])
        self.masks = np.ones(4, dtype=bool)
        self.masks[others[:2]] = False
        return np.full((36, 36, 1), 60 * self.target, dtype=np.uint8)

    def step(self, action):
        if not self.masks[int(action)]:
            raise AssertionError(f"masked action {action} taken with masks {self.masks}")
        reward = float(int(action) == self.target)
        return self._observe(), reward, False, False, {}

    def action_masks(self) -> np.ndarray:
        return self.masks.copy()


def test_masks_with_cnn_policy() -> None:
    env = make_vec_env(_ImageMaskedEnv, n_envs=2, seed=0)
    model = ClippedPPO("CnnPolicy", env, seed=0, **TINY)
    model.learn(128)  # the env raises on a masked action
    masks = model.rollout_buffer.action_masks.reshape(64, 4)
    assert masks[np.arange(64), model.rollout_buffer.actions.reshape(64).astype(int)].all()
    obs = env.reset()
    action_masks = np.array(env.env_method("action_masks"))
    for _ in range(10):
        actions, _ = model.predict(obs, action_masks=action_masks)
        assert action_masks[np.arange(2), actions].all()


def test_sb3_contrib_evaluate_policy_works_with_clippedppo() -> None:
    model = ClippedPPO("MlpPolicy", InvalidActionEnvDiscrete(dim=8, n_invalid_actions=4), seed=0, **TINY)
    model.learn(64)
    mean, _ = evaluate_policy(model, InvalidActionEnvDiscrete(dim=8, n_invalid_actions=4), n_eval_episodes=2)
    assert np.isfinite(mean)


@pytest.mark.slow
def test_learns_the_invalid_action_env_as_maskableppo_does() -> None:
    kwargs = dict(n_steps=128, batch_size=64, seed=0, device="cpu", learning_rate=3e-3)
    scores = {}
    for algo in (ClippedPPO, MaskablePPO):
        env = make_vec_env(InvalidActionEnvDiscrete, n_envs=4, seed=0, env_kwargs=dict(dim=12, n_invalid_actions=8))
        model = algo("MlpPolicy", env, **kwargs)
        model.learn(12_000)  # both at 100 on seeds 0-2; at 6k both sit at 86-96, seed to seed
        eval_env = InvalidActionEnvDiscrete(dim=12, n_invalid_actions=8)
        eval_env.reset(seed=0)  # the evaluation episodes are the same for both algorithms and every run
        scores[algo.__name__], _ = evaluate_policy(model, eval_env, n_eval_episodes=5, deterministic=True)
    # an episode is 100 steps with reward 1 per correct action; chance with the masks is 1 in 4
    assert scores["ClippedPPO"] >= 95
    assert scores["ClippedPPO"] >= scores["MaskablePPO"] - 5


# -- errors ------------------------------------------------------------------------------------------------


def test_policy_without_masks_is_refused_at_construction() -> None:
    with pytest.raises(ConfigurationError, match="cannot apply the invalid-action masks"):
        ClippedPPO(SB3ActorCriticPolicy, InvalidActionEnvDiscrete(dim=8, n_invalid_actions=4), **TINY)


@pytest.mark.parametrize(
    ("masks", "match"),
    [
        (np.ones((2, 7), dtype=bool), "shape"),
        (np.zeros((2, 8), dtype=bool), "no valid action"),
        (np.full((2, 8), np.nan), "booleans"),
        (np.full((2, 8), 0.5), "booleans"),
    ],
    ids=["wrong-length", "none-valid", "nan", "not-binary"],
)
def test_bad_masks_get_clear_errors(masks: np.ndarray, match: str) -> None:
    with pytest.raises(ActionMaskError, match=match):
        check_action_masks(masks, spaces.Discrete(8), 2, step=3)


def test_multidiscrete_subspace_without_valid_action_is_named() -> None:
    masks = np.array([[True, False, False, False, False]])
    with pytest.raises(ActionMaskError, match="sub-space 1"):
        check_action_masks(masks, spaces.MultiDiscrete([2, 3]), 1, step=0)


class _BadMaskEnv(gym.Wrapper):
    def action_masks(self) -> np.ndarray:
        return np.zeros(self.action_space.n, dtype=bool)


def test_an_env_returning_an_all_false_mask_stops_the_rollout_with_env_and_step() -> None:
    env = make_vec_env("CartPole-v1", n_envs=2, wrapper_class=_BadMaskEnv)
    model = ClippedPPO("MlpPolicy", env, **TINY)
    with pytest.raises(ActionMaskError, match=r"Env 0 .* at rollout step 0 .* no valid action"):
        model.learn(64)


# -- interoperability ----------------------------------------------------------------------------------------


class _DictObsMaskedEnv(gym.ObservationWrapper):
    """InvalidActionEnvDiscrete with a Dict observation (the state and a constant), masks passed through."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.observation_space = spaces.Dict(
            {"state": env.observation_space, "bias": spaces.Box(-1.0, 1.0, (1,), dtype=np.float32)}
        )

    def observation(self, observation):
        return {"state": observation, "bias": np.ones(1, dtype=np.float32)}

    def action_masks(self):
        return self.env.unwrapped.action_masks()


def _masked_env_fn() -> gym.Env:
    return InvalidActionEnvDiscrete(dim=8, n_invalid_actions=4)


def test_masks_through_subproc_and_vecnormalize() -> None:
    from stable_baselines3.common.vec_env import SubprocVecEnv, VecNormalize

    env = VecNormalize(make_vec_env(_masked_env_fn, n_envs=2, vec_env_cls=SubprocVecEnv), norm_obs=False)
    try:
        model = ClippedPPO("MlpPolicy", env, seed=0, **TINY)
        model.learn(64)
        masks = model.rollout_buffer.action_masks
        assert masks is not None and masks.shape == (32, 2, 8)
        actions = model.rollout_buffer.actions.reshape(64).astype(int)
        assert masks.reshape(64, 8)[np.arange(64), actions].all()
    finally:
        env.close()


def test_masks_with_dict_observations() -> None:
    model = ClippedPPO("MultiInputPolicy", _DictObsMaskedEnv(_masked_env_fn()), seed=0, **TINY)
    model.learn(64)
    masks = model.rollout_buffer.action_masks.reshape(32, 8)
    assert masks[np.arange(32), model.rollout_buffer.actions.reshape(32).astype(int)].all()


def test_maskable_eval_callback_runs_with_clippedppo() -> None:
    from sb3_contrib.common.maskable.callbacks import MaskableEvalCallback

    callback = MaskableEvalCallback(_masked_env_fn(), eval_freq=32, n_eval_episodes=1, warn=False)
    model = ClippedPPO("MlpPolicy", _masked_env_fn(), seed=0, **TINY)
    model.learn(64, callback=callback)
    assert callback.last_mean_reward > -np.inf


def test_box_actions_with_masks_get_a_clear_error() -> None:
    class BoxMasks(gym.Wrapper):
        def action_masks(self):
            return np.ones(2, dtype=bool)

    model = ClippedPPO("MlpPolicy", make_vec_env("Pendulum-v1", n_envs=1, wrapper_class=BoxMasks), **TINY)
    with pytest.raises(ActionMaskError, match="use_masking=False"):
        model.learn(64)
    model.learn(64, use_masking=False)
