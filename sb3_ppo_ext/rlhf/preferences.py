"""Rewards learned from pairwise preferences between trajectory segments (Christiano et al. 2017).

The pieces of the RLHF loop for control tasks, each usable on its own:

* :class:`RewardModel`: ``r(s, a)`` per step, an MLP on the flattened observation and action;
* :class:`PreferenceDataset`: labelled pairs of equal-length segments;
* :func:`bradley_terry_loss` and :func:`fit`: ``P(seg1 > seg2) = sigmoid(R1 - R2)`` with ``R`` the sum of
  the model's per-step rewards, trained by cross-entropy against the labels;
* :class:`SyntheticPreferenceCollector`: cuts segment pairs out of recorded trajectories and labels them with
  a scoring function (a hidden true reward stands in for the human, for demos and tests);
* :class:`LearnedRewardWrapper`: a ``VecEnvWrapper`` that replaces (or adds to) the env's reward with the
  model's, keeping the env's own reward in ``info["env_reward"]``;
* :class:`RewardModelRefitCallback`: every few rollouts, labels new segments and refits the model.

Wrapper order with ``VecNormalize``: put the reward wrapper *inside*, i.e.
``VecNormalize(LearnedRewardWrapper(venv, model))``. The reward model then sees raw observations (the
same ones the collector records) and ``VecNormalize`` normalises the learned reward the policy trains on.
A ``Monitor`` inside the VecEnv (SB3's default) keeps reporting the true episode return in
``rollout/ep_rew_mean``; a ``VecMonitor`` outside the reward wrapper would report the learned one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch as th
import torch.nn.functional as F
from gymnasium import spaces
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.preprocessing import is_image_space
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper
from stable_baselines3.common.vec_env.base_vec_env import VecEnvStepReturn
from torch import nn

from sb3_ppo_ext.errors import NonFiniteError, PreferenceDataError

_SUPPORTED_SPACES = (spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)


# ── reward model ───────────────────────────────────────────────────────────────────────────────────────


def _input_dim(space: spaces.Space, what: str) -> int:
    """Width of ``space``'s encoding (one-hot for discrete spaces); TypeError for spaces we cannot encode."""
    if not isinstance(space, _SUPPORTED_SPACES):
        raise TypeError(
            f"RewardModel does not support the {what} space {space!r}: use Box, Discrete, MultiDiscrete or "
            "MultiBinary (flatten Dict/Tuple spaces with gymnasium's FlattenObservation first)"
        )
    if isinstance(space, spaces.Discrete):
        return int(space.n)
    if isinstance(space, spaces.MultiDiscrete):
        return int(np.sum(space.nvec))
    return int(np.prod(space.shape))


def check_space_values(x: th.Tensor, space: spaces.Space, what: str) -> None:
    """Discrete values within ``space`` (``x``: ``[B, *space.shape]``); Box values are not bounded here.

    :param x: the values, one row per step.
    :param space: the space they should belong to.
    :param what: what they are, plural (``"actions"``, ``"observations"``), for the message.
    :raises PreferenceDataError: naming ``what`` (``"actions"``, ``"observations"``), a bad value and the space,
        where one-hot encoding would fail with torch's "Class values must be smaller than num_classes".
    """
    if isinstance(space, spaces.Box) or x.numel() == 0:
        return
    if isinstance(space, spaces.MultiBinary):
        bad = (x != 0) & (x != 1)
    else:
        starts = th.as_tensor(np.asarray(space.start), device=x.device).reshape(-1)
        sizes = th.as_tensor(np.asarray(space.nvec if isinstance(space, spaces.MultiDiscrete) else space.n))
        index = x.reshape(x.shape[0], -1) - starts
        bad = (index < 0) | (index >= sizes.reshape(-1).to(x.device))
        if x.is_floating_point():
            bad |= index != index.floor()
    if bad.any():
        value = x.reshape(bad.shape)[bad][0].item()
        raise PreferenceDataError(
            f"{what} hold {value!r}, outside the {what[:-1]} space {space} (the reward model one-hot encodes "
            f"discrete values). Record the {what} the env takes, or give the reward model the space they come from."
        )


def _encode(x: th.Tensor, space: spaces.Space, normalize_images: bool, what: str = "inputs") -> th.Tensor:
    """``x`` of shape ``[B, *space.shape]`` -> float ``[B, D]``: Box flattened, discrete spaces one-hot.

    :raises PreferenceDataError: for discrete values outside ``space`` (:func:`check_space_values`).
    """
    batch = x.shape[0]
    if isinstance(space, spaces.Box):
        out = x.float()
        if normalize_images and is_image_space(space):
            out = out / 255.0
        return out.reshape(batch, -1)
    check_space_values(x, space, what)
    if isinstance(space, spaces.Discrete):
        # gymnasium's Discrete may start at a non-zero value; SB3's preprocess_obs ignores that
        return F.one_hot((x.long() - int(space.start)).reshape(batch), int(space.n)).float()
    if isinstance(space, spaces.MultiDiscrete):
        columns = (x.long() - th.as_tensor(space.start, device=x.device)).reshape(batch, -1)
        nvec = np.asarray(space.nvec).reshape(-1)
        return th.cat([F.one_hot(columns[:, i], int(n)).float() for i, n in enumerate(nvec)], dim=1)
    return x.float().reshape(batch, -1)  # MultiBinary


class RewardModel(nn.Module):
    """Per-step reward ``r(s, a)``: an MLP on the flattened observation and (unless ``use_action=False``) action.

    Discrete and MultiDiscrete parts are one-hot encoded, uint8 images scaled to [0, 1]. Inputs may carry
    any leading batch dimensions (``[B]``, ``[B, L]``...): the output has exactly those dimensions.

    :param observation_space: the env's observation space: Box, Discrete, MultiDiscrete or MultiBinary.
    :param action_space: the env's action space, from the same four.
    :param net_arch: hidden layer widths; a linear output layer of width 1 follows.
    :param activation_fn: activation class after each hidden layer.
    :param use_action: feed the action too (``r(s, a)``); False: ``r(s)``, the actions are not read.
    :param normalize_images: scale image observations (uint8 Box spaces) by 1/255.
    :raises TypeError: for other spaces (Dict, Tuple, ...).
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        net_arch: Sequence[int] = (64, 64),
        activation_fn: type[nn.Module] = nn.ReLU,
        *,
        use_action: bool = True,
        normalize_images: bool = True,
    ) -> None:
        super().__init__()
        obs_dim = _input_dim(observation_space, "observation")
        act_dim = _input_dim(action_space, "action")
        self.observation_space = observation_space
        self.action_space = action_space
        self.use_action = use_action
        self.normalize_images = normalize_images
        layers: list[nn.Module] = []
        width = obs_dim + (act_dim if use_action else 0)
        for hidden in net_arch:
            layers += [nn.Linear(width, int(hidden)), activation_fn()]
            width = int(hidden)
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    @property
    def device(self) -> th.device:
        """The device of the model's parameters."""
        return next(self.parameters()).device

    def _leading_shape(self, obs: th.Tensor) -> tuple[int, ...]:
        """The batch dimensions of ``obs``: everything before the observation space's own shape."""
        n_space_dims = len(self.observation_space.shape or ())
        if obs.ndim < n_space_dims or tuple(obs.shape[obs.ndim - n_space_dims :]) != tuple(
            self.observation_space.shape or ()
        ):
            raise ValueError(
                f"observations of shape {tuple(obs.shape)} do not end with the observation space's shape "
                f"{self.observation_space.shape}"
            )
        return tuple(obs.shape[: obs.ndim - n_space_dims])

    def forward(self, obs: th.Tensor, actions: th.Tensor) -> th.Tensor:
        """Rewards of shape ``lead`` for ``obs`` ``[*lead, *obs_shape]`` and ``actions`` ``[*lead, *action_shape]``.

        :param obs: observations, any leading batch dimensions ``lead``.
        :param actions: the actions taken in them (not read with ``use_action=False``).
        :return: the per-step rewards, shape ``lead``.
        """
        lead = self._leading_shape(obs)
        batch = math.prod(lead)
        obs = obs.to(self.device).reshape(batch, *(self.observation_space.shape or ()))
        features = [_encode(obs, self.observation_space, self.normalize_images, "observations")]
        if self.use_action:
            action_shape = tuple(self.action_space.shape or ())
            if math.prod(actions.shape) != batch * math.prod(action_shape):
                raise ValueError(
                    f"actions of shape {tuple(actions.shape)} do not match observations with batch shape {lead} "
                    f"and the action space's shape {action_shape}"
                )
            actions = actions.to(self.device).reshape(batch, *action_shape)
            features.append(_encode(actions, self.action_space, normalize_images=False, what="actions"))
        return self.net(th.cat(features, dim=1)).reshape(lead)

    def segment_return(self, obs_seq: th.Tensor, act_seq: th.Tensor) -> th.Tensor:
        """Sum of the per-step rewards over the step axis: ``[*B, L, ...]`` -> ``[*B]`` (a scalar for one segment).

        :param obs_seq: observations ``[*B, L, *obs_shape]``.
        :param act_seq: actions ``[*B, L, *action_shape]``.
        :return: the segments' predicted returns ``[*B]``, with gradients.
        """
        return self(obs_seq, act_seq).sum(dim=-1)

    @th.no_grad()
    def predict_reward(self, obs: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """NumPy in, float32 NumPy out, no gradients: the rewards the wrapper hands to the env's consumer.

        :param obs: observations ``[*lead, *obs_shape]``.
        :param actions: actions ``[*lead, *action_shape]``.
        :return: float32 rewards of shape ``lead``.
        """
        obs_t = th.as_tensor(np.asarray(obs), device=self.device)
        act_t = th.as_tensor(np.asarray(actions), device=self.device)
        return self(obs_t, act_t).cpu().numpy().astype(np.float32)


# ── segments and labelled pairs ────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Segment:
    """``L`` consecutive steps of one env: observations before each step, actions, and the env's rewards."""

    obs: np.ndarray
    actions: np.ndarray
    env_rewards: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.obs)


@dataclass(frozen=True)
class Trajectories:
    """Steps of ``N`` envs over ``T`` steps, time first: ``obs`` ``[T, N, ...]``, ``dones`` ``[T, N]``.

    ``obs[t]`` is the observation the action ``actions[t]`` was taken in; ``dones[t]`` says whether that step
    ended an episode (so a segment never runs past a step whose ``done`` is set).
    """

    obs: np.ndarray
    actions: np.ndarray
    env_rewards: np.ndarray
    dones: np.ndarray

    def __post_init__(self) -> None:
        steps_envs = tuple(self.dones.shape)
        if len(steps_envs) != 2:
            raise ValueError(f"dones must have shape [T, N], got {steps_envs}")
        for name in ("obs", "actions", "env_rewards"):
            shape = tuple(getattr(self, name).shape)
            if shape[:2] != steps_envs:
                raise ValueError(f"{name} has shape {shape}, expected [T, N, ...] = {steps_envs} like dones")


def _check_label(label: float) -> float:
    label = float(label)
    if not 0.0 <= label <= 1.0:  # also false for NaN
        raise ValueError(f"a preference label is P(segment 1 preferred), in [0, 1] (0, 0.5 or 1); got {label}")
    return label


def check_finite_segment(array: np.ndarray, what: str) -> None:
    """Refuse a segment's observations or actions with NaN/inf (:class:`~sb3_ppo_ext.errors.NonFiniteError`).

    A single NaN/inf in a segment makes ``fit`` turn every weight of the reward model into NaN. Arrays that are
    not numbers raise a ``ValueError``.

    :param array: a segment's observations or actions, steps first.
    :param what: what it is, for the message (``"segment 1: observations"``).
    """
    if array.dtype.kind not in "biufc":
        raise ValueError(f"{what} must be numbers, got an array of dtype {array.dtype}")
    if array.dtype.kind in "fc" and not np.isfinite(array).all():
        step = int(np.flatnonzero(~np.isfinite(array.reshape(len(array), -1)).all(axis=1))[0])
        raise NonFiniteError(
            f"{what} contain NaN or inf (first at step {step} of {len(array)}): fitting on them would turn every "
            "weight of the reward model into NaN. Leave out or repair the segments recorded from broken steps (the "
            "env's observations can be checked with SB3's VecCheckNan)."
        )


class PreferenceDataset:
    """Labelled pairs of segments, all of one length ``L`` and one observation / action shape.

    A label is the probability that the first segment is preferred: 1 (first), 0 (second), 0.5 (equally
    good); soft labels in between are accepted. The first pair fixes ``L`` and the shapes; later pairs must
    match them (a ValueError otherwise). Segments with NaN/inf are refused (:func:`check_finite_segment`), and the
    arrays are copied, so the pairs stay as checked. With ``capacity`` the oldest pairs are dropped first.

    :param capacity: the most pairs kept; None: no limit.
    """

    def __init__(self, capacity: int | None = None) -> None:
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity must be a positive number of pairs or None, got {capacity}")
        self.capacity = capacity
        self._pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]] = []
        self._shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None  # (obs [L, ...], actions [L, ...])
        self._stacked: tuple[np.ndarray, ...] | None = None

    def __len__(self) -> int:
        return len(self._pairs)

    @property
    def segment_length(self) -> int | None:
        """``L``, once the first pair has been added."""
        return None if self._shapes is None else self._shapes[0][0]

    def _check_segment(self, obs: Any, actions: Any, which: str) -> tuple[np.ndarray, np.ndarray]:
        # copies: a caller that reuses its arrays must not change (or put NaN into) pairs already checked
        obs, actions = np.array(obs), np.array(actions)
        if obs.ndim == 0 or actions.ndim == 0 or len(obs) != len(actions):
            raise ValueError(
                f"segment {which}: observations {obs.shape} and actions {actions.shape} must have the same "
                "number of steps on their first axis"
            )
        if len(obs) == 0:
            raise ValueError(f"segment {which} is empty")
        check_finite_segment(obs, f"segment {which}: observations")
        check_finite_segment(actions, f"segment {which}: actions")
        return obs, actions

    def add(self, obs1: Any, act1: Any, obs2: Any, act2: Any, label: float) -> None:
        """Add one pair: segment 1 = (``obs1``, ``act1``), segment 2 = (``obs2``, ``act2``), each ``[L, ...]``.

        :param obs1: segment 1's observations ``[L, *obs_shape]``.
        :param act1: segment 1's actions ``[L, *action_shape]``.
        :param obs2: segment 2's observations, same shape as ``obs1``.
        :param act2: segment 2's actions, same shape as ``act1``.
        :param label: ``P(segment 1 preferred)`` in [0, 1]: 1, 0, 0.5 for a tie, or a soft label.
        """
        obs1, act1 = self._check_segment(obs1, act1, "1")
        obs2, act2 = self._check_segment(obs2, act2, "2")
        label = _check_label(label)
        if (obs1.shape, act1.shape) != (obs2.shape, act2.shape):
            raise ValueError(
                "the two segments of a pair must have the same length and shapes: "
                f"observations {obs1.shape} vs {obs2.shape}, actions {act1.shape} vs {act2.shape}"
            )
        shapes = (tuple(obs1.shape), tuple(act1.shape))
        if self._shapes is None:
            self._shapes = shapes
        elif shapes != self._shapes:
            raise ValueError(
                f"this dataset holds segments with observations {self._shapes[0]} and actions {self._shapes[1]} "
                f"([L, ...], L = {self._shapes[0][0]}); got {shapes[0]} and {shapes[1]}"
            )
        self._pairs.append((obs1, act1, obs2, act2, label))
        if self.capacity is not None and len(self._pairs) > self.capacity:
            del self._pairs[: len(self._pairs) - self.capacity]
        self._stacked = None

    def add_pair(self, seg1: Segment, seg2: Segment, label: float) -> None:
        """Add one pair of :class:`Segment` objects (their env rewards are not kept).

        :param seg1: the first segment.
        :param seg2: the second segment.
        :param label: ``P(seg1 preferred)`` in [0, 1].
        """
        self.add(seg1.obs, seg1.actions, seg2.obs, seg2.actions, label)

    def extend(self, other: PreferenceDataset) -> None:
        """Add every pair of ``other``.

        :param other: another dataset; its pairs must have this one's length and shapes.
        """
        for pair in other._pairs:
            self.add(*pair)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The pairs as NumPy arrays (stacked once, then cached).

        :return: ``(obs1 [P, L, ...], act1, obs2, act2, labels [P])``, labels as float32.
        :raises ValueError: when the dataset is empty.
        """
        if not self._pairs:
            raise ValueError("the preference dataset is empty")
        if self._stacked is None:
            columns = list(zip(*self._pairs, strict=True))
            self._stacked = (
                *(np.stack(column) for column in columns[:4]),
                np.asarray(columns[4], dtype=np.float32),
            )
        return self._stacked  # type: ignore[return-value]


# ── Bradley-Terry loss and training ────────────────────────────────────────────────────────────────────


def preference_probability(returns1: th.Tensor, returns2: th.Tensor) -> th.Tensor:
    """Bradley-Terry: ``P(segment 1 preferred) = sigmoid(R1 - R2)``.

    :param returns1: the first segments' returns ``R1``.
    :param returns2: the second segments' returns ``R2``, same shape.
    :return: the probabilities, same shape.
    """
    return th.sigmoid(returns1 - returns2)


def bradley_terry_loss(returns1: th.Tensor, returns2: th.Tensor, labels: th.Tensor) -> th.Tensor:
    """Mean cross-entropy of ``sigmoid(R1 - R2)`` against the labels (``P(segment 1 preferred)``).

    ``-[y log sigmoid(d) + (1 - y) log(1 - sigmoid(d))]`` with ``d = R1 - R2``, computed from the logit ``d``
    so that large return gaps do not overflow. Its gradient w.r.t. ``R1`` is ``(sigmoid(d) - y) / B``.

    :param returns1: ``[B]`` returns of the first segments.
    :param returns2: ``[B]`` returns of the second segments.
    :param labels: ``[B]`` ``P(segment 1 preferred)``.
    :return: the scalar loss.
    """
    return F.binary_cross_entropy_with_logits(returns1 - returns2, labels.to(returns1.dtype))


def _dataset_tensors(dataset: PreferenceDataset, model: RewardModel) -> tuple[th.Tensor, ...]:
    """The dataset's arrays as tensors on the model's device, checked against the model's spaces first.

    Checked as a whole, before ``fit`` changes any weight: a bad value in a later minibatch would otherwise
    stop the fit half-way through.
    """
    tensors = tuple(th.as_tensor(array, device=model.device) for array in dataset.arrays())
    obs1, act1, obs2, act2, _ = tensors
    for obs, actions, which in ((obs1, act1, "1"), (obs2, act2, "2")):
        lead = model._leading_shape(obs)  # a clear error for observations of another shape
        flat = obs.reshape(math.prod(lead), *(model.observation_space.shape or ()))
        check_space_values(flat, model.observation_space, "observations")
        if model.use_action:
            action_shape = tuple(model.action_space.shape or ())
            if math.prod(actions.shape) != math.prod(lead) * math.prod(action_shape):
                raise PreferenceDataError(
                    f"the segments' actions {tuple(actions.shape)} ([pairs, L, ...], segments {which}) do not fit the "
                    f"reward model's action space {model.action_space}: expected {(*lead, *action_shape)}."
                )
            check_space_values(actions.reshape(-1, *action_shape), model.action_space, "actions")
    return tensors


@th.no_grad()
def evaluate(model: RewardModel, dataset: PreferenceDataset, batch_size: int = 256) -> dict[str, float]:
    """The Bradley-Terry ``loss`` and the ``accuracy`` of ``model`` on ``dataset``.

    ``accuracy``: the share of non-tied pairs whose preferred segment the model gives the higher return;
    NaN when every label is a tie.

    :param model: the reward model (left in the training mode it had).
    :param dataset: the labelled pairs, not empty.
    :param batch_size: pairs per forward pass.
    :return: ``{"loss": mean loss per pair, "accuracy": ...}``.
    """
    was_training = model.training
    model.eval()
    obs1, act1, obs2, act2, labels = _dataset_tensors(dataset, model)
    losses, hits, counted = [], 0, 0
    for start in range(0, len(labels), batch_size):
        batch = slice(start, start + batch_size)
        r1, r2 = model.segment_return(obs1[batch], act1[batch]), model.segment_return(obs2[batch], act2[batch])
        y = labels[batch]
        losses.append(F.binary_cross_entropy_with_logits(r1 - r2, y, reduction="sum"))
        decided = y != 0.5
        hits += int(((r1 > r2) == (y > 0.5))[decided].sum())
        counted += int(decided.sum())
    model.train(was_training)
    return {
        "loss": float(th.stack(losses).sum()) / len(labels),
        "accuracy": hits / counted if counted else float("nan"),
    }


def fit(
    model: RewardModel,
    dataset: PreferenceDataset,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 1e-3,
    *,
    weight_decay: float = 0.0,
    optimizer: th.optim.Optimizer | None = None,
    seed: int | None = None,
) -> list[float]:
    """Train ``model`` on ``dataset`` with the Bradley-Terry loss; returns the mean loss of each epoch.

    Adam with ``lr`` and ``weight_decay`` unless ``optimizer`` is given (pass the same one to successive
    calls to keep its moments across refits). ``seed`` fixes the minibatch order.

    :param model: the reward model, trained in place.
    :param dataset: the labelled pairs, not empty; checked against the model's spaces before any step.
    :param epochs: passes over the dataset.
    :param batch_size: pairs per gradient step.
    :param lr: Adam's learning rate (not read when ``optimizer`` is given).
    :param weight_decay: Adam's weight decay (not read when ``optimizer`` is given).
    :param optimizer: the optimizer to step; None: a new Adam.
    :param seed: seed of the minibatch order; None: drawn from torch's global generator.
    :return: the mean loss per pair of each epoch (empty for ``epochs=0``).
    """
    if epochs < 0 or batch_size < 1 or not lr > 0:
        raise ValueError(f"need epochs >= 0, batch_size >= 1 and lr > 0; got {epochs}, {batch_size}, {lr}")
    # checked as a whole before the first step: no weight changes when a pair cannot be encoded
    obs1, act1, obs2, act2, labels = _dataset_tensors(dataset, model)
    if optimizer is None:
        optimizer = th.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    generator = th.Generator()
    generator.manual_seed(int(th.randint(2**31, ())) if seed is None else seed)
    was_training = model.training
    model.train()
    history = []
    for _ in range(epochs):
        order = th.randperm(len(labels), generator=generator).to(model.device)
        total = 0.0
        for start in range(0, len(labels), batch_size):
            batch = order[start : start + batch_size]
            loss = bradley_terry_loss(
                model.segment_return(obs1[batch], act1[batch]),
                model.segment_return(obs2[batch], act2[batch]),
                labels[batch],
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
        history.append(total / len(labels))
    model.train(was_training)
    return history


# ── synthetic labels ───────────────────────────────────────────────────────────────────────────────────


def true_return(segment: Segment) -> float:
    """The default score: the segment's sum of env rewards (the hidden true reward).

    :param segment: a segment that carries its env rewards.
    :return: their sum.
    :raises ValueError: when the segment has no env rewards.
    """
    if segment.env_rewards is None:
        raise ValueError("this segment carries no env rewards to score; give the collector a score_fn")
    return float(np.sum(segment.env_rewards))


class SyntheticPreferenceCollector:
    """Cuts random segment pairs out of recorded trajectories and labels them with ``score_fn``.

    A stand-in for the human of Christiano et al.: segment 1 is preferred when its score is higher. With
    ``temperature > 0`` the labeller is Boltzmann-rational: it prefers segment 1 with probability
    ``sigmoid((S1 - S2) / temperature)`` (the Bradley-Terry model itself), so labels are noisy where scores
    are close. Pairs whose scores differ by at most ``tie_margin`` get the label 0.5.

    Segments stay inside one env and one episode. Only the last ``capacity`` steps (over all envs) are
    kept, so labels follow the current policy's behaviour.

    :param segment_length: ``L``, the steps per segment.
    :param score_fn: a segment's score; default :func:`true_return`, the sum of its env rewards.
    :param temperature: 0: the higher score is always preferred; > 0: Boltzmann-rational labels.
    :param tie_margin: score gaps up to this are ties (label 0.5).
    :param capacity: the most steps held, over all envs (whole recordings are dropped, oldest first, but the
        newest is always kept); at least ``segment_length``.
    :param seed: seed of the segment sampling and of the noisy labels.
    """

    def __init__(
        self,
        segment_length: int,
        score_fn: Callable[[Segment], float] = true_return,
        *,
        temperature: float = 0.0,
        tie_margin: float = 0.0,
        capacity: int = 100_000,
        seed: int | None = None,
    ) -> None:
        if segment_length < 1:
            raise ValueError(f"segment_length must be >= 1, got {segment_length}")
        if not (temperature >= 0 and tie_margin >= 0 and math.isfinite(temperature) and math.isfinite(tie_margin)):
            raise ValueError(f"temperature and tie_margin must be finite and >= 0; got {temperature}, {tie_margin}")
        if capacity < segment_length:
            raise ValueError(f"capacity ({capacity} steps) must hold at least one segment ({segment_length} steps)")
        self.segment_length = segment_length
        self.score_fn = score_fn
        self.temperature = temperature
        self.tie_margin = tie_margin
        self.capacity = capacity
        self.rng = np.random.default_rng(seed)
        self._chunks: list[tuple[Trajectories, np.ndarray]] = []  # (steps, valid start indices per (t, n))

    @property
    def n_steps(self) -> int:
        """Steps held, over all envs."""
        return sum(chunk.dones.size for chunk, _ in self._chunks)

    @property
    def n_segments(self) -> int:
        """How many distinct segments the held steps allow."""
        return sum(len(starts) for _, starts in self._chunks)

    def add(self, trajectories: Trajectories) -> None:
        """Hold ``trajectories`` (``[T, N, ...]``) as a source of segments; the oldest steps past ``capacity`` go.

        :param trajectories: the steps of a recording; ignored when shorter than one segment or without a
            segment that stays inside one episode.
        """
        length = self.segment_length
        n_steps = trajectories.dones.shape[0]
        if n_steps < length:
            return
        # a segment starting at t may end an episode at its last step, but no step before that may be done
        dones = np.asarray(trajectories.dones, dtype=bool)
        crossing = np.zeros((n_steps - length + 1, dones.shape[1]), dtype=bool)
        for offset in range(length - 1):
            crossing |= dones[offset : offset + n_steps - length + 1]
        starts = np.argwhere(~crossing)
        if len(starts):
            self._chunks.append((trajectories, starts))
        while self._chunks and self.n_steps > self.capacity and len(self._chunks) > 1:
            self._chunks.pop(0)

    def add_steps(self, obs: Any, actions: Any, env_rewards: Any, dones: Any) -> None:
        """:meth:`add` from four ``[T, N, ...]`` arrays.

        :param obs: the observations each action was taken in, ``[T, N, *obs_shape]``.
        :param actions: ``[T, N, *action_shape]``.
        :param env_rewards: ``[T, N]``, the env's rewards (what :func:`true_return` scores).
        :param dones: ``[T, N]``, True where the step ended an episode.
        """
        self.add(Trajectories(np.asarray(obs), np.asarray(actions), np.asarray(env_rewards), np.asarray(dones)))

    def sample_segment(self) -> Segment:
        """One random segment from the held steps (chunks weighted by how many segments they allow).

        :return: ``L`` consecutive steps of one env inside one episode, with their env rewards.
        :raises ValueError: when no segment has been recorded yet.
        """
        counts = np.array([len(starts) for _, starts in self._chunks], dtype=np.float64)
        if counts.sum() == 0:
            raise ValueError(
                f"no segment of {self.segment_length} steps recorded yet (episodes or recordings too short?)"
            )
        chunk, starts = self._chunks[self.rng.choice(len(counts), p=counts / counts.sum())]
        t, n = starts[self.rng.integers(len(starts))]
        window = slice(t, t + self.segment_length)
        return Segment(chunk.obs[window, n], chunk.actions[window, n], chunk.env_rewards[window, n])

    def label(self, seg1: Segment, seg2: Segment) -> float:
        """``P(seg1 preferred)`` as the synthetic labeller answers it: 1, 0 or 0.5.

        :param seg1: the first segment.
        :param seg2: the second segment.
        :return: 0.5 within ``tie_margin``; else 1.0 or 0.0, drawn when ``temperature > 0``.
        """
        gap = float(self.score_fn(seg1)) - float(self.score_fn(seg2))
        if abs(gap) <= self.tie_margin:
            return 0.5
        if self.temperature == 0:
            return 1.0 if gap > 0 else 0.0
        return float(self.rng.random() < 1.0 / (1.0 + math.exp(-gap / self.temperature)))

    def collect(self, n_pairs: int, dataset: PreferenceDataset | None = None) -> PreferenceDataset:
        """Sample and label ``n_pairs`` pairs and add them to ``dataset`` if given.

        :param n_pairs: how many pairs to sample.
        :param dataset: a dataset to extend with the new pairs, or None.
        :return: a new dataset holding only the new pairs.
        """
        new = PreferenceDataset()
        for _ in range(n_pairs):
            seg1, seg2 = self.sample_segment(), self.sample_segment()
            new.add_pair(seg1, seg2, self.label(seg1, seg2))
        if dataset is not None and len(new):
            dataset.extend(new)
        return new


def record_rollout(
    venv: VecEnv,
    n_steps: int,
    policy: BaseAlgorithm | Callable[[np.ndarray], np.ndarray] | None = None,
    *,
    deterministic: bool = False,
) -> Trajectories:
    """Step ``venv`` (reset first) ``n_steps`` times with ``policy`` (a model, ``obs -> actions``, or random actions).

    The recorded observations are the ones ``venv`` returns: record from the env the reward model will see
    (inside any ``VecNormalize``), not from a normalised one.

    :param venv: the env to step; it is reset first.
    :param n_steps: steps per env.
    :param policy: an SB3 algorithm (its ``predict``), a function from observations to actions, or None for
        uniformly random actions.
    :param deterministic: passed to an algorithm's ``predict``.
    :return: the steps, ``[n_steps, n_envs, ...]``, with the env's rewards and dones.
    """
    obs = venv.reset()
    steps: dict[str, list[np.ndarray]] = {"obs": [], "actions": [], "env_rewards": [], "dones": []}
    for _ in range(n_steps):
        if policy is None:
            actions = np.stack([venv.action_space.sample() for _ in range(venv.num_envs)])
        elif isinstance(policy, BaseAlgorithm):
            actions, _ = policy.predict(obs, deterministic=deterministic)
        else:
            actions = np.asarray(policy(obs))
        new_obs, rewards, dones, _ = venv.step(actions)
        for key, value in zip(steps, (obs, actions, rewards, dones), strict=True):
            steps[key].append(np.array(value))
        obs = new_obs
    return Trajectories(**{key: np.stack(values) for key, values in steps.items()})


# ── the env wrapper ────────────────────────────────────────────────────────────────────────────────────


class LearnedRewardWrapper(VecEnvWrapper):
    """The reward model's ``r(s, a)`` as the env's reward: ``mode="replace"`` or ``"add"``.

    ``replace``: ``r = weight * r_model(s, a)``; ``add``: ``r = r_env + weight * r_model(s, a)``, with ``s`` the
    observation the action was taken in. ``info["env_reward"]`` keeps the env's reward and
    ``info["learned_reward"]`` the model's. With ``record=True`` every step's ``(s, a, r_env, done)`` is kept
    for :meth:`pop_recording` (what :class:`RewardModelRefitCallback` labels), at most ``max_recorded_steps``
    steps per env, oldest dropped.

    Use it inside ``VecNormalize``: ``VecNormalize(LearnedRewardWrapper(venv, model))``, so the model sees raw
    observations and the learned reward is normalised.

    :param venv: the env to wrap; its spaces must be the reward model's.
    :param reward_model: the model whose rewards the wrapper hands on.
    :param mode: ``"replace"`` (only the learned reward) or ``"add"`` (the env's reward plus it).
    :param weight: the learned reward's factor, finite.
    :param record: keep every step for :meth:`pop_recording`.
    :param max_recorded_steps: the most steps (per env) kept while recording.
    """

    def __init__(
        self,
        venv: VecEnv,
        reward_model: RewardModel,
        mode: str = "replace",
        weight: float = 1.0,
        *,
        record: bool = False,
        max_recorded_steps: int = 10_000,
    ) -> None:
        super().__init__(venv)
        if mode not in ("replace", "add"):
            raise ValueError(f'mode must be "replace" or "add", got {mode!r}')
        if not math.isfinite(weight):
            raise ValueError(f"weight must be finite, got {weight}")
        for what, env_space, model_space in (
            ("observation", venv.observation_space, reward_model.observation_space),
            ("action", venv.action_space, reward_model.action_space),
        ):
            if env_space != model_space:
                raise ValueError(f"the reward model's {what} space {model_space} differs from the env's {env_space}")
        self.reward_model = reward_model
        self.mode = mode
        self.weight = float(weight)
        self.record = record
        self.max_recorded_steps = max_recorded_steps
        self._last_obs: np.ndarray | None = None
        self._actions: np.ndarray | None = None
        self._recording: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def reset(self) -> np.ndarray:
        """Reset the envs and remember the first observations (the ``s`` of the next step's reward).

        :return: the first observations.
        """
        obs = self.venv.reset()
        self._last_obs = np.array(obs)
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        """Pass the actions on, keeping them for the reward.

        :param actions: one action per env.
        """
        self._actions = np.array(actions)
        self.venv.step_async(actions)

    def step_wait(self) -> VecEnvStepReturn:
        """Step the envs and swap in the learned reward.

        :return: ``(obs, rewards, dones, infos)`` of the wrapped env, with the rewards of ``mode`` (float32) and
            ``info["env_reward"]``, ``info["learned_reward"]`` added.
        :raises RuntimeError: when stepped before ``reset()``.
        """
        obs, env_rewards, dones, infos = self.venv.step_wait()
        if self._last_obs is None or self._actions is None:
            raise RuntimeError("LearnedRewardWrapper stepped before reset()")
        learned = self.reward_model.predict_reward(self._last_obs, self._actions).reshape(self.num_envs)
        env_rewards = np.asarray(env_rewards, dtype=np.float32)
        base = env_rewards if self.mode == "add" else np.zeros_like(env_rewards)
        rewards = (base + self.weight * learned).astype(np.float32)
        for i, info in enumerate(infos):
            info["env_reward"] = float(env_rewards[i])
            info["learned_reward"] = float(learned[i])
        if self.record:
            self._recording.append((self._last_obs, self._actions, env_rewards, np.array(dones, dtype=bool)))
            if len(self._recording) > self.max_recorded_steps:
                del self._recording[0]
        # after an episode ends the VecEnv has already reset that env: obs holds the next episode's first state
        self._last_obs = np.array(obs)
        return obs, rewards, dones, infos

    def pop_recording(self) -> Trajectories | None:
        """The steps recorded since the last call; clears them.

        :return: the recorded steps (``[T, N, ...]``), or None if there are none.
        """
        if not self._recording:
            return None
        columns = [np.stack(column) for column in zip(*self._recording, strict=True)]
        self._recording = []
        return Trajectories(*columns)


def find_reward_wrapper(venv: VecEnv) -> LearnedRewardWrapper | None:
    """The first :class:`LearnedRewardWrapper` in ``venv``'s chain of wrappers, or None.

    :param venv: the outermost VecEnv; the search follows ``.venv``.
    :return: the wrapper, or None when there is none.
    """
    env: Any = venv
    while env is not None:
        if isinstance(env, LearnedRewardWrapper):
            return env
        env = getattr(env, "venv", None)
    return None


# ── periodic refits ────────────────────────────────────────────────────────────────────────────────────


class RewardModelRefitCallback(BaseCallback):
    """Every ``refit_every`` rollouts: label ``pairs_per_refit`` new segment pairs and refit the reward model.

    The steps come from the training env's :class:`LearnedRewardWrapper` (its recording is switched on),
    i.e. raw observations and the actions the env received. Each refit first scores the new pairs with the
    model as it was (a held-out accuracy: the model has not seen them), then trains ``epochs`` epochs on
    all pairs so far. Logs ``reward_model/loss`` (last epoch's mean), ``reward_model/accuracy`` (held-out),
    ``reward_model/pairs``; ``history`` keeps the same numbers per refit.

    :param reward_model: the model to refit; it must be the wrapper's.
    :param collector: where the recorded steps go and the new pairs come from.
    :param dataset: the pairs so far (extended by each refit); None: a new empty one.
    :param refit_every: rollouts between refits.
    :param pairs_per_refit: new pairs labelled per refit.
    :param epochs: epochs of :func:`fit` per refit, over all pairs.
    :param batch_size: pairs per gradient step.
    :param lr: learning rate of the callback's Adam, kept across refits.
    :param weight_decay: its weight decay.
    :param wrapper: the env's :class:`LearnedRewardWrapper`; None: found in the training env at the start.
    :param verbose: 1: print each refit's numbers.
    """

    def __init__(
        self,
        reward_model: RewardModel,
        collector: SyntheticPreferenceCollector,
        dataset: PreferenceDataset | None = None,
        *,
        refit_every: int = 1,
        pairs_per_refit: int = 64,
        epochs: int = 5,
        batch_size: int = 64,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        wrapper: LearnedRewardWrapper | None = None,
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose)
        if refit_every < 1 or pairs_per_refit < 1:
            raise ValueError(f"refit_every and pairs_per_refit must be >= 1; got {refit_every}, {pairs_per_refit}")
        self.reward_model = reward_model
        self.collector = collector
        self.dataset = PreferenceDataset() if dataset is None else dataset
        self.refit_every = refit_every
        self.pairs_per_refit = pairs_per_refit
        self.epochs = epochs
        self.batch_size = batch_size
        self.wrapper = wrapper
        # one optimizer for all refits, so Adam's moments carry over from one refit to the next
        self.optimizer = th.optim.Adam(reward_model.parameters(), lr=lr, weight_decay=weight_decay)
        self.history: list[dict[str, float]] = []
        self._rollouts = 0

    def _init_callback(self) -> None:
        if self.wrapper is None:
            self.wrapper = find_reward_wrapper(self.training_env)
        if self.wrapper is None:
            raise ValueError(
                "RewardModelRefitCallback needs a LearnedRewardWrapper in the training env (or wrapper=...): "
                "it records the raw steps the reward model is refitted on"
            )
        if self.wrapper.reward_model is not self.reward_model:
            raise ValueError("the training env's LearnedRewardWrapper uses another reward model than this callback")
        self.wrapper.record = True

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        assert self.wrapper is not None
        recording = self.wrapper.pop_recording()
        if recording is not None:
            self.collector.add(recording)
        self._rollouts += 1
        if self._rollouts % self.refit_every or self.collector.n_segments == 0:
            return
        new_pairs = self.collector.collect(self.pairs_per_refit, self.dataset)
        held_out = evaluate(self.reward_model, new_pairs)
        losses = fit(
            self.reward_model,
            self.dataset,
            epochs=self.epochs,
            batch_size=self.batch_size,
            optimizer=self.optimizer,
            seed=self._rollouts,
        )
        stats = {
            "loss": losses[-1] if losses else held_out["loss"],
            "accuracy": held_out["accuracy"],
            "pairs": float(len(self.dataset)),
        }
        self.history.append(stats)
        for key, value in stats.items():
            self.logger.record(f"reward_model/{key}", value)
        if self.verbose:
            print(f"reward model refit {len(self.history)}: " + ", ".join(f"{k}={v:.3g}" for k, v in stats.items()))


__all__ = [
    "LearnedRewardWrapper",
    "PreferenceDataset",
    "RewardModel",
    "RewardModelRefitCallback",
    "Segment",
    "SyntheticPreferenceCollector",
    "Trajectories",
    "bradley_terry_loss",
    "check_finite_segment",
    "check_space_values",
    "evaluate",
    "find_reward_wrapper",
    "fit",
    "preference_probability",
    "record_rollout",
    "true_return",
]
