"""The extension points of ``ClippedPPO``'s two loops: a feature is an :class:`Extension`, not a branch.

``ClippedPPO.collect_rollouts`` and ``ClippedPPO.train`` are the seed's steps and nothing else. At fixed
points they hand control to the model's extensions, through one :class:`Extensions` object; every hook of
the base class does nothing, so an extension overrides only the hooks it needs. The package's own features
are extensions (masks: :mod:`sb3_ppo_ext.masking`; LSTM states: :mod:`sb3_ppo_ext.recurrent.rollout`; the
reference KL: :mod:`sb3_ppo_ext.rlhf.penalty`; value-target normalisation, the KL-adaptive learning rate and
RPO: :mod:`sb3_ppo_ext.stabilizers`), and a user's extension plugs in the same way::

    class SurvivalBonus(Extension):
        def shape_rewards(self, rewards, step):
            return rewards + 0.1

    ClippedPPO("MlpPolicy", "CartPole-v1", extensions=[SurvivalBonus()])

One rollout step, in order (``collect_rollouts``): ``policy_inputs`` -> the policy acts -> ``values_in_reward_units``
-> ``acted`` -> ``env.step`` -> ``shape_rewards`` -> (truncations bootstrapped with
``value_inputs``) -> ``buffer.add(**buffer_fields)`` -> ``step_end``. Around the rollout: ``rollout_start``,
``rollout_end`` (its ``statistics``, merged over ranks, come back through ``rollout_statistics``).

One update (``train``): ``update_start`` -> ``loss_options`` -> per epoch ``epoch_start``, then per minibatch
``minibatch`` -> loss and gradient -> optimizer step -> ``minibatch_done``; ``epoch_done``; ``update_end``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch as th
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.vec_env import VecEnv

from sb3_ppo_ext.losses import LossTerms, PPOBatch

#: the model whose loops call the hooks (a ``ClippedPPO``; typed loosely so that this module imports no algorithm)
ClippedPPO = Any

__all__ = ["Extension", "Extensions", "RolloutStep"]


class RolloutStep(NamedTuple):
    """What the policy did at one rollout step, as ``shape_rewards`` sees it (tensors on the model's device)."""

    #: index of the step in the rollout (0 .. n_steps - 1)
    index: int
    observations: Any
    actions: th.Tensor
    log_probs: th.Tensor
    #: the extra inputs the policy acted on (``policy_inputs`` of every extension), e.g. ``action_masks``
    policy_inputs: dict[str, Any]
    #: the policy's outputs after ``(actions, values, log_probs)``, e.g. the LSTM states after the step
    outputs: tuple[Any, ...]


class Extension:
    """A feature of ``ClippedPPO``'s rollout and update. Every hook does nothing; override the ones you need.

    An extension is pickled with the model (``save``/``load``), so it should hold settings and state, not the
    model: the model is passed to the hooks that need it.
    """

    #: names of the numbers ``rollout_end`` returns; with several ranks each is averaged over the ranks
    statistics: tuple[str, ...] = ()

    # -- set-up ------------------------------------------------------------------------------------------------

    def setup(self, model: ClippedPPO) -> None:
        """Called at the end of ``_setup_model`` (construction and ``load``): the policy exists now.

        :param model: the model being set up.
        """

    # -- the rollout -------------------------------------------------------------------------------------------

    def rollout_start(self, model: ClippedPPO, env: VecEnv, rollout_buffer: RolloutBuffer) -> bool | None:
        """A rollout begins (after the buffer's reset, before the first step).

        :param model: the model collecting the rollout.
        :param env: the env the rollout steps.
        :param rollout_buffer: the buffer the rollout fills, just reset.
        :return: False to sit this rollout out (none of the per-step hooks is called until the next rollout);
            None or True to take part.
        """

    def policy_inputs(self, step: int) -> dict[str, Any]:
        """Extra keyword inputs of the policy's acting call at ``step`` (e.g. ``action_masks``).

        :param step: index of the step in the rollout (0 .. n_steps - 1).
        :return: keyword arguments for the policy, by name.
        """
        return {}

    def acted(self, step: RolloutStep) -> None:
        """The policy acted (before ``env.step``; in inference mode): read its outputs, or ask another network.

        :param step: what the policy saw and did at this step.
        """

    def values_in_reward_units(self, values: th.Tensor) -> th.Tensor:
        """The critic's output as a value in reward units (the units GAE and bootstraps use).

        :param values: the critic's output, in the units it learns in.
        :return: the same values in reward units (``values`` itself when the critic learns in reward units).
        """
        return values

    def shape_rewards(self, rewards: np.ndarray, step: RolloutStep) -> np.ndarray:
        """The rewards GAE sees for this step (e.g. minus a KL penalty).

        :param rewards: the env's rewards for this step, one per env (after earlier extensions shaped them).
        :param step: what the policy saw and did at this step.
        :return: the rewards to store; ``rewards`` itself to leave them.
        """
        return rewards

    def buffer_fields(self) -> dict[str, Any]:
        """Extra keyword arguments of ``rollout_buffer.add`` for this step (e.g. ``action_masks``).

        :return: the fields to store, by the buffer's argument name.
        """
        return {}

    def value_inputs(self, rows: np.ndarray | None, episode_starts: np.ndarray) -> dict[str, Any]:
        """Extra keyword inputs of ``policy.predict_values`` after the current step.

        :param rows: the envs whose observations are evaluated (None: all of them, in order).
        :param episode_starts: per evaluated env, whether its episode starts at that observation.
        :return: keyword arguments for ``predict_values``, by name.
        """
        return {}

    def step_end(self, model: ClippedPPO) -> None:
        """The step is stored; the model's last observation is the new one.

        :param model: the model collecting the rollout.
        """

    def rollout_end(self, model: ClippedPPO) -> dict[str, float]:
        """The rollout is complete and its advantages computed.

        :param model: the model that collected the rollout.
        :return: the :attr:`statistics` measured during the rollout, by name.
        """
        return {}

    def rollout_statistics(self, statistics: dict[str, float]) -> None:
        """The :attr:`statistics` of the rollout, over every rank.

        :param statistics: each name's value averaged over the ranks (missing where no rank measured it).
        """

    # -- the update --------------------------------------------------------------------------------------------

    def update_start(self, model: ClippedPPO) -> None:
        """An update begins (after the learning-rate schedule set the optimizer's rate).

        :param model: the model being updated.
        """

    def loss_options(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~sb3_ppo_ext.losses.PPOLoss` this extension sets (e.g. ``ref_kl_coef``).

        :return: the loss's keyword arguments for this update, by name.
        """
        return {}

    def epoch_start(self, model: ClippedPPO, epoch: int) -> None:
        """An epoch begins, before its minibatches are drawn (e.g. GAE again).

        :param model: the model being updated.
        :param epoch: the epoch's index, 0 .. n_epochs - 1.
        """

    def minibatch(self, batch: PPOBatch) -> PPOBatch:
        """The minibatch the loss sees (e.g. targets in other units, extra targets).

        :param batch: the minibatch drawn from the buffer (after earlier extensions changed it).
        :return: the minibatch for the loss; ``batch`` itself to leave it.
        """
        return batch

    def minibatch_done(self, model: ClippedPPO, terms: LossTerms) -> None:
        """A minibatch's optimizer step is done.

        :param model: the model being updated.
        :param terms: the minibatch's loss terms.
        """

    def epoch_done(self, model: ClippedPPO, terms: list[LossTerms]) -> None:
        """An epoch is done.

        :param model: the model being updated.
        :param terms: the loss terms of the epoch's minibatches, in order.
        """

    def update_end(self, model: ClippedPPO, history: list[list[LossTerms]]) -> None:
        """The update is done; log ``train/`` keys here.

        :param model: the model that was updated.
        :param history: per epoch, the loss terms of its minibatches.
        """


def _overrides(extension: Extension, hook: str) -> bool:
    return getattr(type(extension), hook) is not getattr(Extension, hook)


class Extensions:
    """The model's extensions as one object: each hook calls, in order, the extensions that override it.

    Hooks nobody overrides cost one loop over an empty list, so a plain run pays nothing measurable. Each method
    calls the :class:`Extension` hook of the same name, with the arguments documented there.

    :param extensions: the model's extensions, in the order their hooks are called.
    """

    def __init__(self, extensions: Sequence[Extension]) -> None:
        self.extensions = list(extensions)
        self.statistic_names = tuple(name for ext in self.extensions for name in ext.statistics)
        self._measured: dict[str, float] = {}

        def bound(hook: str) -> list[Callable[..., Any]]:
            return [getattr(ext, hook) for ext in self.extensions if _overrides(ext, hook)]

        self._setup = bound("setup")
        self._rollout_start = bound("rollout_start")
        self._values = bound("values_in_reward_units")
        self._value_inputs = bound("value_inputs")
        self._bind_steps(self.extensions)
        self._rollout_end = bound("rollout_end")
        self._rollout_statistics = bound("rollout_statistics")
        self._update_start = bound("update_start")
        self._loss_options = bound("loss_options")
        self._epoch_start = bound("epoch_start")
        self._minibatch = bound("minibatch")
        self._minibatch_done = bound("minibatch_done")
        self._epoch_done = bound("epoch_done")
        self._update_end = bound("update_end")

    def _bind_steps(self, extensions: list[Extension]) -> None:
        """The per-step hooks of a rollout, from the extensions that take part in it."""

        def bound(hook: str) -> list[Callable[..., Any]]:
            return [getattr(ext, hook) for ext in extensions if _overrides(ext, hook)]

        self._policy_inputs = bound("policy_inputs")
        self._acted = bound("acted")
        self._shape_rewards = bound("shape_rewards")
        self._buffer_fields = bound("buffer_fields")
        self._step_end = bound("step_end")

    def setup(self, model: ClippedPPO) -> None:
        """:meth:`Extension.setup` of each."""
        for hook in self._setup:
            hook(model)

    def rollout_start(self, model: ClippedPPO, env: VecEnv, rollout_buffer: RolloutBuffer) -> None:
        """:meth:`Extension.rollout_start` of each; forgets the last rollout's statistics.

        The per-step hooks of this rollout are those of the extensions that did not return False.
        """
        self._measured = {}
        sitting_out = {id(hook.__self__) for hook in self._rollout_start if hook(model, env, rollout_buffer) is False}
        self._bind_steps([ext for ext in self.extensions if id(ext) not in sitting_out])

    def policy_inputs(self, step: int) -> dict[str, Any]:
        """The union of every extension's :meth:`Extension.policy_inputs`."""
        inputs: dict[str, Any] = {}
        for hook in self._policy_inputs:
            inputs.update(hook(step))
        return inputs

    def acted(self, step: RolloutStep) -> None:
        """:meth:`Extension.acted` of each."""
        for hook in self._acted:
            hook(step)

    def values_in_reward_units(self, values: th.Tensor) -> th.Tensor:
        """:meth:`Extension.values_in_reward_units`, chained."""
        for hook in self._values:
            values = hook(values)
        return values

    def shape_rewards(self, rewards: np.ndarray, step: RolloutStep) -> np.ndarray:
        """:meth:`Extension.shape_rewards`, chained."""
        for hook in self._shape_rewards:
            rewards = hook(rewards, step)
        return rewards

    def buffer_fields(self) -> dict[str, Any]:
        """The union of every extension's :meth:`Extension.buffer_fields`."""
        fields: dict[str, Any] = {}
        for hook in self._buffer_fields:
            fields.update(hook())
        return fields

    def value_inputs(self, rows: np.ndarray | None, episode_starts: np.ndarray) -> dict[str, Any]:
        """The union of every extension's :meth:`Extension.value_inputs`."""
        inputs: dict[str, Any] = {}
        for hook in self._value_inputs:
            inputs.update(hook(rows, episode_starts))
        return inputs

    def step_end(self, model: ClippedPPO) -> None:
        """:meth:`Extension.step_end` of each."""
        for hook in self._step_end:
            hook(model)

    def rollout_end(self, model: ClippedPPO) -> None:
        """:meth:`Extension.rollout_end` of each; their statistics are kept for :meth:`take_statistics`."""
        for hook in self._rollout_end:
            self._measured.update(hook(model))

    def take_statistics(self) -> dict[str, float]:
        """The statistics of the last complete rollout, then forgotten.

        :return: every extension's ``rollout_end`` statistics, by name (empty if the rollout stopped early).
        """
        measured, self._measured = self._measured, {}
        return measured

    def rollout_statistics(self, statistics: dict[str, float]) -> None:
        """:meth:`Extension.rollout_statistics` of each, with the merged statistics."""
        for hook in self._rollout_statistics:
            hook(statistics)

    def update_start(self, model: ClippedPPO) -> None:
        """:meth:`Extension.update_start` of each."""
        for hook in self._update_start:
            hook(model)

    def loss_options(self) -> dict[str, Any]:
        """The union of every extension's :meth:`Extension.loss_options`."""
        options: dict[str, Any] = {}
        for hook in self._loss_options:
            options.update(hook())
        return options

    def epoch_start(self, model: ClippedPPO, epoch: int) -> None:
        """:meth:`Extension.epoch_start` of each."""
        for hook in self._epoch_start:
            hook(model, epoch)

    def minibatch(self, batch: PPOBatch) -> PPOBatch:
        """:meth:`Extension.minibatch`, chained."""
        for hook in self._minibatch:
            batch = hook(batch)
        return batch

    def minibatch_done(self, model: ClippedPPO, terms: LossTerms) -> None:
        """:meth:`Extension.minibatch_done` of each."""
        for hook in self._minibatch_done:
            hook(model, terms)

    def epoch_done(self, model: ClippedPPO, terms: list[LossTerms]) -> None:
        """:meth:`Extension.epoch_done` of each."""
        for hook in self._epoch_done:
            hook(model, terms)

    def update_end(self, model: ClippedPPO, history: list[list[LossTerms]]) -> None:
        """:meth:`Extension.update_end` of each."""
        for hook in self._update_end:
            hook(model, history)
