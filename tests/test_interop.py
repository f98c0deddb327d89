"""Drop-in behaviour with SB3's callbacks, VecEnv wrappers, helpers, logging and buffers."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from conftest import TINY, DictObsEnv, params_changed, params_of
from stable_baselines3 import PPO
from stable_baselines3.common.buffers import DictRolloutBuffer, RolloutBuffer
from stable_baselines3.common.callbacks import (
    BaseCallback,
    CallbackList,
    CheckpointCallback,
    EvalCallback,
    StopTrainingOnRewardThreshold,
)
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import (
    DummyVecEnv,
    SubprocVecEnv,
    VecFrameStack,
    VecMonitor,
    VecNormalize,
)

from sb3_ppo_ext import ClippedPPO


class CountingCallback(BaseCallback):
    """Counts every hook SB3 calls."""

    def __init__(self) -> None:
        super().__init__()
        self.counts = dict(training_start=0, rollout_start=0, step=0, rollout_end=0, training_end=0)
        self.timesteps_at_step: list[int] = []

    def _on_training_start(self) -> None:
        self.counts["training_start"] += 1

    def _on_rollout_start(self) -> None:
        self.counts["rollout_start"] += 1

    def _on_step(self) -> bool:
        self.counts["step"] += 1
        self.timesteps_at_step.append(self.num_timesteps)
        assert {"rewards", "dones", "infos", "new_obs"} <= set(self.locals)
        return True

    def _on_rollout_end(self) -> None:
        self.counts["rollout_end"] += 1

    def _on_training_end(self) -> None:
        self.counts["training_end"] += 1


class StopAt(BaseCallback):
    """Returns False from its ``n``-th step."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def _on_step(self) -> bool:
        return self.n_calls < self.n


def cartpole(n_envs: int = 2, seed: int = 0, **kwargs):
    return make_vec_env("CartPole-v1", n_envs=n_envs, seed=seed, **kwargs)


# -- callbacks -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", [ClippedPPO, PPO], ids=["ClippedPPO", "sb3-PPO"])
def test_custom_callback_fires_expected_number_of_times(algo: type) -> None:
    callback = CountingCallback()
    model = algo("MlpPolicy", cartpole(2), n_steps=16, batch_size=16, n_epochs=1, seed=0)
    model.learn(96, callback=callback)
    # 3 rollouts of 16 vectorised steps (2 envs)
    assert callback.counts == dict(training_start=1, rollout_start=3, step=48, rollout_end=3, training_end=1)
    assert callback.timesteps_at_step[:3] == [2, 4, 6]
    assert callback.model is model


def test_callback_returning_false_stops_training() -> None:
    model = ClippedPPO("MlpPolicy", cartpole(2), n_steps=16, batch_size=16, n_epochs=1, seed=0)
    counter = CountingCallback()
    model.learn(10_000, callback=[StopAt(5), counter])  # a plain list becomes a CallbackList
    assert model.num_timesteps == 10
    assert counter.counts["step"] == 5 and counter.counts["training_end"] == 1
    assert model._n_updates == 0


def test_callback_list_eval_and_checkpoint_counts(tmp_path: Path) -> None:
    eval_env = cartpole(1, seed=10)
    eval_callback = EvalCallback(
        eval_env, eval_freq=16, n_eval_episodes=2, log_path=str(tmp_path / "eval"), best_model_save_path=str(tmp_path)
    )
    checkpoint = CheckpointCallback(save_freq=16, save_path=str(tmp_path / "ckpt"), name_prefix="m")
    counter = CountingCallback()
    model = ClippedPPO("MlpPolicy", cartpole(2), n_steps=16, batch_size=16, n_epochs=1, seed=0)
    model.learn(96, callback=CallbackList([eval_callback, checkpoint, counter]))
    # 48 vectorised steps, every 16th: 3 evaluations and 3 checkpoints
    assert eval_callback.evaluations_timesteps == [32, 64, 96]
    assert len(eval_callback.evaluations_results) == 3
    assert all(len(r) == 2 for r in eval_callback.evaluations_results)
    assert (tmp_path / "eval" / "evaluations.npz").exists()
    assert (tmp_path / "best_model.zip").exists()
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["m_32_steps.zip", "m_64_steps.zip", "m_96_steps.zip"]
    assert counter.counts["step"] == 48
    restored = ClippedPPO.load(tmp_path / "ckpt" / "m_64_steps.zip")
    assert restored.num_timesteps == 64


def test_stop_training_on_reward_threshold_stops_after_first_evaluation() -> None:
    stop = StopTrainingOnRewardThreshold(reward_threshold=-1.0)  # any CartPole return clears it
    eval_callback = EvalCallback(cartpole(1, seed=10), eval_freq=8, n_eval_episodes=1, callback_on_new_best=stop)
    model = ClippedPPO("MlpPolicy", cartpole(2), n_steps=16, batch_size=16, n_epochs=1, seed=0)
    model.learn(10_000, callback=eval_callback)
    assert model.num_timesteps == 16  # 8 vectorised steps of 2 envs, then stop
    assert stop.n_calls == 1
    assert eval_callback.best_mean_reward > -1.0


# -- VecEnvs -------------------------------------------------------------------------------------------------


def test_subproc_vec_env_trains() -> None:
    env = make_vec_env("CartPole-v1", n_envs=2, seed=0, vec_env_cls=SubprocVecEnv)
    try:
        model = ClippedPPO("MlpPolicy", env, seed=0, **TINY)
        before = params_of(model)
        model.learn(128)
        assert params_changed(before, model)
        assert model.num_timesteps == 128
    finally:
        env.close()


def test_dummy_vec_env_and_plain_gym_env_are_accepted() -> None:
    model = ClippedPPO("MlpPolicy", DummyVecEnv([lambda: gym.make("CartPole-v1")] * 3), seed=0, **TINY)
    assert model.n_envs == 3
    plain = ClippedPPO("MlpPolicy", gym.make("CartPole-v1"), seed=0, **TINY)
    assert isinstance(plain.get_env(), DummyVecEnv) and plain.n_envs == 1
    plain.learn(64)
    assert plain.num_timesteps == 64


def test_env_id_string() -> None:
    model = ClippedPPO("MlpPolicy", "CartPole-v1", seed=0, **TINY)
    assert model.get_env().num_envs == 1
    assert model.observation_space.shape == (4,)
    model.learn(64)
    assert model.num_timesteps == 64


def test_vec_normalize_statistics_update_and_are_used(tmp_path: Path) -> None:
    env = VecNormalize(cartpole(2), gamma=0.99)
    model = ClippedPPO("MlpPolicy", env, seed=0, **TINY)
    model.learn(128)
    assert env.obs_rms.count > 128
    assert model.get_vec_normalize_env() is env
    # the buffer holds normalised observations
    assert np.abs(model.rollout_buffer.observations.mean()) < 1.0
    env.save(str(tmp_path / "vecnorm.pkl"))
    model.save(tmp_path / "model")
    eval_env = VecNormalize.load(str(tmp_path / "vecnorm.pkl"), cartpole(1, seed=1))
    eval_env.training, eval_env.norm_reward = False, False
    loaded = ClippedPPO.load(tmp_path / "model", env=eval_env)
    mean, _ = evaluate_policy(loaded, eval_env, n_eval_episodes=2)
    assert mean > 0
    np.testing.assert_array_equal(eval_env.obs_rms.mean, env.obs_rms.mean)


def test_vec_frame_stack_trains_on_stacked_observations() -> None:
    env = VecFrameStack(cartpole(2), n_stack=3)
    model = ClippedPPO("MlpPolicy", env, seed=0, **TINY)
    assert model.observation_space.shape == (12,)
    assert model.policy.mlp_extractor.policy_net[0].in_features == 12
    model.learn(128)
    assert model.rollout_buffer.observations.shape == (32, 2, 12)


def test_vec_monitor_fills_episode_statistics() -> None:
    env = VecMonitor(DummyVecEnv([lambda: gym.make("CartPole-v1")] * 2))
    model = ClippedPPO("MlpPolicy", env, seed=0, n_steps=64, batch_size=64, n_epochs=1)
    model.learn(256)
    assert len(model.ep_info_buffer) > 0
    assert all(set(info) >= {"r", "l", "t"} for info in model.ep_info_buffer)
    assert all(info["r"] == info["l"] for info in model.ep_info_buffer)  # CartPole pays 1 per step


def test_make_vec_env_with_monitor_and_dict_env() -> None:
    env = make_vec_env(DictObsEnv, n_envs=2, seed=0)
    assert isinstance(env.envs[0], Monitor)
    model = ClippedPPO("MultiInputPolicy", env, seed=0, **TINY)
    model.learn(128)
    assert len(model.ep_info_buffer) > 0


# -- evaluation and prediction -------------------------------------------------------------------------------


def test_evaluate_policy_returns_episode_statistics() -> None:
    model = ClippedPPO("MlpPolicy", cartpole(1), seed=0, **TINY)
    mean, std = evaluate_policy(model, cartpole(1, seed=5), n_eval_episodes=3)
    assert isinstance(mean, float) and mean > 0 and std >= 0
    rewards, lengths = evaluate_policy(model, cartpole(1, seed=5), n_eval_episodes=3, return_episode_rewards=True)
    assert len(rewards) == len(lengths) == 3 and rewards == [float(n) for n in lengths]


def test_predict_deterministic_with_and_without_vec_env() -> None:
    model = ClippedPPO("MlpPolicy", cartpole(3), seed=0, **TINY)
    vec_obs = model.get_env().reset()
    actions, state = model.predict(vec_obs, deterministic=True)
    assert actions.shape == (3,) and state is None
    with th.no_grad():
        probs = model.policy.get_distribution(th.as_tensor(vec_obs)).distribution.probs
    np.testing.assert_array_equal(actions, probs.argmax(dim=1).numpy())
    again, _ = model.predict(vec_obs, deterministic=True)
    np.testing.assert_array_equal(actions, again)
    # a single observation from a plain gym env gives a single action
    single_obs, _ = gym.make("CartPole-v1").reset(seed=0)
    action, _ = model.predict(single_obs, deterministic=True)
    assert np.asarray(action).shape == ()
    assert model.action_space.contains(int(action))
    # the same observation inside a batch gives the same deterministic action
    batch_action, _ = model.predict(single_obs[None], deterministic=True)
    assert batch_action[0] == action


def test_predict_stochastic_samples_vary_and_continuous_actions_are_clipped() -> None:
    model = ClippedPPO("MlpPolicy", cartpole(1), seed=0, **TINY)
    obs = np.zeros((200, 4), dtype=np.float32)
    actions, _ = model.predict(obs, deterministic=False)
    assert 0 < actions.sum() < 200  # near-uniform initial policy: both actions appear
    pendulum = ClippedPPO("MlpPolicy", "Pendulum-v1", seed=0, policy_kwargs=dict(log_std_init=2.0), **TINY)
    actions, _ = pendulum.predict(np.zeros((100, 3), dtype=np.float32), deterministic=False)
    assert actions.min() >= -2.0 and actions.max() <= 2.0
    assert (np.abs(actions) == 2.0).any()  # std e^2: many samples clipped to the bounds


# -- logging -------------------------------------------------------------------------------------------------


def test_tensorboard_logging_writes_event_files(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = ClippedPPO("MlpPolicy", cartpole(2), seed=0, tensorboard_log=str(tmp_path), **TINY)
    model.learn(192, tb_log_name="run")
    model.learn(64, tb_log_name="run", reset_num_timesteps=False)
    runs = sorted(os.listdir(tmp_path))
    assert runs == ["run_1"]  # continuing a run keeps its folder
    events = glob.glob(str(tmp_path / "run_1" / "events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(str(tmp_path / "run_1"))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"train/loss", "train/value_loss", "train/approx_kl", "time/fps"} <= tags
    assert "train/n_updates" not in tags  # excluded from tensorboard, as in SB3
    new_run = ClippedPPO("MlpPolicy", cartpole(2), seed=0, tensorboard_log=str(tmp_path), **TINY)
    new_run.learn(64)
    assert "ClippedPPO_1" in os.listdir(tmp_path)


@pytest.mark.filterwarnings("ignore::tqdm.TqdmExperimentalWarning")
def test_progress_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    from stable_baselines3.common.callbacks import ProgressBarCallback

    updates = []
    original = ProgressBarCallback._on_step
    monkeypatch.setattr(ProgressBarCallback, "_on_step", lambda self: updates.append(1) or original(self))
    model = ClippedPPO("MlpPolicy", cartpole(2), seed=0, **TINY)
    model.learn(128, progress_bar=True)
    assert model.num_timesteps == 128
    assert len(updates) == 64  # the bar advanced on every vectorised step


def test_verbose_prints_sb3_style_table(capsys: pytest.CaptureFixture[str]) -> None:
    model = ClippedPPO("MlpPolicy", cartpole(2), seed=0, verbose=1, **TINY)
    model.learn(192)
    out = capsys.readouterr().out
    # SB3's human format: keys grouped under their prefix
    assert "| train/" in out and "| rollout/" in out and "| time/" in out
    assert "approx_kl" in out and "total_timesteps" in out


# -- SB3's buffers -------------------------------------------------------------------------------------------


def test_sb3_rollout_buffer_class_trains() -> None:
    model = ClippedPPO("MlpPolicy", cartpole(2), seed=0, rollout_buffer_class=RolloutBuffer, **TINY)
    assert type(model.rollout_buffer) is RolloutBuffer
    before = params_of(model)
    model.learn(128)
    assert params_changed(before, model)


def test_sb3_dict_rollout_buffer_class_trains() -> None:
    env = make_vec_env(DictObsEnv, n_envs=2, seed=0)
    model = ClippedPPO("MultiInputPolicy", env, seed=0, rollout_buffer_class=DictRolloutBuffer, **TINY)
    assert type(model.rollout_buffer) is DictRolloutBuffer
    before = params_of(model)
    model.learn(128)
    assert params_changed(before, model)


class _CountingBuffer(RolloutBuffer):
    """A user subclass of SB3's buffer with an extra constructor argument."""

    def __init__(self, *args, tag: str = "", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tag = tag
        self.computed = 0

    def compute_returns_and_advantage(self, last_values: th.Tensor, dones: np.ndarray) -> None:
        self.computed += 1
        super().compute_returns_and_advantage(last_values, dones)


def test_rollout_buffer_subclass_and_kwargs() -> None:
    model = ClippedPPO(
        "MlpPolicy",
        cartpole(2),
        seed=0,
        rollout_buffer_class=_CountingBuffer,
        rollout_buffer_kwargs=dict(tag="x"),
        **TINY,
    )
    model.learn(128)
    assert model.rollout_buffer.tag == "x"
    assert model.rollout_buffer.computed == 2
