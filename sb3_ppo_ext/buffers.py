"""Our GAE rollout buffers (flat and Dict observations; the recurrent ones are in :mod:`sb3_ppo_ext.recurrent.buffers`).

They subclass SB3's ``RolloutBuffer``/``DictRolloutBuffer`` (same interface, ``isinstance`` holds, so
:class:`~sb3_ppo_ext.ClippedPPO` also runs with SB3's buffers) but differ in how they hand data to
``train()``: the rollout becomes torch tensors once, each epoch permutes the per-step fields with one
gather each (minibatches are then contiguous slices, views), and observations, the one large field,
are gathered per minibatch so the rollout's frames are never copied whole.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from sb3_contrib.common.maskable.buffers import MaskableDictRolloutBufferSamples, MaskableRolloutBufferSamples
from stable_baselines3.common.buffers import BaseBuffer, DictRolloutBuffer, RolloutBuffer
from stable_baselines3.common.preprocessing import is_image_space
from stable_baselines3.common.type_aliases import DictRolloutBufferSamples, RolloutBufferSamples
from stable_baselines3.common.vec_env import VecNormalize

from sb3_ppo_ext.gae import compute_gae


def _stored_dtype(space: spaces.Space) -> np.dtype:
    """The dtype a rollout keeps observations of ``space`` in: float64 as float32, anything else as is.

    The policy reads a float Box as float32 (SB3's ``preprocess_obs``), so float64 storage (MuJoCo's spaces) only
    doubled the buffer and cost a conversion per minibatch (39 us of HalfCheetah's 1.2 ms step); SB3's own buffer
    keeps float32 too. The cast is the one ``.float()`` made: the same values.
    """
    dtype = np.dtype(space.dtype)
    return np.dtype(np.float32) if dtype == np.float64 else dtype


class GAERolloutBuffer(RolloutBuffer):
    """Rollout storage of shape ``[n_steps, n_envs]`` with GAE advantages (seed sections 4 and 5).

    :param buffer_size: steps per env per rollout (``n_steps``).
    :param observation_space: observation space.
    :param action_space: action space.
    :param device: where minibatches are placed.
    :param gae_lambda: GAE lambda.
    :param gamma: discount factor.
    :param n_envs: number of parallel environments.
    :param channels_last: hand out image minibatches in NHWC memory layout (same values, same shape);
        ``None``: when the observation space is an image space (SB3's ``is_image_space``).
    """

    observations: Any
    _field_names = ("actions", "values", "log_probs", "advantages", "returns")
    _scalar_fields = ("values", "log_probs", "advantages", "returns")

    def __init__(
        self,
        buffer_size: int,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        device: th.device | str = "auto",
        gae_lambda: float = 1.0,
        gamma: float = 0.99,
        n_envs: int = 1,
        channels_last: bool | None = None,
    ) -> None:
        # RolloutBuffer.__init__ (DictRolloutBuffer's for the Dict variant) stores the arguments and
        # calls our reset()
        super().__init__(buffer_size, observation_space, action_space, device, gae_lambda, gamma, n_envs)
        # ClippedPPO's policies run convolutions in NHWC (faster on CPUs): image observations handed out
        # in that layout cost one transpose per rollout instead of one per minibatch
        self.channels_last = is_image_space(observation_space) if channels_last is None else bool(channels_last)

    def _new_observations(self) -> Any:
        return np.zeros((self.buffer_size, self.n_envs, *self.obs_shape), dtype=_stored_dtype(self.observation_space))

    def reset(self) -> None:
        """Allocate empty storage (called at the start of every rollout)."""
        shape = (self.buffer_size, self.n_envs)
        self.observations = self._new_observations()
        action_dtype = np.float32 if np.dtype(self.action_space.dtype) == np.float64 else self.action_space.dtype
        self.actions = np.zeros((*shape, self.action_dim), dtype=action_dtype)
        self.rewards = np.zeros(shape, dtype=np.float32)
        self.returns = np.zeros(shape, dtype=np.float32)
        self.episode_starts = np.zeros(shape, dtype=np.float32)
        self.values = np.zeros(shape, dtype=np.float32)
        self.log_probs = np.zeros(shape, dtype=np.float32)
        self.advantages = np.zeros(shape, dtype=np.float32)
        # invalid-action masks [n_steps, n_envs, mask_size], allocated by the first add() that has some
        self.action_masks: np.ndarray | None = None
        self.generator_ready = False
        self._flat_obs: Any = None  # drop the last rollout's tensors before the next one fills up
        self._flat: dict[str, th.Tensor] = {}
        # BaseBuffer's, not RolloutBuffer's (or DictRolloutBuffer's) reset: the storage is allocated above
        BaseBuffer.reset(self)

    def _store_observation(self, obs: Any) -> None:
        self.observations[self.pos] = np.asarray(obs).reshape((self.n_envs, *self.obs_shape))

    def add(
        self,
        obs: Any,
        action: np.ndarray,
        reward: np.ndarray,
        episode_start: np.ndarray,
        value: th.Tensor,
        log_prob: th.Tensor,
        action_masks: np.ndarray | None = None,
    ) -> None:
        """Store one step of all envs: ``(s_t, a_t, r_t, episode_start_t, V(s_t), log pi(a_t|s_t))``.

        :param obs: ``[n_envs, *obs_shape]`` observations ``s_t``.
        :param action: ``[n_envs, *action_shape]`` actions ``a_t`` (unclipped).
        :param reward: ``[n_envs]`` rewards ``r_t``.
        :param episode_start: ``[n_envs]`` True where ``s_t`` starts an episode.
        :param value: ``[n_envs, 1]`` values ``V(s_t)``.
        :param log_prob: ``[n_envs]`` ``log pi(a_t|s_t)``.
        :param action_masks: the step's invalid-action masks ``[n_envs, mask_size]`` (sb3-contrib's
            ``MaskableRolloutBuffer`` argument); minibatches then carry them as ``action_masks``.
        """
        if action_masks is not None:
            masks = np.asarray(action_masks, dtype=bool).reshape(self.n_envs, -1)
            if self.action_masks is None:
                self.action_masks = np.ones((self.buffer_size, self.n_envs, masks.shape[1]), dtype=bool)
            self.action_masks[self.pos] = masks
        self._store_observation(obs)
        self.actions[self.pos] = np.asarray(action).reshape((self.n_envs, self.action_dim))
        self.rewards[self.pos] = reward
        self.episode_starts[self.pos] = episode_start
        self.values[self.pos] = value.detach().cpu().numpy().reshape(self.n_envs)
        self.log_probs[self.pos] = log_prob.detach().cpu().numpy().reshape(self.n_envs)
        self.pos += 1
        if self.pos == self.buffer_size:
            self.full = True

    def compute_returns_and_advantage(self, last_values: th.Tensor, dones: np.ndarray) -> None:
        """Fill ``advantages`` and ``returns`` with GAE, bootstrapping from ``last_values``.

        :param last_values: ``[n_envs, 1]`` values of the observations after the last step.
        :param dones: ``[n_envs]`` whether the last step ended each env's episode.
        """
        self.advantages, self.returns = compute_gae(
            self.rewards,
            self.values,
            self.episode_starts,
            last_values.detach().cpu().numpy().reshape(self.n_envs),
            np.asarray(dones, dtype=np.float32),
            self.gamma,
            self.gae_lambda,
        )
        self.generator_ready = False

    def _flat_observations(self) -> Any:
        obs = th.as_tensor(self.observations.reshape(-1, *self.obs_shape), device=self.device)
        if self.channels_last and obs.dim() == 4:
            return obs.contiguous(memory_format=th.channels_last)
        return obs

    def _flat_fields(self) -> tuple[Any, dict[str, th.Tensor]]:
        """The whole rollout as ``[n_steps * n_envs, ...]`` tensors (shared memory with numpy on CPU)."""
        fields = {name: th.as_tensor(getattr(self, name).reshape(-1)) for name in self._scalar_fields}
        fields["actions"] = th.as_tensor(self.actions.reshape(-1, self.action_dim))
        if self.action_masks is not None:
            fields["action_masks"] = th.as_tensor(self.action_masks.reshape(self.buffer_size * self.n_envs, -1))
        return self._flat_observations(), {name: fields[name].to(self.device) for name in self._names()}

    def _names(self) -> tuple[str, ...]:
        """The per-sample fields of a minibatch after the observations, in the samples' order."""
        return self._field_names + (("action_masks",) if self.action_masks is not None else ())

    @staticmethod
    def _take(obs: Any, index: th.Tensor) -> Any:
        # index_select copies whole rows; advanced indexing (obs[index]) was 10x slower on uint8 frames
        if isinstance(obs, dict):
            return {key: value.index_select(0, index) for key, value in obs.items()}
        if obs.dim() == 4 and not obs.is_contiguous() and obs.is_contiguous(memory_format=th.channels_last):
            # gather in the NHWC storage order, so the minibatch stays channels_last
            return obs.permute(0, 2, 3, 1).index_select(0, index).permute(0, 3, 1, 2)
        return obs.index_select(0, index)

    def get(self, batch_size: int | None = None) -> Generator[RolloutBufferSamples, None, None]:  # type: ignore[override]
        """Yield shuffled minibatches covering the rollout once (the last one may be smaller).

        :param batch_size: minibatch size; None: the whole rollout as one minibatch.
        :return: a generator of SB3's ``RolloutBufferSamples`` (with ``action_masks`` when the rollout has masks).
        """
        assert self.full, "The rollout buffer must be full before sampling from it."
        if not self.generator_ready:
            self._flat_obs, self._flat = self._flat_fields()
            self.generator_ready = True
        total = self.buffer_size * self.n_envs
        batch_size = total if batch_size is None else batch_size
        if batch_size >= total:
            # one minibatch holding the whole rollout: its losses are means, so order is irrelevant
            yield self._make_samples(self._flat_obs, *(self._flat[name] for name in self._names()))
            return
        permutation = th.randperm(total, device=self.device)
        fields = {name: tensor.index_select(0, permutation) for name, tensor in self._flat.items()}
        names = self._names()
        for start in range(0, total, batch_size):
            window = slice(start, start + batch_size)
            # observations are gathered per minibatch: no second copy of the whole rollout's frames
            yield self._make_samples(
                self._take(self._flat_obs, permutation[window]), *(fields[name][window] for name in names)
            )

    def _make_samples(self, *tensors: Any) -> RolloutBufferSamples:
        if self.action_masks is not None:
            return MaskableRolloutBufferSamples(*tensors)  # type: ignore[return-value]
        return RolloutBufferSamples(*tensors)

    def _get_samples(self, batch_inds: np.ndarray, env: VecNormalize | None = None) -> RolloutBufferSamples:
        """Minibatch for explicit flat indices (SB3's ``BaseBuffer`` API)."""
        index = th.as_tensor(batch_inds, dtype=th.long)
        obs, fields = self._flat_fields()
        return self._make_samples(self._take(obs, index), *(fields[name][index] for name in self._names()))


class DictGAERolloutBuffer(GAERolloutBuffer, DictRolloutBuffer):
    """:class:`GAERolloutBuffer` for ``Dict`` observation spaces: one array per key.

    An SB3 ``DictRolloutBuffer`` too; :class:`GAERolloutBuffer` comes first in the method order, so its
    storage, ``add`` and ``get`` are the ones used. ``channels_last`` does not apply to Dict observations.

    :param buffer_size: steps per env per rollout (``n_steps``).
    :param observation_space: a ``Dict`` space.
    :param action_space: action space.
    :param device: where minibatches are placed.
    :param gae_lambda: GAE's lambda.
    :param gamma: discount factor.
    :param n_envs: parallel envs.
    :param channels_last: ignored (no image layout for Dict spaces).
    """

    observation_space: spaces.Dict
    obs_shape: dict[str, tuple[int, ...]]  # type: ignore[assignment]

    def __init__(
        self,
        buffer_size: int,
        observation_space: spaces.Dict,
        action_space: spaces.Space,
        device: th.device | str = "auto",
        gae_lambda: float = 1.0,
        gamma: float = 0.99,
        n_envs: int = 1,
        channels_last: bool | None = None,
    ) -> None:
        if not isinstance(observation_space, spaces.Dict):
            raise TypeError(f"DictGAERolloutBuffer needs a Dict observation space, got {observation_space!r}.")
        super().__init__(buffer_size, observation_space, action_space, device, gae_lambda, gamma, n_envs, channels_last)

    def _new_observations(self) -> dict[str, np.ndarray]:
        return {
            key: np.zeros((self.buffer_size, self.n_envs, *shape), dtype=_stored_dtype(self.observation_space[key]))
            for key, shape in self.obs_shape.items()
        }

    def _store_observation(self, obs: dict[str, np.ndarray]) -> None:
        for key, shape in self.obs_shape.items():
            self.observations[key][self.pos] = np.asarray(obs[key]).reshape((self.n_envs, *shape))

    def _flat_observations(self) -> dict[str, th.Tensor]:
        return {
            key: th.as_tensor(value.reshape(-1, *self.obs_shape[key]), device=self.device)
            for key, value in self.observations.items()
        }

    def _make_samples(self, *tensors: Any) -> DictRolloutBufferSamples:  # type: ignore[override]
        if self.action_masks is not None:
            return MaskableDictRolloutBufferSamples(*tensors)  # type: ignore[return-value]
        return DictRolloutBufferSamples(*tensors)


def __getattr__(name: str) -> Any:
    # the recurrent buffers lived here: their old path (also in the files of models saved then) keeps working
    if name in ("RecurrentGAERolloutBuffer", "RecurrentDictGAERolloutBuffer", "SequenceSamples"):
        from sb3_ppo_ext.recurrent import buffers

        return getattr(buffers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
