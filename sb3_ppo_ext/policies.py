"""Our actor-critic policies and the ``MlpPolicy`` / ``CnnPolicy`` / ``MultiInputPolicy`` aliases.

The networks follow SB3's conventions (``net_arch`` as a list shared by both heads or
``dict(pi=[...], vf=[...])``, separate actor and critic stacks, SB3 feature extractors) so that
``policy_kwargs`` written for SB3's PPO mean the same here. The evaluation path is our own: actions,
log-probabilities and entropies come from :mod:`sb3_ppo_ext.distributions` in closed form.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.distributions import Distribution, StateDependentNoiseDistribution
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.preprocessing import is_image_space, preprocess_obs
from stable_baselines3.common.torch_layers import (
    BaseFeaturesExtractor,
    CombinedExtractor,
    FlattenExtractor,
    NatureCNN,
)
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule
from torch import nn

from sb3_ppo_ext.distributions import SUPPORTED_ACTION_SPACES, ActionHead, DiagGaussianHead, make_action_head
from sb3_ppo_ext.masking import check_action_masks
from sb3_ppo_ext.matmul import use_fast_linears, wants_onednn_matmul
from sb3_ppo_ext.optim import fast_optimizer_kwargs

# invalid-action masks, as numpy (from the env) or a tensor (from the rollout buffer)
MaybeMasks = np.ndarray | th.Tensor | None

# Orthogonal-init gains (seed section 6): sqrt(2) for hidden layers, a near-uniform initial policy
# (0.01) and a unit-scale value head (1.0).
HIDDEN_GAIN = float(np.sqrt(2))
POLICY_HEAD_GAIN = 0.01
VALUE_HEAD_GAIN = 1.0


def layer_init(layer: nn.Module, gain: float) -> nn.Module:
    """Orthogonal weights with ``gain`` and zero biases for every Linear/Conv2d inside ``layer``.

    :param layer: a layer or any module; its Linear and Conv2d submodules are initialised in place.
    :param gain: the orthogonal initialisation's gain.
    :return: the same ``layer``.
    """
    for module in layer.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.orthogonal_(module.weight, gain=gain)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return layer


def mlp(input_dim: int, hidden_sizes: list[int], activation_fn: type[nn.Module]) -> tuple[nn.Sequential, int]:
    """A stack of ``Linear -> activation`` layers.

    :param input_dim: width of the input.
    :param hidden_sizes: width of each hidden layer, in order (empty: no layer).
    :param activation_fn: activation class placed after every Linear layer.
    :return: ``(stack, output width)``; the width is ``input_dim`` when ``hidden_sizes`` is empty.
    """
    layers: list[nn.Module] = []
    last = input_dim
    for size in hidden_sizes:
        layers += [nn.Linear(last, size), activation_fn()]
        last = size
    return nn.Sequential(*layers), last


class ActorCriticMLP(nn.Module):
    """Separate actor and critic hidden stacks on top of the extracted features.

    :param features_dim: width of the features extractor's output.
    :param net_arch: ``[64, 64]`` (same sizes for both) or ``dict(pi=[...], vf=[...])``.
    :param activation_fn: activation class placed after every hidden layer.
    :param critic_features_dim: width of the critic's features when they differ from the actor's.
    """

    def __init__(
        self,
        features_dim: int,
        net_arch: list[int] | dict[str, list[int]],
        activation_fn: type[nn.Module],
        critic_features_dim: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(net_arch, dict):
            pi_sizes, vf_sizes = list(net_arch.get("pi", [])), list(net_arch.get("vf", []))
        else:
            pi_sizes = vf_sizes = list(net_arch)
        self.policy_net, self.latent_dim_pi = mlp(features_dim, pi_sizes, activation_fn)
        critic_input = features_dim if critic_features_dim is None else critic_features_dim
        self.value_net, self.latent_dim_vf = mlp(critic_input, vf_sizes, activation_fn)

    def forward(self, features: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        """Both stacks on shared features.

        :param features: ``[B, features_dim]`` extracted features.
        :return: ``(latent_pi, latent_vf)``.
        """
        return self.policy_net(features), self.value_net(features)

    def forward_actor(self, features: th.Tensor) -> th.Tensor:
        """Actor latent only.

        :param features: ``[B, features_dim]`` the actor's features.
        :return: ``[B, latent_dim_pi]``.
        """
        return self.policy_net(features)

    def forward_critic(self, features: th.Tensor) -> th.Tensor:
        """Critic latent only.

        :param features: ``[B, critic_features_dim]`` the critic's features.
        :return: ``[B, latent_dim_vf]``.
        """
        return self.value_net(features)


class ActorCriticPolicy(BasePolicy):
    """Actor-critic policy for :class:`~sb3_ppo_ext.ClippedPPO` (the ``MlpPolicy``).

    Accepts the constructor arguments of SB3's ``ActorCriticPolicy`` with the same meaning, plus
    ``state_dependent_std``.

    :param observation_space: observation space.
    :param action_space: action space: Box, Discrete, MultiDiscrete or MultiBinary.
    :param lr_schedule: learning-rate schedule; ``lr_schedule(1)`` is the initial learning rate.
    :param net_arch: hidden sizes, ``[64, 64]`` or ``dict(pi=[...], vf=[...])``
        (default ``dict(pi=[64, 64], vf=[64, 64])``, or none on top of NatureCNN).
    :param activation_fn: activation after each hidden layer.
    :param ortho_init: orthogonal initialisation with gains sqrt(2) / 0.01 / 1.0 (else PyTorch's default).
    :param use_sde: generalized State-Dependent Exploration (SB3's gSDE distribution).
    :param log_std_init: initial log standard deviation of Gaussian actions.
    :param full_std: gSDE only: one std per (feature, action) pair rather than per feature.
    :param use_expln: gSDE only: ``expln`` instead of ``exp`` to keep the std positive.
    :param squash_output: gSDE only: squash actions with tanh.
    :param features_extractor_class: SB3 features extractor class.
    :param features_extractor_kwargs: its keyword arguments.
    :param share_features_extractor: one extractor for actor and critic, or one each.
    :param normalize_images: divide image observations by 255.
    :param optimizer_class: optimizer class (default Adam with ``eps=1e-5``).
    :param optimizer_kwargs: optimizer keyword arguments, learning rate excluded.
    :param state_dependent_std: Box actions only: the head outputs ``[B, 2 * action_dim]`` (mean and
        log_std per state, the seed's layout) instead of a state-independent ``log_std`` parameter.
    :param multibinary_head: MultiBinary actions only: ``"bernoulli"`` (default: one logit per bit, as SB3's
        ``PPO``) or ``"categorical"`` (two logits per bit, a two-class softmax, as sb3-contrib's ``MaskablePPO``;
        it learned faster on the masked MultiBinary task, see docs/benchmark.md).
    :param actor_keys: Dict observations only: the keys the actor reads (an asymmetric actor-critic); ``predict``
        then needs these keys alone. None: all keys.
    :param critic_keys: Dict observations only: the keys the critic reads, e.g. privileged simulator state. None:
        all keys. Either one gives actor and critic separate features extractors.
    :param onednn_matmul: compute large Linear layers with oneDNN's matrix product (same values, ~2x
        faster on CPUs where MKL is slow, see :mod:`sb3_ppo_ext.matmul`). ``None`` (default) turns it
        on when the policy has convolutions (oneDNN is then in use already) or a Linear layer with at
        least 2^20 weights; elsewhere its one-time ~7 MB of resident memory outweighs the gain.
    """

    #: ``f(head, params) -> params``, applied to the action head's parameters when stored actions are evaluated in
    #: training mode (the update), e.g. RPO's noise (:mod:`sb3_ppo_ext.stabilizers.rpo`); None: off. The
    #: closed-form kernel refuses a policy that has one.
    training_params_transform: Callable[[ActionHead, tuple[th.Tensor, ...]], tuple[th.Tensor, ...]] | None = None

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        net_arch: list[int] | dict[str, list[int]] | None = None,
        activation_fn: type[nn.Module] = nn.Tanh,
        ortho_init: bool = True,
        use_sde: bool = False,
        log_std_init: float = 0.0,
        full_std: bool = True,
        use_expln: bool = False,
        squash_output: bool = False,
        features_extractor_class: type[BaseFeaturesExtractor] = FlattenExtractor,
        features_extractor_kwargs: dict[str, Any] | None = None,
        share_features_extractor: bool = True,
        normalize_images: bool = True,
        optimizer_class: type[th.optim.Optimizer] = th.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
        state_dependent_std: bool = False,
        onednn_matmul: bool | None = None,
        actor_keys: list[str] | None = None,
        critic_keys: list[str] | None = None,
        multibinary_head: str = "bernoulli",
    ) -> None:
        if optimizer_kwargs is None:
            # Adam's eps=1e-5 as in the reference PPO implementations (SB3, baselines)
            optimizer_kwargs = {"eps": 1e-5} if optimizer_class == th.optim.Adam else {}
        super().__init__(
            observation_space,
            action_space,
            features_extractor_class,
            features_extractor_kwargs,
            optimizer_class=optimizer_class,
            optimizer_kwargs=optimizer_kwargs,
            squash_output=squash_output,
            normalize_images=normalize_images,
        )
        if not isinstance(action_space, SUPPORTED_ACTION_SPACES):
            raise TypeError(f"Unsupported action space {action_space!r} for {type(self).__name__}.")
        if squash_output and not use_sde:
            raise ValueError("squash_output=True is only available with use_sde=True (as in SB3).")
        if state_dependent_std and (use_sde or not isinstance(action_space, spaces.Box)):
            raise ValueError("state_dependent_std=True needs a Box action space and use_sde=False.")
        if multibinary_head != "bernoulli" and not isinstance(action_space, spaces.MultiBinary):
            raise ValueError(
                f"multibinary_head={multibinary_head!r} applies to MultiBinary actions, not {action_space}."
            )
        if isinstance(net_arch, list) and len(net_arch) > 0 and isinstance(net_arch[0], dict):
            warnings.warn("net_arch=[dict(pi=..., vf=...)] is deprecated (as in SB3): pass the dict directly.")
            net_arch = net_arch[0]
        if net_arch is None:
            net_arch = [] if features_extractor_class == NatureCNN else dict(pi=[64, 64], vf=[64, 64])

        self.net_arch = net_arch
        self.activation_fn = activation_fn
        self.ortho_init = ortho_init
        self.use_sde = use_sde
        self.log_std_init = log_std_init
        self.full_std = full_std
        self.use_expln = use_expln
        self.state_dependent_std = state_dependent_std
        self.multibinary_head = multibinary_head
        self.share_features_extractor = share_features_extractor

        self.actor_keys = None if actor_keys is None else list(actor_keys)
        self.critic_keys = None if critic_keys is None else list(critic_keys)
        if self.actor_keys is not None or self.critic_keys is not None:
            self._build_asymmetric_extractors()
        else:
            self.features_extractor = self.make_features_extractor()
            self.pi_features_extractor = self.features_extractor
            self.vf_features_extractor = (
                self.features_extractor if share_features_extractor else self.make_features_extractor()
            )
        self.features_dim = self.pi_features_extractor.features_dim
        self.vf_features_dim = self.vf_features_extractor.features_dim
        self._build_mlp_extractor()
        self._build_action_net(self.mlp_extractor.latent_dim_pi)
        self.value_net = nn.Linear(self.mlp_extractor.latent_dim_vf, 1)
        if ortho_init:
            self._init_weights()
        self._onednn_matmul_arg = onednn_matmul
        self._use_accelerators(onednn_matmul)

        self.optimizer = self.optimizer_class(
            self.parameters(), lr=lr_schedule(1), **fast_optimizer_kwargs(self.optimizer_class, self.optimizer_kwargs)
        )

    def _build_mlp_extractor(self) -> None:
        """The actor and critic hidden stacks on the features (recurrent subclasses put their LSTMs first)."""
        self.mlp_extractor = ActorCriticMLP(
            self.features_dim, self.net_arch, self.activation_fn, critic_features_dim=self.vf_features_dim
        )

    def _build_asymmetric_extractors(self) -> None:
        """Separate extractors on the actor's and the critic's keys of a Dict observation space."""
        space = self.observation_space
        if not isinstance(space, spaces.Dict):
            raise ValueError(
                f"actor_keys/critic_keys select keys of a Dict observation space; this one is {space}. Remove them, "
                "or use Dict observations with 'MultiInputPolicy'."
            )
        for name, keys in (("actor_keys", self.actor_keys), ("critic_keys", self.critic_keys)):
            if keys is None:
                continue
            unknown = [key for key in keys if key not in space.spaces]
            if unknown or not keys:
                raise ValueError(
                    f"{name}={keys!r} is invalid: unknown keys {unknown}; the observation space has "
                    f"{list(space.spaces)}."
                    if unknown
                    else f"{name}=[] is invalid: name at least one key."
                )
        self.share_features_extractor = False

        def extractor(keys: list[str] | None) -> BaseFeaturesExtractor:
            subspace = space if keys is None else spaces.Dict({key: space[key] for key in keys})
            module = self.features_extractor_class(subspace, **self.features_extractor_kwargs)
            module.observation_keys = None if keys is None else list(keys)  # read by extract_features
            return module

        self.pi_features_extractor = extractor(self.actor_keys)
        self.vf_features_extractor = extractor(self.critic_keys)
        self.features_extractor = self.pi_features_extractor

    def _build_action_net(self, latent_pi: int) -> None:
        """The action head and its linear layer (plus the state-independent ``log_std`` for Box actions)."""
        self.action_head: ActionHead | None = None
        self.sde_dist: StateDependentNoiseDistribution | None = None
        if self.use_sde:
            if not isinstance(self.action_space, spaces.Box):
                raise ValueError(f"use_sde=True needs a Box action space, got {self.action_space!r}.")
            self.sde_dist = StateDependentNoiseDistribution(
                int(np.prod(self.action_space.shape)),
                full_std=self.full_std,
                use_expln=self.use_expln,
                squash_output=self.squash_output,
                learn_features=False,
            )
            self.action_net, self.log_std = self.sde_dist.proba_distribution_net(
                latent_dim=latent_pi, log_std_init=self.log_std_init, latent_sde_dim=latent_pi
            )
            return
        self.action_head = make_action_head(self.action_space, self.state_dependent_std, self.multibinary_head)
        self.action_net = nn.Linear(latent_pi, self.action_head.n_outputs)
        if isinstance(self.action_head, DiagGaussianHead) and not self.state_dependent_std:
            self.log_std = nn.Parameter(th.full((self.action_head.action_dim,), float(self.log_std_init)))

    def _init_weights(self) -> None:
        """Orthogonal initialisation with the seed's gains (sqrt(2) hidden, 0.01 policy head, 1.0 value head)."""
        gains: dict[nn.Module, float] = {
            self.pi_features_extractor: HIDDEN_GAIN,
            self.vf_features_extractor: HIDDEN_GAIN,
            self.mlp_extractor: HIDDEN_GAIN,
            self.action_net: POLICY_HEAD_GAIN,
            self.value_net: VALUE_HEAD_GAIN,
        }
        for module, gain in gains.items():
            layer_init(module, gain)
        if self.state_dependent_std:
            # start every state's std at exp(log_std_init), like the state-independent parameter
            with th.no_grad():
                self.action_net.bias[self.action_head.action_dim :].fill_(self.log_std_init)  # type: ignore[union-attr]

    def _use_accelerators(self, onednn_matmul: bool | None) -> None:
        """Memory layouts and matrix-product kernels that change speed, not values (:mod:`sb3_ppo_ext.matmul`)."""
        # large Linear layers (NatureCNN's 3136x512) go through oneDNN's matrix product
        self.onednn_matmul = wants_onednn_matmul(self) if onednn_matmul is None else bool(onednn_matmul)
        if self.onednn_matmul:
            use_fast_linears(self)
        # oneDNN's convolutions run about 1.3x faster in NHWC ("channels_last") than in NCHW on a CPU
        self.channels_last = any(isinstance(module, nn.Conv2d) for module in self.modules())
        if self.channels_last:
            self.to(memory_format=th.channels_last)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            dict(
                net_arch=self.net_arch,
                activation_fn=self.activation_fn,
                ortho_init=self.ortho_init,
                use_sde=self.use_sde,
                log_std_init=self.log_std_init,
                full_std=self.full_std,
                use_expln=self.use_expln,
                squash_output=self.squash_output,
                lr_schedule=self._dummy_schedule,
                features_extractor_class=self.features_extractor_class,
                features_extractor_kwargs=self.features_extractor_kwargs,
                share_features_extractor=self.share_features_extractor,
                optimizer_class=self.optimizer_class,
                optimizer_kwargs=self.optimizer_kwargs,
                state_dependent_std=self.state_dependent_std,
                multibinary_head=self.multibinary_head,
                onednn_matmul=self._onednn_matmul_arg,
                actor_keys=self.actor_keys,
                critic_keys=self.critic_keys,
            )
        )
        return data

    # -- network pieces -------------------------------------------------------------------------

    def extract_features(  # type: ignore[override]
        self, obs: PyTorchObs, features_extractor: BaseFeaturesExtractor
    ) -> th.Tensor:
        """Preprocess ``obs`` (SB3's ``preprocess_obs``) and run ``features_extractor`` on it.

        An extractor with ``observation_keys`` (asymmetric actor-critic) sees only those keys.

        :param obs: a batch of observations as tensors (a dict for Dict spaces).
        :param features_extractor: the extractor to run (the actor's, the critic's or the shared one).
        :return: ``[B, features_dim]`` features.
        """
        keys = getattr(features_extractor, "observation_keys", None)
        if keys is not None and isinstance(obs, dict):
            obs = {key: obs[key] for key in keys}
        if self.channels_last and isinstance(obs, th.Tensor) and obs.dim() == 4:
            if self.normalize_images and is_image_space(self.observation_space):
                # SB3's obs.float() / 255 in NHWC; the layout change is done on the uint8 frames (4x less
                # memory to move than on floats) and is free for the buffer's minibatches, already NHWC
                frames = obs.contiguous(memory_format=th.channels_last)
                return features_extractor(frames.to(th.float32).div_(255.0))
            preprocessed = preprocess_obs(obs, self.observation_space, normalize_images=self.normalize_images)
            return features_extractor(preprocessed.contiguous(memory_format=th.channels_last))  # type: ignore[union-attr]
        return features_extractor(preprocess_obs(obs, self.observation_space, normalize_images=self.normalize_images))

    def _latents(self, obs: PyTorchObs) -> tuple[th.Tensor, th.Tensor]:
        """Actor and critic latents for a batch of observations."""
        if self.share_features_extractor:
            features = self.extract_features(obs, self.features_extractor)
            return self.mlp_extractor(features)
        latent_pi = self.mlp_extractor.forward_actor(self.extract_features(obs, self.pi_features_extractor))
        latent_vf = self.mlp_extractor.forward_critic(self.extract_features(obs, self.vf_features_extractor))
        return latent_pi, latent_vf

    def _head_params(self, latent_pi: th.Tensor, action_masks: MaybeMasks = None) -> tuple[th.Tensor, ...]:
        """The action head's parameters for an actor latent, restricted to the valid actions when masked."""
        params = self.split_head_output(self.action_net(latent_pi))
        if action_masks is None:
            return params
        assert self.action_head is not None
        return self.action_head.mask(params, self.mask_tensor(action_masks))

    def split_head_output(self, out: th.Tensor) -> tuple[th.Tensor, ...]:
        """``action_net``'s output as the head's parameters: logits, or mean and log_std.

        :param out: ``action_net``'s output ``[B, n_outputs]``.
        :return: ``(logits,)``, or ``(mean, log_std)`` for Gaussian actions (``log_std`` the state-independent
            parameter unless ``state_dependent_std``).
        """
        if isinstance(self.action_head, DiagGaussianHead):
            if self.state_dependent_std:
                mean, log_std = out.chunk(2, dim=-1)
                return mean, log_std
            return out, self.log_std
        return (out,)

    def mask_tensor(self, action_masks: np.ndarray | th.Tensor) -> th.Tensor:
        """Invalid-action masks as a bool tensor ``[B, mask_size]`` on the policy's device.

        :param action_masks: masks as a NumPy array or a tensor, ``True`` (or nonzero) for valid actions.
        :return: ``[B, mask_size]`` bool tensor.
        :raises ValueError: when the action space (or gSDE) has nothing to mask.
        """
        if self.action_head is None or self.action_head.mask_size is None:
            raise ValueError(f"Invalid-action masks do not apply to {self.action_space} actions (or gSDE).")
        if isinstance(action_masks, th.Tensor) and action_masks.dtype == th.bool:
            # rollouts and minibatches hand them over as bool tensors on the model's device already
            return action_masks.reshape(-1, self.action_head.mask_size)
        masks = th.as_tensor(action_masks, device=self.device)
        return masks.reshape(-1, self.action_head.mask_size).bool()

    def _sde_distribution(
        self, latent_pi: th.Tensor, action_masks: MaybeMasks = None
    ) -> StateDependentNoiseDistribution:
        assert self.sde_dist is not None
        if action_masks is not None:
            self.mask_tensor(action_masks)  # raises: gSDE's Box actions have nothing to mask
        return self.sde_dist.proba_distribution(self.action_net(latent_pi), self.log_std, latent_pi)

    def _act(
        self, latent_pi: th.Tensor, deterministic: bool, action_masks: MaybeMasks = None
    ) -> tuple[th.Tensor, th.Tensor]:
        """Actions and their log-probabilities from the actor latent."""
        if self.action_head is None:
            dist = self._sde_distribution(latent_pi, action_masks)
            actions = dist.get_actions(deterministic=deterministic)
            return actions, dist.log_prob(actions)
        params = self._head_params(latent_pi, action_masks)
        actions = self.action_head.sample(params, deterministic)
        return actions, self.action_head.log_prob(params, actions)

    # -- the policy API used by the algorithm and by SB3 ----------------------------------------

    def forward(
        self, obs: PyTorchObs, deterministic: bool = False, action_masks: MaybeMasks = None
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """Act: only valid actions when masks are given.

        :param obs: a batch of observations as tensors.
        :param deterministic: the distribution's mode instead of a sample.
        :param action_masks: invalid-action masks ``[B, mask_size]``, or None.
        :return: ``(actions, values [B, 1], log_prob [B])``.
        """
        latent_pi, latent_vf = self._latents(obs)
        actions, log_prob = self._act(latent_pi, deterministic, action_masks)
        actions = actions.reshape((-1, *self.action_space.shape))  # type: ignore[misc]
        return actions, self.value_net(latent_vf), log_prob

    def evaluate_actions(
        self, obs: PyTorchObs, actions: th.Tensor, action_masks: MaybeMasks = None
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor | None]:
        """Values, log-probabilities and entropies of stored actions (under their masks).

        :param obs: a batch of observations as tensors.
        :param actions: the actions taken, ``[B, *action_shape]``.
        :param action_masks: the masks they were taken under, or None.
        :return: ``(values [B, 1], log pi(a|s) [B], entropy [B] or None)``.
        """
        return self.evaluate_with_params(obs, actions, action_masks)[:3]  # type: ignore[return-value]

    def evaluate_with_params(
        self, obs: PyTorchObs, actions: th.Tensor, action_masks: MaybeMasks = None
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor | None, tuple[th.Tensor, ...] | None]:
        """:meth:`evaluate_actions` plus the action head's parameters (None under gSDE), for the reference KL.

        :param obs: a batch of observations as tensors.
        :param actions: the actions taken, ``[B, *action_shape]``.
        :param action_masks: the masks they were taken under, or None.
        :return: ``(values [B, 1], log_prob [B], entropy [B] or None, head parameters or None)``.
        """
        latent_pi, latent_vf = self._latents(obs)
        return self._evaluate_latents(latent_pi, latent_vf, actions, action_masks)

    def _evaluate_latents(
        self, latent_pi: th.Tensor, latent_vf: th.Tensor, actions: th.Tensor, action_masks: MaybeMasks
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor | None, tuple[th.Tensor, ...] | None]:
        values = self.value_net(latent_vf)
        if self.action_head is None:
            dist = self._sde_distribution(latent_pi, action_masks)
            return values, dist.log_prob(actions), dist.entropy(), None
        params = self._head_params(latent_pi, action_masks)
        if self.training_params_transform is not None and self.training:
            params = self.training_params_transform(self.action_head, params)
        log_prob, entropy, _ = self.action_head.evaluate(params, actions)
        return values, log_prob, entropy, params

    def predict_values(self, obs: PyTorchObs) -> th.Tensor:
        """Critic only: ``V(s)``.

        :param obs: a batch of observations as tensors.
        :return: ``[B, 1]`` values.
        """
        features = self.extract_features(obs, self.vf_features_extractor)
        return self.value_net(self.mlp_extractor.forward_critic(features))

    def _actor_latent(self, obs: PyTorchObs) -> th.Tensor:
        return self.mlp_extractor.forward_actor(self.extract_features(obs, self.pi_features_extractor))

    def _predict(
        self, observation: PyTorchObs, deterministic: bool = False, action_masks: MaybeMasks = None
    ) -> th.Tensor:
        """Actions for ``predict()``; the critic is not evaluated."""
        return self._act(self._actor_latent(observation), deterministic, action_masks)[0]

    def predict(
        self,
        observation: np.ndarray | dict[str, np.ndarray],
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
        action_masks: np.ndarray | None = None,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        """SB3's ``predict``, plus sb3-contrib's ``action_masks``: only valid actions are returned.

        :param observation: one observation or a batch (NumPy, a dict of arrays for Dict spaces).
        :param state: recurrent state; unused here, returned as given.
        :param episode_start: episode starts; unused here (recurrent policies read them).
        :param deterministic: the distribution's mode instead of a sample.
        :param action_masks: invalid-action masks, one row per observation, or None.
        :return: ``(actions, state)``; without masks, SB3's ``predict`` (Box actions rescaled or clipped).
        """
        if action_masks is None:
            return super().predict(observation, state, episode_start, deterministic)
        self.set_training_mode(False)
        obs_tensor, vectorized_env = self.obs_to_tensor(observation)
        # one mask row per observation: torch would broadcast a single row to the batch, or fail obscurely
        action_masks = check_action_masks(action_masks, self.action_space, n_rows(obs_tensor), step=-1)
        with th.no_grad():
            actions = self._predict(obs_tensor, deterministic=deterministic, action_masks=action_masks)
        # masks apply to discrete actions only: no rescaling or clipping as for Box
        actions = actions.cpu().numpy().reshape((-1, *self.action_space.shape))  # type: ignore[misc]
        if not vectorized_env:
            actions = actions.squeeze(axis=0)
        return actions, state

    def get_distribution(self, obs: PyTorchObs, action_masks: MaybeMasks = None) -> Distribution:
        """The action distribution as an SB3 ``Distribution`` object (for code written against SB3).

        :param obs: a batch of observations as tensors.
        :param action_masks: invalid-action masks, or None.
        :return: the SB3 distribution of the (masked) actor's outputs.
        """
        latent_pi = self._actor_latent(obs)
        if self.action_head is None:
            return self._sde_distribution(latent_pi, action_masks)
        return self.action_head.to_sb3(self._head_params(latent_pi, action_masks))

    def reset_noise(self, n_envs: int = 1) -> None:
        """Sample a new gSDE exploration matrix (only with ``use_sde=True``).

        :param n_envs: how many matrices to sample, one per env.
        :raises ValueError: without ``use_sde=True``.
        """
        if self.sde_dist is None:
            raise ValueError("reset_noise() is only available with use_sde=True.")
        self.sde_dist.sample_weights(self.log_std, batch_size=n_envs)


class ActorCriticCnnPolicy(ActorCriticPolicy):
    """:class:`ActorCriticPolicy` with SB3's NatureCNN features extractor (the ``CnnPolicy``).

    The other arguments are :class:`ActorCriticPolicy`'s, passed on.

    :param observation_space: observation space (images).
    :param action_space: action space.
    :param lr_schedule: learning-rate schedule.
    :param features_extractor_class: SB3 features extractor class (default NatureCNN).
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        *args: Any,
        features_extractor_class: type[BaseFeaturesExtractor] = NatureCNN,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            *args,
            features_extractor_class=features_extractor_class,
            **kwargs,
        )


class MultiInputActorCriticPolicy(ActorCriticPolicy):
    """:class:`ActorCriticPolicy` for Dict observations with SB3's CombinedExtractor (``MultiInputPolicy``).

    The other arguments are :class:`ActorCriticPolicy`'s, passed on.

    :param observation_space: a Dict observation space.
    :param action_space: action space.
    :param lr_schedule: learning-rate schedule.
    :param features_extractor_class: SB3 features extractor class (default CombinedExtractor).
    """

    def __init__(
        self,
        observation_space: spaces.Dict,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        *args: Any,
        features_extractor_class: type[BaseFeaturesExtractor] = CombinedExtractor,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            *args,
            features_extractor_class=features_extractor_class,
            **kwargs,
        )


MlpPolicy = ActorCriticPolicy
CnnPolicy = ActorCriticCnnPolicy
MultiInputPolicy = MultiInputActorCriticPolicy


def env_actions(policy: BasePolicy, action_space: spaces.Space, actions: np.ndarray) -> np.ndarray:
    """The actions the env receives: Box actions unscaled (squashed gSDE) or clipped to the bounds.

    :param policy: the policy that produced them (its ``squash_output`` decides).
    :param action_space: the env's action space.
    :param actions: the policy's actions, as stored in the buffer.
    :return: the actions to step the env with; non-Box actions unchanged.
    """
    if not isinstance(action_space, spaces.Box):
        return actions
    if policy.squash_output:
        return policy.unscale_action(actions)
    # an unbounded Gaussian sample must be clipped to the env's bounds; the buffer keeps the unclipped action so
    # that its log-probability stays consistent. np.clip's values, without its Python layers (~10 us per step)
    return np.minimum(np.maximum(actions, action_space.low), action_space.high)


def n_rows(obs: PyTorchObs) -> int:
    """The batch size of observations as tensors (a Dict's: its first key's).

    :param obs: a batch of observations as a tensor or a dict of tensors.
    :return: the number of rows.
    """
    return next(iter(obs.values())).shape[0] if isinstance(obs, dict) else obs.shape[0]
