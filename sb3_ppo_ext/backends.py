"""How a minibatch's loss is differentiated: one call, ``loss_and_grad``, whichever path computes it.

``ClippedPPO.train`` asks :func:`select_backend` once per update and then calls
``backend.loss_and_grad(loss, batch)`` for every minibatch: it returns the :class:`~sb3_ppo_ext.losses.LossTerms`
(detached) and leaves ``.grad`` of every policy parameter set, ready for gradient clipping and the
optimizer step. ``backend.act`` is what the rollout calls to pick actions.

* :class:`AutogradBackend`: ``policy.evaluate_actions`` -> :class:`~sb3_ppo_ext.losses.PPOLoss` ->
  ``loss.backward()``. Works for every policy.
* :class:`ClosedFormBackend`: the same loss, differentiated by hand
  (:class:`~sb3_ppo_ext.fast.kernel.MLPActorCriticKernel`), for plain MLP policies. When the loss has an
  active term without a closed-form gradient, it hands that step to autograd.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch as th

from sb3_ppo_ext.fast.kernel import MLPActorCriticKernel
from sb3_ppo_ext.losses import LossTerms, PolicyEvaluation, PPOBatch, PPOLoss, sampled_kl


class Backend(Protocol):
    """Acting and differentiation for one policy.

    ``act(obs)``, or ``act(obs, action_masks=masks)`` where the env gives invalid-action masks, returns
    ``(actions, values [B, 1], log_prob [B])``.
    """

    act: Callable[..., tuple[th.Tensor, th.Tensor, th.Tensor]]

    def loss_and_grad(self, loss: PPOLoss, batch: PPOBatch) -> LossTerms:
        """Compute the loss terms of ``batch`` and set ``.grad`` of every policy parameter."""
        ...


class AutogradBackend:
    """The textbook path: the policy's own ``forward``/``evaluate_actions`` and ``loss.backward()``.

    :param policy: any actor-critic policy with SB3's ``evaluate_actions`` and an ``optimizer``.
    """

    def __init__(self, policy: Any) -> None:
        self.policy = policy
        self.act = policy

    def loss_and_grad(self, loss: PPOLoss, batch: PPOBatch) -> LossTerms:
        """Evaluate the policy, compute the loss and backpropagate it through autograd."""
        if batch.reference is None:
            values, log_prob, entropy = self.policy.evaluate_actions(
                batch.observations, batch.actions, **batch.policy_inputs()
            )
            evaluation = PolicyEvaluation(values.flatten(), log_prob, entropy)
        else:
            evaluation = self._evaluate_with_reference(batch)
        terms = loss(evaluation, batch)
        self.policy.optimizer.zero_grad(set_to_none=True)
        terms.loss.backward()
        return terms._replace(loss=terms.loss.detach())

    def _evaluate_with_reference(self, batch: PPOBatch) -> PolicyEvaluation:
        """The evaluation plus ``KL(pi_theta || pi_ref)`` per sample: closed form where both heads allow it."""
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
            ref_kl = sampled_kl(log_prob, reference.log_prob)
        return PolicyEvaluation(values.flatten(), log_prob, entropy, ref_kl)


class ClosedFormBackend:
    """The same loss and gradients without autograd, for policies :class:`MLPActorCriticKernel` supports.

    :param policy: a policy for which ``MLPActorCriticKernel.supports(policy)`` holds.
    """

    def __init__(self, policy: Any) -> None:
        self.kernel = MLPActorCriticKernel(policy)
        self.autograd = AutogradBackend(policy)
        self.act = self.kernel.act

    def loss_and_grad(self, loss: PPOLoss, batch: PPOBatch) -> LossTerms:
        """Closed-form gradients when every active loss term has one, else this step goes through autograd."""
        reference = batch.reference
        if not loss.has_closed_form or batch.sequences is not None or not self._closed_form_reference(reference):
            return self.autograd.loss_and_grad(loss, batch)
        with th.no_grad():
            evaluation, activations = self.kernel.evaluate(
                batch.observations, batch.actions, batch.action_masks, None if reference is None else reference.params
            )
            terms, grads = loss.with_gradients(evaluation, batch)
            self.kernel.backward(activations, grads)
        return terms

    def _closed_form_reference(self, reference: Any) -> bool:
        """No reference-KL term, or one whose gradient the head gives in closed form (the reference has a head)."""
        if reference is None:
            return True
        return reference.params is not None and self.kernel.head.closed_form_kl_grad


def select_backend(policy: Any, fast_update: bool) -> Backend:
    """The closed-form backend when ``fast_update`` is on and the policy is a plain MLP of ours, else autograd."""
    if fast_update and MLPActorCriticKernel.supports(policy):
        return ClosedFormBackend(policy)
    return AutogradBackend(policy)
