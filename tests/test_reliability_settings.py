"""Issue 28: settings that do nothing because their feature is off warn, naming the setting and its switch."""

from __future__ import annotations

import inspect
import re
import warnings
from typing import Any

import numpy as np
import pytest

from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext.errors import ConfigurationWarning
from sb3_ppo_ext.reliability.checks import INACTIVE_SETTING_DEFAULTS, inactive_settings, warn_inactive_settings

TINY = dict(n_steps=32, batch_size=16, n_epochs=1, device="cpu")

INACTIVE = [
    (dict(ref_kl_coef=0.5), "ref_kl_coef=0.5", "ref_policy="),
    (dict(ref_kl_coef="adaptive", ref_kl_target=0.02), "ref_kl_coef='adaptive'", "ref_policy="),
    (dict(ref_kl_mode="loss"), "ref_kl_mode='loss'", "ref_policy="),
    (dict(ref_kl_target=0.01), "ref_kl_target=0.01", "ref_policy="),
    (dict(ref_kl_horizon=500), "ref_kl_horizon=500", "ref_policy="),
    (dict(adaptive_lr_every="minibatch"), "adaptive_lr_every='minibatch'", "adaptive_lr_kl="),
    (dict(adaptive_lr_bounds=(1e-4, 1e-3)), r"adaptive_lr_bounds=\(0.0001, 0.001\)", "adaptive_lr_kl="),
    (dict(popart=True), "popart=True", "normalize_value_targets=True"),
]


@pytest.mark.parametrize(("kwargs", "setting", "switch"), INACTIVE, ids=[c[1].split("=")[0] for c in INACTIVE])
def test_a_setting_whose_feature_is_off_warns_naming_it_and_its_switch(
    kwargs: dict[str, Any], setting: str, switch: str
) -> None:
    with pytest.warns(ConfigurationWarning) as record:
        ClippedPPO("MlpPolicy", "CartPole-v1", **kwargs, **TINY)
    inactive = [w for w in record if "has no effect" in str(w.message)]
    assert len(inactive) == len(kwargs)  # one warning per setting
    assert re.match(rf"{setting} has no effect: its feature is off\. Pass {switch}", str(inactive[0].message))
    assert all(w.filename == __file__ for w in inactive)  # they point at the user's ClippedPPO(...) line


def test_reference_settings_for_the_adaptive_controller_warn_with_a_fixed_beta() -> None:
    base = ClippedPPO("MlpPolicy", "CartPole-v1", **TINY)
    with pytest.warns(ConfigurationWarning, match=r"ref_kl_target=0.01 has no effect.*Pass ref_kl_coef='adaptive'"):
        ClippedPPO("MlpPolicy", "CartPole-v1", ref_policy=base, ref_kl_coef=0.2, ref_kl_target=0.01, **TINY)
    with pytest.warns(ConfigurationWarning, match=r"ref_kl_horizon=100 has no effect.*ref_kl_coef='adaptive'"):
        ClippedPPO("MlpPolicy", "CartPole-v1", ref_policy=base, ref_kl_horizon=100, **TINY)


def test_settings_of_features_that_are_on_or_left_at_their_defaults_do_not_warn() -> None:
    base = ClippedPPO("MlpPolicy", "CartPole-v1", **TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigurationWarning)
        ClippedPPO("MlpPolicy", "CartPole-v1", **TINY)
        ClippedPPO(
            "MlpPolicy",
            "CartPole-v1",
            ref_policy=base,
            ref_kl_coef="adaptive",
            ref_kl_target=0.02,
            ref_kl_horizon=500,
            ref_kl_mode="loss",
            adaptive_lr_kl=0.01,
            adaptive_lr_every="minibatch",
            adaptive_lr_bounds=[1e-4, 1e-3],
            normalize_value_targets=True,
            popart=True,
            **TINY,
        )
        ClippedPPO("MlpPolicy", "CartPole-v1", adaptive_lr_bounds=[1e-5, 1e-2], ref_kl_horizon=10_000, **TINY)


def test_inactive_setting_defaults_are_clipped_ppos() -> None:
    parameters = inspect.signature(ClippedPPO.__init__).parameters
    assert {name: parameters[name].default for name in INACTIVE_SETTING_DEFAULTS} == INACTIVE_SETTING_DEFAULTS


def test_warn_inactive_settings_on_its_own() -> None:
    assert inactive_settings({}) == []
    assert inactive_settings({"ref_kl_coef": np.array([1.0, 2.0])})[0][0] == "ref_kl_coef"  # no ambiguous truth value
    with pytest.warns(ConfigurationWarning) as record:
        names = warn_inactive_settings({"popart": True, "adaptive_lr_every": "rollout", "normalize_value_targets": 0})
    assert names == ["adaptive_lr_every", "popart"] and len(record) == 2
    assert record[0].filename == __file__
