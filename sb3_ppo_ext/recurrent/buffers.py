"""Rollout buffers of recurrent policies: LSTM states per step, minibatches of whole sequences."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, NamedTuple

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.vec_env import VecNormalize

from sb3_ppo_ext.buffers import DictGAERolloutBuffer, GAERolloutBuffer
from sb3_ppo_ext.recurrent.sequences import LSTMStates, Sequences, segment_starts


class SequenceSamples(NamedTuple):
    """A minibatch of sequences: the flat per-step fields (as SB3's samples) plus their :class:`Sequences`."""

    observations: Any
    actions: th.Tensor
    old_values: th.Tensor
    old_log_prob: th.Tensor
    advantages: th.Tensor
    returns: th.Tensor
    action_masks: th.Tensor | None
    sequences: Sequences


class RecurrentGAERolloutBuffer(GAERolloutBuffer):
    """:class:`GAERolloutBuffer` that also keeps each step's LSTM states and hands out minibatches of sequences.

    Each env's timeline is cut into segments at episode starts (and every ``sequence_length`` steps when
    given); every epoch shuffles the segments, lays them end to end and cuts that stream into minibatches
    of ``batch_size`` steps, splitting a segment where a minibatch ends. A sequence that begins an episode
    starts from zero states; any other from the states the rollout stored for its first step.

    :param buffer_size: steps per env per rollout (``n_steps``).
    :param observation_space: observation space.
    :param action_space: action space.
    :param device: where minibatches are placed.
    :param gae_lambda: GAE's lambda.
    :param gamma: discount factor.
    :param n_envs: parallel envs.
    :param channels_last: image minibatches in NHWC memory layout (see :class:`~sb3_ppo_ext.buffers.GAERolloutBuffer`).
    :param sequence_length: longest sequence (truncated backpropagation through time); ``None``: as long
        as the episode, the rollout and the minibatch allow, as in sb3-contrib's ``RecurrentRolloutBuffer``.
    """

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
        sequence_length: int | None = None,
    ) -> None:
        if sequence_length is not None and sequence_length < 1:
            raise ValueError(f"sequence_length must be None or >= 1, got {sequence_length}.")
        self.sequence_length = sequence_length
        super().__init__(buffer_size, observation_space, action_space, device, gae_lambda, gamma, n_envs, channels_last)

    def reset(self) -> None:
        """Allocate empty storage; the state storage is sized by the first ``add``."""
        super().reset()
        # [n_steps, n_envs, 4 (pi h, pi c, vf h, vf c), n_layers, hidden]: the states *before* each step
        self.lstm_states: np.ndarray | None = None
        self._flat_states: th.Tensor | None = None

    def add(  # type: ignore[override]
        self,
        obs: Any,
        action: np.ndarray,
        reward: np.ndarray,
        episode_start: np.ndarray,
        value: th.Tensor,
        log_prob: th.Tensor,
        action_masks: np.ndarray | None = None,
        lstm_states: LSTMStates | None = None,
    ) -> None:
        """Store one step (see :meth:`GAERolloutBuffer.add`) and ``lstm_states``, the states the step was taken from.

        :param obs: observations ``s_t``.
        :param action: actions ``a_t``.
        :param reward: rewards ``r_t``.
        :param episode_start: True where ``s_t`` starts an episode.
        :param value: values ``V(s_t)``.
        :param log_prob: ``log pi(a_t|s_t)``.
        :param action_masks: the step's invalid-action masks, or None.
        :param lstm_states: the actor's and critic's LSTM states before the step.
        """
        if lstm_states is None:
            raise ValueError(f"{type(self).__name__}.add() needs lstm_states: the states the step's actions came from.")
        # [4, n_layers, n_envs, hidden] -> [n_envs, 4, n_layers, hidden]
        stacked = th.stack((*lstm_states.pi, *lstm_states.vf)).permute(2, 0, 1, 3).cpu().numpy()
        if self.lstm_states is None:
            self.lstm_states = np.zeros((self.buffer_size, *stacked.shape), dtype=np.float32)
        self.lstm_states[self.pos] = stacked
        super().add(obs, action, reward, episode_start, value, log_prob, action_masks)

    def get(self, batch_size: int | None = None) -> Generator[SequenceSamples, None, None]:  # type: ignore[override]
        """Yield minibatches of about ``batch_size`` steps, as whole or split segments, covering the rollout once.

        :param batch_size: steps per minibatch; None: the whole rollout.
        :return: a generator of minibatches, each with its :class:`~sb3_ppo_ext.recurrent.sequences.Sequences`.
        """
        assert self.full, "The rollout buffer must be full before sampling from it."
        if not self.generator_ready:
            self._prepare()
            self.generator_ready = True
        total = self.buffer_size * self.n_envs
        batch_size = total if batch_size is None else batch_size
        rows, begins = self._shuffled_stream()
        for start in range(0, total, batch_size):
            yield self._sequence_samples(rows[start : start + batch_size], begins[start : start + batch_size])

    def _prepare(self) -> None:
        """The rollout as flat tensors (fields, observations and states), once per rollout."""
        self._flat_obs, self._flat = self._flat_fields()
        if self.lstm_states is None:
            raise ValueError(f"{type(self).__name__} holds no LSTM states: fill it with add(..., lstm_states=...).")
        flat_states = self.lstm_states.reshape(-1, *self.lstm_states.shape[2:])
        self._flat_states = th.as_tensor(flat_states, device=self.device)

    def _shuffled_stream(self) -> tuple[np.ndarray, np.ndarray]:
        """Every row once, segment after segment in random order; and where each segment begins."""
        # rows are flat time-major indices (t * n_envs + env), as in the flat fields
        starts = segment_starts(self.episode_starts, self.sequence_length).T.reshape(-1)  # env after env
        steps, envs = np.arange(self.buffer_size), np.arange(self.n_envs)
        env_major_rows = (steps[None, :] * self.n_envs + envs[:, None]).reshape(-1)
        first = np.flatnonzero(starts)
        lengths = np.diff(np.append(first, starts.size))
        order = th.randperm(len(first)).numpy()
        first, lengths = first[order], lengths[order]
        # position in the env-major timeline of every element of the shuffled stream
        shift = np.repeat(first - (np.cumsum(lengths) - lengths), lengths)
        positions = np.arange(starts.size) + shift
        return env_major_rows[positions], starts[positions]

    def _sequence_samples(self, rows: np.ndarray, begins: np.ndarray) -> SequenceSamples:
        """The minibatch of ``rows`` (consecutive within a sequence); ``begins`` marks where sequences begin."""
        begins = begins.copy()
        begins[0] = True
        first_rows = rows[begins]
        index = th.as_tensor(rows, dtype=th.long, device=self.device)
        assert self._flat_states is not None
        first = self._flat_states.index_select(0, th.as_tensor(first_rows, dtype=th.long, device=self.device))
        # [K, 4, n_layers, hidden] -> 4 x [n_layers, K, hidden]
        h_pi, c_pi, h_vf, c_vf = first.permute(1, 2, 0, 3)
        reset = self.episode_starts.reshape(-1)[first_rows] > 0
        sequences = Sequences.from_starts(begins, LSTMStates((h_pi, c_pi), (h_vf, c_vf)), reset)
        fields = [self._flat[name].index_select(0, index) for name in self._field_names]
        masks = self._flat["action_masks"].index_select(0, index) if "action_masks" in self._flat else None
        return SequenceSamples(self._take(self._flat_obs, index), *fields, masks, sequences)

    def _get_samples(self, batch_inds: np.ndarray, env: VecNormalize | None = None) -> SequenceSamples:  # type: ignore[override]
        """Minibatch for explicit flat indices (SB3's ``BaseBuffer`` API).

        A new sequence begins wherever two indices are not one step apart in the same env, or an episode starts.
        """
        rows = np.asarray(batch_inds, dtype=np.int64)
        self._prepare()
        begins = self.episode_starts.reshape(-1)[rows] > 0
        begins[1:] |= rows[1:] != rows[:-1] + self.n_envs
        return self._sequence_samples(rows, begins)


class RecurrentDictGAERolloutBuffer(RecurrentGAERolloutBuffer, DictGAERolloutBuffer):
    """:class:`RecurrentGAERolloutBuffer` for ``Dict`` observation spaces."""
