"""KL regularisation to a frozen reference policy (the seed's RLHF setting): the reference and the coefficient.

``ClippedPPO(..., ref_policy=..., ref_kl_coef=..., ref_kl_mode=...)`` keeps the trained policy close to a
reference ``pi_ref``:

* ``ref_kl_mode="reward"`` (InstructGPT; Ziegler et al. 2019): every step's reward becomes
  ``r_t - beta * (log pi_old(a_t|s_t) - log pi_ref(a_t|s_t))`` before GAE;
* ``ref_kl_mode="loss"``: ``beta * KL(pi_theta || pi_ref)`` joins the loss
  (:func:`sb3_ppo_ext.losses.reference_kl_loss`), in closed form where the action head has one
  (:meth:`ActionHead.kl <sb3_ppo_ext.distributions.ActionHead.kl>`), else (gSDE) the importance-weighted sampled
  estimator ``rho * k3`` (:func:`sb3_ppo_ext.losses.importance_weighted_kl`).

``beta`` is fixed, or adapted by Ziegler et al.'s proportional controller (:class:`AdaptiveKLController`):
``ref_kl_coef="adaptive"`` with ``ref_kl_target`` (KL per step) and ``ref_kl_horizon`` (env steps), or
``ref_kl_coef=AdaptiveKLCoef(...)`` for the units of Ziegler et al. and TRL (KL per episode, horizon in episodes)
and another starting beta. ``ref_policy=Reference(model_or_path, vec_normalize=...)`` gives the reference with
the ``VecNormalize`` statistics it was trained under (:mod:`sb3_ppo_ext.rlhf.observations`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch as th
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.distributions import (
    BernoulliDistribution,
    CategoricalDistribution,
    DiagGaussianDistribution,
    Distribution,
    MultiCategoricalDistribution,
)
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.save_util import load_from_zip_file

from sb3_ppo_ext.errors import ConfigurationError
from sb3_ppo_ext.masking import policy_applies_masks
from sb3_ppo_ext.rlhf.observations import ObsStatistics, load_obs_statistics

RefKLMode = Literal["reward", "loss"]
REF_KL_MODES: tuple[str, ...] = ("reward", "loss")
#: beta when a reference is given without ``ref_kl_coef`` (and the adaptive controller's starting value)
DEFAULT_REF_KL_COEF = 0.1
#: Ziegler et al.'s clip of the proportional error, and their horizon (env steps)
ADAPTIVE_ERROR_CLIP = 0.2
DEFAULT_REF_KL_HORIZON = 10_000


class ReferenceTargets(NamedTuple):
    """What the reference says about a minibatch: head parameters (None without a plain head), ``log pi_ref(a|s)``."""

    params: tuple[th.Tensor, ...] | None
    log_prob: th.Tensor


class ReferencePolicy:
    """A frozen copy of a policy: eval mode, no gradients, never updated, on the model's device.

    :param policy: an SB3-style actor-critic policy (ours or SB3's) with the model's spaces.
    :raises ConfigurationError: for a recurrent (LSTM) policy.
    """

    def __init__(self, policy: BasePolicy) -> None:
        if getattr(policy, "lstm_actor", None) is not None:
            raise ConfigurationError(
                "ref_policy has memory (an LSTM policy): a recurrent reference is not supported yet. Use a "
                "feed-forward reference (the trained policy itself may be recurrent)."
            )
        self.policy = policy
        self.policy.set_training_mode(False)
        self.policy.requires_grad_(False)
        self._masks = policy_applies_masks(type(policy))

    @th.no_grad()
    def log_prob(self, obs: Any, actions: th.Tensor, action_masks: th.Tensor | None = None) -> th.Tensor:
        """``log pi_ref(a|s)`` under the same invalid-action masks as the trained policy.

        :param obs: a batch of observations, as the policy takes them (a tensor, or a dict of tensors).
        :param actions: the actions taken, ``[B]`` or ``[B, action_dim]``.
        :param action_masks: ``[B, mask_size]`` booleans, or None.
        :return: ``[B]`` log-probabilities.
        """
        return self.targets(obs, actions, action_masks).log_prob

    @th.no_grad()
    def targets(self, obs: Any, actions: th.Tensor, action_masks: th.Tensor | None = None) -> ReferenceTargets:
        """The reference's head parameters and log-probabilities for a batch.

        :param obs: a batch of observations, as the policy takes them.
        :param actions: the actions taken.
        :param action_masks: ``[B, mask_size]`` booleans, or None.
        :return: the head parameters (None where ours have no equivalent) and ``log pi_ref(a|s)``.
        """
        policy = self.policy
        masks = {"action_masks": action_masks} if action_masks is not None and self._masks else {}
        if hasattr(policy, "_head_params") and getattr(policy, "action_head", None) is not None:
            params = policy._head_params(policy._actor_latent(obs), masks.get("action_masks"))
            return ReferenceTargets(params, policy.action_head.log_prob(params, actions))
        distribution = policy.get_distribution(obs, **masks)
        return ReferenceTargets(_sb3_head_params(distribution), distribution.log_prob(actions))


def _sb3_head_params(distribution: Distribution) -> tuple[th.Tensor, ...] | None:
    """An SB3 distribution's parameters in our heads' layout, or None where our heads have no equivalent."""
    if isinstance(distribution, CategoricalDistribution):
        return (distribution.distribution.logits,)
    if isinstance(distribution, MultiCategoricalDistribution):
        return (th.cat([d.logits for d in distribution.distribution], dim=-1),)
    if isinstance(distribution, BernoulliDistribution):
        return (distribution.distribution.logits,)
    if isinstance(distribution, DiagGaussianDistribution):
        normal = distribution.distribution
        return (normal.mean, normal.stddev.log())
    return None


def reference_spec(policy: BasePolicy) -> dict[str, Any]:
    """What rebuilds an empty copy of ``policy`` (class and constructor arguments), saved with the model.

    :param policy: the reference's policy.
    :return: ``{"class": ..., "kwargs": ...}``.
    """
    return {"class": type(policy), "kwargs": policy._get_constructor_parameters()}


def build_reference(spec: dict[str, Any], device: th.device) -> ReferencePolicy:
    """An empty reference of the saved architecture; ``load`` then restores its weights.

    :param spec: what :func:`reference_spec` returned.
    :param device: the model's device.
    :return: the reference, with freshly initialised weights (the global random state is left as it was).
    """
    # the fresh weights are overwritten at once; building them must not move the global RNG, or training
    # with beta = 0 would no longer match training without a reference
    with th.random.fork_rng(devices=[]):
        policy = spec["class"](**spec["kwargs"])
    policy.optimizer = None  # a reference is never trained
    return ReferencePolicy(policy.to(device))


class Reference:
    """A reference and the observation statistics it was trained under: ``ClippedPPO(..., ref_policy=Reference(...))``.

    The reference reads every observation as ``VecNormalize`` showed it to the reference in its own training:
    the env's raw observation normalised by these statistics, frozen (they never update).

    :param policy: a trained model (ClippedPPO, PPO, ...), its policy, or the path of a saved model.
    :param vec_normalize: the reference's observation statistics: the path of a ``VecNormalize`` saved with
        ``VecNormalize.save`` (or a ``VecNormalize`` object, copied now); ``False``: the reference reads raw
        observations (it was trained without observation normalisation); None (default): found as for a plain
        ``ref_policy`` (a ``<model>_vecnormalize.pkl`` beside a path, a model's own ``VecNormalize``, else the
        env's statistics frozen at the first rollout when the env normalises observations).
    :raises ConfigurationError: for a missing policy, a missing or unreadable statistics file, or another type.
    """

    def __init__(self, policy: Any, vec_normalize: Any = None) -> None:
        if policy is None or isinstance(policy, Reference):
            raise ConfigurationError(
                f"Reference(policy={policy!r}) is invalid: pass a trained model, its policy or a saved model's path."
            )
        self.policy = policy
        self.vec_normalize = vec_normalize
        #: the statistics, loaded and copied now (None: found when the model is set up)
        self.obs_statistics: ObsStatistics | None = load_obs_statistics(vec_normalize)

    def __repr__(self) -> str:
        return f"Reference({self.policy!r}, vec_normalize={self.vec_normalize!r})"


def resolve_reference(ref_policy: Any, device: th.device) -> ReferencePolicy:
    """A frozen copy of ``ref_policy``: a model (SB3 or ClippedPPO), a policy, or the path of a saved model.

    :param ref_policy: the ``ref_policy`` argument of ``ClippedPPO`` (a :class:`Reference` included).
    :param device: the model's device.
    :return: the frozen reference.
    :raises ConfigurationError: for anything else, a missing file or a file without a saved policy.
    """
    if isinstance(ref_policy, Reference):
        return resolve_reference(ref_policy.policy, device)
    if isinstance(ref_policy, (str, Path)):
        policy = _load_policy(Path(ref_policy))
    elif isinstance(ref_policy, (BaseAlgorithm, BasePolicy)):
        source = ref_policy.policy if isinstance(ref_policy, BaseAlgorithm) else ref_policy
        # rebuilt and loaded rather than deep-copied: exploration noise (gSDE) holds non-leaf tensors
        policy = build_reference(reference_spec(source), th.device("cpu")).policy
        policy.load_state_dict(source.state_dict())
    else:
        raise ConfigurationError(
            f"ref_policy={ref_policy!r} is invalid: pass a trained model (ClippedPPO, PPO, ...), its policy, the "
            "path of a saved model, or sb3_ppo_ext.rlhf.Reference(one of these, vec_normalize=...)."
        )
    policy.optimizer = None  # type: ignore[assignment]
    return ReferencePolicy(policy.to(device))


def _load_policy(path: Path) -> BasePolicy:
    if not path.exists() and path.with_suffix(".zip").exists():
        path = path.with_suffix(".zip")
    if not path.exists():
        raise ConfigurationError(f"ref_policy={str(path)!r}: no such file. Pass the path of a saved model (.zip).")
    data, params, _ = load_from_zip_file(path, device="cpu")
    if data is None or "policy_class" not in data or "policy" not in params:
        raise ConfigurationError(f"ref_policy={str(path)!r} holds no saved policy: pass a model saved with save().")
    policy_class = data["policy_class"]
    kwargs = dict(data.get("policy_kwargs") or {})
    if data.get("use_sde"):  # as SB3's _setup_model builds it: use_sde is the algorithm's, not in policy_kwargs
        kwargs.setdefault("use_sde", True)
    policy = policy_class(data["observation_space"], data["action_space"], lambda _: 0.0, **kwargs)
    policy.load_state_dict(params["policy"])
    return policy


def check_reference_spaces(reference: ReferencePolicy, observation_space: Any, action_space: Any) -> None:
    """A reference must read the model's observations and score its actions: the same spaces.

    :param reference: the frozen reference.
    :param observation_space: the model's observation space.
    :param action_space: the model's action space.
    :raises ConfigurationError: when either space differs.
    """
    mismatched = [
        f"{name}: reference {theirs}, model {ours}"
        for name, theirs, ours in (
            ("observation_space", reference.policy.observation_space, observation_space),
            ("action_space", reference.policy.action_space, action_space),
        )
        if theirs != ours
    ]
    if mismatched:
        raise ConfigurationError(
            "ref_policy does not fit this env: " + "; ".join(mismatched) + ". Use a reference trained on the same "
            "observation and action spaces (with VecNormalize, on the same normalised observations)."
        )


# -- the coefficient ------------------------------------------------------------------------------------------


class FixedKLController:
    """A constant ``beta``.

    :param value: ``beta``.
    """

    def __init__(self, value: float) -> None:
        self.value = float(value)

    def update(self, kl: float, n_steps: int) -> None:
        """Nothing to adapt.

        :param kl: the mean KL per step measured over the last rollout (unused).
        :param n_steps: env steps of that rollout (unused).
        """


class AdaptiveKLController:
    """Ziegler et al. (2019)'s proportional controller of ``beta`` towards a target KL.

    ``e = clip(KL / target - 1, -0.2, 0.2)``; ``beta <- beta * (1 + e * n / horizon)``, where ``KL`` is measured
    in the target's unit (per step or per episode) and ``n`` counts the rollout in the horizon's unit (env steps,
    or episodes that ended in it).

    :param value: the starting ``beta``.
    :param target: the KL to hold, per step or per episode (``target_per``).
    :param horizon: env steps or episodes (``horizon_in``) over which ``beta`` may change by about ``e``.
    :param target_per: ``"step"`` or ``"episode"``.
    :param horizon_in: ``"steps"`` or ``"episodes"``.
    """

    # class-level defaults: controllers pickled before these settings existed load as per step / env steps
    target_per: str = "step"
    horizon_in: str = "steps"

    def __init__(
        self, value: float, target: float, horizon: int, target_per: str = "step", horizon_in: str = "steps"
    ) -> None:
        self.value = float(value)
        self.target = float(target)
        self.horizon = int(horizon)
        if target_per != "step":
            self.target_per = target_per
        if horizon_in != "steps":
            self.horizon_in = horizon_in

    @property
    def counts_episodes(self) -> bool:
        """Whether the controller needs per-episode measurements (its target or horizon is in episodes)."""
        return self.target_per == "episode" or self.horizon_in == "episodes"

    def update(self, kl: float, n_steps: float) -> None:
        """Move ``beta`` after a rollout.

        :param kl: the KL measured over the rollout, in the target's unit.
        :param n_steps: the rollout's size in the horizon's unit: env steps (all envs, all ranks), or episodes.
        """
        error = min(max(kl / self.target - 1.0, -ADAPTIVE_ERROR_CLIP), ADAPTIVE_ERROR_CLIP)
        self.value *= 1.0 + error * n_steps / self.horizon


KLController = FixedKLController | AdaptiveKLController

TARGET_UNITS: tuple[str, ...] = ("step", "episode")
HORIZON_UNITS: tuple[str, ...] = ("steps", "episodes")


def _positive_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@dataclass(frozen=True)
class AdaptiveKLCoef:
    """Ziegler et al.'s adaptive beta with its units stated: ``ClippedPPO(..., ref_kl_coef=AdaptiveKLCoef(...))``.

    After every rollout ``beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)``
    (:class:`AdaptiveKLController`). Ziegler et al. and TRL state the target per episode (a sequence: the KL
    summed over its tokens, e.g. 6 nats) and the horizon in episodes (10 000): ``target_per="episode"``. The
    settings only describe the controller: each model builds its own, so one object may serve several models.

    * ``target_per="step"``: ``KL`` is the mean per-step KL of the rollout (the sampled log-ratio in reward mode,
      the exact KL of the update in loss mode), as ``ref_kl_coef="adaptive"`` measures it.
    * ``target_per="episode"``: ``KL`` is the per-step KL summed over each episode that ended in the rollout,
      averaged over those episodes (reward mode: ``rlhf/kl_sampled_per_episode``; loss mode: the exact per-step KL
      times the mean length of those episodes, ``rlhf/kl_exact_per_episode``). No episode ended: beta stays.
    * ``horizon_in="steps"``: ``n`` is the rollout's env steps (all envs, all ranks); ``"episodes"``: the number of
      episodes that ended in it (all envs, all ranks).

    :param target: the KL to hold (> 0), in nats per step or per episode (``target_per``).
    :param target_per: ``"step"`` or ``"episode"``; required, so that a target's unit is never guessed.
    :param initial: the starting beta (> 0; the controller multiplies it, so 0 would stay 0). Default 0.1.
    :param horizon: how many steps or episodes (``horizon_in``) a change of beta by about 20% takes. Default 10 000.
    :param horizon_in: ``"steps"`` or ``"episodes"``; default: the target's unit (``"episodes"`` for a target per
        episode, as in Ziegler et al.).
    :raises ConfigurationError: for a value out of range or an unknown unit.
    """

    target: float
    target_per: str
    initial: float = DEFAULT_REF_KL_COEF
    horizon: int = DEFAULT_REF_KL_HORIZON
    horizon_in: str | None = None

    def __post_init__(self) -> None:
        if not _positive_number(self.target):
            raise ConfigurationError(
                f"AdaptiveKLCoef(target={self.target!r}) is invalid: pass a finite KL > 0 (nats per step or per "
                "episode, as target_per says; e.g. 6.0 per episode as in Ziegler et al. and TRL)."
            )
        if self.target_per not in TARGET_UNITS:
            raise ConfigurationError(
                f"AdaptiveKLCoef(target_per={self.target_per!r}) is invalid: pass 'step' (the target is a mean KL "
                "per env step) or 'episode' (a KL summed over an episode, as in Ziegler et al. and TRL)."
            )
        if not _positive_number(self.initial):
            raise ConfigurationError(
                f"AdaptiveKLCoef(initial={self.initial!r}) is invalid: pass a finite beta > 0 (the controller "
                "multiplies beta, so it cannot leave 0; for a fixed beta pass ref_kl_coef=<float>)."
            )
        horizon = self.horizon
        if not isinstance(horizon, numbers.Integral) or isinstance(horizon, bool) or horizon <= 0:
            raise ConfigurationError(
                f"AdaptiveKLCoef(horizon={horizon!r}) is invalid: pass a positive whole number of env steps or "
                "episodes (horizon_in)."
            )
        if self.horizon_in is not None and self.horizon_in not in HORIZON_UNITS:
            raise ConfigurationError(
                f"AdaptiveKLCoef(horizon_in={self.horizon_in!r}) is invalid: pass 'steps' (env steps) or 'episodes' "
                "(episodes that ended), or leave it out for the target's unit."
            )

    @property
    def horizon_unit(self) -> str:
        """``horizon_in``, or the target's unit when it was left out.

        :return: ``"steps"`` or ``"episodes"``.
        """
        if self.horizon_in is not None:
            return self.horizon_in
        return "episodes" if self.target_per == "episode" else "steps"

    def controller(self) -> AdaptiveKLController:
        """A new controller with these settings, at the initial beta.

        :return: the controller.
        """
        return AdaptiveKLController(
            float(self.initial), float(self.target), int(self.horizon), self.target_per, self.horizon_unit
        )


def check_ref_kl_coef(coef: Any, target: Any, horizon: Any) -> None:
    """``ref_kl_target``/``ref_kl_horizon`` may not be given beside ``ref_kl_coef=AdaptiveKLCoef(...)``.

    :param coef: ``ref_kl_coef``.
    :param target: ``ref_kl_target``.
    :param horizon: ``ref_kl_horizon``.
    :raises ConfigurationError: when the object and the separate settings are both given.
    """
    if not isinstance(coef, AdaptiveKLCoef):
        return
    given = [
        f"{name}={value!r}"
        for name, value, default in (
            ("ref_kl_target", target, None),
            ("ref_kl_horizon", horizon, DEFAULT_REF_KL_HORIZON),
        )
        if value is not default and value != default
    ]
    if given:
        raise ConfigurationError(
            f"{', '.join(given)} beside ref_kl_coef={coef!r}: the object holds the target and the horizon. Set them "
            "there (AdaptiveKLCoef(target=..., horizon=...)) and leave ref_kl_target/ref_kl_horizon out."
        )


def make_kl_controller(coef: Any, target: float | None, horizon: int) -> KLController:
    """The controller for ``ref_kl_coef`` (a float, ``"adaptive"`` or :class:`AdaptiveKLCoef`), after checks.

    :param coef: ``ref_kl_coef``: a float >= 0, ``"adaptive"``, or an :class:`AdaptiveKLCoef`.
    :param target: ``ref_kl_target`` (KL per step), needed by ``"adaptive"``.
    :param horizon: ``ref_kl_horizon`` (env steps).
    :return: a :class:`FixedKLController` or an :class:`AdaptiveKLController` (``"adaptive"`` starts at 0.1).
    :raises ConfigurationError: for an invalid coefficient, target or horizon.
    """
    if isinstance(coef, AdaptiveKLCoef):
        check_ref_kl_coef(coef, target, horizon)
        return coef.controller()
    if isinstance(coef, str) and coef == "adaptive":
        if target is None or not (isinstance(target, (int, float)) and math.isfinite(target) and target > 0):
            raise ConfigurationError(
                f"ref_kl_target={target!r} is invalid: ref_kl_coef='adaptive' needs a finite target KL > 0 per step "
                "(e.g. 0.01 to 0.1 for control tasks)."
            )
        if not isinstance(horizon, int) or horizon <= 0:
            raise ConfigurationError(f"ref_kl_horizon={horizon!r} is invalid: pass a positive number of env steps.")
        return AdaptiveKLController(DEFAULT_REF_KL_COEF, float(target), horizon)
    if isinstance(coef, str) or not isinstance(coef, (int, float)) or not math.isfinite(coef) or coef < 0:
        raise ConfigurationError(
            f"ref_kl_coef={coef!r} is invalid: pass a finite float >= 0, 'adaptive' (with ref_kl_target, per step), "
            "or sb3_ppo_ext.rlhf.AdaptiveKLCoef(target=..., target_per='step'|'episode', initial=..., horizon=...)."
        )
    return FixedKLController(float(coef))


def check_ref_kl_mode(mode: Any) -> None:
    """``ref_kl_mode`` is ``"reward"`` or ``"loss"``.

    :param mode: the ``ref_kl_mode`` argument.
    :raises ConfigurationError: for anything else.
    """
    if mode not in REF_KL_MODES:
        raise ConfigurationError(f"ref_kl_mode={mode!r} is invalid: pass one of {list(REF_KL_MODES)}.")
