"""Sequences for recurrent policies: which rows of a flat minibatch form which sequence, and their first states.

A recurrent policy trains on minibatches of whole stretches of experience. We keep every per-step field
flat (``[N, ...]``, the layout the loss and the feed-forward policies use) and describe the stretches
with a :class:`Sequences`: row ``n`` is step ``t`` of sequence ``k``. An LSTM then runs once over the
padded grid ``[T, K, features]``: no Python loop over time, no reset inside a sequence (a sequence never
crosses an episode start: one that begins at an episode start begins from zero states, any other from
the states the rollout stored for its first step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch as th
from torch import nn

__all__ = ["LSTMStates", "Sequences", "Step", "segment_starts", "sequence_layout"]


class LSTMStates(NamedTuple):
    """Hidden and cell states of the actor's and the critic's LSTMs, each ``[n_layers, batch, hidden]``.

    Field names as sb3-contrib's ``RNNStates`` (``pi``, ``vf``), so code written for ``RecurrentPPO`` reads them.
    """

    pi: tuple[th.Tensor, th.Tensor]
    vf: tuple[th.Tensor, th.Tensor]


def sequence_layout(starts: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Where each row sits in the padded grid, given the rows at which a new sequence begins.

    :param starts: bool ``[N]``, True where a sequence begins; rows of one sequence are consecutive and
        in time order. Row 0 always begins one.
    :return: ``(position, first_rows, max_length, n_sequences)``: row ``n`` is at ``position[n] = t * K + k``
        of the flattened ``[T, K]`` grid; ``first_rows[k]`` is the first row of sequence ``k``.
    """
    starts = np.asarray(starts, dtype=bool).copy()
    starts[0] = True
    first_rows = np.flatnonzero(starts)
    sequence = np.cumsum(starts) - 1
    step = np.arange(len(starts)) - first_rows[sequence]
    lengths = np.diff(np.append(first_rows, len(starts)))
    n_sequences = len(first_rows)
    return step * n_sequences + sequence, first_rows, int(lengths.max()), n_sequences


def segment_starts(episode_starts: np.ndarray, sequence_length: int | None = None) -> np.ndarray:
    """Where sequences begin along each env's timeline: at step 0, at episode starts, every ``sequence_length``.

    :param episode_starts: ``[n_steps, n_envs]`` flags from the rollout.
    :param sequence_length: the longest sequence; None: no limit.
    :return: bool ``[n_steps, n_envs]``.
    """
    starts = np.asarray(episode_starts, dtype=bool).copy()
    starts[0] = True
    if sequence_length is not None:
        starts[::sequence_length] = True
    return starts


@dataclass(frozen=True)
class Sequences:
    """The sequence structure of a flat minibatch of ``N`` rows (see the module docstring).

    :param position: long ``[N]``: row ``n`` is at ``t * K + k`` of the ``[T, K]`` grid.
    :param max_length: ``T``, the longest sequence.
    :param n_sequences: ``K``.
    :param initial_pi: the actor LSTM's ``(h, c)`` before each sequence's first step, ``[n_layers, K, hidden]``.
    :param initial_vf: the same for the critic's LSTM.
    """

    position: th.Tensor
    max_length: int
    n_sequences: int
    initial_pi: tuple[th.Tensor, th.Tensor]
    initial_vf: tuple[th.Tensor, th.Tensor]

    @classmethod
    def from_starts(
        cls,
        starts: np.ndarray,
        first_states: LSTMStates,
        reset: np.ndarray,
    ) -> Sequences:
        """Build the structure from the rows at which sequences begin.

        :param starts: bool ``[N]`` (see :func:`sequence_layout`).
        :param first_states: states before each sequence's first step, batch dimension ``K``.
        :param reset: bool ``[K]``: the sequence begins an episode, so it starts from zero states.
        :return: the sequence structure, its first states zeroed where ``reset``.
        """
        position, _, max_length, n_sequences = sequence_layout(starts)
        device = first_states.pi[0].device
        keep = th.as_tensor(~np.asarray(reset, dtype=bool), dtype=th.float32, device=device).view(1, -1, 1)
        return cls(
            position=th.as_tensor(position, dtype=th.long, device=device),
            max_length=max_length,
            n_sequences=n_sequences,
            initial_pi=(first_states.pi[0] * keep, first_states.pi[1] * keep),
            initial_vf=(first_states.vf[0] * keep, first_states.vf[1] * keep),
        )

    def run(self, lstm: nn.LSTM, features: th.Tensor, initial: tuple[th.Tensor, th.Tensor]) -> tuple[th.Tensor, None]:
        """Run ``lstm`` over every sequence at once; its outputs as flat rows ``[N, hidden]`` (no final states).

        :param lstm: the actor's or the critic's LSTM.
        :param features: ``[N, features_dim]`` flat rows.
        :param initial: that LSTM's ``(h, c)`` before each sequence.
        :return: ``([N, hidden], None)``.
        """
        n_cells = self.max_length * self.n_sequences
        if n_cells == features.shape[0]:
            # no padding: scattering is a permutation (one sequence, or equal lengths)
            grid = features.new_empty(n_cells, features.shape[1]).index_copy(0, self.position, features)
        else:
            grid = features.new_zeros(n_cells, features.shape[1]).index_copy(0, self.position, features)
        output, _ = lstm(grid.view(self.max_length, self.n_sequences, -1), initial)
        return output.reshape(n_cells, -1).index_select(0, self.position), None

    @classmethod
    def from_equal_length(cls, first_states: LSTMStates, episode_starts: th.Tensor) -> Sequences:
        """sb3-contrib's layout: ``K`` sequences of equal length, sequence after sequence, episode starts inside.

        Each sequence is cut where an episode starts; the part after the cut begins from zero states.

        :param first_states: states before each sequence, batch dimension ``K``.
        :param episode_starts: ``[K * T]`` flags (sequence-major), as ``RecurrentPPO`` passes them.
        :return: the sequence structure: one sequence per part, the parts after a cut from zero states.
        """
        n_sequences = first_states.pi[0].shape[1]
        flags = episode_starts.detach().reshape(n_sequences, -1).cpu().numpy().astype(bool)
        starts = flags.copy()
        starts[:, 0] = True
        starts = starts.reshape(-1)
        _, first_rows, _, _ = sequence_layout(starts)
        parent = first_rows // flags.shape[1]  # the sequence each part belongs to
        index = th.as_tensor(parent, dtype=th.long, device=first_states.pi[0].device)
        parts = LSTMStates(*(tuple(s.index_select(1, index) for s in pair) for pair in first_states))
        return cls.from_starts(starts, parts, flags.reshape(-1)[first_rows])


@dataclass(frozen=True)
class Step:
    """One step of a batch of envs (the rollout, ``predict``): each env's states, reset where its episode starts.

    Same interface as :class:`Sequences` (``initial_pi``, ``initial_vf``, ``run``), so the policy has one code
    path for both.

    :param initial_pi: the actor LSTM's ``(h, c)``, each ``[n_layers, B, hidden]``.
    :param initial_vf: the critic LSTM's.
    """

    initial_pi: tuple[th.Tensor, th.Tensor]
    initial_vf: tuple[th.Tensor, th.Tensor]

    @classmethod
    def after(cls, states: LSTMStates, episode_starts: th.Tensor) -> Step:
        """The step that follows ``states``; envs whose ``episode_starts`` flag is set start from zero states.

        :param states: the states after the previous step.
        :param episode_starts: ``[B]`` flags.
        :return: the next step.
        """
        keep = (1.0 - episode_starts.to(states.pi[0].dtype)).view(1, -1, 1)
        return cls(
            initial_pi=(states.pi[0] * keep, states.pi[1] * keep),
            initial_vf=(states.vf[0] * keep, states.vf[1] * keep),
        )

    def run(
        self, lstm: nn.LSTM, features: th.Tensor, initial: tuple[th.Tensor, th.Tensor]
    ) -> tuple[th.Tensor, tuple[th.Tensor, th.Tensor]]:
        """One LSTM step: outputs ``[B, hidden]`` and the new ``(h, c)``.

        :param lstm: the actor's or the critic's LSTM.
        :param features: ``[B, features_dim]``.
        :param initial: the LSTM's ``(h, c)`` before the step.
        :return: the outputs and the new ``(h, c)``.
        """
        output, states = lstm(features.unsqueeze(0), initial)
        return output.squeeze(0), states
