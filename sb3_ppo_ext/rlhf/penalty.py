"""The reference-KL feature as an extension: ``beta * KL(pi || pi_ref)`` in the reward or in the loss.

The seed's section 7: the policy is kept near a frozen reference (the SFT policy) by a KL penalty of weight
beta, fixed or adapted by Ziegler et al.'s controller (:mod:`sb3_ppo_ext.rlhf.reference`).

* :class:`RewardKLPenalty` (``ref_kl_mode="reward"``): at every rollout step ``r_t - beta * (log pi_old(a_t|s_t)
  - log pi_ref(a_t|s_t))``, before GAE; ``train/ref_kl`` is the mean of that sampled log-ratio.
* :class:`LossKLPenalty` (``ref_kl_mode="loss"``): ``beta * KL(pi_theta || pi_ref)`` per sample, in closed form
  where both action heads allow it, added to the loss (:func:`sb3_ppo_ext.losses.reference_kl_loss`).

With ``VecNormalize`` (reward mode): the penalty is in the env's raw reward units. The env's reward reaches the
rollout divided by VecNormalize's return scale ``sqrt(var(R) + eps)`` (and clipped); the penalty is divided by
the same scale before it is subtracted, so the reward GAE sees is ``(r_raw - beta * KL) / scale`` (the clip
applies to the env's reward alone) and beta keeps its meaning while the return statistics move.

The reference reads observations through frozen statistics in both modes (:mod:`sb3_ppo_ext.rlhf.observations`):
its own (``Reference(model_or_path, vec_normalize=...)``, ``<model>_vecnormalize.pkl`` beside a path, or a
model's own ``VecNormalize``), raw observations (``vec_normalize=False``), or else, when the env normalises
observations, the env's as they were at the first rollout. They are saved with the model (``_ref_obs_rms``).

The adaptive controller measures the KL in its target's unit and counts the rollout in its horizon's unit
(:class:`~sb3_ppo_ext.rlhf.reference.AdaptiveKLCoef`): per step, the rollout's mean (reward mode) or the
update's exact KL (loss mode); per episode, ``rlhf/kl_sampled_per_episode`` (reward mode) or
``rlhf/kl_exact_per_episode`` (loss mode); env steps, or the episodes that ended in the rollout.

The keys an RLHF user watches for over-optimisation, one name per quantity (``train/ref_kl`` and
``train/ref_kl_coef`` stay, with their mode-dependent meaning, for older dashboards):

* ``rlhf/beta``: the coefficient the last update used.
* ``rlhf/kl_sampled_per_step``: mean of ``log pi_old(a_t|s_t) - log pi_ref(a_t|s_t)`` over the rollout's steps
  (reward mode: the penalty's KL).
* ``rlhf/kl_sampled_per_episode``: the same log-ratio summed over each episode that ended in the rollout, averaged
  over those episodes (reward mode; the per-sequence KL of Ziegler et al. and TRL).
* ``rlhf/score``: the env's reward (before the penalty) summed per episode, averaged over the rollout's episodes.
* ``rlhf/non_score_reward``: the penalty ``-beta * KL`` summed per episode, averaged likewise (reward mode).
* ``rlhf/kl_exact_per_step``: ``KL(pi_theta || pi_ref)`` of the moving policy, averaged over the update's
  minibatches (loss mode; the term's own value: closed form, or under gSDE the importance-weighted estimate of
  :func:`~sb3_ppo_ext.losses.importance_weighted_kl`).
* ``rlhf/kl_exact_per_episode``: ``rlhf/kl_exact_per_step`` times the mean length of the episodes that ended in
  the rollout (loss mode, with a controller whose target or horizon is per episode).
* ``rlhf/entropy``: the policy's entropy, averaged over the update's minibatches.

With several ranks (``torchrun``) a per-episode number is the mean over every rank's episodes (each episode weighs
the same, whichever rank ran it), the episode count the total over ranks, and a per-step number the mean of the
ranks' means (every rank runs the same number of steps).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.vec_env import VecEnv

from sb3_ppo_ext.extensions import Extension, RolloutStep
from sb3_ppo_ext.losses import LossTerms, PPOBatch, mean_of
from sb3_ppo_ext.rlhf.observations import (
    ReferenceObservations,
    check_obs_statistics,
    normalize_observations,
    reference_obs_statistics,
    reference_view,
    statistics_of,
)
from sb3_ppo_ext.rlhf.reference import (
    KLController,
    ReferencePolicy,
    build_reference,
    check_reference_spaces,
    reference_spec,
    resolve_reference,
)

__all__ = [
    "REFERENCE_UNSAVED",
    "LossKLPenalty",
    "ReferenceKLMixin",
    "RewardKLPenalty",
    "reference_kl",
    "setup_reference",
]

#: the model's attributes that are not pickled: the reference's weights go in a state dict, its spec as data
REFERENCE_UNSAVED = ("ref_policy", "_reference", "_ref_policy_source")

#: the per-episode statistics of the reward mode, in the order of the rollout's statistics
EPISODE_KEYS = ("kl_sampled_per_episode", "score", "non_score_reward")


def _reward_scale(venv: Any) -> float:
    """The divisor VecNormalize applied to this step's rewards (1.0 without reward normalisation)."""
    if venv is None or not venv.norm_reward:
        return 1.0
    return float(np.sqrt(venv.ret_rms.var + venv.epsilon))


def setup_reference(model: Any) -> ReferencePolicy | None:
    """The model's frozen reference: from its ``ref_policy`` argument, or rebuilt from the spec ``load`` restored.

    Sets ``model.ref_policy`` (the module whose state dict is saved with the model) and ``model._ref_policy_spec``
    (its class and constructor arguments, saved as data); the caller's model is neither kept nor pickled.

    :param model: the ClippedPPO model being set up.
    :return: the frozen reference, or None without one.
    """
    reference = None
    source = getattr(model, "_ref_policy_source", None)
    if source is not None:
        reference = resolve_reference(source, model.device)
        model._ref_obs_rms = reference_obs_statistics(source)
        check_obs_statistics(model._ref_obs_rms, model.observation_space)
        model._ref_policy_spec = reference_spec(reference.policy)
        model._ref_policy_source = None
    elif model._ref_policy_spec is not None:
        reference = build_reference(model._ref_policy_spec, model.device)
    if reference is not None:
        check_reference_spaces(reference, model.observation_space, model.action_space)
        model.ref_policy = reference.policy
    model._reference = reference
    return reference


class _ReferenceKL(Extension):
    """What both modes share: the reference, beta's controller, and the ``train/ref_kl*`` keys."""

    def __init__(self, controller: KLController) -> None:
        self.controller = controller
        self.reference: ReferencePolicy | None = None

    def setup(self, model: Any) -> None:
        """Build (or rebuild, after ``load``) the frozen reference.

        :param model: the model.
        """
        self._model = model
        self.reference = setup_reference(model)

    def _freeze_statistics(self, model: Any) -> None:
        """Where the env normalises observations and the reference has no statistics of its own: the env's, now."""
        self._model = model
        self._venv = model.get_vec_normalize_env()
        self._normalizes = self._venv is not None and bool(self._venv.norm_obs)
        if self._normalizes and getattr(model, "_ref_obs_rms", None) is None:
            # frozen from now on: the reference's outputs must not move with the live statistics
            model._ref_obs_rms = statistics_of(self._venv)

    def _raw_view(self, raw: Any) -> Any:
        """Raw observations as the reference reads them (tensors on the model's device)."""
        return reference_view(raw, self._model._ref_obs_rms, self._model.device)

    def _measured_kl(self, history: list[list[LossTerms]]) -> float | None:
        raise NotImplementedError

    def _episodes_measured(self, kl: float | None) -> tuple[float | None, float]:
        """The KL per episode (None without one) and the mean number of episodes per rank that ended in the rollout.

        :param kl: the per-step KL of :meth:`_measured_kl`.
        """
        raise NotImplementedError

    def _controlled(self, model: Any, kl: float | None) -> tuple[float | None, float]:
        """The KL in the target's unit and the rollout's size in the horizon's unit (the controller's inputs)."""
        controller = self.controller
        if not getattr(controller, "counts_episodes", False):
            return kl, model.distributed.global_steps(model.n_steps * model.n_envs)
        per_episode, episodes = self._episodes_measured(kl)
        measured = per_episode if controller.target_per == "episode" else kl
        if controller.horizon_in == "episodes":
            return measured, model.distributed.global_steps(1) * episodes
        return measured, model.distributed.global_steps(model.n_steps * model.n_envs)

    def update_end(self, model: Any, history: list[list[LossTerms]]) -> None:
        """Log the KL to the reference and beta, then let the controller move beta (Ziegler et al.).

        :param model: the model.
        :param history: each epoch's loss terms.
        """
        kl = self._measured_kl(history)
        if kl is not None:
            model.logger.record("train/ref_kl", kl)
        measured, size = self._controlled(model, kl)
        if measured is not None:
            self.controller.update(measured, size)
        model.logger.record("train/ref_kl_coef", self.controller.value)


class RewardKLPenalty(_ReferenceKL):
    """``r_t - beta * (log pi_old - log pi_ref)(a_t|s_t)`` at every step; beta = 0 leaves rewards untouched.

    :param controller: beta's controller (:func:`~sb3_ppo_ext.rlhf.reference.make_kl_controller`).
    """

    # sums and counts, not means: averaged over ranks, their ratio is the mean over every rank's episodes
    statistics = ("ref_kl", *(f"sum/{key}" for key in EPISODE_KEYS), "episodes")

    def __init__(self, controller: KLController) -> None:
        super().__init__(controller)
        self.rollout_kl: float | None = None  # the last rollout's mean log-ratio, over every rank
        self.rollout_statistics_: dict[str, float] = {}
        self._kl_sum, self._samples = 0.0, 0
        self._step_kl: th.Tensor | None = None
        self._episodes = _EpisodeSums()

    def rollout_start(self, model: Any, env: VecEnv, rollout_buffer: RolloutBuffer) -> None:
        """Start the rollout's sum of log-ratios.

        :param model: the model.
        :param env: the model's VecEnv.
        :param rollout_buffer: the model's rollout buffer, reset.
        """
        self._kl_sum, self._samples = 0.0, 0
        self._episodes.start_rollout()
        self._freeze_statistics(model)

    def acted(self, step: RolloutStep) -> None:
        """``log pi_old - log pi_ref`` of the actions just sampled, under the same masks.

        :param step: the step: the policy's outputs.
        """
        assert self.reference is not None
        masks = step.policy_inputs.get("action_masks")
        observations = step.observations
        if self._normalizes:  # the raw observations, through the reference's frozen statistics
            observations = self._raw_view(self._venv.get_original_obs())
        elif getattr(self._model, "_ref_obs_rms", None) is not None:  # raw observations, the reference's statistics
            observations = self._raw_view(observations)
        self._step_kl = step.log_probs - self.reference.log_prob(observations, step.actions, masks)

    def shape_rewards(self, rewards: np.ndarray, step: RolloutStep) -> np.ndarray:
        """The seed's per-step KL penalty.

        :param rewards: ``[n_envs]`` rewards of the step.
        :param step: the step: the policy's outputs and the env's data.
        :return: the rewards GAE sees.
        """
        step_kl = self._step_kl
        assert step_kl is not None
        beta = self.controller.value
        step_kl_np = step_kl.cpu().numpy()
        kl = step_kl_np.astype(np.float64)
        scale = _reward_scale(self._venv)
        score = rewards if self._venv is None else self._venv.get_original_reward()
        self._episodes.add(score=np.asarray(score, dtype=np.float64), kl=kl, penalty=-float(beta or 0.0) * kl)
        if beta and scale == 1.0:
            rewards = (rewards - beta * step_kl_np).astype(rewards.dtype, copy=False)
        elif beta:  # in raw reward units, scaled as VecNormalize scaled the env's reward
            rewards = (rewards - beta * step_kl_np / scale).astype(rewards.dtype, copy=False)
        self._kl_sum += step_kl.sum().item()
        self._samples += len(step_kl)
        return rewards

    def step_end(self, model: Any) -> None:
        """Close the sums of the episodes that ended at this step.

        :param model: the model (its ``_last_episode_starts`` are the step's done flags).
        """
        self._episodes.end(model._last_episode_starts)

    def rollout_end(self, model: Any) -> dict[str, float]:
        """The mean log-ratio over the rollout's steps, and the per-episode means of the episodes that ended.

        :param model: the model.
        :return: the statistics measured over the rollout.
        """
        return {"ref_kl": self._kl_sum / self._samples, **self._episodes.sums(), "episodes": self._episodes.count()}

    def rollout_statistics(self, statistics: dict[str, float]) -> None:
        """Keep the means over every rank (the KL is None when the rollout stopped early everywhere).

        :param statistics: the rollout's statistics, over every rank (sums and counts averaged over ranks).
        """
        self.rollout_kl = statistics.get("ref_kl")
        self.rollout_statistics_ = _pooled_means(statistics)

    def update_end(self, model: Any, history: list[list[LossTerms]]) -> None:
        """The ``train/ref_kl*`` keys and beta's move (see the base class), then the ``rlhf/`` keys.

        :param model: the model.
        :param history: each epoch's loss terms.
        """
        beta = self.controller.value
        super().update_end(model, history)
        _record_rlhf(model, beta, history, self.rollout_statistics_)

    def _measured_kl(self, history: list[list[LossTerms]]) -> float | None:
        return self.rollout_kl

    def _episodes_measured(self, kl: float | None) -> tuple[float | None, float]:
        statistics = self.rollout_statistics_
        return statistics.get("kl_sampled_per_episode"), statistics.get("episodes", 0.0)


class LossKLPenalty(_ReferenceKL):
    """``beta * KL(pi_theta || pi_ref)`` in the loss; the reference's outputs computed once per distinct minibatch.

    The rollout's steps concern it only where the env normalises observations (it keeps what the reference reads
    for each stored observation) or the controller counts episodes (it keeps the episodes' lengths).

    :param controller: beta's controller (:func:`~sb3_ppo_ext.rlhf.reference.make_kl_controller`).
    """

    statistics = ("episodes", "sum/episode_length")

    def __init__(self, controller: KLController) -> None:
        super().__init__(controller)
        self._memo: tuple[Any, Any] | None = None
        self._active = False
        self._normalizes = False
        self._counting = False
        self._observations = ReferenceObservations()
        self._lengths = _EpisodeLengths()
        self.rollout_statistics_: dict[str, float] = {}

    def rollout_start(self, model: Any, env: VecEnv, rollout_buffer: RolloutBuffer) -> bool | None:
        """Freeze the statistics the reference reads through; take part in the steps only where needed.

        :param model: the model.
        :param env: the model's VecEnv.
        :param rollout_buffer: the model's rollout buffer, reset.
        :return: False (no per-step hooks) unless the env normalises observations or episodes are counted.
        """
        self._freeze_statistics(model)
        self._observations.clear()
        self._lengths.start_rollout()
        self._counting = bool(getattr(self.controller, "counts_episodes", False))
        return None if self._normalizes or self._counting else False

    def acted(self, step: RolloutStep) -> None:
        """Keep what the reference reads for the observations the buffer will store.

        :param step: the step: the policy's outputs.
        """
        if self._normalizes:
            raw = self._venv.get_original_obs()
            self._observations.add(step.observations, normalize_observations(raw, self._model._ref_obs_rms))

    def step_end(self, model: Any) -> None:
        """Count the episodes that ended at this step.

        :param model: the model (its ``_last_episode_starts`` are the step's done flags).
        """
        if self._counting:
            self._lengths.step(model._last_episode_starts)

    def rollout_end(self, model: Any) -> dict[str, float]:
        """The number and mean length of the episodes that ended in the rollout, where episodes are counted.

        :param model: the model.
        :return: the statistics measured over the rollout.
        """
        return self._lengths.statistics() if self._counting else {}

    def rollout_statistics(self, statistics: dict[str, float]) -> None:
        """Keep the mean episode length over every rank's episodes.

        :param statistics: the rollout's statistics, over every rank (sums and counts averaged over ranks).
        """
        self.rollout_statistics_ = _pooled_means(statistics)

    def _episodes_measured(self, kl: float | None) -> tuple[float | None, float]:
        statistics = self.rollout_statistics_
        length = statistics.get("episode_length")
        per_episode = None if kl is None or length is None else kl * length
        return per_episode, statistics.get("episodes", 0.0)

    def _reference_observations(self, observations: Any) -> Any:
        """A minibatch's observations as the reference reads them."""
        if self._normalizes:
            return self._observations.lookup(observations, self._model.device)
        if getattr(self._model, "_ref_obs_rms", None) is not None:
            return self._raw_view(observations)
        return observations

    def update_start(self, model: Any) -> None:
        """Only a beta that weighs something asks the reference (beta = 0 trains as without one).

        :param model: the model.
        """
        self._memo = None
        self._active = self.controller.value != 0

    def loss_options(self) -> dict[str, Any]:
        """The term's weight, beta.

        :return: keyword arguments of ``PPOLoss``.
        """
        return {"ref_kl_coef": self.controller.value or 0.0}

    def minibatch(self, batch: PPOBatch) -> PPOBatch:
        """The reference's head parameters and log-probabilities for the minibatch.

        :param batch: the minibatch.
        :return: the minibatch the loss sees.
        """
        if not self._active:
            return batch
        assert self.reference is not None
        if self._memo is None or self._memo[0] is not batch.observations:
            # one minibatch holding the whole rollout is the same tensor at every epoch, and the reference is
            # frozen: its outputs are then computed once per update, not once per epoch
            observations = self._reference_observations(batch.observations)
            targets = self.reference.targets(observations, batch.actions, batch.action_masks)
            self._memo = (batch.observations, targets)
        return batch._replace(reference=self._memo[1])

    def _measured_kl(self, history: list[list[LossTerms]]) -> float | None:
        measured = [t.ref_kl for epoch in history for t in epoch if t.ref_kl is not None]
        return th.stack(measured).mean().item() if measured else None

    def update_end(self, model: Any, history: list[list[LossTerms]]) -> None:
        """The ``train/ref_kl*`` keys and beta's move (see the base class), then the ``rlhf/`` keys.

        :param model: the model.
        :param history: each epoch's loss terms.
        """
        beta, kl = self.controller.value, self._measured_kl(history)
        super().update_end(model, history)
        measured = {} if kl is None else {"kl_exact_per_step": kl}
        if self._counting and self._episodes_measured(kl)[0] is not None:
            measured["kl_exact_per_episode"] = self._episodes_measured(kl)[0]
        _record_rlhf(model, beta, history, measured)


class _EpisodeSums:
    """Per env, the running sums of the episode in flight; the sums of the episodes that ended in this rollout."""

    def __init__(self) -> None:
        self._running: dict[str, np.ndarray] = {}
        self._ended: dict[str, list[float]] = {key: [] for key in EPISODE_KEYS}

    def start_rollout(self) -> None:
        """Forget the last rollout's ended episodes (the ones in flight go on)."""
        self._ended = {key: [] for key in EPISODE_KEYS}

    def add(self, *, score: np.ndarray, kl: np.ndarray, penalty: np.ndarray) -> None:
        """Add one step of every env."""
        for key, value in zip(EPISODE_KEYS, (kl, score, penalty), strict=True):
            running = self._running.get(key)
            self._running[key] = value.copy() if running is None or running.shape != value.shape else running + value

    def end(self, dones: np.ndarray) -> None:
        """The envs whose episode ended: their sums are kept, and start again from zero."""
        ended = np.flatnonzero(np.asarray(dones, dtype=bool))
        if len(ended) == 0 or not self._running:
            return
        for key in EPISODE_KEYS:
            self._ended[key].extend(self._running[key][ended].tolist())
            self._running[key][ended] = 0.0

    def sums(self) -> dict[str, float]:
        """``sum/<key>``: each quantity summed over the episodes that ended in this rollout (0 if none ended)."""
        return {f"sum/{key}": float(np.sum(values)) for key, values in self._ended.items()}

    def count(self) -> float:
        """The number of episodes that ended in this rollout."""
        return float(len(self._ended[EPISODE_KEYS[0]]))


class _EpisodeLengths:
    """Per env, the length of the episode in flight; the lengths of the episodes that ended in this rollout."""

    def __init__(self) -> None:
        self._running: np.ndarray | None = None
        self._ended: list[int] = []

    def start_rollout(self) -> None:
        """Forget the last rollout's ended episodes (the ones in flight go on)."""
        self._ended = []

    def step(self, dones: np.ndarray) -> None:
        """One step of every env; the envs whose episode ended start again from zero."""
        dones = np.asarray(dones, dtype=bool)
        if self._running is None or self._running.shape != dones.shape:
            self._running = np.zeros(dones.shape, dtype=np.int64)
        self._running += 1
        self._ended.extend(self._running[dones].tolist())
        self._running[dones] = 0

    def statistics(self) -> dict[str, float]:
        """The number of episodes that ended, and the sum of their lengths."""
        return {"episodes": float(len(self._ended)), "sum/episode_length": float(np.sum(self._ended))}


def _pooled_means(statistics: dict[str, float]) -> dict[str, float]:
    """``statistics`` with each ``sum/<key>`` replaced by ``<key>``, its mean over the episodes counted.

    Sums and counts arrive averaged over the same ranks, so their ratio weighs every rank's episodes equally
    (the mean of the ranks' means would weigh a rank with few, long episodes as much as one with many).
    Keys are left out when no episode ended on any rank.
    """
    episodes = statistics.get("episodes", 0.0)
    pooled = {name: value for name, value in statistics.items() if not name.startswith("sum/")}
    if episodes > 0:
        pooled.update({name[4:]: total / episodes for name, total in statistics.items() if name.startswith("sum/")})
    return pooled


def _record_rlhf(model: Any, beta: float, history: list[list[LossTerms]], measured: dict[str, float]) -> None:
    """Log the ``rlhf/`` keys (see the module's docstring)."""
    model.logger.record("rlhf/beta", beta)
    model.logger.record("rlhf/entropy", -mean_of(history, "entropy_loss"))
    if "ref_kl" in measured:
        model.logger.record("rlhf/kl_sampled_per_step", measured["ref_kl"])
    for key in (*EPISODE_KEYS, "kl_exact_per_step", "kl_exact_per_episode"):
        if key in measured:
            model.logger.record(f"rlhf/{key}", measured[key])


def reference_kl(controller: KLController, mode: str) -> _ReferenceKL:
    """The extension of ``ref_kl_mode``: :class:`RewardKLPenalty` or :class:`LossKLPenalty`.

    :param controller: beta's controller.
    :param mode: ``"reward"`` or ``"loss"``.
    :return: the extension.
    """
    return RewardKLPenalty(controller) if mode == "reward" else LossKLPenalty(controller)


class ReferenceKLMixin:
    """The model side of the reference: beta as ``ref_kl_coef``, and the reference's weights saved with the model."""

    ref_policy: Any = None
    _ref_kl_controller: KLController | None = None
    #: the reference's frozen observation statistics under VecNormalize: ``(obs_rms, epsilon, clip_obs)``, saved
    _ref_obs_rms: Any = None

    @property
    def ref_kl_coef(self) -> float | None:
        """The current beta of the reference-KL term (None without a reference)."""
        return None if self._ref_kl_controller is None else self._ref_kl_controller.value

    def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
        state_dicts, variables = super()._get_torch_save_params()  # type: ignore[misc]
        return ([*state_dicts, "ref_policy"] if self.ref_policy is not None else state_dicts), variables
