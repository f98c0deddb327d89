"""sb3_ppo_ext.schedules: LinearDecay (not SB3's LinearSchedule), and models saved with the former names."""

from __future__ import annotations

import base64
import pickle

import cloudpickle
import pytest
from stable_baselines3.common import utils as sb3_utils

from sb3_ppo_ext import schedules
from sb3_ppo_ext.schedules import LinearDecay, linear, parse_schedule

# What SB3's save() stored (cloudpickle, in the zip's "data") for learning_rate=linear(1e-3) and a
# ConstantSchedule(0.7) of this module, before the classes were renamed: FloatSchedule wrapping
# sb3_ppo_ext.schedules.LinearSchedule(start=0.001, end=0.0) / ConstantSchedule(value=0.7).
LEGACY_LINEAR = (
    "gAWVnwAAAAAAAACMHnN0YWJsZV9iYXNlbGluZXMzLmNvbW1vbi51dGlsc5SMDUZsb2F0U2NoZWR1bGWUk5QpgZR9lIwOdmFsdWVfc2NoZWR1"
    "bGWUjBVzYjNfcHBvX2V4dC5zY2hlZHVsZXOUjA5MaW5lYXJTY2hlZHVsZZSTlCmBlH2UKIwFc3RhcnSURz9QYk3S8an8jANlbmSURwAAAAAA"
    "AAAAdWJzYi4="
)
LEGACY_CONSTANT = (
    "gAWVkQAAAAAAAACMHnN0YWJsZV9iYXNlbGluZXMzLmNvbW1vbi51dGlsc5SMDUZsb2F0U2NoZWR1bGWUk5QpgZR9lIwOdmFsdWVfc2NoZWR1"
    "bGWUjBVzYjNfcHBvX2V4dC5zY2hlZHVsZXOUjBBDb25zdGFudFNjaGVkdWxllJOUKYGUfZSMBXZhbHVllEc/5mZmZmZmZnNic2Iu"
)


def test_linear_decay_goes_from_start_to_end_over_the_run_clamped():
    schedule = linear(3e-4)
    assert isinstance(schedule, LinearDecay) and schedule == LinearDecay(3e-4, 0.0)
    assert schedule(1.0) == pytest.approx(3e-4) and schedule(0.5) == pytest.approx(1.5e-4) and schedule(0.0) == 0.0
    assert schedule(-0.01) == 0.0 and schedule(1.2) == pytest.approx(3e-4)
    assert linear(0.3, 0.1)(0.5) == pytest.approx(0.2)
    assert parse_schedule("lin_1e-3") == LinearDecay(1e-3) and parse_schedule("0.25") == 0.25


def test_no_name_shadows_sb3s_schedules():
    assert not {"LinearSchedule", "ConstantSchedule", "FloatSchedule"} & set(schedules.__all__)
    assert not {"LinearSchedule", "ConstantSchedule", "FloatSchedule"} & set(vars(schedules))
    # SB3's LinearSchedule is another schedule: it reaches `end` at progress 1 - end_fraction
    assert sb3_utils.LinearSchedule(1.0, 0.0, 0.5)(0.5) == 0.0 != LinearDecay(1.0)(0.5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_models_saved_with_the_former_class_names_still_load():
    lr = cloudpickle.loads(base64.b64decode(LEGACY_LINEAR))
    assert isinstance(lr, sb3_utils.FloatSchedule) and lr.value_schedule == LinearDecay(1e-3)
    assert lr(0.5) == pytest.approx(5e-4)
    constant = cloudpickle.loads(base64.b64decode(LEGACY_CONSTANT))
    assert isinstance(constant.value_schedule, sb3_utils.ConstantSchedule) and constant(0.1) == 0.7
    # and round-trip again
    assert pickle.loads(pickle.dumps(constant.value_schedule)) == constant.value_schedule


def test_former_names_warn():
    with pytest.warns(DeprecationWarning, match="LinearDecay"):
        assert schedules.LinearSchedule is LinearDecay
    with pytest.warns(DeprecationWarning, match="stable_baselines3.common.utils.ConstantSchedule"):
        assert issubclass(schedules.ConstantSchedule, sb3_utils.ConstantSchedule)
    with pytest.raises(AttributeError):
        schedules.NoSuchSchedule  # noqa: B018


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_model_zip_with_the_former_class_names_loads(tmp_path):
    import json
    import zipfile

    from sb3_ppo_ext import ClippedPPO

    path = tmp_path / "model.zip"
    ClippedPPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=64, learning_rate=linear(1e-3), device="cpu").save(
        path
    )
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    data = json.loads(members["data"])
    # the zip as the former version wrote it: its schedules pickled under the former class names
    bare = pickle.dumps(LinearDecay(1e-3), protocol=2).replace(b"\nLinearDecay\n", b"\nLinearSchedule\n")
    data["learning_rate"][":serialized:"] = base64.b64encode(bare).decode()
    data["lr_schedule"][":serialized:"] = LEGACY_LINEAR
    data["clip_range"][":serialized:"] = LEGACY_CONSTANT
    members["data"] = json.dumps(data).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)

    model = ClippedPPO.load(path, device="cpu")
    assert model.learning_rate == LinearDecay(1e-3)
    assert model.lr_schedule(0.5) == pytest.approx(5e-4)
    assert model.clip_range(0.3) == pytest.approx(0.7)
