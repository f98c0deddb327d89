"""How a minibatch's loss is differentiated: one call, ``loss_and_grad``, whichever path computes it.

``ClippedPPO.train`` asks :func:`select_backend` once per update and then calls
``backend.loss_and_grad(loss, batch)`` for every minibatch: it returns the :class:`~sb3_ppo_ext.losses.LossTerms`
(detached) and leaves ``.grad`` of every policy parameter set, ready for gradient clipping and the
optimizer step. ``backend.act`` is what the rollout calls to pick actions.

* :class:`AutogradBackend`: ``policy.evaluate_actions`` -> :class:`~sb3_ppo_ext.losses.PPOLoss` ->
  ``loss.backward()``. Works for every policy.
* :class:`ClosedFormBackend`: the same loss, differentiated by hand
  (:class:`~sb3_ppo_ext.fast.kernel.MLPActorCriticKernel`), for plain MLP policies. A step it cannot
  differentiate by hand (sequences of an LSTM, a reference without a closed-form KL gradient) goes to autograd.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch as th

from sb3_ppo_ext.fast.kernel import MLPActorCriticKernel
from sb3_ppo_ext.loss_statistics import DeferredStatistics
from sb3_ppo_ext.losses import LossTerms, PolicyEvaluation, PPOBatch, PPOLoss, importance_weighted_kl
from sb3_ppo_ext.optim import LeanAdamStep, UpdateSteps


class Backend(Protocol):
    """Acting and differentiation for one policy.

    ``act(obs)``, or ``act(obs, action_masks=masks)`` where the env gives invalid-action masks, returns
    ``(actions, values [B, 1], log_prob [B])``.
    """

    act: Callable[..., tuple[th.Tensor, th.Tensor, th.Tensor]]

    def loss_and_grad(self, loss: PPOLoss, batch: PPOBatch) -> LossTerms:
        """Compute the loss terms of ``batch`` and set ``.grad`` of every policy parameter.

        :param loss: the objective at this update's clip ranges and coefficients.
        :param batch: the minibatch.
        :return: the loss terms (statistics for the log).
        """
        ...


class AutogradBackend:
    """The textbook path: the policy's own ``forward``/``evaluate_actions`` and ``loss.backward()``.

    :param policy: any actor-critic policy with SB3's ``evaluate_actions`` and an ``optimizer``.
    """

    def __init__(self, policy: Any) -> None:
        self.policy = policy
        self.act = policy

    def loss_and_grad(self, loss: PPOLoss, batch: PPOBatch) -> LossTerms:
        """Evaluate the policy, compute the loss and backpropagate it through autograd.

        :param loss: the objective.
        :param batch: the minibatch.
        :return: the loss terms.
        """
        if batch.reference is None:
            values, log_prob, entropy = self.policy.evaluate_actions(
                batch.observations, batch.actions, **batch.policy_inputs()
            )
            evaluation = PolicyEvaluation(values.flatten(), log_prob, entropy)
        else:
            evaluation = self._evaluate_with_reference(batch)
        terms = loss(evaluation, batch)
        # zeroed, not dropped: backward then accumulates into the same tensors, views of the optimizer's flat
        # gradient buffer (optim.FlatBuffers), so the clip and the Adam step run on one tensor
        self.policy.optimizer.zero_grad(set_to_none=False)
        terms.loss.backward()
        return terms._replace(loss=terms.loss.detach())

    def _evaluate_with_reference(self, batch: PPOBatch) -> PolicyEvaluation:
        """The evaluation plus ``KL(pi_theta || pi_ref)`` per sample: closed form where both heads allow it.

        Else (gSDE) the importance-weighted estimate, whose gradient is that of ``KL(pi_theta || pi_ref)``.
        """
        params = None
        if hasattr(self.policy, "evaluate_with_params"):
            values, log_prob, entropy, params = self.policy.evaluate_with_params(
                batch.observations, batch.actions, **batch.policy_inputs()
            )
        else:
            values, log_prob, entropy = self.policy.evaluate_actions(
                batch.observations, batch.actions, **batch.policy_inputs()
            )
        reference = batch.reference
        if params is not None and reference.params is not None:
            ref_kl = self.policy.action_head.kl(params, reference.params)
        else:
            ref_kl = importance_weighted_kl(log_prob, batch.old_log_prob, reference.log_prob)
        return PolicyEvaluation(values.flatten(), log_prob, entropy, ref_kl)


class ClosedFormBackend:
    """The same loss and gradients without autograd, for policies :class:`MLPActorCriticKernel` supports.

    :param policy: a policy for which ``MLPActorCriticKernel.supports(policy)`` holds.
    """

    def __init__(self, policy: Any) -> None:
        self.kernel = MLPActorCriticKernel(policy)
        self.autograd = AutogradBackend(policy)
        self.act = self.kernel.act
        self._later: DeferredStatistics | None = None  # the loss statistics of the current update, computed late

    def _statistics_of(self, loss: PPOLoss) -> DeferredStatistics:
        """Where this update's minibatches wait for their statistics (a new ``PPOLoss``: a new update)."""
        later = self._later
        if later is None or later.loss is not loss:
            later = self._later = DeferredStatistics(loss)
        return later

    def loss_and_grad(self, loss: PPOLoss, batch: PPOBatch) -> LossTerms:
        """Closed-form gradients, or autograd for a step the kernel cannot differentiate by hand.

        :param loss: the objective.
        :param batch: the minibatch.
        :return: the loss terms.
        """
        reference = batch.reference
        if batch.sequences is not None or not self._closed_form_reference(reference):
            return self.autograd.loss_and_grad(loss, batch)
        with th.no_grad():
            evaluation, activations = self.kernel.evaluate(
                batch.observations, batch.actions, batch.action_masks, None if reference is None else reference.params
            )
            terms, grads = loss.with_gradients(evaluation, batch, self._statistics_of(loss))
            self.kernel.backward(activations, grads)
        return terms

    def _closed_form_reference(self, reference: Any) -> bool:
        """No reference-KL term, or one whose gradient the head gives in closed form (the reference has a head)."""
        if reference is None:
            return True
        return reference.params is not None and self.kernel.head.closed_form_kl_grad


def select_backend(policy: Any, fast_update: bool) -> Backend:
    """The closed-form backend when ``fast_update`` is on and the policy is a plain MLP of ours, else autograd.

    :param policy: the model's policy.
    :param fast_update: ``ClippedPPO``'s ``fast_update``.
    :return: a :class:`ClosedFormBackend` or an :class:`AutogradBackend`.
    """
    if fast_update and MLPActorCriticKernel.supports(policy):
        return ClosedFormBackend(policy)
    return AutogradBackend(policy)


class LearnCache:
    """The backend and the optimizer step of one ``learn()`` call, chosen once and kept while nothing changes.

    Choosing a backend inspects every module and parameter for hooks (about 1 ms here), which every rollout and
    every ``train()`` of a CartPole run would otherwise pay: ~800 times per 100k steps.
    """

    def __init__(self) -> None:
        self._backend: tuple[Any, bool, Backend] | None = None
        self._lean: LeanAdamStep | None = None

    def backend(self, policy: Any, fast_update: bool) -> Backend:
        """:func:`select_backend` for ``policy`` (again if the policy or ``fast_update`` changed).

        :param policy: the model's policy.
        :param fast_update: ``ClippedPPO``'s ``fast_update``.
        :return: the backend.
        """
        cached = self._backend
        if cached is None or cached[0] is not policy or cached[1] != fast_update:
            cached = self._backend = (policy, fast_update, select_backend(policy, fast_update))
        return cached[2]

    def optimizer_steps(self, optimizer: th.optim.Optimizer) -> UpdateSteps:
        """The gradient clips and optimizer steps of one update (:class:`~sb3_ppo_ext.optim.LeanAdamStep`).

        :param optimizer: the policy's optimizer.
        :return: an :class:`~sb3_ppo_ext.optim.UpdateSteps` (``clip_grad_norm(parameters, max_norm)``, ``step()``).
        """
        if self._lean is None or self._lean.optimizer is not optimizer:
            self._lean = LeanAdamStep(optimizer)
        return self._lean.update_steps()
