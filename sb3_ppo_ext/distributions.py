"""Stateless action heads: sample, log-probability and entropy straight from network outputs.

SB3 builds a ``torch.distributions`` object (with argument validation) on every forward pass. PPO only
needs three numbers per sample, so each head here computes them in closed form from the raw head
output. ``to_sb3`` builds the equivalent SB3 ``Distribution`` for code that asks the policy for one
(``policy.get_distribution(obs)``); tests check the two agree.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.distributions import (
    BernoulliDistribution,
    CategoricalDistribution,
    DiagGaussianDistribution,
    Distribution,
    MultiCategoricalDistribution,
)
from torch.nn import functional as F

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
# the logit of a masked-out outcome (sb3-contrib's value): its probability exp(-1e8 - logsumexp) is exactly 0 in
# float32 and 0 * log p stays 0, so entropies sum over the valid outcomes only, with no 0 * -inf NaN
MASKED_LOGIT = -1e8


def _softmaxes(logits: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
    """``(p, log p)`` along the last axis.

    ``p`` comes from ``softmax``, not ``log_p.exp()``: with masked logits ``log p`` holds values near -1e8, where
    PyTorch's CPU ``exp`` leaves its vectorised path and runs about 12x slower (0.65 vs 0.055 ms for 256 x 64);
    ``softmax`` stays fast and gives exact zeros there.
    """
    return F.softmax(logits, dim=-1), F.log_softmax(logits, dim=-1)


def gumbel_max_sample(logits: th.Tensor) -> th.Tensor:
    """Draw from ``Categorical(softmax(logits))`` along the last dim as ``argmax(logits + Gumbel noise)``.

    Exact (the Gumbel-max trick) and about half the cost of ``torch.multinomial`` on a small batch.

    :param logits: ``[..., n]`` unnormalised log-probabilities.
    :return: ``[...]`` sampled indices.
    """
    exponential = th.empty_like(logits).exponential_().clamp_min_(th.finfo(logits.dtype).tiny)
    return (logits - exponential.log_()).argmax(dim=-1)


class HeadEvaluation(NamedTuple):
    """``log pi(a|s)`` and ``H(pi(.|s))`` of a batch, plus the intermediates their gradients reuse."""

    log_prob: th.Tensor
    entropy: th.Tensor
    saved: tuple[th.Tensor, ...] = ()


class ActionHead:
    """Maps the policy network's head output to actions, ``log pi(a|s)`` and ``H(pi(.|s))``.

    Heads with :attr:`closed_form_grad` also give the derivatives of ``log pi`` and ``H`` with respect
    to their parameters (:meth:`param_grads`), which the closed-form update path (:mod:`sb3_ppo_ext.fast`)
    backpropagates through the network.
    """

    #: width of the linear layer that feeds this head
    n_outputs: int
    #: whether :meth:`param_grads` is implemented
    closed_form_grad: bool = False
    #: length of an invalid-action mask for this head (sb3-contrib's layout); None: masks do not apply
    mask_size: int | None = None

    def mask(self, params: tuple[th.Tensor, ...], action_masks: th.Tensor) -> tuple[th.Tensor, ...]:
        """The distribution's parameters restricted to the valid actions (``action_masks``: bool ``[B, mask_size]``).

        Sampling, ``log_prob``, ``entropy`` and ``param_grads`` of the returned parameters are those of the
        masked distribution.

        :param params: the head's parameters.
        :param action_masks: bool ``[B, mask_size]``, True where valid.
        :return: the masked parameters.
        :raises ValueError: for a head without masks (Box actions).
        """
        raise ValueError(f"{type(self).__name__} does not support invalid-action masks.")

    def sample(self, params: tuple[th.Tensor, ...], deterministic: bool) -> th.Tensor:
        """Draw actions (or the mode when ``deterministic``).

        :param params: the head's parameters.
        :param deterministic: the mode instead of a sample.
        :return: ``[B, ...]`` actions.
        """
        raise NotImplementedError

    def log_prob(self, params: tuple[th.Tensor, ...], actions: th.Tensor) -> th.Tensor:
        """Return ``log pi(a|s)``, shape ``[B]``.

        :param params: the head's parameters.
        :param actions: ``[B, ...]`` actions.
        :return: ``[B]``.
        """
        raise NotImplementedError

    def entropy(self, params: tuple[th.Tensor, ...]) -> th.Tensor:
        """Return ``H(pi(.|s))``, shape ``[B]``.

        :param params: the head's parameters.
        :return: ``[B]``.
        """
        raise NotImplementedError

    def evaluate(self, params: tuple[th.Tensor, ...], actions: th.Tensor) -> HeadEvaluation:
        """``log pi(a|s)`` and ``H`` together (heads override this to share intermediates).

        :param params: the head's parameters.
        :param actions: ``[B, ...]`` actions.
        :return: the log-probabilities, entropies and the intermediates :meth:`param_grads` reuses.
        """
        return HeadEvaluation(self.log_prob(params, actions), self.entropy(params))

    def param_grads(
        self,
        params: tuple[th.Tensor, ...],
        evaluation: HeadEvaluation,
        grad_log_prob: th.Tensor,
        grad_entropy: th.Tensor | None,
    ) -> tuple[th.Tensor, ...]:
        """``dL/d params`` (per sample, same shapes as ``params`` broadcast to the batch) by the chain rule.

        :param params: the head's parameters.
        :param evaluation: what :meth:`evaluate` returned for them.
        :param grad_log_prob: ``dL/d log pi(a|s)``, shape ``[B]``.
        :param grad_entropy: ``dL/dH``, shape ``[B]``, or None when the loss does not use the entropy.
        :return: ``dL/d params``, one tensor per parameter.
        """
        raise NotImplementedError(f"{type(self).__name__} has no closed-form gradient; use autograd")

    def to_sb3(self, params: tuple[th.Tensor, ...]) -> Distribution:
        """Return the equivalent SB3 distribution object.

        :param params: the head's parameters.
        :return: an SB3 ``Distribution`` with the same parameters.
        """
        raise NotImplementedError

    def kl(self, params: tuple[th.Tensor, ...], other: tuple[th.Tensor, ...]) -> th.Tensor:
        """``KL(pi_params || pi_other)`` in closed form, shape ``[B]`` (the reference-KL term's divergence).

        :param params: this policy's head parameters.
        :param other: the other (reference) policy's.
        :return: ``[B]``.
        """
        raise NotImplementedError(f"{type(self).__name__} has no closed-form KL")

    #: whether :meth:`kl_grads` is implemented
    closed_form_kl_grad: bool = False

    def kl_grads(
        self, params: tuple[th.Tensor, ...], other: tuple[th.Tensor, ...], grad_kl: th.Tensor
    ) -> tuple[th.Tensor, ...]:
        """``dL/d params`` through ``KL(pi_params || pi_other)`` per sample, given ``dL/dKL`` (``[B]``).

        Same shapes as :meth:`param_grads`; ``other`` (the reference's parameters) gets no gradient.

        :param params: this policy's head parameters.
        :param other: the reference's (no gradient).
        :param grad_kl: ``dL/dKL`` per sample, ``[B]``.
        :return: ``dL/d params``, one tensor per parameter.
        """
        raise NotImplementedError(f"{type(self).__name__} has no closed-form KL gradient; use autograd")


def _categorical_kl(logits: th.Tensor, other_logits: th.Tensor) -> th.Tensor:
    """``sum_a p(a) (log p(a) - log q(a))`` over the last axis; masked-out actions (p = 0) add nothing."""
    p, log_p = _softmaxes(logits)
    return (p * (log_p - F.log_softmax(other_logits, dim=-1))).sum(dim=-1)


class CategoricalHead(ActionHead):
    """Softmax over ``n`` logits (``Discrete`` actions).

    :param n: the number of actions.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.n_outputs = n
        self.mask_size = n

    def mask(self, params: tuple[th.Tensor, ...], action_masks: th.Tensor) -> tuple[th.Tensor, ...]:
        """Invalid actions' logits set to :data:`MASKED_LOGIT`.

        :param params: the head's parameters.
        :param action_masks: bool ``[B, mask_size]``, True where valid.
        :return: the masked parameters.
        """
        return (th.where(action_masks, params[0], MASKED_LOGIT),)

    def sample(self, params: tuple[th.Tensor, ...], deterministic: bool) -> th.Tensor:
        """Sample an index per row, or the arg-max when ``deterministic``.

        :param params: the head's parameters.
        :param deterministic: the mode instead of a sample.
        :return: ``[B, ...]`` actions.
        """
        (logits,) = params
        if deterministic:
            return logits.argmax(dim=-1)
        return gumbel_max_sample(logits)

    @staticmethod
    def _log_prob(logits: th.Tensor, actions: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """``(log pi(a), log_softmax(logits), a as [B, 1] indices)``."""
        log_p = F.log_softmax(logits, dim=-1)
        index = actions.long().reshape(-1, 1)
        return log_p.gather(-1, index).squeeze(-1), log_p, index

    def log_prob(self, params: tuple[th.Tensor, ...], actions: th.Tensor) -> th.Tensor:
        """Log-softmax of the chosen logit.

        :param params: the head's parameters.
        :param actions: ``[B, ...]`` actions.
        :return: ``[B]``.
        """
        return self._log_prob(params[0], actions)[0]

    def entropy(self, params: tuple[th.Tensor, ...]) -> th.Tensor:
        """``-sum p log p``.

        :param params: the head's parameters.
        :return: ``[B]``.
        """
        p, log_p = _softmaxes(params[0])
        return -(p * log_p).sum(dim=-1)

    def evaluate(self, params: tuple[th.Tensor, ...], actions: th.Tensor) -> HeadEvaluation:
        """Log-probability and entropy from one log-softmax.

        :param params: the head's parameters.
        :param actions: ``[B, ...]`` actions.
        :return: the log-probabilities, entropies and the intermediates :meth:`param_grads` reuses.
        """
        log_prob, log_p, index = self._log_prob(params[0], actions)
        probs = F.softmax(params[0], dim=-1)  # not log_p.exp(): see _softmaxes
        return HeadEvaluation(log_prob, -(probs * log_p).sum(dim=-1), (log_p, probs, index))

    closed_form_grad = True

    def param_grads(
        self,
        params: tuple[th.Tensor, ...],
        evaluation: HeadEvaluation,
        grad_log_prob: th.Tensor,
        grad_entropy: th.Tensor | None,
    ) -> tuple[th.Tensor, ...]:
        """``d log pi(a) / d logits = onehot(a) - p``; ``dH / d logits = -p (log p + H)``.

        :param params: the head's parameters.
        :param evaluation: what :meth:`evaluate` returned for them.
        :param grad_log_prob: ``dL/d log pi(a|s)``, shape ``[B]``.
        :param grad_entropy: ``dL/dH``, shape ``[B]``, or None when the loss does not use the entropy.
        :return: ``dL/d params``, one tensor per parameter.
        """
        log_p, probs, index = evaluation.saved
        grad = probs * (-grad_log_prob).unsqueeze(1)
        grad.scatter_add_(1, index, grad_log_prob.unsqueeze(1))
        if grad_entropy is not None:
            grad -= probs * (log_p + evaluation.entropy.unsqueeze(1)) * grad_entropy.unsqueeze(1)
        return (grad,)

    def to_sb3(self, params: tuple[th.Tensor, ...]) -> Distribution:
        """SB3 ``CategoricalDistribution`` on the same logits.

        :param params: the head's parameters.
        :return: an SB3 ``Distribution`` with the same parameters.
        """
        return CategoricalDistribution(self.n).proba_distribution(action_logits=params[0])

    def kl(self, params: tuple[th.Tensor, ...], other: tuple[th.Tensor, ...]) -> th.Tensor:
        """``sum_a p(a) (log p(a) - log q(a))``.

        :param params: this policy's head parameters.
        :param other: the other (reference) policy's.
        :return: ``[B]``.
        """
        return _categorical_kl(params[0], other[0])

    closed_form_kl_grad = True

    def kl_grads(
        self, params: tuple[th.Tensor, ...], other: tuple[th.Tensor, ...], grad_kl: th.Tensor
    ) -> tuple[th.Tensor, ...]:
        """``dKL / d logit_j = p_j (log p_j - log q_j - KL)``; a masked-out action (p = 0) gets none.

        :param params: this policy's head parameters.
        :param other: the reference's (no gradient).
        :param grad_kl: ``dL/dKL`` per sample, ``[B]``.
        :return: ``dL/d params``, one tensor per parameter.
        """
        p, log_p = _softmaxes(params[0])
        log_ratio = log_p - F.log_softmax(other[0], dim=-1)
        kl = (p * log_ratio).sum(dim=-1, keepdim=True)
        return (p * (log_ratio - kl) * grad_kl.unsqueeze(1),)


class MultiCategoricalHead(ActionHead):
    """Independent softmaxes, one per ``MultiDiscrete`` component.

    :param nvec: the number of choices of each component.
    """

    def __init__(self, nvec: np.ndarray) -> None:
        self.nvec = [int(n) for n in np.asarray(nvec).ravel()]
        self.n_outputs = sum(self.nvec)
        self.mask_size = self.n_outputs

    def mask(self, params: tuple[th.Tensor, ...], action_masks: th.Tensor) -> tuple[th.Tensor, ...]:
        """Invalid choices' logits set to :data:`MASKED_LOGIT` (the mask concatenates the components' masks).

        :param params: the head's parameters.
        :param action_masks: bool ``[B, mask_size]``, True where valid.
        :return: the masked parameters.
        """
        return (th.where(action_masks, params[0], MASKED_LOGIT),)

    def _log_softmaxes(self, logits: th.Tensor) -> list[th.Tensor]:
        return [F.log_softmax(chunk, dim=-1) for chunk in th.split(logits, self.nvec, dim=-1)]

    def sample(self, params: tuple[th.Tensor, ...], deterministic: bool) -> th.Tensor:
        """One index per component.

        :param params: the head's parameters.
        :param deterministic: the mode instead of a sample.
        :return: ``[B, ...]`` actions.
        """
        chunks = th.split(params[0], self.nvec, dim=-1)
        if deterministic:
            return th.stack([chunk.argmax(dim=-1) for chunk in chunks], dim=-1)
        return th.stack([gumbel_max_sample(chunk) for chunk in chunks], dim=-1)

    def log_prob(self, params: tuple[th.Tensor, ...], actions: th.Tensor) -> th.Tensor:
        """Sum of the components' log-probabilities.

        :param params: the head's parameters.
        :param actions: ``[B, ...]`` actions.
        :return: ``[B]``.
        """
        actions = actions.long().reshape(actions.shape[0], -1)
        return th.stack(
            [lp.gather(-1, actions[:, i : i + 1]).squeeze(-1) for i, lp in enumerate(self._log_softmaxes(params[0]))],
            dim=-1,
        ).sum(dim=-1)

    def entropy(self, params: tuple[th.Tensor, ...]) -> th.Tensor:
        """Sum of the components' entropies.

        :param params: the head's parameters.
        :return: ``[B]``.
        """
        pairs = (_softmaxes(chunk) for chunk in th.split(params[0], self.nvec, dim=-1))
        return sum(-(p * log_p).sum(dim=-1) for p, log_p in pairs)  # type: ignore[return-value]

    def to_sb3(self, params: tuple[th.Tensor, ...]) -> Distribution:
        """SB3 ``MultiCategoricalDistribution`` on the same logits.

        :param params: the head's parameters.
        :return: an SB3 ``Distribution`` with the same parameters.
        """
        return MultiCategoricalDistribution(self.nvec).proba_distribution(action_logits=params[0])

    def kl(self, params: tuple[th.Tensor, ...], other: tuple[th.Tensor, ...]) -> th.Tensor:
        """Sum of the components' categorical KLs.

        :param params: this policy's head parameters.
        :param other: the other (reference) policy's.
        :return: ``[B]``.
        """
        pairs = zip(th.split(params[0], self.nvec, dim=-1), th.split(other[0], self.nvec, dim=-1), strict=True)
        return sum(_categorical_kl(mine, theirs) for mine, theirs in pairs)  # type: ignore[return-value]


class BernoulliHead(ActionHead):
    """Independent Bernoulli variables (``MultiBinary`` actions), parametrised by logits.

    :param n: the number of bits.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.n_outputs = n
        self.mask_size = 2 * n

    def mask(self, params: tuple[th.Tensor, ...], action_masks: th.Tensor) -> tuple[th.Tensor, ...]:
        """A bit whose 0 (or 1) is invalid is forced to 1 (or 0): its logit becomes +/- ``-MASKED_LOGIT``.

        The mask holds ``[0 valid, 1 valid]`` per bit (sb3-contrib's layout for ``MultiBinary(n)``: ``2 n``).

        :param params: the head's parameters.
        :param action_masks: bool ``[B, mask_size]``, True where valid.
        :return: the masked parameters.
        """
        pairs = action_masks.reshape(action_masks.shape[0], self.n, 2)
        zero_ok, one_ok = pairs[..., 0], pairs[..., 1]
        forced = th.where(one_ok, -MASKED_LOGIT, MASKED_LOGIT)
        return (th.where(zero_ok & one_ok, params[0], forced),)

    def sample(self, params: tuple[th.Tensor, ...], deterministic: bool) -> th.Tensor:
        """Bits drawn with probability ``sigmoid(logit)``; the rounded probability when ``deterministic``.

        :param params: the head's parameters.
        :param deterministic: the mode instead of a sample.
        :return: ``[B, ...]`` actions.
        """
        probs = th.sigmoid(params[0])
        if deterministic:
            return th.round(probs)
        return th.bernoulli(probs)

    def log_prob(self, params: tuple[th.Tensor, ...], actions: th.Tensor) -> th.Tensor:
        """Sum over bits of ``a log p + (1 - a) log(1 - p)``.

        :param params: the head's parameters.
        :param actions: ``[B, ...]`` actions.
        :return: ``[B]``.
        """
        logits = params[0]
        return -F.binary_cross_entropy_with_logits(
            logits, actions.to(logits.dtype).reshape(logits.shape), reduction="none"
        ).sum(dim=-1)

    def entropy(self, params: tuple[th.Tensor, ...]) -> th.Tensor:
        """Sum over bits of the binary entropy.

        :param params: the head's parameters.
        :return: ``[B]``.
        """
        logits = params[0]
        return F.binary_cross_entropy_with_logits(logits, th.sigmoid(logits), reduction="none").sum(dim=-1)

    def to_sb3(self, params: tuple[th.Tensor, ...]) -> Distribution:
        """SB3 ``BernoulliDistribution`` on the same logits.

        :param params: the head's parameters.
        :return: an SB3 ``Distribution`` with the same parameters.
        """
        return BernoulliDistribution(self.n).proba_distribution(action_logits=params[0])

    def kl(self, params: tuple[th.Tensor, ...], other: tuple[th.Tensor, ...]) -> th.Tensor:
        """Sum over bits of ``p (log p - log q) + (1 - p) (log(1 - p) - log(1 - q))``.

        :param params: this policy's head parameters.
        :param other: the other (reference) policy's.
        :return: ``[B]``.
        """
        logits, other_logits = params[0], other[0]
        p = th.sigmoid(logits)
        log_ratio_one = F.logsigmoid(logits) - F.logsigmoid(other_logits)
        log_ratio_zero = F.logsigmoid(-logits) - F.logsigmoid(-other_logits)
        return (p * log_ratio_one + (1 - p) * log_ratio_zero).sum(dim=-1)


class BinaryCategoricalHead(MultiCategoricalHead):
    """``MultiBinary(n)`` as ``n`` two-class softmaxes (two logits per bit), sb3-contrib ``MaskablePPO``'s form.

    The same family of distributions as :class:`BernoulliHead` (bit ``i`` is 1 with probability
    ``sigmoid(l1 - l0)``), but each bit's log-odds is the difference of two outputs, so the optimizer moves it
    about twice as far per step. Actions are returned as floats, like :class:`BernoulliHead`'s.

    :param n: the number of bits.
    """

    def __init__(self, n: int) -> None:
        super().__init__(np.full(n, 2))
        self.n = n

    def sample(self, params: tuple[th.Tensor, ...], deterministic: bool) -> th.Tensor:
        """One bit per softmax pair (the more likely one when ``deterministic``), as floats.

        :param params: the head's parameters.
        :param deterministic: the mode instead of a sample.
        :return: ``[B, ...]`` actions.
        """
        return super().sample(params, deterministic).to(params[0].dtype)


#: ``MultiBinary`` parametrisations (the policy keyword ``multibinary_head``)
MULTIBINARY_HEADS = {"bernoulli": BernoulliHead, "categorical": BinaryCategoricalHead}


class DiagGaussianHead(ActionHead):
    """Diagonal Gaussian (``Box`` actions); ``params = (mean, log_std)``, log_std broadcastable to mean.

    With ``state_dependent_std=True`` the network emits ``[B, 2 * action_dim]`` (mean and log_std, the
    seed's layout); otherwise log_std is a free parameter shared by all states (SB3's default).

    :param action_dim: the size of the action vector.
    :param state_dependent_std: whether the network emits the log std.
    """

    def __init__(self, action_dim: int, state_dependent_std: bool = False) -> None:
        self.action_dim = action_dim
        self.state_dependent_std = state_dependent_std
        self.n_outputs = 2 * action_dim if state_dependent_std else action_dim

    def sample(self, params: tuple[th.Tensor, ...], deterministic: bool) -> th.Tensor:
        """``mean + std * N(0, 1)``, or the mean when ``deterministic``.

        :param params: the head's parameters.
        :param deterministic: the mode instead of a sample.
        :return: ``[B, ...]`` actions.
        """
        mean, log_std = params
        if deterministic:
            return mean
        return mean + th.exp(log_std) * th.randn_like(mean)

    @staticmethod
    def _log_prob(params: tuple[th.Tensor, ...], actions: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """``(log pi(a), z = (a - mean) / std, 1 / std)``."""
        mean, log_std = params
        inv_std = th.exp(-log_std)
        z = (actions.reshape(mean.shape) - mean) * inv_std
        return (-0.5 * z * z - log_std - _HALF_LOG_2PI).sum(dim=-1), z, inv_std

    def log_prob(self, params: tuple[th.Tensor, ...], actions: th.Tensor) -> th.Tensor:
        """Sum over action dims of the Gaussian log-density.

        :param params: the head's parameters.
        :param actions: ``[B, ...]`` actions.
        :return: ``[B]``.
        """
        return self._log_prob(params, actions)[0]

    def entropy(self, params: tuple[th.Tensor, ...]) -> th.Tensor:
        """Sum over action dims of ``0.5 + 0.5 log(2 pi) + log_std``.

        :param params: the head's parameters.
        :return: ``[B]``.
        """
        mean, log_std = params
        return (log_std + (0.5 + _HALF_LOG_2PI)).expand_as(mean).sum(dim=-1)

    def evaluate(self, params: tuple[th.Tensor, ...], actions: th.Tensor) -> HeadEvaluation:
        """Log-density and entropy, keeping the standardised actions for the gradient.

        :param params: the head's parameters.
        :param actions: ``[B, ...]`` actions.
        :return: the log-probabilities, entropies and the intermediates :meth:`param_grads` reuses.
        """
        log_prob, z, inv_std = self._log_prob(params, actions)
        return HeadEvaluation(log_prob, self.entropy(params), (z, inv_std))

    closed_form_grad = True

    def param_grads(
        self,
        params: tuple[th.Tensor, ...],
        evaluation: HeadEvaluation,
        grad_log_prob: th.Tensor,
        grad_entropy: th.Tensor | None,
    ) -> tuple[th.Tensor, ...]:
        """``d log pi / d mean = z / std``, ``d log pi / d log_std = z^2 - 1``, ``dH / d log_std = 1``.

        Both gradients are per sample, ``[B, action_dim]``; a state-independent log_std sums the second
        over the batch.

        :param params: the head's parameters.
        :param evaluation: what :meth:`evaluate` returned for them.
        :param grad_log_prob: ``dL/d log pi(a|s)``, shape ``[B]``.
        :param grad_entropy: ``dL/dH``, shape ``[B]``, or None when the loss does not use the entropy.
        :return: ``dL/d params``, one tensor per parameter.
        """
        z, inv_std = evaluation.saved
        grad_log_prob = grad_log_prob.unsqueeze(1)
        grad_mean = grad_log_prob * z * inv_std
        grad_log_std = grad_log_prob * (z * z - 1.0)
        if grad_entropy is not None:
            grad_log_std = grad_log_std + grad_entropy.unsqueeze(1)
        return grad_mean, grad_log_std

    def to_sb3(self, params: tuple[th.Tensor, ...]) -> Distribution:
        """SB3 ``DiagGaussianDistribution`` with the same mean and std.

        :param params: the head's parameters.
        :return: an SB3 ``Distribution`` with the same parameters.
        """
        mean, log_std = params
        return DiagGaussianDistribution(self.action_dim).proba_distribution(mean, log_std)

    def kl(self, params: tuple[th.Tensor, ...], other: tuple[th.Tensor, ...]) -> th.Tensor:
        """Sum over dims of ``log(s_q / s_p) + (s_p^2 + (m_p - m_q)^2) / (2 s_q^2) - 1/2``.

        :param params: this policy's head parameters.
        :param other: the other (reference) policy's.
        :return: ``[B]``.
        """
        mean, log_std = params
        other_mean, other_log_std = other
        variance_ratio = th.exp(2 * (log_std - other_log_std))
        scaled_gap = (mean - other_mean) * th.exp(-other_log_std)
        per_dim = other_log_std - log_std + 0.5 * (variance_ratio + scaled_gap * scaled_gap) - 0.5
        return per_dim.expand_as(th.broadcast_tensors(mean, other_mean)[0]).sum(dim=-1)

    closed_form_kl_grad = True

    def kl_grads(
        self, params: tuple[th.Tensor, ...], other: tuple[th.Tensor, ...], grad_kl: th.Tensor
    ) -> tuple[th.Tensor, ...]:
        """``dKL / d mean = (m_p - m_q) / s_q^2``, ``dKL / d log_std = s_p^2 / s_q^2 - 1`` (per sample and dim).

        :param params: this policy's head parameters.
        :param other: the reference's (no gradient).
        :param grad_kl: ``dL/dKL`` per sample, ``[B]``.
        :return: ``dL/d params``, one tensor per parameter.
        """
        mean, log_std = params
        other_mean, other_log_std = other
        grad_kl = grad_kl.unsqueeze(1)
        grad_mean = (mean - other_mean) * th.exp(-2 * other_log_std) * grad_kl
        grad_log_std = (th.exp(2 * (log_std - other_log_std)) - 1.0) * grad_kl
        return grad_mean, grad_log_std.expand_as(grad_mean)


#: the action spaces :func:`make_action_head` has a head for; ppo.py hands them to SB3 as ``supported_action_spaces``
SUPPORTED_ACTION_SPACES: tuple[type[spaces.Space[Any]], ...] = (
    spaces.Box,
    spaces.Discrete,
    spaces.MultiDiscrete,
    spaces.MultiBinary,
)


def make_action_head(
    action_space: spaces.Space, state_dependent_std: bool = False, multibinary_head: str = "bernoulli"
) -> ActionHead:
    """Return the head for ``action_space`` (gSDE is handled by the policy with SB3's own distribution).

    :param action_space: ``Discrete``, ``MultiDiscrete``, ``MultiBinary`` or ``Box``.
    :param state_dependent_std: ``Box`` only: the log std is an output of the network, not a parameter.
    :param multibinary_head: ``MultiBinary`` actions only: ``"bernoulli"`` (one logit per bit, SB3's ``PPO``)
        or ``"categorical"`` (two logits per bit, sb3-contrib's ``MaskablePPO``).
    :return: the head.
    :raises ValueError: for an unknown ``multibinary_head``.
    :raises TypeError: for an action space no head supports.
    """
    if multibinary_head not in MULTIBINARY_HEADS:
        raise ValueError(
            f"multibinary_head={multibinary_head!r} is not one of {sorted(MULTIBINARY_HEADS)}: 'bernoulli' is SB3 "
            "PPO's one logit per bit, 'categorical' MaskablePPO's two logits per bit."
        )
    if isinstance(action_space, spaces.Discrete):
        return CategoricalHead(int(action_space.n))
    if isinstance(action_space, spaces.MultiDiscrete):
        return MultiCategoricalHead(action_space.nvec)
    if isinstance(action_space, spaces.MultiBinary):
        return MULTIBINARY_HEADS[multibinary_head](int(np.prod(action_space.shape)))
    if isinstance(action_space, spaces.Box):
        return DiagGaussianHead(int(np.prod(action_space.shape)), state_dependent_std)
    raise TypeError(f"No action head for action space {action_space!r}.")
