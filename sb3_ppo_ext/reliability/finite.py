"""Finite-value checks of environment data, losses and gradients, and their messages.

``ClippedPPO`` calls :func:`check_env_data` on every reset and step (with ``check_finite=True``) and
:func:`non_finite_update_error` when a minibatch's gradient norm is not finite, before the optimizer
step. Each message names where the bad value appeared and what to do about it.
"""

from __future__ import annotations

from typing import Any, NoReturn

import numpy as np
import torch as th

from sb3_ppo_ext.errors import NonFiniteError
from sb3_ppo_ext.losses import LossTerms


def non_finite_summary(name: str, values: Any) -> str:
    """``"name: mean=.., std=.., min=.., max=.. (k of n non-finite)"`` for a tensor or array, ignoring NaN/inf.

    :param name: what the values are, first in the summary.
    :param values: a torch tensor (any device) or anything ``np.asarray`` reads.
    :return: the one-line summary (``"name: all n non-finite"`` when no value is finite).
    """
    array = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values, dtype=np.float64).ravel()
    finite = array[np.isfinite(array)]
    bad = array.size - finite.size
    if finite.size == 0:
        return f"{name}: all {array.size} non-finite"
    stats = f"{name}: mean={finite.mean():.4g}, std={finite.std():.4g}, min={finite.min():.4g}, max={finite.max():.4g}"
    return stats + (f" ({bad} of {array.size} non-finite)" if bad else f" (n={array.size})")


def check_env_data(new_obs: Any, rewards: np.ndarray | None, *, step: int, n_steps: int, num_timesteps: int) -> None:
    """Raise :class:`NonFiniteError` naming env index and step when an env returned NaN or inf.

    One ``np.isfinite(...).all()`` per array when all is well.

    :param new_obs: the VecEnv's observations (an array, or a dict of arrays).
    :param rewards: the step's rewards, or None for the observations of ``env.reset()``.
    :param step: the rollout step, ``-1`` for ``env.reset()``.
    :param n_steps: steps per rollout, for the message.
    :param num_timesteps: the model's step counter, for the message.
    """
    arrays = [(f"observation[{key!r}]", obs) for key, obs in new_obs.items()] if isinstance(new_obs, dict) else []
    arrays = arrays or [("observation", new_obs)]
    if rewards is not None:
        arrays.append(("reward", rewards))
    for name, array in arrays:
        array = np.asarray(array)
        if array.dtype.kind != "f" or np.isfinite(array).all():
            continue
        per_env = array.reshape(array.shape[0], -1)
        bad_envs = np.flatnonzero(~np.isfinite(per_env).all(axis=1))
        env_index = int(bad_envs[0])
        when = "from env.reset()" if step < 0 else f"at rollout step {step} of {n_steps}"
        raise NonFiniteError(
            f"Environment {env_index} returned a non-finite {name} {when} (num_timesteps={num_timesteps}; "
            f"envs with non-finite values: {bad_envs.tolist()}): {name}[{env_index}] = {per_env[env_index]}. "
            "Fix the environment, wrap it (VecCheckNan finds the action that caused it), or pass "
            "check_finite=False to skip this check."
        )


def non_finite_update_error(
    terms: LossTerms,
    grad_norm: th.Tensor,
    advantages: th.Tensor,
    rollout_buffer: Any,
    *,
    num_timesteps: int,
    learning_rate: float,
) -> NonFiniteError:
    """The error for a minibatch whose loss or gradient is not finite: which term, and the data's statistics.

    :param terms: the minibatch's loss terms.
    :param grad_norm: its global gradient norm (non-finite).
    :param advantages: its advantages, before normalisation.
    :param rollout_buffer: the rollout (``returns`` and ``values`` are summarised).
    :param num_timesteps: the model's step counter.
    :param learning_rate: the optimizer's current learning rate.
    :return: the error, to raise.
    """
    named = {"policy_loss": terms.policy_loss, "value_loss": terms.value_loss, "entropy_loss": terms.entropy_loss}
    bad = [name for name, value in named.items() if not th.isfinite(value)]
    what = ", ".join(bad) if bad else "gradient (all loss terms are finite)"
    values = ", ".join(f"{name}={value.item():.4g}" for name, value in named.items())
    return NonFiniteError(
        f"Non-finite {what} in train() at num_timesteps={num_timesteps} (learning_rate={learning_rate:.4g}): "
        f"{values}, grad_norm={grad_norm.item():.4g}. "
        f"Batch statistics: {non_finite_summary('advantages', advantages)}; rollout "
        f"{non_finite_summary('returns', rollout_buffer.returns)}; rollout "
        f"{non_finite_summary('values', rollout_buffer.values)}. The optimizer step was skipped: the "
        "parameters are those of the last good update and can be saved with model.save(). Lower the learning "
        "rate, scale rewards/observations (VecNormalize) or check the environment for extreme values."
    )


def refuse_non_finite_update(model: Any, terms: LossTerms, grad_norm: th.Tensor, advantages: th.Tensor) -> NoReturn:
    """Raise :func:`non_finite_update_error` before the optimizer step, with the gradients cleared.

    The parameters and the optimizer's state then stay those of the last good update, ready to be saved.

    :param model: the ``ClippedPPO`` being updated.
    :param terms: the minibatch's loss terms.
    :param grad_norm: its global gradient norm (non-finite).
    :param advantages: its advantages, before normalisation.
    :raises NonFiniteError: always.
    """
    model.policy.optimizer.zero_grad(set_to_none=True)
    raise non_finite_update_error(
        terms,
        grad_norm,
        advantages,
        model.rollout_buffer,
        num_timesteps=model.num_timesteps,
        learning_rate=model.policy.optimizer.param_groups[0]["lr"],
    )


__all__ = ["check_env_data", "non_finite_summary", "non_finite_update_error", "refuse_non_finite_update"]
