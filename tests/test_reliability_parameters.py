"""Issue 28: ``set_parameters`` is all or nothing, copies what it is given, and takes a dict without the reference."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch as th

from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext.errors import ModelFileError, ParameterMismatchError
from sb3_ppo_ext.reliability.checks import check_parameters

TINY = dict(n_steps=32, batch_size=16, n_epochs=1, device="cpu")
NET = dict(net_arch=[16])


def _trained(policy: str = "MlpPolicy", seed: int = 0, **kwargs: Any) -> ClippedPPO:
    model = ClippedPPO(policy, "CartPole-v1", seed=seed, **TINY, **kwargs)
    model.learn(32)  # one update: Adam's moments exist
    return model


def _tensors(value: Any, prefix: str = "") -> dict[str, th.Tensor]:
    """Every tensor of a nested state dict, by path."""
    if isinstance(value, th.Tensor):
        return {prefix: value}
    found: dict[str, th.Tensor] = {}
    if isinstance(value, dict):
        for key, item in value.items():
            found.update(_tensors(item, f"{prefix}/{key}"))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found.update(_tensors(item, f"{prefix}/{index}"))
    return found


def _assert_same(got: dict[str, Any], expected: dict[str, Any]) -> None:
    got_tensors, expected_tensors = _tensors(got), _tensors(expected)
    assert got_tensors.keys() == expected_tensors.keys()
    for path, tensor in expected_tensors.items():
        assert th.equal(got_tensors[path], tensor), path


def test_a_recurrent_models_file_into_a_plain_model_changes_nothing(tmp_path) -> None:
    plain = _trained(policy_kwargs=NET)
    _trained("MlpLstmPolicy", policy_kwargs=dict(lstm_hidden_size=8, **NET)).save(tmp_path / "recurrent.zip")
    before = copy.deepcopy(plain.get_parameters())
    with pytest.raises(ParameterMismatchError) as info:
        plain.set_parameters(tmp_path / "recurrent.zip")
    message = str(info.value)
    assert "none were loaded (the model is unchanged)" in message
    assert "unexpected key(s) in state_dict of 'policy': lstm_actor.weight_ih_l0" in message
    # the entries whose names match but whose shapes differ, with both shapes
    assert "shape mismatch in 'policy': mlp_extractor.policy_net.0.weight (16, 8) (the model's (16, 4))" in message
    assert "'policy.optimizer' holds parameter groups of sizes" in message
    assert isinstance(info.value, RuntimeError)  # torch's type, which SB3's load() catches
    _assert_same(plain.get_parameters(), before)  # parameters and Adam's moments untouched
    # without exact_match the unexpected keys are skipped, but the shapes still do not fit
    with pytest.raises(ParameterMismatchError, match=r"shape mismatch in 'policy'") as info:
        plain.set_parameters(tmp_path / "recurrent.zip", exact_match=False)
    assert "unexpected key" not in str(info.value)
    _assert_same(plain.get_parameters(), before)


def test_every_problem_is_reported_at_once_and_the_model_still_trains() -> None:
    model = _trained(policy_kwargs=NET)
    params = model.get_parameters()
    before = copy.deepcopy(params)
    broken = copy.deepcopy(params)
    del broken["policy"]["value_net.bias"]
    broken["policy"]["extra.weight"] = th.zeros(2)
    broken["policy"]["action_net.weight"] = th.zeros(3, 16)
    moments = broken["policy.optimizer"]["state"][0]
    moments["exp_avg"] = th.zeros(7)  # a moment of another shape: torch's optimizer would load it
    with pytest.raises(ParameterMismatchError) as info:
        model.set_parameters(broken)
    message = str(info.value)
    for part in (
        "Missing key(s) in state_dict of 'policy': value_net.bias",
        "unexpected key(s) in state_dict of 'policy': extra.weight",
        "action_net.weight (3, 16) (the model's (2, 16))",
        "exp_avg of parameter 0 (7,) (the parameter's",
    ):
        assert part in message, part
    with pytest.raises(ParameterMismatchError, match=r"missing object\(s\) \['policy.optimizer'\]"):
        model.set_parameters({"policy": params["policy"]})
    with pytest.raises(ParameterMismatchError, match=r"unexpected object 'policy.no_such_module'"):
        model.set_parameters({**params, "policy.no_such_module": {}})
    with pytest.raises(ParameterMismatchError, match="needs a path or a dict"):
        check_parameters(model, [params])
    _assert_same(model.get_parameters(), before)
    model.set_parameters({"policy": params["policy"]}, exact_match=False)  # a subset, as SB3 allows
    model.learn(32)


def test_a_damaged_file_is_a_model_file_error_and_changes_nothing(tmp_path) -> None:
    model = _trained()
    before = copy.deepcopy(model.get_parameters())
    (tmp_path / "empty.zip").write_bytes(b"")
    with pytest.raises(ModelFileError, match="empty"):
        model.set_parameters(tmp_path / "empty.zip")
    _assert_same(model.get_parameters(), before)


def test_two_models_fine_tuned_from_one_dict_share_no_tensor() -> None:
    pretrained = _trained()
    params = pretrained.get_parameters()
    snapshot = copy.deepcopy(params)
    first, second = (
        ClippedPPO("MlpPolicy", "CartPole-v1", seed=1, **TINY),
        ClippedPPO("MlpPolicy", "CartPole-v1", seed=2, **TINY),
    )
    first.set_parameters(params)
    second.set_parameters(params)
    second_before = copy.deepcopy(second.get_parameters())
    _assert_same(second_before, snapshot)  # loaded exactly
    first.learn(64)
    _assert_same(second.get_parameters(), second_before)  # its parameters and Adam's moments did not move
    _assert_same(params, snapshot)  # nor did the dict
    given = {tensor.data_ptr() for tensor in _tensors(params).values()}
    for model in (first, second):
        loaded = _tensors(model.policy.optimizer.state_dict()) | _tensors(model.policy.state_dict())
        assert not given & {tensor.data_ptr() for tensor in loaded.values()}


def test_a_model_with_a_reference_loads_a_pretrained_dict_in_strict_mode() -> None:
    pretrained = _trained()
    model = ClippedPPO("MlpPolicy", "CartPole-v1", ref_policy=pretrained, seed=3, **TINY)
    model.learn(32)
    reference = copy.deepcopy(model.ref_policy.state_dict())
    params = pretrained.get_parameters()
    assert "ref_policy" not in params and "ref_policy" in model.get_parameters()
    model.set_parameters(params)  # exact_match=True: the reference is not a trainable parameter
    _assert_same(model.policy.state_dict(), params["policy"])
    _assert_same(model.ref_policy.state_dict(), reference)
    # its own parameters, reference included, load back; a reference of another shape is refused
    own = model.get_parameters()
    model.set_parameters(own)
    own["ref_policy"]["action_net.weight"] = th.zeros(5, 64)
    with pytest.raises(ParameterMismatchError, match=r"shape mismatch in 'ref_policy': action_net.weight \(5, 64\)"):
        model.set_parameters(own)
    _assert_same(model.ref_policy.state_dict(), reference)
    # and a model without a reference refuses one, saying what it is
    with pytest.raises(ParameterMismatchError, match="unexpected object 'ref_policy' \\(a frozen reference"):
        pretrained.set_parameters(model.get_parameters())
    model.learn(32)
    obs = np.zeros((1, 4), np.float32)
    assert model.predict(obs)[0].shape == (1,)


def test_save_and_load_still_round_trip(tmp_path) -> None:
    model = _trained("MlpLstmPolicy", policy_kwargs=dict(lstm_hidden_size=8, **NET))
    model.save(tmp_path / "model.zip")
    loaded = ClippedPPO.load(tmp_path / "model.zip", device="cpu")
    _assert_same(loaded.get_parameters(), model.get_parameters())
    loaded.set_parameters(tmp_path / "model.zip")
    _assert_same(loaded.get_parameters(), model.get_parameters())
