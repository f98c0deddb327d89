"""The rollout layer of recurrent policies: each env's LSTM states carried from step to step."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.vec_env import VecEnv

from sb3_ppo_ext.extensions import Extension, RolloutStep
from sb3_ppo_ext.recurrent.sequences import LSTMStates

__all__ = ["RecurrentStates"]


class RecurrentStates(Extension):
    """Gives the policy each env's states and episode starts, stores the states, and moves them on.

    The states continue across rollouts (``model._last_lstm_states``, sb3-contrib's name); a new or resized
    set of envs starts from zeros. A time-limit truncation is bootstrapped through the critic's states after
    the episode's last step, the rollout's last value through the states after its last step.
    """

    def __init__(self) -> None:
        self._states: LSTMStates | None = None  # before the current step
        self._after: LSTMStates | None = None  # after it

    def rollout_start(self, model: Any, env: VecEnv, rollout_buffer: RolloutBuffer) -> None:
        """Continue from the last rollout's states (zeros for a new or resized set of envs).

        :param model: the model.
        :param env: the model's VecEnv.
        :param rollout_buffer: the model's rollout buffer, reset.
        """
        self._model = model
        n_envs = env.num_envs
        states = model._last_lstm_states
        if states is None or states.pi[0].shape[1] != n_envs or states.pi[0].device != model.device:
            states = model._last_lstm_states = model.policy.initial_state(n_envs)
        self._states = self._after = states

    def policy_inputs(self, step: int) -> dict[str, Any]:
        """The states before this step, and which envs start an episode (their states are reset).

        :param step: the step's index in the rollout.
        :return: keyword inputs of the policy's acting call.
        """
        model = self._model
        starts = th.as_tensor(model._last_episode_starts, dtype=th.float32, device=model.device)
        return {"lstm_states": self._states, "episode_starts": starts}

    def acted(self, step: RolloutStep) -> None:
        """The states after this step (the policy's fourth output).

        :param step: the step: the policy's outputs.
        """
        self._after = step.outputs[0]

    def buffer_fields(self) -> dict[str, Any]:
        """The states the step was taken from: each stored sequence restarts from its first step's states.

        :return: keyword arguments of ``rollout_buffer.add``.
        """
        return {"lstm_states": self._states}

    def value_inputs(self, rows: np.ndarray | None, episode_starts: np.ndarray) -> dict[str, Any]:
        """The critic's states after the current step (of ``rows`` only, when given).

        :param rows: the envs whose observations are evaluated (None: all of them, in order).
        :param episode_starts: ``[n_envs]`` True where an episode starts.
        :return: keyword inputs of ``policy.predict_values``.
        """
        states = self._after
        assert states is not None
        if rows is not None:
            index = th.as_tensor(rows, dtype=th.long, device=self._model.device)
            states = LSTMStates(*(tuple(s.index_select(1, index) for s in pair) for pair in states))
        starts = th.as_tensor(episode_starts, dtype=th.float32, device=self._model.device)
        return {"lstm_states": states.vf, "episode_starts": starts}

    def step_end(self, model: Any) -> None:
        """The states after the step become those the next step starts from.

        :param model: the model.
        """
        self._states = model._last_lstm_states = self._after
