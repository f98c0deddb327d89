"""Where ClippedPPO checks an input before SB3 would, its message contains SB3's message for that input.

Each case names a message by a piece of its literal text and the SB3 source file that builds it. The
message's template is read from SB3's installed source at test time, so the test fails when SB3
changes its wording. For each case the test shows that SB3's own ``PPO`` raises (or warns) with that
message for the input, then that ``ClippedPPO`` raises an exception of the same type (or a
``UserWarning``) whose message contains it (a warning's starts with it, for ``warnings.filterwarnings``).
"""

from __future__ import annotations

import ast
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import stable_baselines3
from conftest import TINY
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.vec_env import DummyVecEnv

from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext.errors import ClippedPPOError
from sb3_ppo_ext.reliability.checks import check_clip_range_vf

SB3_SOURCE = Path(stable_baselines3.__file__).parent
BOX3 = spaces.Box(-1, 1, (3,), np.float32)
TWO_ACTIONS = spaces.Discrete(2)


class SpacesEnv(gym.Env):
    """An env with the given spaces and random observations."""

    def __init__(self, observation_space: spaces.Space = BOX3, action_space: spaces.Space = TWO_ACTIONS):
        self.observation_space = observation_space
        self.action_space = action_space

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[Any, dict]:
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        return self.observation_space.sample(), 0.0, False, False, {}


def sb3_message_pattern(source_file: str, anchor: str) -> re.Pattern[str]:
    """The message SB3 builds around the literal text ``anchor`` in ``source_file``, as a regex.

    The string (or f-string) that contains ``anchor`` must be unique in the file; its literal parts
    must match exactly and each ``{...}`` matches any text.
    """
    tree = ast.parse((SB3_SOURCE / source_file).read_text(encoding="utf-8"))
    inside_f_strings = {id(part) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for part in node.values}
    templates = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            parts = [part.value if isinstance(part, ast.Constant) else None for part in node.values]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in inside_f_strings:
            parts = [node.value]
        else:
            continue
        if any(part is not None and anchor in part for part in parts):
            templates.append(parts)
    assert len(templates) == 1, f"{anchor!r} is in {len(templates)} strings of SB3's {source_file}, not in one"
    return re.compile("".join(".*?" if part is None else re.escape(part) for part in templates[0]), re.DOTALL)


@dataclass
class Case:
    """An SB3 message, an input that triggers it, and what kind of report it is."""

    source_file: str
    anchor: str
    trigger: Callable[[type[BaseAlgorithm], Path], Any]
    warning: bool = False
    first_line_only: bool = False  # SB3's advice after the first line is replaced by ours


def construct(policy: str = "MlpPolicy", env: Any = None, **kwargs: Any) -> Callable[[type[BaseAlgorithm], Path], Any]:
    def trigger(algo: type[BaseAlgorithm], tmp_path: Path) -> Any:
        return algo(policy, env if env is not None else SpacesEnv(), **{**TINY, **kwargs})

    return trigger


def load_with_other_env(other: gym.Env) -> Callable[[type[BaseAlgorithm], Path], Any]:
    def trigger(algo: type[BaseAlgorithm], tmp_path: Path) -> Any:
        algo("MlpPolicy", SpacesEnv(), **TINY).save(tmp_path / "model")
        return algo.load(tmp_path / "model", env=other)

    return trigger


PPO_FILE, BASE_FILE = "ppo/ppo.py", "common/base_class.py"
PREPROCESSING_FILE, LAYERS_FILE, UTILS_FILE = "common/preprocessing.py", "common/torch_layers.py", "common/utils.py"

CASES = {
    # SB3's PPO.__init__
    "batch_size=1": Case(PPO_FILE, "`batch_size` must be greater than 1", construct(batch_size=1)),
    "batch_size=0": Case(PPO_FILE, "`batch_size` must be greater than 1", construct(batch_size=0)),
    "n_steps=1": Case(PPO_FILE, "`n_steps * n_envs` must be greater than 1", construct(n_steps=1, batch_size=2)),
    "n_steps=0, 2 envs": Case(
        PPO_FILE,
        "`n_steps * n_envs` must be greater than 1",
        construct(env=DummyVecEnv([SpacesEnv, SpacesEnv]), n_steps=0, batch_size=2),
    ),
    "truncated mini-batch": Case(
        PPO_FILE, "there will be a truncated mini-batch", construct(n_steps=10, batch_size=4), warning=True
    ),
    "batch larger than rollout": Case(
        PPO_FILE, "there will be a truncated mini-batch", construct(n_steps=16, batch_size=64), warning=True
    ),
    # SB3's PPO._setup_model
    "clip_range_vf=0": Case(PPO_FILE, "`clip_range_vf` must be positive", construct(clip_range_vf=0.0)),
    "clip_range_vf=-1": Case(PPO_FILE, "`clip_range_vf` must be positive", construct(clip_range_vf=-1)),
    "clip_range_vf=nan": Case(PPO_FILE, "`clip_range_vf` must be positive", construct(clip_range_vf=math.nan)),
    # SB3's BaseAlgorithm.__init__
    "unknown policy": Case(BASE_FILE, " unknown", construct(policy="MLPPolicy")),
    "Dict action space": Case(
        BASE_FILE, " as action spaces but ", construct(env=SpacesEnv(action_space=spaces.Dict(a=spaces.Discrete(2))))
    ),
    "Text action space": Case(
        BASE_FILE, " as action spaces but ", construct(env=SpacesEnv(action_space=spaces.Text(4)))
    ),
    "unbounded Box actions": Case(
        BASE_FILE,
        "Continuous action space must have a finite lower and upper bound",
        construct(env=SpacesEnv(action_space=spaces.Box(-np.inf, np.inf, (2,), np.float32))),
    ),
    "gSDE with Discrete actions": Case(BASE_FILE, "(gSDE) can only be used", construct(use_sde=True)),
    "Dict observations with MlpPolicy": Case(
        BASE_FILE, "You must use `MultiInputPolicy`", construct(env=SpacesEnv(observation_space=spaces.Dict(a=BOX3)))
    ),
    # SB3's preprocessing, run while SB3 builds the policy
    "Tuple observations": Case(
        PREPROCESSING_FILE,
        " observation space is not supported",
        construct(env=SpacesEnv(observation_space=spaces.Tuple((BOX3, BOX3)))),
    ),
    "nested Dict observations": Case(
        PREPROCESSING_FILE,
        "Nested observation spaces are not supported",
        construct("MultiInputPolicy", env=SpacesEnv(observation_space=spaces.Dict(a=spaces.Dict(b=BOX3)))),
    ),
    "2-d MultiBinary actions": Case(
        PREPROCESSING_FILE,
        "Multi-dimensional MultiBinary(",
        construct(env=SpacesEnv(action_space=spaces.MultiBinary((2, 2)))),
    ),
    # SB3's NatureCNN
    "CnnPolicy on vectors": Case(
        LAYERS_FILE, "only with images not with ", construct("CnnPolicy"), first_line_only=True
    ),
    # SB3's check_for_correct_spaces, run by load(env=...)
    "load with other observations": Case(
        UTILS_FILE,
        "Observation spaces do not match",
        load_with_other_env(SpacesEnv(observation_space=spaces.Box(-1, 1, (5,), np.float32))),
    ),
    "load with other actions": Case(
        UTILS_FILE, "Action spaces do not match", load_with_other_env(SpacesEnv(action_space=spaces.Discrete(3)))
    ),
}


def report(algo: type[BaseAlgorithm], case: Case, tmp_path: Path) -> tuple[str, type]:
    """The message and the type (exception or warning category) of what ``algo`` reports for the case's input."""
    if case.warning:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            case.trigger(algo, tmp_path)
        about = [w for w in caught if case.anchor in str(w.message)]
        assert len(about) == 1, [str(w.message) for w in caught]
        return str(about[0].message), about[0].category
    with pytest.raises(Exception) as raised:
        case.trigger(algo, tmp_path)
    return str(raised.value), type(raised.value)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_sb3_reports_the_message_of_its_source_for_the_input(case: Case, tmp_path: Path) -> None:
    """The table is right: SB3's PPO reports exactly the message its source builds."""
    message, _ = report(PPO, case, tmp_path)
    assert sb3_message_pattern(case.source_file, case.anchor).fullmatch(message), message


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_clipped_ppo_message_contains_sb3s(case: Case, tmp_path: Path) -> None:
    sb3_message, sb3_type = report(PPO, case, tmp_path)
    ours, our_type = report(ClippedPPO, case, tmp_path)
    phrase = sb3_message.split("\n")[0] if case.first_line_only else sb3_message
    if case.warning:
        assert issubclass(our_type, UserWarning)
        assert ours.startswith(phrase), (ours, phrase)  # warnings.filterwarnings(message=...) matches the start
    else:
        assert issubclass(our_type, sb3_type) and issubclass(our_type, ClippedPPOError), our_type
        assert phrase in ours, (ours, phrase)
        assert " is invalid" in ours  # and, as every error of ours, it names the value given


@pytest.mark.parametrize(
    "pattern", [".*truncated mini-batch.*", "You have specified a mini-batch size"], ids=["anywhere", "start"]
)
def test_warning_filters_written_for_sb3_silence_ours(pattern: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=pattern)
        ClippedPPO("MlpPolicy", SpacesEnv(), n_steps=10, batch_size=4)
        PPO("MlpPolicy", SpacesEnv(), n_steps=10, batch_size=4)


@pytest.mark.parametrize("value", [0.0, -1, math.nan])
def test_clip_range_vf_check_for_setup_model_has_sb3s_message(value: float, tmp_path: Path) -> None:
    """``check_clip_range_vf`` is SB3's ``_setup_model`` assertion: same input, same phrase, same type."""
    case = CASES["clip_range_vf=0"]
    with pytest.raises(AssertionError) as sb3:
        PPO("MlpPolicy", SpacesEnv(), clip_range_vf=value, **TINY)
    assert sb3_message_pattern(case.source_file, case.anchor).fullmatch(str(sb3.value))
    with pytest.raises(AssertionError) as ours:
        check_clip_range_vf(value)
    assert str(sb3.value) in str(ours.value) and isinstance(ours.value, ClippedPPOError)
