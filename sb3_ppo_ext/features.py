"""Which of the package's features a model's settings turn on, as the extensions its loops call.

The one place that maps constructor arguments to feature layers (:mod:`sb3_ppo_ext.extensions`): a new
feature adds its extension here, and ``ppo.py``'s loops stay as they are.
"""

from __future__ import annotations

from typing import Any

from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.policies import BasePolicy

from sb3_ppo_ext.buffers import DictGAERolloutBuffer, GAERolloutBuffer
from sb3_ppo_ext.details.recompute_advantages import RecomputeAdvantages
from sb3_ppo_ext.details.reward_scaling import RewardScaler, RewardScaling
from sb3_ppo_ext.errors import ConfigurationError
from sb3_ppo_ext.extensions import Extension
from sb3_ppo_ext.masking import ActionMasks
from sb3_ppo_ext.policies import ActorCriticCnnPolicy, ActorCriticPolicy, MultiInputActorCriticPolicy
from sb3_ppo_ext.recurrent.buffers import RecurrentDictGAERolloutBuffer, RecurrentGAERolloutBuffer
from sb3_ppo_ext.recurrent.policies import (
    GruActorCriticCnnPolicy,
    GruActorCriticPolicy,
    GruMultiInputActorCriticPolicy,
    RecurrentActorCriticCnnPolicy,
    RecurrentActorCriticPolicy,
    RecurrentMultiInputActorCriticPolicy,
)
from sb3_ppo_ext.recurrent.rollout import RecurrentStates
from sb3_ppo_ext.reliability.checks import validate_stabilizers, warn_inactive_settings
from sb3_ppo_ext.rlhf.penalty import reference_kl
from sb3_ppo_ext.rlhf.reference import DEFAULT_REF_KL_COEF, check_ref_kl_coef, check_ref_kl_mode, make_kl_controller
from sb3_ppo_ext.stabilizers.adaptive_lr import AdaptiveLearningRate, KLAdaptiveLearningRate
from sb3_ppo_ext.stabilizers.rpo import RobustPolicyOptimization
from sb3_ppo_ext.stabilizers.value_normalization import ValueNormalizer, ValueTargetNormalization

__all__ = [
    "POLICY_ALIASES",
    "check_extensions",
    "check_recompute_advantages",
    "configure_features",
    "default_rollout_buffer_class",
    "feature_extensions",
    "is_recurrent",
]

#: the policy names ``ClippedPPO`` accepts; the ``*LstmPolicy`` ones (sb3-contrib's names) and the ``*GruPolicy``
#: ones (the same policies with ``rnn_type="gru"``) turn recurrence on
POLICY_ALIASES: dict[str, type[BasePolicy]] = {
    "MlpPolicy": ActorCriticPolicy,
    "CnnPolicy": ActorCriticCnnPolicy,
    "MultiInputPolicy": MultiInputActorCriticPolicy,
    "MlpLstmPolicy": RecurrentActorCriticPolicy,
    "CnnLstmPolicy": RecurrentActorCriticCnnPolicy,
    "MultiInputLstmPolicy": RecurrentMultiInputActorCriticPolicy,
    "MlpGruPolicy": GruActorCriticPolicy,
    "CnnGruPolicy": GruActorCriticCnnPolicy,
    "MultiInputGruPolicy": GruMultiInputActorCriticPolicy,
}


def configure_features(
    model: Any,
    action_space: spaces.Space | None,
    *,
    use_sde: bool,
    ref_policy: Any,
    ref_kl_coef: Any,
    ref_kl_mode: Any,
    ref_kl_target: float | None,
    ref_kl_horizon: int,
    dual_clip: float | None,
    rpo_alpha: float | None,
    adaptive_lr_kl: float | None,
    adaptive_lr_every: str,
    adaptive_lr_bounds: tuple[float, float],
    normalize_value_targets: bool,
    popart: bool,
    recompute_advantages: bool,
    scale_rewards: bool,
    extensions: list[Extension] | None,
) -> None:
    """Check the feature arguments of ``ClippedPPO`` (named as there) and keep them, with their state, on ``model``.

    Runs in the constructor before the env is stepped, so a bad setting fails before any work is done. The
    keyword arguments are ``ClippedPPO``'s, with the meaning documented there.

    :param model: the ``ClippedPPO`` being constructed.
    :param action_space: the env's action space (None: not known yet), for the checks that depend on it.
    :param use_sde: whether the model uses gSDE exploration (RPO needs plain Gaussian noise).
    :param ref_policy: the frozen reference policy, or None.
    :param ref_kl_coef: the reference KL's beta (a float or ``"adaptive"``), or None for the default.
    :param ref_kl_mode: ``"reward"`` or ``"loss"``.
    :param ref_kl_target: the adaptive beta's target KL per step.
    :param ref_kl_horizon: env steps over which the adaptive beta may change by about 20%.
    :param dual_clip: dual-clip PPO's c, or None.
    :param rpo_alpha: RPO's noise scale, or None.
    :param adaptive_lr_kl: the KL-adaptive learning rate's target, or None.
    :param adaptive_lr_every: ``"epoch"`` or ``"minibatch"``.
    :param adaptive_lr_bounds: the adaptive learning rate's ``(min, max)``.
    :param normalize_value_targets: whether the critic learns normalised returns.
    :param popart: whether the value head is rescaled as PopArt does.
    :param recompute_advantages: whether GAE is computed again before every epoch.
    :param scale_rewards: whether rewards are divided by a running std of the return.
    :param extensions: the user's own extensions, or None.
    :raises ConfigurationError: a setting is invalid or does not fit another.
    """
    check_ref_kl_mode(ref_kl_mode)
    check_ref_kl_coef(ref_kl_coef, ref_kl_target, ref_kl_horizon)  # AdaptiveKLCoef holds target and horizon
    validate_stabilizers(
        dual_clip=dual_clip,
        rpo_alpha=rpo_alpha,
        adaptive_lr_kl=adaptive_lr_kl,
        adaptive_lr_every=adaptive_lr_every,
        adaptive_lr_bounds=adaptive_lr_bounds,
        normalize_value_targets=normalize_value_targets,
        popart=popart,
        action_space=action_space,
        use_sde=use_sde,
    )
    settings = dict(
        ref_policy=ref_policy,
        ref_kl_coef=ref_kl_coef,
        ref_kl_mode=ref_kl_mode,
        ref_kl_target=ref_kl_target,
        ref_kl_horizon=ref_kl_horizon,
        adaptive_lr_kl=adaptive_lr_kl,
        adaptive_lr_every=adaptive_lr_every,
        adaptive_lr_bounds=adaptive_lr_bounds,
        normalize_value_targets=normalize_value_targets,
        popart=popart,
    )
    warn_inactive_settings(settings, stacklevel=4)  # e.g. ref_kl_coef without ref_policy; 4: the user's ClippedPPO()
    model._ref_kl_controller = None
    if ref_policy is not None:
        coef = DEFAULT_REF_KL_COEF if ref_kl_coef is None else ref_kl_coef
        model._ref_kl_controller = make_kl_controller(coef, ref_kl_target, ref_kl_horizon)
    model.ref_kl_mode = ref_kl_mode
    model._ref_policy_source = ref_policy  # resolved by setup_reference, then dropped
    # the reference's class and constructor arguments: load() rebuilds it from them, then restores its weights
    model._ref_policy_spec = None
    model._reference = None
    model.ref_policy = None
    model.dual_clip = dual_clip
    model.rpo_alpha = rpo_alpha
    model.adaptive_lr_kl = adaptive_lr_kl
    model.adaptive_lr_every = adaptive_lr_every
    model.adaptive_lr_bounds = tuple(adaptive_lr_bounds)
    model._adaptive_lr = None
    model.normalize_value_targets = normalize_value_targets
    model.popart = popart
    model.value_normalizer = ValueNormalizer(popart) if normalize_value_targets else None
    for name, value in (("recompute_advantages", recompute_advantages), ("scale_rewards", scale_rewards)):
        if not isinstance(value, bool):
            raise ConfigurationError(f"{name}={value!r} is invalid: pass True or False (default False: off).")
    model.recompute_advantages = recompute_advantages
    model.scale_rewards = scale_rewards
    model.reward_scaler = None  # made with the model's gamma by feature_extensions
    model.extensions = list(check_extensions(extensions))


def feature_extensions(model: Any) -> list[Extension]:
    """The extensions of the features ``model``'s settings turn on, in the order their hooks run.

    Their state lives on the model, where ``save`` finds it (``value_normalizer``, ``_adaptive_lr``,
    ``_ref_kl_controller``), so that the extensions can be rebuilt by every ``_setup_model`` (``load`` included).

    :param model: a ``ClippedPPO`` after :func:`configure_features`, whose policy class and schedule are set.
    :return: the features' extensions (the masks' always first), without the user's own.
    """
    features: list[Extension] = [ActionMasks()]
    if is_recurrent(model.policy_class):
        features.append(RecurrentStates())
    if model._ref_kl_controller is not None:
        features.append(reference_kl(model._ref_kl_controller, model.ref_kl_mode))
    if model.value_normalizer is not None:
        features.append(ValueTargetNormalization(model.value_normalizer))
    if model.adaptive_lr_kl is not None:
        if model._adaptive_lr is None:  # a new model; a loaded one restored the rule and its current rate
            initial = model.lr_schedule(1.0)
            model._adaptive_lr = KLAdaptiveLearningRate(initial, model.adaptive_lr_kl, model.adaptive_lr_bounds)
        features.append(AdaptiveLearningRate(model._adaptive_lr, model.adaptive_lr_every))
    if model.rpo_alpha is not None:
        features.append(RobustPolicyOptimization(model.rpo_alpha))
    if getattr(model, "recompute_advantages", False):  # models saved before the switch existed lack it
        check_recompute_advantages(model.policy_class, model.normalize_advantage)
        features.append(RecomputeAdvantages())
    if getattr(model, "scale_rewards", False):
        if model.reward_scaler is None:
            model.reward_scaler = RewardScaler(model.gamma)
        features.append(RewardScaling(model.reward_scaler))
    return features


def check_recompute_advantages(policy_class: Any, normalize_advantage: Any) -> None:
    """``recompute_advantages`` needs a feed-forward critic and advantages normalised per minibatch or not at all.

    :param policy_class: the model's policy class.
    :param normalize_advantage: the model's ``normalize_advantage`` setting.
    :raises ConfigurationError: the policy is recurrent, or advantages are normalised per batch.
    """
    if is_recurrent(policy_class):
        raise ConfigurationError(
            f"recompute_advantages=True is not supported with the recurrent policy {policy_class.__name__}: its "
            "critic needs the rollout's LSTM states in sequence. Use a feed-forward policy or pass False."
        )
    if normalize_advantage == "batch":
        raise ConfigurationError(
            "recompute_advantages=True with normalize_advantage='batch' would train on un-normalised recomputed "
            "advantages after the first epoch. Use normalize_advantage=True (per minibatch) or False."
        )


def check_extensions(extensions: Any) -> list[Extension]:
    """``extensions`` is None or a list of :class:`~sb3_ppo_ext.extensions.Extension` instances.

    :param extensions: the ``extensions`` argument of ``ClippedPPO``.
    :return: the extensions as a new list (empty for None).
    :raises ConfigurationError: it is anything else.
    """
    if extensions is None:
        return []
    items = list(extensions) if isinstance(extensions, list | tuple) else None
    if items is None or not all(isinstance(item, Extension) for item in items):
        raise ConfigurationError(
            f"extensions={extensions!r} is invalid: pass a list of sb3_ppo_ext.extensions.Extension instances "
            "(subclass Extension and override the hooks you need)."
        )
    return items


def is_recurrent(policy_class: Any) -> bool:
    """Whether the policy has memory (``MlpLstmPolicy``, ``MlpGruPolicy`` and the like): rollouts then carry its states.

    :param policy_class: a policy class (anything else is not recurrent).
    :return: True for a subclass of :class:`~sb3_ppo_ext.recurrent.policies.RecurrentActorCriticPolicy`.
    """
    return isinstance(policy_class, type) and issubclass(policy_class, RecurrentActorCriticPolicy)


def default_rollout_buffer_class(observation_space: spaces.Space, recurrent: bool) -> type[RolloutBuffer]:
    """Our GAE buffer for the observation space (flat or Dict), with LSTM states for a recurrent policy.

    :param observation_space: the env's observation space.
    :param recurrent: whether the policy is recurrent.
    :return: the buffer class ``ClippedPPO`` uses when ``rollout_buffer_class`` is not given.
    """
    is_dict = isinstance(observation_space, spaces.Dict)
    if recurrent:
        return RecurrentDictGAERolloutBuffer if is_dict else RecurrentGAERolloutBuffer
    return DictGAERolloutBuffer if is_dict else GAERolloutBuffer
