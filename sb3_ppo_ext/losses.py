"""PPO's loss terms, each written once, with its closed-form gradient beside it (seed sections 3 and 6).

The total loss minimised by :class:`~sb3_ppo_ext.ClippedPPO` is the seed's objective with its sign flipped,

    L = -L_CLIP + c1 * L_VF - c2 * H(pi)

written as ``policy_loss + vf_coef * value_loss + ent_coef * entropy_loss`` with
``entropy_loss = -mean(H)``. :class:`PPOLoss` puts the terms together. Both gradient paths use it: the
autograd path differentiates :meth:`PPOLoss.__call__`; the closed-form path
(:mod:`sb3_ppo_ext.fast`) takes :meth:`PPOLoss.with_gradients`, the derivatives of ``L`` with respect to
the policy's per-sample outputs ``log pi(a|s)``, ``V(s)`` and ``H(pi(.|s))``, and backpropagates them
through the network by hand.

Every term averages over the last dimension: a minibatch's ``[B]`` gives a scalar, a stack of ``m``
minibatches ``[m, B]`` gives one value per minibatch (the closed-form path logs its statistics that way,
:mod:`sb3_ppo_ext.loss_statistics`).

The gradients (and :func:`probability_ratio`) take torch tensors or NumPy arrays and answer in kind (``_xp``):
where the closed-form path evaluates the action head in NumPy (:mod:`sb3_ppo_ext.fast.numpy_head`), the same
formulas run on its arrays. On tensors they are the torch operations they always were.

Adding a term: write its formula here, add it in :meth:`PPOLoss._terms` and its derivative with respect to
those outputs in :meth:`PPOLoss._output_gradients` (every term has one today). A term without a closed form
must make ``ClosedFormBackend.loss_and_grad`` hand its steps to autograd, as it does for LSTM minibatches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import torch as th

ValueClipMode = Literal["max", "sb3"]
VALUE_CLIP_MODES: tuple[str, ...] = ("max", "sb3")


class PPOBatch(NamedTuple):
    """One minibatch as the loss sees it: advantages already normalised, Discrete actions as indices.

    ``action_masks`` (bool ``[B, mask_size]``) are the invalid-action masks the actions were sampled under,
    or None; the policy evaluates the masked distribution with them. ``sequences``
    (:class:`~sb3_ppo_ext.recurrent.sequences.Sequences`) tells a recurrent policy which rows form which sequence.
    ``reference`` (:class:`~sb3_ppo_ext.rlhf.reference.ReferenceTargets`) holds what the reference policy says
    about the minibatch, for the reference-KL term.
    """

    observations: Any
    actions: th.Tensor
    old_log_prob: th.Tensor
    old_values: th.Tensor
    advantages: th.Tensor
    returns: th.Tensor
    action_masks: th.Tensor | None = None
    sequences: Any = None
    reference: Any = None

    @classmethod
    def from_minibatch(cls, samples: Any, advantages: th.Tensor, discrete_actions: bool) -> PPOBatch:
        """A buffer minibatch as the loss sees it: Discrete actions as indices, masks and sequences kept if any.

        :param samples: a minibatch of the rollout buffer (SB3's ``RolloutBufferSamples`` or ours).
        :param advantages: its advantages, normalised as configured.
        :param discrete_actions: the action space is ``Discrete``.
        :return: the batch.
        """
        actions = samples.actions.long().flatten() if discrete_actions else samples.actions
        masks, sequences = getattr(samples, "action_masks", None), getattr(samples, "sequences", None)
        fields = (samples.observations, actions, samples.old_log_prob, samples.old_values, advantages, samples.returns)
        return cls(*fields, masks, sequences)

    def numpy_targets(self) -> PPOBatch:
        """The batch with the loss's targets (old log-probabilities and values, advantages, returns) as NumPy arrays.

        The arrays share the tensors' memory; the gradients of an evaluation in NumPy read them so.

        :return: the batch.
        """
        targets = ("old_log_prob", "old_values", "advantages", "returns")
        return self._replace(**{name: _numpy(getattr(self, name)) for name in targets})

    def policy_inputs(self) -> dict[str, Any]:
        """What ``evaluate_actions`` gets besides observations and actions: the masks and sequences there are.

        :return: ``{"action_masks": ..., "sequences": ...}`` without the absent ones.
        """
        inputs = {"action_masks": self.action_masks, "sequences": self.sequences}
        return {name: value for name, value in inputs.items() if value is not None}


class PolicyEvaluation(NamedTuple):
    """What the policy says about a minibatch: ``V(s)``, ``log pi(a|s)`` and ``H(pi(.|s))``, each ``[B]``.

    ``entropy`` is None where the distribution has no closed-form entropy (squashed gSDE). ``ref_kl`` is
    ``KL(pi_theta || pi_ref)`` per sample when the loss regularises towards a reference policy, else None.
    """

    values: th.Tensor
    log_prob: th.Tensor
    entropy: th.Tensor | None
    ref_kl: th.Tensor | None = None


class OutputGradients(NamedTuple):
    """``dL/dV``, ``dL/dlog_prob`` (each ``[B]``), ``dL/dH`` and ``dL/dKL_ref`` (``[B]``; None when no term uses it)."""

    values: th.Tensor
    log_prob: th.Tensor
    entropy: th.Tensor | None
    ref_kl: th.Tensor | None = None


class LossTerms(NamedTuple):
    """Loss terms and diagnostics of one minibatch; only ``loss`` may carry an autograd graph."""

    loss: th.Tensor
    policy_loss: th.Tensor
    value_loss: th.Tensor
    entropy_loss: th.Tensor
    clip_fraction: th.Tensor
    approx_kl: th.Tensor
    ref_kl: th.Tensor | None = None
    dual_clip_fraction: th.Tensor | None = None


def mean_of(terms: list[LossTerms] | list[list[LossTerms]], name: str) -> float:
    """Mean of one field of :class:`LossTerms` over minibatches (nested lists are flattened); NaN if none.

    :param terms: the minibatches' terms, or a list of such lists (one per epoch).
    :param name: a field of :class:`LossTerms`.
    :return: the mean, or NaN without terms.
    """
    flat = [t for item in terms for t in (item if isinstance(item, list) else [item])]
    if not flat:
        return float("nan")
    column = _stacked_column(flat, name)
    return (th.stack([getattr(t, name) for t in flat]) if column is None else column).mean().item()


def _stacked_column(terms: list[Any], name: str) -> th.Tensor | None:
    """``name`` of every term as a slice of one stack, where the terms are its consecutive rows; else None.

    The closed-form path computes an update's loss statistics as one stack
    (:class:`~sb3_ppo_ext.loss_statistics.DeferredTerms`); reading them back row by row and stacking them again cost
    about 0.3 ms per CartPole update. The same values in the same order: the same mean.
    """
    first = getattr(terms[0], "stacked_row", None)
    located = None if first is None else first()
    if located is None:
        return None
    rows, start = located
    for offset, term in enumerate(terms):
        row = getattr(term, "stacked_row", None)
        found = None if row is None else row()
        if found is None or found[0] is not rows or found[1] != start + offset:
            return None
    column = getattr(rows, name)
    return None if column is None else column[start : start + len(terms)]


def normalize_advantages(advantages: th.Tensor, eps: float = 1e-8) -> th.Tensor:
    """Return ``(A - mean(A)) / (std(A) + eps)``; a batch of one is returned unchanged (its std is undefined).

    :param advantages: ``[B]`` advantages, or ``[M, B]``: M minibatches, each normalised on its own.
    :param eps: added to the std.
    :return: the normalised advantages.
    """
    if advantages.dim() == 0 or advantages.shape[-1] <= 1:
        return advantages
    return (advantages - advantages.mean(-1, keepdim=True)) / (advantages.std(-1, keepdim=True) + eps)


def _xp(array: Any) -> Any:
    """The array library of ``array``: NumPy for an ``ndarray``, else torch (whose ``where``/``clip``/... match)."""
    return np if isinstance(array, np.ndarray) else th


def _numpy(array: Any) -> np.ndarray:
    return array if isinstance(array, np.ndarray) else array.detach().numpy()


def _as_tensors(fields: Any) -> Any:
    """A NamedTuple (evaluation, batch) with its NumPy arrays as tensors on their memory; tensors stay as they are."""
    arrays = {name: th.from_numpy(value) for name, value in fields._asdict().items() if isinstance(value, np.ndarray)}
    return fields._replace(**arrays) if arrays else fields


def probability_ratio(log_prob: th.Tensor, old_log_prob: th.Tensor) -> th.Tensor:
    """Return ``r(theta) = pi_theta(a|s) / pi_theta_old(a|s)``, computed from log-probabilities.

    :param log_prob: ``log pi_theta(a|s)``, ``[B]``.
    :param old_log_prob: ``log pi_theta_old(a|s)`` from the rollout, ``[B]``.
    :return: ``[B]`` ratios.
    """
    return _xp(log_prob).exp(log_prob - old_log_prob)


# -- the clipped surrogate (seed section 3) ---------------------------------------------------------


def clipped_surrogate_loss(
    ratio: th.Tensor, advantages: th.Tensor, clip_range: float, dual_clip: float | None = None
) -> th.Tensor:
    """PPO-Clip policy loss: ``-E[min(r * A, clip(r, 1 - eps, 1 + eps) * A)]``.

    The ``min`` keeps the more pessimistic term, so the gradient vanishes once the ratio has moved past
    ``1 + eps`` for a positive advantage or below ``1 - eps`` for a negative one.

    ``dual_clip`` (c > 1, Ye et al. 2020): for ``A < 0`` the objective is also bounded below,
    ``max(min(r A, clip(r) A), c A)``, so a very large ratio on a bad action cannot dominate the batch.

    :param ratio: ``[B]`` probability ratios.
    :param advantages: ``[B]`` advantages.
    :param clip_range: epsilon.
    :param dual_clip: c > 1 of dual clip, or None.
    :return: the scalar loss.
    """
    surrogate = ratio * advantages
    clipped_surrogate = th.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range) * advantages
    objective = th.min(surrogate, clipped_surrogate)
    if dual_clip is not None:
        objective = th.where(advantages < 0, th.max(objective, dual_clip * advantages), objective)
    return -objective.mean(-1)


def clipped_surrogate_grad(
    ratio: th.Tensor, advantages: th.Tensor, clip_range: float, dual_clip: float | None = None
) -> th.Tensor:
    """``d clipped_surrogate_loss / d log pi(a|s)`` per sample.

    ``d(r * A) / d log pi = r * A``; the clipped term is constant in ``log pi`` outside ``[1 - eps, 1 + eps]``.
    The gradient flows where the unclipped term is the minimum or the two coincide: ``r <= 1 + eps`` for
    ``A > 0``, ``r >= 1 - eps`` for ``A < 0`` (for ``A = 0`` it is ``r * A = 0`` either way). With
    ``dual_clip``, a negative advantage's gradient also stops once ``r > c`` (the constant ``c A`` wins).

    :param ratio: ``[B]`` probability ratios.
    :param advantages: ``[B]`` advantages.
    :param clip_range: epsilon.
    :param dual_clip: c > 1 of dual clip, or None.
    :return: ``[B]`` gradients with respect to ``log pi(a|s)``.
    """
    xp = _xp(ratio)
    active = xp.where(advantages > 0, ratio <= 1.0 + clip_range, ratio >= 1.0 - clip_range)
    if dual_clip is not None:
        active = active & ((advantages >= 0) | (ratio <= dual_clip))
    return xp.where(active, ratio * advantages, 0.0) * (-1.0 / ratio.shape[0])


# -- the KL penalty towards a reference policy (seed section 7, RLHF) ----------------------------------


def reference_kl_loss(ref_kl: th.Tensor, ref_kl_coef: float) -> th.Tensor:
    """``beta * E[KL(pi_theta(.|s) || pi_ref(.|s))]``: keeps the fine-tuned policy near the reference.

    :param ref_kl: ``[B]`` per-sample ``KL(pi_theta || pi_ref)``.
    :param ref_kl_coef: beta.
    :return: the scalar loss.
    """
    return ref_kl_coef * ref_kl.mean(-1)


def reference_kl_loss_grad(ref_kl: th.Tensor, ref_kl_coef: float) -> th.Tensor:
    """``d reference_kl_loss / d KL_i`` per sample: ``beta / n`` (the head turns it into parameter gradients).

    :param ref_kl: ``[B]`` per-sample KL.
    :param ref_kl_coef: beta.
    :return: ``[B]`` gradients with respect to each sample's KL.
    """
    return _xp(ref_kl).full_like(ref_kl, ref_kl_coef / ref_kl.shape[0])


def sampled_kl(log_prob: th.Tensor, ref_log_prob: th.Tensor) -> th.Tensor:
    """Per-sample estimate of ``KL(pi_theta || pi_ref)`` from log-probabilities of taken actions.

    ``exp(d) - d - 1`` with ``d = log pi_ref(a|s) - log pi_theta(a|s)``: never negative and low-variance
    (Schulman's "k3"); used where the action head has no closed-form KL (gSDE).

    :param log_prob: ``[B]`` ``log pi_theta(a|s)``.
    :param ref_log_prob: ``[B]`` ``log pi_ref(a|s)``.
    :return: ``[B]`` estimates.
    """
    difference = ref_log_prob - log_prob
    return th.expm1(difference) - difference


def importance_weighted_kl(log_prob: th.Tensor, old_log_prob: th.Tensor, ref_log_prob: th.Tensor) -> th.Tensor:
    """Per-sample ``rho * k3``: unbiased for ``KL(pi_theta || pi_ref)`` and its gradient, for actions from ``pi_old``.

    The loss-mode KL where the heads have no closed form (gSDE). Plain k3 (:func:`sampled_kl`) is unbiased for the
    value where ``pi_theta = pi_old``, but its gradient there is
    ``E_old[(1 - pi_ref / pi_theta) grad log pi_theta] = grad KL(pi_ref || pi_theta)``, the reverse direction.
    Weighing it by ``rho = pi_theta / pi_old`` gives ``E_old[rho * k3] = E_theta[k3] = KL(pi_theta || pi_ref)`` for
    every theta, so value and gradient are right on every epoch; at ``rho = 1`` the value equals k3's, and it stays
    >= 0 per sample. Gradients flow through ``log_prob`` only.

    :param log_prob: ``[B]`` ``log pi_theta(a|s)`` (with its autograd graph).
    :param old_log_prob: ``[B]`` ``log pi_old(a|s)``, stored with the rollout.
    :param ref_log_prob: ``[B]`` ``log pi_ref(a|s)``.
    :return: ``[B]`` estimates, each >= 0.
    """
    return probability_ratio(log_prob, old_log_prob) * sampled_kl(log_prob, ref_log_prob)


def clip_fraction(ratio: th.Tensor, clip_range: float) -> th.Tensor:
    """Share of samples whose ratio lies outside ``[1 - eps, 1 + eps]`` (a diagnostic, no gradient).

    :param ratio: ``[B]`` probability ratios.
    :param clip_range: epsilon.
    :return: a scalar in [0, 1].
    """
    return ((ratio.detach() - 1.0).abs() > clip_range).float().mean(-1)


def dual_clip_fraction(ratio: th.Tensor, advantages: th.Tensor, dual_clip: float) -> th.Tensor:
    """Share of samples the dual clip bounds, ``A < 0`` and ``r > c`` (a diagnostic, no gradient).

    Zero means dual clip changed nothing in this minibatch: its ``c A`` floor only wins past ``r = c``.

    :param ratio: ``[B]`` probability ratios.
    :param advantages: ``[B]`` advantages.
    :param dual_clip: c.
    :return: a scalar in [0, 1].
    """
    return ((advantages < 0) & (ratio.detach() > dual_clip)).float().mean(-1)


# -- the value loss (seed section 6, "value function clipping") -------------------------------------


def value_loss(
    values: th.Tensor,
    old_values: th.Tensor,
    returns: th.Tensor,
    clip_range_vf: float | None = None,
    mode: ValueClipMode = "max",
) -> th.Tensor:
    """Critic loss against the TD(lambda) returns, optionally clipped around the old values.

    * ``clip_range_vf=None``: plain ``mean((V - R)^2)``.
    * ``mode="max"`` (the seed's and the PPO paper's form):
      ``mean(max((V - R)^2, (V_clip - R)^2))`` with ``V_clip = V_old + clip(V - V_old, -eps_vf, eps_vf)``;
      the pessimistic max keeps a gradient whenever the unclipped error is the larger one.
    * ``mode="sb3"`` (Stable-Baselines3's form): ``mean((V_clip - R)^2)``; the gradient is zero for every
      sample whose value moved further than ``eps_vf``, even when that move reduced the error.

    :param values: ``[B]`` ``V(s)`` of the current critic.
    :param old_values: ``[B]`` ``V(s)`` recorded in the rollout.
    :param returns: ``[B]`` TD(lambda) returns (the targets).
    :param clip_range_vf: epsilon of the value clipping, or None.
    :param mode: ``"max"`` or ``"sb3"``.
    :return: the scalar loss.
    :raises ValueError: for an unknown ``mode``.
    """
    if clip_range_vf is None:
        return ((values - returns) ** 2).mean(-1)
    _check_value_clip_mode(mode)
    values_clipped = old_values + th.clamp(values - old_values, -clip_range_vf, clip_range_vf)
    clipped_error = (values_clipped - returns) ** 2
    if mode == "sb3":
        return clipped_error.mean(-1)
    return th.max((values - returns) ** 2, clipped_error).mean(-1)


def value_loss_grad(
    values: th.Tensor,
    old_values: th.Tensor,
    returns: th.Tensor,
    clip_range_vf: float | None = None,
    mode: ValueClipMode = "max",
    coef: float = 1.0,
) -> th.Tensor:
    """``d (coef * value_loss) / d V(s)`` per sample: ``2 coef (V - R) / n`` where the unclipped error is used.

    :param values: ``[B]`` ``V(s)`` of the current critic.
    :param old_values: ``[B]`` ``V(s)`` recorded in the rollout.
    :param returns: ``[B]`` targets.
    :param clip_range_vf: epsilon of the value clipping, or None.
    :param mode: ``"max"`` or ``"sb3"``.
    :param coef: c1, the value loss's weight.
    :return: ``[B]`` gradients with respect to ``V(s)``.
    :raises ValueError: for an unknown ``mode``.
    """
    scale = 2.0 * coef / values.shape[0]
    error = values - returns
    if clip_range_vf is None:
        return error * scale
    _check_value_clip_mode(mode)
    xp = _xp(values)
    delta = values - old_values
    clipped_error = old_values + xp.clip(delta, -clip_range_vf, clip_range_vf) - returns
    # inside the clip range V_clip = V and both errors are the same; outside it V_clip is constant in V
    in_range = (delta >= -clip_range_vf) & (delta <= clip_range_vf)
    if mode == "sb3":
        return xp.where(in_range, clipped_error, 0.0) * scale
    use_unclipped = (error * error > clipped_error * clipped_error) | in_range
    return xp.where(use_unclipped, error, 0.0) * scale


def _check_value_clip_mode(mode: str) -> None:
    if mode not in VALUE_CLIP_MODES:
        raise ValueError(f"Unknown value clipping mode {mode!r}; use one of {VALUE_CLIP_MODES}.")


# -- the entropy bonus (seed section 6) --------------------------------------------------------------


def entropy_loss(entropy: th.Tensor | None, log_prob: th.Tensor) -> th.Tensor:
    """Return ``-mean(H(pi))``; minimising it is the seed's entropy bonus ``+ c2 * H``.

    Where the distribution has no closed-form entropy (e.g. squashed gSDE), ``-log pi(a|s)`` of the
    sampled actions is its Monte Carlo estimate.

    :param entropy: ``[B]`` entropies, or None.
    :param log_prob: ``[B]`` ``log pi(a|s)`` (used without entropies).
    :return: the scalar loss.
    """
    if entropy is None:
        return log_prob.mean(-1)
    return -entropy.mean(-1)


def entropy_loss_grad(entropy: th.Tensor, coef: float = 1.0) -> th.Tensor:
    """``d (coef * entropy_loss) / d H`` per sample: ``-coef / n``.

    :param entropy: ``[B]`` entropies.
    :param coef: c2, the entropy loss's weight.
    :return: ``[B]`` gradients with respect to each entropy.
    """
    return _xp(entropy).full_like(entropy, -coef / entropy.shape[0])


# -- diagnostics ------------------------------------------------------------------------------------


def approx_kl(ratio: th.Tensor, log_ratio: th.Tensor) -> th.Tensor:
    """Low-variance estimator of ``KL(pi_old || pi)``: ``mean((r - 1) - log r)`` (always >= 0), no gradient.

    :param ratio: ``[B]`` probability ratios.
    :param log_ratio: ``[B]`` their logarithms.
    :return: a scalar.
    """
    with th.no_grad():
        return (ratio - 1.0 - log_ratio).mean(-1)


# -- the whole objective ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PPOLoss:
    """``L = -L_CLIP + c1 * L_VF - c2 * H`` at this update's clip ranges and coefficients.

    :param clip_range: epsilon of the clipped surrogate.
    :param clip_range_vf: epsilon of the value clipping, or None (no value clipping).
    :param vf_clip_mode: ``"max"`` or ``"sb3"``, see :func:`value_loss`.
    :param ent_coef: c2.
    :param vf_coef: c1.
    :param ref_kl_coef: beta of the reference-KL term (``ref_kl_mode="loss"``); 0: no such term.
    :param dual_clip: c of dual-clip PPO (bounds the surrogate of negative advantages below by ``c A``); None: off.
    """

    clip_range: float
    clip_range_vf: float | None = None
    vf_clip_mode: ValueClipMode = "max"
    ent_coef: float = 0.0
    vf_coef: float = 0.5
    ref_kl_coef: float = 0.0
    dual_clip: float | None = None

    def __post_init__(self) -> None:
        _check_value_clip_mode(self.vf_clip_mode)

    def __call__(self, evaluation: PolicyEvaluation, batch: PPOBatch) -> LossTerms:
        """The loss terms of one minibatch; ``loss`` keeps the autograd graph of ``evaluation``.

        :param evaluation: the policy's outputs for the minibatch.
        :param batch: the minibatch.
        :return: the terms.
        """
        return self._terms(evaluation, batch)[0]

    def with_gradients(
        self, evaluation: PolicyEvaluation, batch: PPOBatch, later: Any = None
    ) -> tuple[LossTerms, OutputGradients]:
        """The loss terms and ``dL/d(V, log pi, H, KL_ref)`` per sample, for the closed-form path (no graph).

        Every term has its derivative in :meth:`_output_gradients`; the reference-KL term's is ``dL/dKL_i``, which
        the head's :meth:`~sb3_ppo_ext.distributions.ActionHead.kl_grads` carries to the head's parameters.

        :param evaluation: the policy's outputs for the minibatch.
        :param batch: the minibatch.
        :param later: None: the terms are computed now; a :class:`~sb3_ppo_ext.loss_statistics.DeferredStatistics`
            of this loss: they wait there and are computed at their first read, with every other minibatch waiting
            (the gradients need only the ratio).
        :return: the terms (or a :class:`~sb3_ppo_ext.loss_statistics.DeferredTerms` standing for them) and the
            gradients with respect to the policy's outputs.
        """
        with th.no_grad():
            if isinstance(evaluation.log_prob, np.ndarray):  # the heads ran in NumPy: so do the derivatives
                batch = batch.numpy_targets()
            ratio = probability_ratio(evaluation.log_prob, batch.old_log_prob)
            if later is None:
                terms = self._terms(_as_tensors(evaluation), _as_tensors(batch))[0]
            else:
                terms = later.add(evaluation, batch)
            return terms, self._output_gradients(evaluation, batch, ratio)

    def _terms(self, evaluation: PolicyEvaluation, batch: PPOBatch) -> tuple[LossTerms, th.Tensor]:
        log_ratio = evaluation.log_prob - batch.old_log_prob
        ratio = th.exp(log_ratio)
        policy_loss = clipped_surrogate_loss(ratio, batch.advantages, self.clip_range, self.dual_clip)
        critic_loss = value_loss(
            evaluation.values, batch.old_values, batch.returns, self.clip_range_vf, self.vf_clip_mode
        )
        loss = policy_loss + self.vf_coef * critic_loss
        if self.ent_coef == 0:
            # same loss and gradient; the entropy is only logged, so keep it out of the backward pass
            with th.no_grad():
                entropy_term = entropy_loss(evaluation.entropy, evaluation.log_prob)
        else:
            entropy_term = entropy_loss(evaluation.entropy, evaluation.log_prob)
            loss = loss + self.ent_coef * entropy_term
        ref_kl = None
        if evaluation.ref_kl is not None:
            ref_kl = evaluation.ref_kl.mean(-1).detach()
            if self.ref_kl_coef != 0:
                loss = loss + reference_kl_loss(evaluation.ref_kl, self.ref_kl_coef)
        terms = LossTerms(
            loss,
            policy_loss.detach(),
            critic_loss.detach(),
            entropy_term.detach(),
            clip_fraction(ratio, self.clip_range),
            approx_kl(ratio, log_ratio),
            ref_kl,
            None if self.dual_clip is None else dual_clip_fraction(ratio, batch.advantages, self.dual_clip),
        )
        return terms, ratio

    def _output_gradients(self, evaluation: PolicyEvaluation, batch: PPOBatch, ratio: th.Tensor) -> OutputGradients:
        grad_log_prob = clipped_surrogate_grad(ratio, batch.advantages, self.clip_range, self.dual_clip)
        grad_values = value_loss_grad(
            evaluation.values, batch.old_values, batch.returns, self.clip_range_vf, self.vf_clip_mode, self.vf_coef
        )
        grad_entropy = None
        if self.ent_coef != 0:
            if evaluation.entropy is None:
                # the Monte Carlo estimate mean(log pi) of entropy_loss
                grad_log_prob = grad_log_prob + self.ent_coef / grad_log_prob.shape[0]
            else:
                grad_entropy = entropy_loss_grad(evaluation.entropy, self.ent_coef)
        grad_ref_kl = None
        if evaluation.ref_kl is not None and self.ref_kl_coef != 0:
            grad_ref_kl = reference_kl_loss_grad(evaluation.ref_kl, self.ref_kl_coef)
        return OutputGradients(grad_values, grad_log_prob, grad_entropy, grad_ref_kl)
