"""SB3's ``train/...`` logger keys, recorded from one update's loss terms (the same names and meanings as SB3's PPO)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.utils import explained_variance

from sb3_ppo_ext.losses import LossTerms, mean_of

__all__ = ["record_update"]


def record_update(model: Any, history: list[list[LossTerms]], clip_range: float, clip_range_vf: float | None) -> None:
    """Record SB3's ``train/`` keys for the update just run (the terms stay tensors until now).

    :param model: the ``ClippedPPO`` whose logger, policy and rollout buffer to read.
    :param history: each epoch's minibatch loss terms.
    :param clip_range: this update's clip range.
    :param clip_range_vf: this update's value clip range, or None.
    """
    record = model.logger.record
    record("train/entropy_loss", mean_of(history, "entropy_loss"))
    record("train/policy_gradient_loss", mean_of(history, "policy_loss"))
    record("train/value_loss", mean_of(history, "value_loss"))
    # SB3 logs the approximate KL of the last epoch only
    record("train/approx_kl", mean_of(history[-1], "approx_kl"))
    record("train/clip_fraction", mean_of(history, "clip_fraction"))
    if model.dual_clip is not None:
        record("train/dual_clip_fraction", mean_of(history, "dual_clip_fraction"))
    record("train/loss", history[-1][-1].loss.item() if history[-1] else float("nan"))
    values, returns = np.asarray(model.rollout_buffer.values), np.asarray(model.rollout_buffer.returns)
    record("train/explained_variance", explained_variance(values.flatten(), returns.flatten()))
    if hasattr(model.policy, "log_std"):
        record("train/std", th.exp(model.policy.log_std).mean().item())
    record("train/n_updates", model._n_updates, exclude="tensorboard")
    record("train/clip_range", clip_range)
    if clip_range_vf is not None:
        record("train/clip_range_vf", clip_range_vf)
