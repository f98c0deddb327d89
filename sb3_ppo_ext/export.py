"""One-call export of a trained policy to ONNX or TorchScript: the deterministic action, optionally the value.

::

    model.export("policy.onnx")                                   # or "policy.pt" for TorchScript
    to_onnx(model, "policy.onnx", vecnormalize="stats.pkl", with_value=True, action_masks=True)

The exported graph is :class:`PolicyExportModule`: the observations exactly as ``predict`` receives them
(raw, when VecNormalize statistics are baked in), then the policy's own ``_predict(obs, deterministic=True)``
(so the preprocessing ``predict`` applies, image scaling, one-hot encoding and Dict observations, is
traced from the same code), then ``predict``'s post-processing: Box actions clipped to the bounds, or
unscaled when the policy squashes them. Inputs and outputs have a dynamic batch axis:

* inputs: ``obs`` (or one input per key of a Dict observation space, named after the key), then
  ``action_masks`` (bool, ``[batch, mask_size]``) when exported with ``action_masks=True``;
* outputs: ``action`` (``predict``'s shape and dtype), then ``value`` (``[batch, 1]``, ``predict_values``)
  with ``with_value=True``.

Spaces, versions and export options travel with the file (ONNX ``metadata_props``, a TorchScript extra
file); :func:`read_metadata` reads either. ONNX export uses torch's TorchScript-based exporter
(``dynamo=False``): it needs only the ``onnx`` package, where the ``torch.export``-based one also needs
``onnxscript`` and takes seconds per model. ``opset_version`` is checked first (:func:`supported_opsets`).

Files are built and checked in memory, then written to a temporary file renamed over the target: a failed
export leaves neither a partial file nor a folder it created behind.

Recurrent policies (``MlpLstmPolicy``, ``CnnLstmPolicy``, ``MultiInputLstmPolicy``, and with ``rnn_type="gru"``)
export as :class:`RecurrentExportModule`: one step of each env, the LSTM state in and out as ``predict(obs, state,
episode_start, deterministic=True)`` takes and returns it (see that class for the names); a GRU's state is ``h``
alone (no ``state_c`` input or output).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import numbers
import os
import pickle
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.vec_env import VecNormalize
from torch import nn

from sb3_ppo_ext.errors import ExportError, UnsupportedExportError
from sb3_ppo_ext.masking import mask_groups, policy_applies_masks
from sb3_ppo_ext.recurrent.policies import RecurrentActorCriticPolicy
from sb3_ppo_ext.recurrent.sequences import LSTMStates
from sb3_ppo_ext.reliability.checkpoints import atomic_write

__all__ = [
    "DEFAULT_OPSET",
    "METADATA_FILE",
    "MIN_OPSET",
    "PolicyExportModule",
    "RecurrentExportModule",
    "TensorSpec",
    "build_module",
    "check_opset",
    "export",
    "is_recurrent",
    "read_metadata",
    "supported_opsets",
    "to_onnx",
    "to_torchscript",
]

ExportFormat = Literal["onnx", "torchscript"]
# ONNX opset 17: every op the policies need, and run by onnxruntime releases of the last few years
DEFAULT_OPSET = 17
#: the lowest ONNX opset every policy kind exports with (MultiBinary actions need Round, opset 11; masks need Where, 9)
MIN_OPSET = 11
# name of the metadata JSON stored inside a TorchScript archive (its ``_extra_files``)
METADATA_FILE = "sb3_ppo_ext_metadata.json"
BATCH = "batch"
# trace with one batch size, check with another: a batch size baked into the graph shows up as a mismatch
_TRACE_BATCH, _CHECK_BATCH = 2, 3
_SUFFIXES: dict[str, ExportFormat] = {
    ".onnx": "onnx",
    ".pt": "torchscript",
    ".pth": "torchscript",
    ".ts": "torchscript",
}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of the exported graph: its name, shape (``"batch"`` first) and dtype name."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str


def _obs_input_dtype(space: spaces.Space) -> th.dtype:
    """The dtype an observation is fed as: uint8 images stay uint8, discrete indices int64, the rest float32."""
    if isinstance(space, spaces.Box) and space.dtype == np.uint8:
        return th.uint8
    if isinstance(space, (spaces.Discrete, spaces.MultiDiscrete)):
        return th.int64
    return th.float32


def _obs_shape(space: spaces.Space) -> tuple[int, ...]:
    # predict() reshapes observations to (-1, *space.shape): Discrete is one index per row
    return tuple(int(n) for n in space.shape) if space.shape is not None else ()


def is_recurrent(policy: nn.Module) -> bool:
    """Whether ``policy`` carries an LSTM state between steps (sb3-contrib's RecurrentPPO layout).

    :param policy: the policy to export.
    :return: True when it has ``lstm_actor`` or ``lstm_hidden_state_shape``.
    """
    return any(hasattr(policy, name) for name in ("lstm_actor", "lstm_hidden_state_shape"))


def _normalization_stats(
    vecnormalize: VecNormalize | str | Path | None, observation_space: spaces.Space
) -> tuple[dict[str | None, tuple[np.ndarray, np.ndarray]], dict[str, Any]]:
    """VecNormalize's observation statistics per input (key None: a non-Dict space) and the options recorded.

    :return: ``{key: (mean, std)}`` with ``std = sqrt(var + epsilon)``, and ``clip_obs``/``epsilon``.
    """
    if vecnormalize is None:
        return {}, {}
    if isinstance(vecnormalize, (str, Path)):
        # VecNormalize.load() wants a VecEnv to wrap; the pickle alone holds the statistics
        with open(vecnormalize, "rb") as file:
            vecnormalize = pickle.load(file)  # the user's own statistics file, as VecNormalize.load reads it
    if not isinstance(vecnormalize, VecNormalize):
        raise ExportError(
            f"vecnormalize must be a VecNormalize, the path of its saved statistics or None; got {type(vecnormalize)}."
        )
    options = {"clip_obs": float(vecnormalize.clip_obs), "epsilon": float(vecnormalize.epsilon)}
    if not vecnormalize.norm_obs:
        return {}, options
    is_dict = isinstance(observation_space, spaces.Dict)
    per_key = isinstance(vecnormalize.obs_rms, dict)
    keys = list(vecnormalize.norm_obs_keys or []) if per_key else []
    if per_key != is_dict or not set(keys) <= set(getattr(observation_space, "spaces", {})):
        raise ExportError(
            f"The VecNormalize statistics ({'per key' if per_key else 'one array'}"
            f"{f', keys {keys}' if keys else ''}) do not fit the policy's observation space {observation_space}: "
            "they belong to another env."
        )
    if is_dict:
        stats = {key: vecnormalize.obs_rms[key] for key in keys}  # type: ignore[index]
    else:
        stats = {None: vecnormalize.obs_rms}  # type: ignore[dict-item]
    result = {}
    for key, rms in stats.items():
        space = observation_space[key] if key is not None else observation_space
        if tuple(np.shape(rms.mean)) != _obs_shape(space):
            raise ExportError(
                f"The VecNormalize statistics{'' if key is None else f' of {key!r}'} have shape {np.shape(rms.mean)}, "
                f"but the policy's observations have shape {_obs_shape(space)}: they belong to another env."
            )
        # float64 in numpy, as VecNormalize computes them; the graph then works in float32
        std = np.sqrt(np.asarray(rms.var, np.float64) + vecnormalize.epsilon)
        result[key] = (np.asarray(rms.mean, np.float64), std)
    return result, options


class PolicyExportModule(nn.Module):
    """Inference-only module: observations (and masks) in, ``predict(..., deterministic=True)``'s actions out.

    :param policy: the policy (in eval mode; this module does not copy it).
    :param with_value: add a ``value`` output, ``policy.predict_values(obs)`` (``[batch, 1]``).
    :param action_masks: add an ``action_masks`` input (bool, or 0/1 numbers in TorchScript), as
        ``predict(..., action_masks=...)``; masks are not checked (a row with no valid action gives action 0).
    :param obs_stats: VecNormalize statistics ``{key: (mean, std)}`` (key None for a non-Dict space), applied
        to raw observations before the policy, as ``VecNormalize.normalize_obs``.
    :param clip_obs: VecNormalize's ``clip_obs``.
    """

    def __init__(
        self,
        policy: BasePolicy,
        with_value: bool = False,
        action_masks: bool = False,
        obs_stats: dict[str | None, tuple[np.ndarray, np.ndarray]] | None = None,
        clip_obs: float = 10.0,
    ) -> None:
        super().__init__()
        self.policy = policy
        self.with_value = with_value
        self.action_masks = action_masks
        self.clip_obs = float(clip_obs)
        observation_space = policy.observation_space
        if isinstance(observation_space, spaces.Dict):
            self.obs_keys: list[str] | None = list(observation_space.spaces)
            self.obs_spaces = [observation_space[key] for key in self.obs_keys]
        else:
            self.obs_keys = None
            self.obs_spaces = [observation_space]
        names = self.obs_keys or ["obs"]
        if action_masks and "action_masks" in names:
            raise ExportError("An observation key named 'action_masks' clashes with the mask input; rename the key.")
        # the recurrent module's state inputs and outputs share the graph's namespace with the observations
        clashes = sorted(set(names) & set(self._reserved_names()))
        if clashes:
            raise ExportError(
                f"Observation key(s) {clashes} clash with the exported graph's {type(self).__name__} inputs or "
                "outputs; rename the key(s)."
            )
        # normalised inputs, by position, with their statistics as float32 buffers (constants of the graph)
        self.normalized: list[bool] = []
        for index, key in enumerate(self.obs_keys or [None]):
            stats = (obs_stats or {}).get(key)
            self.normalized.append(stats is not None)
            if stats is not None:
                self.register_buffer(f"obs_mean_{index}", th.as_tensor(stats[0], dtype=th.float32))
                self.register_buffer(f"obs_std_{index}", th.as_tensor(stats[1], dtype=th.float32))
        action_space = policy.action_space
        # length of one invalid-action mask (sb3-contrib's layout, sb3_ppo_ext.masking); None: masks do not apply
        groups = mask_groups(action_space)
        self.mask_size: int | None = None if groups is None else sum(groups)
        if action_masks and self.mask_size is None:
            raise ExportError(f"Invalid-action masks do not apply to {action_space} actions.")
        self.clip_actions = isinstance(action_space, spaces.Box)
        if self.clip_actions:
            assert isinstance(action_space, spaces.Box)
            self.register_buffer("action_low", th.as_tensor(action_space.low, dtype=th.float32))
            self.register_buffer("action_high", th.as_tensor(action_space.high, dtype=th.float32))
        self.input_names = [spec.name for spec in self.input_specs()]
        self.output_names = [spec.name for spec in self.output_specs()]

    def _reserved_names(self) -> list[str]:
        """Input and output names that observation keys must not take (beyond ``action_masks``)."""
        return []

    def input_specs(self) -> list[TensorSpec]:
        """The graph's inputs, in order.

        :return: one spec (name, shape with ``"batch"`` for the batch axis, dtype) per input.
        """
        specs = [
            TensorSpec(name, (BATCH, *_obs_shape(space)), str(_obs_input_dtype(space)).removeprefix("torch."))
            for name, space in zip(self.obs_keys or ["obs"], self.obs_spaces, strict=True)
        ]
        if self.action_masks:
            specs.append(TensorSpec("action_masks", (BATCH, self.mask_size), "bool"))
        return specs

    def output_specs(self) -> list[TensorSpec]:
        """The graph's outputs, in order.

        :return: one spec (name, shape with ``"batch"`` for the batch axis, dtype) per output.
        """
        action_space = self.policy.action_space
        if isinstance(action_space, (spaces.Discrete, spaces.MultiDiscrete)):
            dtype = "int64"
        else:
            dtype = "float32"
        specs = [TensorSpec("action", (BATCH, *(int(n) for n in action_space.shape or ())), dtype)]
        if self.with_value:
            specs.append(TensorSpec("value", (BATCH, 1), "float32"))
        return specs

    def example_inputs(self, batch_size: int, seed: int = 0) -> tuple[th.Tensor, ...]:
        """Random inputs of the right shapes and dtypes (for tracing and for checking an exported file).

        :param batch_size: rows of each input.
        :param seed: seed of the random generator, so the same call gives the same inputs.
        :return: one tensor per :meth:`input_specs` entry, in order.
        """
        generator = th.Generator().manual_seed(seed)
        inputs = []
        for space in self.obs_spaces:
            shape = (batch_size, *_obs_shape(space))
            if isinstance(space, spaces.Discrete):
                inputs.append(th.randint(int(space.n), shape, generator=generator))
            elif isinstance(space, spaces.MultiDiscrete):
                highs = th.as_tensor(np.asarray(space.nvec, np.int64))
                inputs.append((th.rand(shape, generator=generator) * highs).long())
            elif isinstance(space, spaces.MultiBinary):
                inputs.append(th.randint(2, shape, generator=generator).float())
            elif _obs_input_dtype(space) == th.uint8:
                inputs.append(th.randint(256, shape, generator=generator, dtype=th.uint8))
            else:
                inputs.append(th.randn(shape, generator=generator))
        if self.action_masks:
            inputs.append(th.rand((batch_size, self.mask_size), generator=generator) < 0.7)
        return tuple(inputs)

    def _observations(self, inputs: Sequence[th.Tensor]) -> th.Tensor | dict[str, th.Tensor]:
        """Raw inputs -> what ``predict`` hands the policy (VecNormalize applied where baked in)."""
        observations = []
        for index, obs in enumerate(inputs):
            if self.normalized[index]:
                mean, std = getattr(self, f"obs_mean_{index}"), getattr(self, f"obs_std_{index}")
                obs = th.clamp((obs.float() - mean) / std, -self.clip_obs, self.clip_obs)
            observations.append(obs)
        if self.obs_keys is None:
            return observations[0]
        return dict(zip(self.obs_keys, observations, strict=True))

    def _postprocess(self, actions: th.Tensor) -> th.Tensor:
        """``BasePolicy.predict``'s last steps: reshape, then clip (or unscale squashed) Box actions."""
        actions = actions.reshape((-1, *self.policy.action_space.shape))  # type: ignore[misc]
        if not self.clip_actions:
            return actions
        if self.policy.squash_output:
            return self.action_low + 0.5 * (actions + 1.0) * (self.action_high - self.action_low)
        # np.clip(a, low, high) is min(max(a, low), high)
        return th.minimum(th.maximum(actions, self.action_low), self.action_high)

    def forward(self, *inputs: th.Tensor) -> th.Tensor | tuple[th.Tensor, th.Tensor]:
        """``action`` (and ``value``) for the inputs listed by :meth:`input_specs`.

        :param inputs: one tensor per :meth:`input_specs` entry, in order.
        :return: the actions, or ``(actions, values)`` with ``with_value``.
        """
        n_obs = len(self.obs_spaces)
        obs = self._observations(inputs[:n_obs])
        if self.action_masks:
            masks = inputs[n_obs].to(th.bool)  # 0/1 numbers work too (TorchScript; ONNX fixes the input type)
            actions = self.policy._predict(obs, deterministic=True, action_masks=masks)  # type: ignore[call-arg]
        else:
            actions = self.policy._predict(obs, deterministic=True)
        actions = self._postprocess(actions)
        if self.with_value:
            return actions, self.policy.predict_values(obs)  # type: ignore[attr-defined]
        return actions


class RecurrentExportModule(PolicyExportModule):
    """One step of a recurrent policy: ``predict(obs, state, episode_start, deterministic=True)`` as a graph.

    Inputs, in order: the observations (as :class:`PolicyExportModule`), ``state_h`` and ``state_c`` (float32
    ``[n_lstm_layers, batch, lstm_hidden_size]``, the actor's LSTM state ``predict`` returned last step),
    ``episode_start`` (float32 ``[batch]``, 1 where an episode starts: that row's state is reset to zero
    first, as ``predict`` does; TorchScript also takes bool), then ``action_masks`` when exported with masks.
    Outputs: ``action``, ``state_h_out``, ``state_c_out`` (the actor's state after the step, ``predict``'s).

    With ``with_value=True`` the outputs go on with ``value`` (``[batch, 1]``, as the rollout computes it
    with ``policy.forward``). A critic with its own LSTM (``enable_critic_lstm=True``, the default) keeps its
    own state, so the graph then also takes ``critic_state_h``, ``critic_state_c`` (last inputs) and returns
    ``critic_state_h_out``, ``critic_state_c_out`` (last outputs); a shared LSTM or a memoryless critic adds
    no state. Start every state at zero (or set ``episode_start`` to 1 on the first step).

    :param policy: a recurrent policy of this package (in eval mode; not copied).
    :param with_value: add the ``value`` output (and the critic's state, when it has its own LSTM).
    :param action_masks: add the ``action_masks`` input, as :class:`PolicyExportModule`.
    :param obs_stats: VecNormalize statistics, as :class:`PolicyExportModule`.
    :param clip_obs: VecNormalize's ``clip_obs``.
    """

    def __init__(
        self,
        policy: BasePolicy,
        with_value: bool = False,
        action_masks: bool = False,
        obs_stats: dict[str | None, tuple[np.ndarray, np.ndarray]] | None = None,
        clip_obs: float = 10.0,
    ) -> None:
        # set before the parent's __init__, which lists the inputs and outputs (input_specs reads them)
        self.state_shape = (int(policy.n_lstm_layers), int(policy.lstm_hidden_size))  # type: ignore[attr-defined]
        self.critic_state = with_value and getattr(policy, "lstm_critic", None) is not None
        # a GRU's state is h alone; the (h, c) pairs the policy takes get zeros for c
        self.cell_state = getattr(policy, "rnn_type", "lstm") == "lstm"
        super().__init__(policy, with_value, action_masks, obs_stats, clip_obs)

    def _reserved_names(self) -> list[str]:
        names = ["state_h", "state_c", "episode_start", "state_h_out", "state_c_out"]
        return [*names, "critic_state_h", "critic_state_c", "critic_state_h_out", "critic_state_c_out"]

    def _state_specs(self, names: Sequence[str]) -> list[TensorSpec]:
        """Specs of a ``[h, c]`` pair of names; a GRU has no ``c``, so its second name is left out."""
        layers, hidden = self.state_shape
        names = names if self.cell_state else names[:1]
        return [TensorSpec(name, (layers, BATCH, hidden), "float32") for name in names]

    def input_specs(self) -> list[TensorSpec]:
        """The graph's inputs, in order (see the class docstring).

        :return: one spec per input: the observations, the states, ``episode_start``, the masks, the critic's states.
        """
        specs = super().input_specs()
        n_obs = len(self.obs_spaces)
        recurrent = [*self._state_specs(["state_h", "state_c"]), TensorSpec("episode_start", (BATCH,), "float32")]
        specs[n_obs:n_obs] = recurrent
        if self.critic_state:
            specs.extend(self._state_specs(["critic_state_h", "critic_state_c"]))
        return specs

    def output_specs(self) -> list[TensorSpec]:
        """The graph's outputs, in order (see the class docstring).

        :return: one spec per output: ``action``, the actor's states, ``value``, the critic's states.
        """
        action, *value = super().output_specs()
        specs = [action, *self._state_specs(["state_h_out", "state_c_out"]), *value]
        if self.critic_state:
            specs.extend(self._state_specs(["critic_state_h_out", "critic_state_c_out"]))
        return specs

    def example_inputs(self, batch_size: int, seed: int = 0) -> tuple[th.Tensor, ...]:
        """Random inputs; ``episode_start`` alternates 1 and 0, so both the reset and the carried state are traced.

        :param batch_size: rows of each input (the states' second axis).
        :param seed: seed of the random generators.
        :return: one tensor per :meth:`input_specs` entry, in order.
        """
        base = super().example_inputs(batch_size, seed)
        n_obs = len(self.obs_spaces)
        generator = th.Generator().manual_seed(seed + 1)
        layers, hidden = self.state_shape

        def state() -> th.Tensor:
            return th.randn((layers, batch_size, hidden), generator=generator)

        def states() -> tuple[th.Tensor, ...]:
            return (state(), state()) if self.cell_state else (state(),)

        starts = (th.arange(batch_size) % 2 == 0).float()
        critic = states() if self.critic_state else ()
        return (*base[:n_obs], *states(), starts, *base[n_obs:], *critic)

    def _pair(self, inputs: Sequence[th.Tensor]) -> tuple[tuple[th.Tensor, th.Tensor], Sequence[th.Tensor]]:
        """The ``(h, c)`` pair at the front of ``inputs`` (``c`` zeros for a GRU) and the inputs after it."""
        if self.cell_state:
            return (inputs[0], inputs[1]), inputs[2:]
        return (inputs[0], th.zeros_like(inputs[0])), inputs[1:]

    def _unpaired(self, state: tuple[th.Tensor, th.Tensor]) -> tuple[th.Tensor, ...]:
        """The graph's outputs for a state pair: ``(h, c)``, or ``(h,)`` for a GRU."""
        return state if self.cell_state else state[:1]

    def forward(self, *inputs: th.Tensor) -> tuple[th.Tensor, ...]:  # type: ignore[override]
        """``action``, the actor's new state (and ``value``, the critic's new state) for :meth:`input_specs`.

        :param inputs: one tensor per :meth:`input_specs` entry, in order.
        :return: one tensor per :meth:`output_specs` entry, in order.
        """
        n_obs = len(self.obs_spaces)
        obs = self._observations(inputs[:n_obs])
        state, rest = self._pair(inputs[n_obs:])
        # predict() feeds episode starts as float32; a bool input works too (TorchScript)
        episode_start = rest[0].to(th.float32)
        rest = rest[1:]
        masks: dict[str, th.Tensor] = {}
        if self.action_masks:
            masks["action_masks"] = rest[0].to(th.bool)
            rest = rest[1:]
        if not self.with_value:
            actions, new_state = self.policy._predict(  # type: ignore[call-arg]
                obs, state, episode_start, deterministic=True, **masks
            )
            return self._postprocess(actions), *self._unpaired(new_state)
        # the rollout's own step: actions, values and both LSTMs' states at once; with a shared LSTM or a
        # memoryless critic the critic's states are not read, the actor's stand in for them
        critic = self._pair(rest)[0] if self.critic_state else state
        actions, values, _, states = self.policy(  # forward(); its log-probability is pruned from the graph
            obs, LSTMStates(state, critic), episode_start, deterministic=True, **masks
        )
        outputs = (self._postprocess(actions), *self._unpaired(states.pi), values)
        return (*outputs, *self._unpaired(states.vf)) if self.critic_state else outputs


# -- building the module -----------------------------------------------------------------------------


def _policy_of(model: BaseAlgorithm | BasePolicy) -> BasePolicy:
    if isinstance(model, BaseAlgorithm):
        return model.policy
    if isinstance(model, BasePolicy):
        return model
    raise ExportError(f"Expected a ClippedPPO model (or another SB3 algorithm) or its policy, got {type(model)}.")


def _check_exportable(policy: BasePolicy, action_masks: bool, with_value: bool) -> None:
    """Refuse what the exported graph cannot reproduce, saying what to do instead."""
    if is_recurrent(policy) and not isinstance(policy, RecurrentActorCriticPolicy):
        raise UnsupportedExportError(
            f"{type(policy).__module__}.{type(policy).__name__} is recurrent but not one of sb3_ppo_ext's recurrent "
            "policies, whose LSTM state the exporter knows: train with ClippedPPO's MlpLstmPolicy (sb3-contrib's "
            "keywords), or run this one with model.predict(obs, state, episode_start)."
        )
    if action_masks:
        if mask_groups(policy.action_space) is None or getattr(policy, "use_sde", False):
            raise ExportError(
                f"action_masks=True needs Discrete, MultiDiscrete or MultiBinary actions without gSDE; the policy has "
                f"{policy.action_space}{' with gSDE' if getattr(policy, 'use_sde', False) else ''}. "
                "Export with action_masks=False."
            )
        if not policy_applies_masks(type(policy)):
            raise ExportError(
                f"{type(policy).__name__} takes no action masks (its forward() has no action_masks argument). "
                "Export with action_masks=False, or use a ClippedPPO policy."
            )
    if with_value and not hasattr(policy, "predict_values"):
        raise ExportError(f"{type(policy).__name__} has no critic (predict_values); export with with_value=False.")


def build_module(
    model: BaseAlgorithm | BasePolicy,
    *,
    vecnormalize: VecNormalize | str | Path | None = None,
    with_value: bool = False,
    action_masks: bool = False,
) -> tuple[PolicyExportModule, dict[str, Any]]:
    """The module to export (on CPU, in eval mode) and the export options recorded in the metadata.

    The policy is shared with ``model`` when it lives on the CPU, and copied otherwise; it is left in eval
    mode (:func:`to_onnx` and :func:`to_torchscript` restore the mode it had).

    :param model: a model or its policy.
    :param vecnormalize: a ``VecNormalize`` (or its saved statistics' path) to bake in, or None.
    :param with_value: add the ``value`` output.
    :param action_masks: add the ``action_masks`` input.
    :return: the module (a :class:`RecurrentExportModule` for a recurrent policy) and the options to record.
    :raises ExportError: the policy, its masks or the statistics cannot be exported as asked.
    """
    policy = _policy_of(model)
    _check_exportable(policy, action_masks, with_value)
    if isinstance(model, BaseAlgorithm) and vecnormalize is None and model.get_vec_normalize_env() is not None:
        warnings.warn(
            "The model's env normalises observations (VecNormalize) but no statistics were given: the exported "
            "policy expects normalised observations. Pass vecnormalize=model.get_vec_normalize_env() (or the saved "
            "statistics file) to feed raw observations.",
            stacklevel=3,
        )
    obs_stats, norm_options = _normalization_stats(vecnormalize, policy.observation_space)
    if policy.device.type != "cpu":
        policy = copy.deepcopy(policy).to("cpu")
    policy.set_training_mode(False)
    module_class = RecurrentExportModule if is_recurrent(policy) else PolicyExportModule
    module = module_class(policy, with_value, action_masks, obs_stats, norm_options.get("clip_obs", 10.0))
    options = {
        "with_value": with_value,
        "action_masks": action_masks,
        "deterministic": True,
        "vecnormalize": bool(obs_stats),
        "vecnormalize_keys": [key for key in obs_stats if key is not None],
        **norm_options,
    }
    return module.eval(), options


def _metadata(module: PolicyExportModule, options: dict[str, Any], export_format: str) -> dict[str, str]:
    """String key/value pairs describing the exported graph (ONNX ``metadata_props`` take strings only)."""
    import stable_baselines3

    import sb3_ppo_ext

    policy = module.policy
    recurrent: dict[str, Any] | None = None
    if isinstance(module, RecurrentExportModule):
        layers, hidden = module.state_shape
        recurrent = {
            "state_shape": [layers, BATCH, hidden],
            "n_lstm_layers": layers,
            "lstm_hidden_size": hidden,
            "critic_state": module.critic_state,
            "rnn_type": str(getattr(policy, "rnn_type", "lstm")),
            "state_names": ["h", "c"] if module.cell_state else ["h"],
            "shared_lstm": bool(policy.shared_lstm),  # type: ignore[attr-defined]
            "enable_critic_lstm": bool(policy.enable_critic_lstm),  # type: ignore[attr-defined]
        }
    return {
        "producer": "sb3_ppo_ext.export",
        "format": export_format,
        "policy_class": type(policy).__name__,
        "observation_space": repr(policy.observation_space),
        "action_space": repr(policy.action_space),
        "inputs": json.dumps([asdict(spec) for spec in module.input_specs()]),
        "outputs": json.dumps([asdict(spec) for spec in module.output_specs()]),
        "recurrent": json.dumps(recurrent is not None),
        **({"lstm_state": json.dumps(recurrent)} if recurrent is not None else {}),
        "export_options": json.dumps(options),
        "torch_version": th.__version__,
        "stable_baselines3_version": stable_baselines3.__version__,
        "sb3_ppo_ext_version": sb3_ppo_ext.__version__,
    }


def _outputs(result: Any) -> list[np.ndarray]:
    items = result if isinstance(result, (tuple, list)) else [result]
    return [item.detach().cpu().numpy() if isinstance(item, th.Tensor) else np.asarray(item) for item in items]


def _check_outputs(expected: list[np.ndarray], got: list[np.ndarray], what: str) -> None:
    """Raise :class:`ExportError` when an exported file disagrees with the module it came from."""
    for spec_index, (want, have) in enumerate(zip(expected, got, strict=True)):
        if want.shape != have.shape or not np.allclose(want, have, rtol=1e-4, atol=1e-5):
            raise ExportError(
                f"The exported {what} disagrees with the policy on output {spec_index} (shapes {want.shape} vs "
                f"{have.shape}); a custom features extractor may use Python control flow or shapes that tracing "
                "cannot capture. Please report this with the policy's architecture."
            )


@contextlib.contextmanager
def _training_mode_kept(model: BaseAlgorithm | BasePolicy) -> Iterator[None]:
    """Give the policy back in the mode it had (export puts it in eval mode), e.g. when exporting from a callback."""
    policy = _policy_of(model)
    training = policy.training
    try:
        yield
    finally:
        policy.set_training_mode(training)


def _check_target(path: str | Path) -> Path:
    """The file to write, refused up front when it cannot be written: a folder, or a path through a file."""
    path = Path(path)
    if path.is_dir():
        raise ExportError(
            f"{str(path)!r} is a folder: pass the path of the file to write in it, e.g. "
            f"{str(path / 'policy.onnx')!r} or {str(path / 'policy.pt')!r}."
        )
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ExportError(f"Cannot write {str(path)!r}: {str(parent)!r} is a file, not a folder.")
            break
    return path


def _write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file renamed over it), creating missing folders.

    On any failure nothing is left behind: no partial file (:func:`~sb3_ppo_ext.reliability.checkpoints.atomic_write`)
    and none of the folders this call created.
    """
    created = [folder for folder in [path.parent, *path.parent.parents] if not folder.exists()]  # deepest first
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as file:
            file.write(data)
    except BaseException:
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _traced(module: PolicyExportModule, example: tuple[th.Tensor, ...]) -> Any:
    """``torch.jit.trace`` of the module, quietly: the tracer's warnings concern code paths not taken here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # frozen: the weights become constants, so outputs need no .detach() and the file holds nothing unused
        return th.jit.freeze(th.jit.trace(module, example, check_trace=False).eval())


@contextlib.contextmanager
def _weights_without_grad(module: nn.Module) -> Iterator[None]:
    """Parameters that need no gradient while the TorchScript module is traced and saved, then as they were.

    Freezing does not fold every weight into a constant (not an LSTM's when an in-place op, as the image
    scaling of a channels-last CNN policy, runs before it), and an output computed from a weight that
    requires grad requires it too. The weights are shared with the model, not copied: gSDE's exploration
    matrices are not leaf tensors, which ``deepcopy`` refuses.
    """
    parameters = [parameter for parameter in module.parameters() if parameter.requires_grad]
    try:
        for parameter in parameters:
            parameter.requires_grad_(False)
        yield
    finally:
        for parameter in parameters:
            parameter.requires_grad_(True)


def supported_opsets() -> range:
    """The ONNX opsets :func:`to_onnx` accepts.

    :return: :data:`MIN_OPSET` up to the highest opset that torch's exporter and onnx both know.
    """
    import onnx

    try:  # torch's own bound for its TorchScript-based exporter; a private module, hence the fallback
        from torch.onnx import _constants

        highest = int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", DEFAULT_OPSET))
    except ImportError:  # pragma: no cover - a torch without it
        highest = DEFAULT_OPSET
    return range(MIN_OPSET, min(highest, int(onnx.defs.onnx_opset_version())) + 1)


def check_opset(opset_version: Any) -> int:
    """``opset_version`` as an int, or an :class:`ExportError` listing the supported range.

    The range is :func:`supported_opsets`: checked before anything is traced or written.

    :param opset_version: the ``opset_version`` argument.
    :return: the opset, as an int.
    :raises ExportError: it is not an int in the supported range.
    """
    supported = supported_opsets()
    if isinstance(opset_version, numbers.Integral) and not isinstance(opset_version, bool):
        if int(opset_version) in supported:
            return int(opset_version)
    import onnx

    raise ExportError(
        f"opset_version={opset_version!r} is not supported: pass an int from {supported.start} to {supported[-1]}, "
        f"the opsets that torch {th.__version__}'s exporter and onnx {onnx.__version__} both support and every "
        f"policy exports with. The default, {DEFAULT_OPSET}, runs on onnxruntime releases of the last few years."
    )


@contextlib.contextmanager
def _exporter_errors(opset_version: int) -> Iterator[None]:
    """Run torch's exporter quietly: its errors as an :class:`ExportError`, no graph dump on stdout or stderr."""
    with _native_output_silenced():
        try:
            yield
        except ExportError:
            raise
        except Exception as error:
            lines = str(error).strip().splitlines()
            summary = lines[0].rstrip(".") if lines else type(error).__name__
            raise ExportError(
                f"torch could not export the policy to ONNX opset {opset_version}: {summary[:300]}. Try the default "
                f"opset_version={DEFAULT_OPSET}, or export to TorchScript (a .pt file) instead."
            ) from error


@contextlib.contextmanager
def _native_output_silenced() -> Iterator[None]:
    """Send what is written to file descriptors 1 and 2 (torch's C++ graph dumps) to a temporary file meanwhile."""
    import sys
    import tempfile

    try:
        saved = [os.dup(fd) for fd in (1, 2)]
    except OSError:  # no such descriptors (a service without stdout): nothing to silence
        yield
        return
    streams = [stream for stream in (sys.stdout, sys.stderr) if stream is not None]
    try:
        with tempfile.TemporaryFile() as sink:
            for stream in streams:  # Python's buffered output so far goes where it was meant to
                with contextlib.suppress(OSError, ValueError):
                    stream.flush()
            for fd in (1, 2):
                os.dup2(sink.fileno(), fd)
            try:
                yield
            finally:
                for stream in streams:
                    with contextlib.suppress(OSError, ValueError):
                        stream.flush()
                for fd, copy_of_fd in zip((1, 2), saved, strict=True):
                    os.dup2(copy_of_fd, fd)
    finally:
        for copy_of_fd in saved:
            os.close(copy_of_fd)


# -- public API --------------------------------------------------------------------------------------


def to_onnx(
    model: BaseAlgorithm | BasePolicy,
    path: str | Path,
    *,
    vecnormalize: VecNormalize | str | Path | None = None,
    with_value: bool = False,
    action_masks: bool = False,
    opset_version: int = DEFAULT_OPSET,
    check: bool = True,
) -> Path:
    """Write the policy's deterministic action (and value) as an ONNX model; return the path.

    :param model: a ClippedPPO model (SB3's PPO works too) or its policy.
    :param path: the ``.onnx`` file to write.
    :param vecnormalize: a ``VecNormalize`` (or the path of its saved statistics) whose observation
        normalisation is baked in, so the graph takes raw observations.
    :param with_value: add the ``value`` output (and, for a recurrent policy whose critic has its own LSTM,
        the critic's state: :class:`RecurrentExportModule`).
    :param action_masks: add the ``action_masks`` input (bool ``[batch, mask_size]``).
    :param opset_version: ONNX opset.
    :param check: run the file once with onnxruntime (when installed) and compare with the policy.
    :return: the path written.
    """
    try:
        import onnx  # noqa: F401 - checked here, used by _write_onnx
    except ImportError as exc:
        raise ImportError("ONNX export needs the onnx package: pip install 'sb3_ppo_ext[export]'") from exc
    check_opset(opset_version)
    target = _check_target(path)
    with _training_mode_kept(model):
        module, options = build_module(
            model, vecnormalize=vecnormalize, with_value=with_value, action_masks=action_masks
        )
        return _write_onnx(module, options, target, opset_version, check)


def _write_onnx(
    module: PolicyExportModule, options: dict[str, Any], path: Path, opset_version: int, check: bool
) -> Path:
    """Export to memory, add the metadata, check the model (and run it), then write the file atomically."""
    import onnx

    example = module.example_inputs(_TRACE_BATCH)
    # the batch axis is not always the first: LSTM states are [n_layers, batch, hidden]
    dynamic_axes = {
        spec.name: {axis: BATCH for axis, size in enumerate(spec.shape) if size == BATCH}
        for spec in [*module.input_specs(), *module.output_specs()]
    }
    buffer = io.BytesIO()
    with warnings.catch_warnings(), th.no_grad(), _exporter_errors(opset_version):
        # the TorchScript-based exporter is deprecated in favour of dynamo=True, which needs onnxscript
        warnings.simplefilter("ignore")
        th.onnx.export(
            module,
            example,
            buffer,
            dynamo=False,
            input_names=module.input_names,
            output_names=module.output_names,
            dynamic_axes=dynamic_axes,
            opset_version=opset_version,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    options["opset_version"] = opset_version
    for key, value in _metadata(module, options, "onnx").items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "sb3_ppo_ext"
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    if check:
        _check_onnx(module, data)
    _write_file(path, data)
    return path


def _check_onnx(module: PolicyExportModule, data: bytes) -> None:
    """Run the serialised model once with onnxruntime (when installed) and compare it with the module."""
    try:
        import onnxruntime as ort
    except ImportError:
        return
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    check_inputs = module.example_inputs(_CHECK_BATCH, seed=1)
    with th.no_grad():
        expected = _outputs(module(*check_inputs))
    feed = {name: tensor.numpy() for name, tensor in zip(module.input_names, check_inputs, strict=True)}
    _check_outputs(expected, session.run(None, feed), "ONNX model")


def to_torchscript(
    model: BaseAlgorithm | BasePolicy,
    path: str | Path,
    *,
    vecnormalize: VecNormalize | str | Path | None = None,
    with_value: bool = False,
    action_masks: bool = False,
    check: bool = True,
) -> Path:
    """Write the policy's deterministic action (and value) as a traced TorchScript module; return the path.

    Same inputs, outputs and options as :func:`to_onnx`; load it with ``torch.jit.load(path)`` and call it
    with tensors (``module(obs)``, ``module(obs, masks)``, one tensor per Dict key in the space's order;
    ``module(obs, state_h, state_c, episode_start)`` for a recurrent policy, :class:`RecurrentExportModule`).
    The metadata is the archive's extra file :data:`METADATA_FILE`.

    :param model: a ClippedPPO model (SB3's PPO works too) or its policy.
    :param path: the file to write (``.pt`` by convention).
    :param vecnormalize: a ``VecNormalize`` (or its saved statistics' path) to bake in, as :func:`to_onnx`.
    :param with_value: add the ``value`` output, as :func:`to_onnx`.
    :param action_masks: add the ``action_masks`` input, as :func:`to_onnx`.
    :param check: load the saved module once and compare it with the policy.
    :return: the path written.
    """
    target = _check_target(path)
    with _training_mode_kept(model):
        module, options = build_module(
            model, vecnormalize=vecnormalize, with_value=with_value, action_masks=action_masks
        )
        return _write_torchscript(module, options, target, check)


def _write_torchscript(module: PolicyExportModule, options: dict[str, Any], path: Path, check: bool) -> Path:
    """Trace and save to memory, check the saved module, then write the file atomically."""
    metadata = _metadata(module, options, "torchscript")
    buffer = io.BytesIO()
    # saved before the weights need gradients again: the weights left unfrozen are the model's own tensors
    with th.no_grad(), _weights_without_grad(module):
        traced = _traced(module, module.example_inputs(_TRACE_BATCH))
        th.jit.save(traced, buffer, _extra_files={METADATA_FILE: json.dumps(metadata)})
    data = buffer.getvalue()
    if check:
        check_inputs = module.example_inputs(_CHECK_BATCH, seed=1)
        with th.no_grad():
            expected = _outputs(module(*check_inputs))
            got = _outputs(th.jit.load(io.BytesIO(data))(*check_inputs))
        _check_outputs(expected, got, "TorchScript module")
    _write_file(path, data)
    return path


def export(
    model: BaseAlgorithm | BasePolicy, path: str | Path, export_format: ExportFormat | None = None, **options: Any
) -> Path:
    """:func:`to_onnx` or :func:`to_torchscript`, by ``export_format`` or else by the file suffix.

    ``.onnx`` is ONNX; ``.pt``, ``.pth`` and ``.ts`` are TorchScript. ``options`` go to the chosen function.

    :param model: a ClippedPPO model (SB3's PPO works too) or its policy.
    :param path: the file to write.
    :param export_format: ``"onnx"`` or ``"torchscript"``; None: from the suffix of ``path``.
    :return: the path written.
    :raises ExportError: the format is unknown, or ``opset_version`` is given for TorchScript.
    """
    if export_format is None:
        suffix = Path(path).suffix.lower()
        if suffix not in _SUFFIXES:
            raise ExportError(
                f"Cannot tell the export format from {str(path)!r}: use a .onnx, .pt or .ts file name, or pass "
                "export_format='onnx' or 'torchscript'."
            )
        export_format = _SUFFIXES[suffix]
    if export_format == "onnx":
        return to_onnx(model, path, **options)
    if export_format == "torchscript":
        if "opset_version" in options:
            raise ExportError(
                f"opset_version applies to ONNX files only; {str(path)!r} is written as TorchScript. Drop "
                "opset_version, or export to a .onnx file (export_format='onnx')."
            )
        return to_torchscript(model, path, **options)
    raise ExportError(f"export_format must be 'onnx' or 'torchscript', got {export_format!r}.")


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of an exported file (ONNX or TorchScript).

    :param path: a file written by :func:`to_onnx` or :func:`to_torchscript`.
    :return: the metadata by key, with the JSON values (inputs, outputs, options...) decoded.
    """
    path = Path(path)
    with open(path, "rb") as file:
        is_zip = file.read(4) == b"PK\x03\x04"  # TorchScript archives are zip files, ONNX models are protobuf
    if is_zip:
        extra = {METADATA_FILE: ""}
        th.jit.load(str(path), _extra_files=extra)
        raw: dict[str, str] = json.loads(extra[METADATA_FILE] or "{}")
    else:
        import onnx

        raw = {entry.key: entry.value for entry in onnx.load(str(path), load_external_data=False).metadata_props}
    decoded: dict[str, Any] = {}
    for key, value in raw.items():
        if key in {"inputs", "outputs", "export_options", "recurrent", "lstm_state"}:
            decoded[key] = json.loads(value)
        else:
            decoded[key] = value
    return decoded
