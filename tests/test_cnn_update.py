"""The Atari path's update: ClippedPPO's CnnPolicy on SB3's rollout gives SB3 PPO's gradients."""

from __future__ import annotations

import copy

import torch as th
from conftest import collect_rollout, recording_logger
from stable_baselines3 import PPO
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.envs import FakeImageEnv
from stable_baselines3.common.vec_env import VecFrameStack

from sb3_ppo_ext import ClippedPPO


def _frames() -> VecFrameStack:
    """Random 84x84 frames, stacked by 4 (the frames come from the observation space's own generator)."""
    envs = make_vec_env(lambda: FakeImageEnv(action_dim=6), n_envs=2, seed=0)
    for i, env in enumerate(envs.envs):
        env.observation_space.seed(i)
    return VecFrameStack(envs, n_stack=4)


def _gradients_at_the_step(model) -> dict[str, th.Tensor]:
    """One ``train()`` (one epoch of one minibatch); the clipped gradients the optimizer was handed."""
    seen: dict[str, th.Tensor] = {}
    optimizer, step = model.policy.optimizer, model.policy.optimizer.step

    def recording_step(*args, **kwargs):
        for name, param in model.policy.named_parameters():
            if param.grad is not None:
                seen[name] = param.grad.detach().double().clone()
        return step(*args, **kwargs)

    optimizer.step = recording_step
    logger, _ = recording_logger()
    model.set_logger(logger)
    model.train()
    return seen


def test_cnn_policy_gradients_equal_sb3_ppo_on_the_same_rollout() -> None:
    """NatureCNN on stacked 84x84 frames (NHWC convolutions, oneDNN matrix product): SB3's gradients.

    The whole rollout is the one minibatch, so the shuffling order cannot matter. The dense layers must agree to
    float rounding. The convolutions may differ more: a ReLU input within rounding of zero (about one in 200k here)
    can fall on the other side of the kink in one library, which moves the convolution gradients by ~1e-3 of their
    scale; a wrong layout or gather would move them by O(1).
    """
    common = dict(n_steps=32, batch_size=64, n_epochs=1, seed=0, learning_rate=2.5e-4, clip_range=0.1, ent_coef=0.01)
    sb3 = PPO("CnnPolicy", _frames(), **common)
    ours = ClippedPPO("CnnPolicy", _frames(), rollout_buffer_class=RolloutBuffer, vf_clip_mode="sb3", **common)
    assert ours.policy.channels_last and ours.policy.onednn_matmul  # the fast paths are the ones checked
    ours.policy.load_state_dict(sb3.policy.state_dict())
    collect_rollout(sb3, 64)
    ours.rollout_buffer = copy.deepcopy(sb3.rollout_buffer)

    expected = _gradients_at_the_step(sb3)
    got = _gradients_at_the_step(ours)
    assert set(got) == set(expected) and len(expected) == 12
    for name, grad in expected.items():
        scale = grad.abs().max().item()
        assert scale > 0, name
        error = (got[name] - grad).abs().max().item() / scale
        bound = 2e-2 if ".cnn." in name else 1e-4
        assert error < bound, f"{name}: relative error {error:.1e}"
