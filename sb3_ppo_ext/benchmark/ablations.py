"""Ablation variants: each one a function from the Zoo settings to the settings actually run.

``lambda``: GAE's lambda in {0, 0.95, 1} (the seed's section 4 table: one-step TD, GAE, Monte Carlo).

``details``: the seed's section 6 implementation details (after Engstrom et al. 2020 and Huang et
al. 2022). The ``all_on`` baseline is the Zoo's per-env settings with every detail switched on:

- advantage normalization per minibatch (``normalize_advantage=True``);
- no value clipping (``clip_range_vf=None``; the seed calls it debated, so the variant turns it *on*);
- an entropy bonus (the Zoo's ``ent_coef``, or 0.01 where the Zoo uses 0);
- linear learning-rate annealing to 0 from the Zoo's initial rate;
- global gradient-norm clipping (the Zoo's ``max_grad_norm``, SB3's default 0.5 when unset);
- orthogonal initialization (``ortho_init=True``; the Zoo's MuJoCo blocks turn it off);
- observation normalization with ``VecNormalize`` (reward normalization as the Zoo has it).

Each other variant switches exactly one of them.

``stabilizers``: the robotics PPOs' stabilisers (issue 14), each switched on alone on top of the Zoo's
settings (``zoo``), on continuous-action tasks (RPO perturbs a Gaussian mean): dual clip (c = 3), RPO
(alpha = 0.5), the KL-adaptive learning rate (target 0.01, per epoch), value-target normalisation, and
value-target normalisation with PopArt. RPO perturbs the Gaussian mean, which gSDE does not sample
around, so where the Zoo samples with gSDE (Pendulum-v1) the ``rpo`` variant turns gSDE off and a
``no_sde`` control (the Zoo's settings with gSDE off, nothing else) runs beside it; on the other tasks
``no_sde`` would repeat ``zoo`` and is not planned. The asymmetric critic needs Dict observations with
privileged keys, which none of the ablation's tasks has, so it is not a variant.

``tuned``: ClippedPPO's tuned MuJoCo preset (``clipped_ppo_tuned``, issue 30) with one of its choices turned
back to SB3's: advantages not recomputed before each epoch (``no_recompute_adv``), rewards not scaled
(``no_reward_scaling``), advantages normalised per minibatch (``adv_norm``), observations not normalised
(``no_obs_norm``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from sb3_ppo_ext.schedules import linear
from sb3_ppo_ext.zoo.presets import Settings

Variant = Callable[[Settings], Settings]


def _initial(value: Any) -> float:
    # A schedule's value at the start of training (progress_remaining = 1).
    return float(value(1.0)) if callable(value) else float(value)


def _with(settings: Settings, *, normalize: Any = dataclasses.MISSING, **model_kwargs: Any) -> Settings:
    kwargs = {**settings.model_kwargs, **model_kwargs}
    changes: dict[str, Any] = {"model_kwargs": kwargs}
    if normalize is not dataclasses.MISSING:
        changes["normalize"] = normalize
    return dataclasses.replace(settings, **changes)


def _gae_lambda(value: float) -> Variant:
    return lambda settings: _with(settings, gae_lambda=value)


def all_details_on(settings: Settings) -> Settings:
    """The details ablation's baseline: the Zoo settings with every implementation detail on.

    :param settings: an env's Zoo settings.
    :return: a copy with every detail of the module's list switched on.
    """
    kwargs = settings.model_kwargs
    policy_kwargs = {**(kwargs.get("policy_kwargs") or {}), "ortho_init": True}
    normalize = {**(settings.normalize or {"norm_reward": False}), "norm_obs": True}
    normalize.setdefault("gamma", kwargs.get("gamma", 0.99))
    return _with(
        settings,
        normalize=normalize,
        normalize_advantage=True,
        clip_range_vf=None,
        ent_coef=kwargs.get("ent_coef") or 0.01,
        learning_rate=linear(_initial(kwargs.get("learning_rate", 3e-4))),
        max_grad_norm=kwargs.get("max_grad_norm", 0.5),
        policy_kwargs=policy_kwargs,
    )


def _detail_off(switch: Callable[[Settings], Settings]) -> Variant:
    return lambda settings: switch(all_details_on(settings))


def _no_obs_norm(settings: Settings) -> Settings:
    normalize = {**(settings.normalize or {}), "norm_obs": False}
    return _with(settings, normalize=normalize if normalize.get("norm_reward", True) else None)


def _without_sde(settings: Settings) -> Settings:
    return _with(settings, use_sde=False, sde_sample_freq=-1) if uses_sde(settings) else settings


def uses_sde(settings: Settings) -> bool:
    """Whether these settings sample actions with gSDE.

    :param settings: an env's settings.
    :return: True when their ``use_sde`` is set.
    """
    return bool(settings.model_kwargs.get("use_sde", False))


def _no_ortho_init(settings: Settings) -> Settings:
    return _with(settings, policy_kwargs={**settings.model_kwargs["policy_kwargs"], "ortho_init": False})


#: ablation name -> variant name -> settings transform. The first variant is the reference.
ABLATIONS: dict[str, dict[str, Variant]] = {
    "lambda": {
        "lambda=0.95": _gae_lambda(0.95),
        "lambda=0": _gae_lambda(0.0),
        "lambda=1": _gae_lambda(1.0),
    },
    "details": {
        "all_on": all_details_on,
        "no_adv_norm": _detail_off(lambda s: _with(s, normalize_advantage=False)),
        "value_clip_on": _detail_off(lambda s: _with(s, clip_range_vf=_initial(s.model_kwargs.get("clip_range", 0.2)))),
        "no_entropy": _detail_off(lambda s: _with(s, ent_coef=0.0)),
        "no_lr_anneal": _detail_off(lambda s: _with(s, learning_rate=_initial(s.model_kwargs["learning_rate"]))),
        "no_grad_clip": _detail_off(lambda s: _with(s, max_grad_norm=None)),
        "no_ortho_init": _detail_off(_no_ortho_init),
        "no_obs_norm": _detail_off(_no_obs_norm),
    },
    "stabilizers": {
        "zoo": lambda settings: settings,
        "dual_clip": lambda settings: _with(settings, dual_clip=3.0),
        "rpo": lambda settings: _with(_without_sde(settings), rpo_alpha=0.5),
        "no_sde": _without_sde,
        "adaptive_lr": lambda settings: _with(settings, adaptive_lr_kl=0.01),
        "value_norm": lambda settings: _with(settings, normalize_value_targets=True),
        "popart": lambda settings: _with(settings, normalize_value_targets=True, popart=True),
    },
    "tuned": {
        "tuned": lambda settings: settings,
        "no_recompute_adv": lambda settings: _with(settings, recompute_advantages=False),
        "no_reward_scaling": lambda settings: _with(settings, scale_rewards=False),
        "adv_norm": lambda settings: _with(settings, normalize_advantage=True),
        "no_obs_norm": lambda settings: _with(settings, normalize=None),
    },
}

#: Algorithms each ablation may run: the details switches are ClippedPPO arguments (SB3's PPO cannot
#: turn gradient clipping off), lambda exists in every GAE-based algorithm.
ABLATION_ALGOS: dict[str, tuple[str, ...]] = {
    "lambda": ("clipped_ppo", "ppo", "a2c", "trpo"),
    "details": ("clipped_ppo",),
    "stabilizers": ("clipped_ppo",),
    "tuned": ("clipped_ppo_tuned",),
}


#: Variants that train exactly the Zoo settings: a plain run of the same spec can stand in for them (``--reuse``).
ZOO_VARIANTS: dict[str, str] = {"stabilizers": "zoo", "tuned": "tuned"}

#: Variants that change more than their own switch on some envs, and the control that isolates the switch there:
#: where gSDE is on, ``rpo`` also turns it off, so ``rpo`` against ``no_sde`` (both without gSDE) measures RPO alone.
CONTROLS: dict[str, str] = {"rpo": "no_sde"}

#: Variants planned only where a predicate on the Zoo settings holds (elsewhere they repeat the reference).
APPLIES: dict[tuple[str, str], Callable[[Settings], bool]] = {("stabilizers", "no_sde"): uses_sde}


def applies(ablation: str | None, variant: str, settings: Settings) -> bool:
    """Whether ``variant`` of ``ablation`` is worth running on top of ``settings``.

    :param ablation: a key of :data:`ABLATIONS`, or None (no ablation: every run applies).
    :param variant: one of the ablation's variants.
    :param settings: the env's Zoo settings.
    :return: False where the variant would repeat the reference (:data:`APPLIES`).
    """
    if ablation is None:
        return True
    return APPLIES.get((ablation, variant), lambda _: True)(settings)


def apply(ablation: str | None, variant: str, settings: Settings) -> Settings:
    """The settings that ``variant`` of ``ablation`` runs.

    :param ablation: a key of :data:`ABLATIONS`, or None.
    :param variant: one of the ablation's variants.
    :param settings: the env's Zoo settings.
    :return: the variant's settings (``settings`` unchanged without an ablation).
    """
    if ablation is None:
        return settings
    return ABLATIONS[ablation][variant](settings)
