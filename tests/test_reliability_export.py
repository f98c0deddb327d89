"""Issue 28: export refuses an unsupported opset up front, prints nothing, and leaves nothing behind on failure."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch as th
from sb3_contrib.common.envs import InvalidActionEnvDiscrete, InvalidActionEnvMultiBinary

from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext import export as export_module
from sb3_ppo_ext.errors import ExportError
from sb3_ppo_ext.export import (
    DEFAULT_OPSET,
    MIN_OPSET,
    check_opset,
    read_metadata,
    supported_opsets,
    to_onnx,
    to_torchscript,
)

onnx = pytest.importorskip("onnx")
TINY = dict(n_steps=32, batch_size=16, n_epochs=1, device="cpu")


def _model(policy: str = "MlpPolicy", env: Any = "CartPole-v1", **kwargs: Any) -> ClippedPPO:
    return ClippedPPO(policy, env, **TINY, **kwargs)


def _listing(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def test_the_supported_range_is_what_torch_and_onnx_both_know() -> None:
    supported = supported_opsets()
    assert supported.start == MIN_OPSET and DEFAULT_OPSET in supported
    assert supported[-1] <= onnx.defs.onnx_opset_version()
    assert check_opset(np.int64(DEFAULT_OPSET)) == DEFAULT_OPSET


@pytest.mark.parametrize("opset", [99, 5, MIN_OPSET - 1, "17", 17.0, True, None])
def test_an_unsupported_opset_is_refused_up_front_quietly_leaving_nothing(opset: Any, tmp_path, capfd) -> None:
    model = _model()
    supported = supported_opsets()
    target = tmp_path / "new" / "folder" / "policy.onnx"
    with pytest.raises(ExportError) as info:
        to_onnx(model, target, opset_version=opset)
    assert str(info.value).startswith(f"opset_version={opset!r} is not supported: pass an int from ")
    assert f"from {supported.start} to {supported[-1]}" in str(info.value)
    assert capfd.readouterr() == ("", "")
    assert _listing(tmp_path) == []  # no folder, no file
    assert model.policy.training  # the model is as it was


@pytest.mark.parametrize("policy", ["box", "masked", "multibinary", "lstm"])
def test_every_policy_kind_exports_at_both_ends_of_the_range(policy: str, tmp_path, capfd) -> None:
    options: dict[str, Any] = dict(with_value=True)
    if policy == "lstm":
        model = _model("MlpLstmPolicy", policy_kwargs=dict(lstm_hidden_size=8, net_arch=[8]))
    elif policy == "box":
        model = _model(env="Pendulum-v1")
    else:  # masks need ONNX's Where (opset 9), MultiBinary actions its Round (opset 11)
        env = InvalidActionEnvDiscrete(4, n_invalid_actions=1) if policy == "masked" else InvalidActionEnvMultiBinary(3)
        model, options = _model(env=env), dict(action_masks=True)
    for opset in (supported_opsets().start, supported_opsets()[-1]):
        path = to_onnx(model, tmp_path / f"{opset}.onnx", opset_version=opset, **options)  # checked with onnxruntime
        assert read_metadata(path)["export_options"]["opset_version"] == opset
    assert capfd.readouterr().out == ""
    assert _listing(tmp_path) == sorted(f"{opset}.onnx" for opset in (supported_opsets().start, supported_opsets()[-1]))


def test_a_failing_torch_exporter_is_an_export_error_without_its_output(tmp_path, capfd, monkeypatch) -> None:
    def failing_export(*args: Any, **kwargs: Any) -> None:
        os.write(1, b"graph(%obs : Float(*, 4)):\n  %1 : ... 40 lines of IR\n")
        os.write(2, b"more native output\n")
        raise RuntimeError("Exporting the operator 'aten::something' to ONNX opset version 17 is not supported.\nIR...")

    monkeypatch.setattr(th.onnx, "export", failing_export)
    target = tmp_path / "out" / "policy.onnx"
    with pytest.raises(
        ExportError, match=r"torch could not export the policy to ONNX opset 17: Exporting the operator"
    ):
        to_onnx(_model(), target)
    assert capfd.readouterr() == ("", "")
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("kind", ["onnx", "torchscript"])
def test_a_failed_check_leaves_neither_a_file_nor_a_folder_and_keeps_the_old_file(
    kind: str, tmp_path, monkeypatch
) -> None:
    def disagree(*args: Any) -> None:
        raise ExportError("The exported model disagrees with the policy")

    monkeypatch.setattr(export_module, "_check_outputs", disagree)
    write = to_onnx if kind == "onnx" else to_torchscript
    suffix = ".onnx" if kind == "onnx" else ".pt"
    with pytest.raises(ExportError, match="disagrees"):
        write(_model(), tmp_path / "a" / "b" / f"policy{suffix}")
    assert _listing(tmp_path) == []
    old = tmp_path / f"old{suffix}"
    old.write_bytes(b"the previous export")
    with pytest.raises(ExportError, match="disagrees"):
        write(_model(), old)
    assert old.read_bytes() == b"the previous export" and _listing(tmp_path) == [old.name]


def test_a_failed_write_removes_the_temporary_file_and_new_folders(tmp_path, monkeypatch) -> None:
    def failing_replace(source: Any, target: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        to_torchscript(_model(), tmp_path / "new" / "policy.pt")
    assert _listing(tmp_path) == []


def test_a_folder_as_target_is_refused_before_any_work(tmp_path) -> None:
    with pytest.raises(ExportError, match="is a folder"):
        to_onnx(_model(), tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="is a file, not a folder"):
        to_torchscript(_model(), tmp_path / "file" / "policy.pt")
    assert _listing(tmp_path) == ["file"]


def test_a_successful_export_writes_just_the_file(tmp_path) -> None:
    model = _model()
    to_onnx(model, tmp_path / "deep" / "er" / "policy.onnx")
    to_torchscript(model, tmp_path / "policy.pt")
    assert _listing(tmp_path) == ["deep", "deep/er", "deep/er/policy.onnx", "policy.pt"]
    assert read_metadata(tmp_path / "policy.pt")["format"] == "torchscript"


def test_an_opset_for_a_torchscript_file_is_refused(tmp_path) -> None:
    with pytest.raises(ExportError, match="opset_version applies to ONNX files only"):
        _model().export(tmp_path / "policy.pt", opset_version=DEFAULT_OPSET)
    assert _listing(tmp_path) == []
