"""Recurrent (LSTM or GRU) actor-critic policies: ``MlpLstmPolicy``, ``CnnLstmPolicy``, ``MultiInputLstmPolicy``.

The layout and keywords are sb3-contrib's ``RecurrentActorCriticPolicy`` (features -> LSTM -> MLP -> heads;
``lstm_hidden_size``, ``n_lstm_layers``, ``shared_lstm``, ``enable_critic_lstm``, ``lstm_kwargs``), so
``policy_kwargs`` written for ``RecurrentPPO`` mean the same here, and so do ``predict``'s states. What
differs is inside: masks apply to the action head as in the feed-forward policies, and training runs
each LSTM once over a padded grid of sequences (:mod:`sb3_ppo_ext.recurrent.sequences`) instead of step by step.

``rnn_type="gru"`` (``policy_kwargs``; or the ``MlpGruPolicy``, ``CnnGruPolicy``, ``MultiInputGruPolicy`` classes)
puts GRUs where the LSTMs are (:class:`PairedStateGRU`), with every other keyword, the attribute names and the
``(h, c)`` state pairs unchanged: a GRU has no cell state, so its ``c`` is always zeros.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor, CombinedExtractor, NatureCNN
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule
from torch import nn

from sb3_ppo_ext.errors import ConfigurationAssertionError, ConfigurationError, PredictInputError
from sb3_ppo_ext.masking import check_action_masks
from sb3_ppo_ext.policies import ActorCriticMLP, ActorCriticPolicy, MaybeMasks, n_rows
from sb3_ppo_ext.recurrent.sequences import LSTMStates, Sequences, Step

# How a recurrent policy is told where it is in time: one step of each env, or minibatch sequences.
Memory = Step | Sequences
#: the recurrent layers a policy can have (``rnn_type``)
RNN_TYPES = ("lstm", "gru")


class PairedStateGRU(nn.GRU):
    """``nn.GRU`` that takes and returns an LSTM's ``(h, c)`` state pair, so it runs wherever an ``nn.LSTM`` runs.

    The sequences, buffers, rollout and ``predict`` carry ``(h, c)`` pairs; a GRU's state is ``h`` alone, so ``c``
    is ignored on the way in and zeros on the way out. Parameters and state dict are ``nn.GRU``'s.
    """

    def forward(  # type: ignore[override]
        self, input: th.Tensor, hx: tuple[th.Tensor, th.Tensor] | None = None
    ) -> tuple[th.Tensor, tuple[th.Tensor, th.Tensor]]:
        """Run the GRU over ``input`` (``[T, B, features]``) from ``hx[0]``.

        :param input: the sequence, time first.
        :param hx: ``(h, c)`` before the first step, each ``[n_layers, B, hidden]`` (``c`` unused); None: zeros.
        :return: the outputs ``[T, B, hidden]`` and ``(h_n, zeros)``.
        """
        output, h_n = super().forward(input, None if hx is None else hx[0])
        return output, (h_n, th.zeros_like(h_n))


class RecurrentActorCriticPolicy(ActorCriticPolicy):
    """Our actor-critic policy with an LSTM between the features and the MLP (``MlpLstmPolicy``).

    Takes every argument of :class:`~sb3_ppo_ext.policies.ActorCriticPolicy`, plus sb3-contrib's recurrent ones
    (``lstm_hidden_size`` to ``lstm_kwargs``) and ``rnn_type``.

    :param observation_space: observation space.
    :param action_space: action space.
    :param lr_schedule: learning-rate schedule; ``lr_schedule(1)`` is the initial learning rate.
    :param lstm_hidden_size: hidden units per LSTM layer.
    :param n_lstm_layers: stacked LSTM layers.
    :param shared_lstm: the critic reads the actor's LSTM output (detached: only the actor's loss trains it).
    :param enable_critic_lstm: the critic has its own LSTM (the default). With neither, the critic is a
        linear layer on the features, without memory.
    :param lstm_kwargs: extra ``nn.LSTM`` (``nn.GRU``) keyword arguments.
    :param rnn_type: ``"lstm"`` (default, sb3-contrib's) or ``"gru"``: a :class:`PairedStateGRU` in each LSTM's
        place, under the same attribute names (``lstm_actor``, ``lstm_critic``) and with the same keywords
        (``lstm_hidden_size`` is the GRU's hidden size); its states are ``(h, c)`` pairs whose ``c`` is zeros.

    The LSTMs keep PyTorch's initialisation, as in sb3-contrib; the layers around them get the orthogonal one.
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        *args: Any,
        lstm_hidden_size: int = 256,
        n_lstm_layers: int = 1,
        shared_lstm: bool = False,
        enable_critic_lstm: bool = True,
        lstm_kwargs: dict[str, Any] | None = None,
        rnn_type: str = "lstm",
        **kwargs: Any,
    ) -> None:
        if rnn_type not in RNN_TYPES:
            raise ConfigurationError(
                f"rnn_type={rnn_type!r} is invalid: pass 'lstm' (the default, as sb3-contrib's RecurrentPPO) or 'gru'."
            )
        if shared_lstm and enable_critic_lstm:
            raise ConfigurationAssertionError(
                "You must choose between shared LSTM, seperate or no LSTM for the critic: shared_lstm=True needs "
                "enable_critic_lstm=False."
            )
        if lstm_hidden_size < 1 or n_lstm_layers < 1:
            raise ConfigurationAssertionError(
                f"lstm_hidden_size and n_lstm_layers must be >= 1, got {lstm_hidden_size} and {n_lstm_layers}."
            )
        # read by _build_mlp_extractor, which the parent's __init__ calls before the optimizer is built
        self.lstm_hidden_size = lstm_hidden_size
        self.n_lstm_layers = n_lstm_layers
        self.shared_lstm = shared_lstm
        self.enable_critic_lstm = enable_critic_lstm
        self.lstm_kwargs = dict(lstm_kwargs or {})
        self.rnn_type = rnn_type
        super().__init__(observation_space, action_space, lr_schedule, *args, **kwargs)
        # sb3-contrib's attribute: the states of one env, for predict()
        self.lstm_hidden_state_shape = (n_lstm_layers, 1, lstm_hidden_size)

    #: the class's own default ``rnn_type`` (the ``*GruPolicy`` classes: ``"gru"``); another one is saved explicitly
    _default_rnn_type = "lstm"

    def _build_mlp_extractor(self) -> None:
        """The LSTMs (actor, then critic's or a linear critic input), then the MLP on their outputs."""
        if self.shared_lstm and not self.share_features_extractor:
            raise ConfigurationAssertionError(
                "If the features extractor is not shared, the LSTM cannot be shared: pass "
                "share_features_extractor=True or shared_lstm=False."
            )
        # SB3's flattened sizes may be NumPy integers (MultiDiscrete observations), which nn.LSTM refuses
        recurrent_layer = nn.LSTM if self.rnn_type == "lstm" else PairedStateGRU
        self.lstm_actor = recurrent_layer(
            int(self.features_dim), self.lstm_hidden_size, num_layers=self.n_lstm_layers, **self.lstm_kwargs
        )
        self.lstm_critic: nn.LSTM | PairedStateGRU | None = None
        self.critic: nn.Linear | None = None
        if self.enable_critic_lstm:
            self.lstm_critic = recurrent_layer(
                int(self.vf_features_dim), self.lstm_hidden_size, num_layers=self.n_lstm_layers, **self.lstm_kwargs
            )
        elif not self.shared_lstm:
            # no memory for the critic: a linear map to the LSTM's output width, as in sb3-contrib
            self.critic = nn.Linear(int(self.vf_features_dim), self.lstm_hidden_size)
        self.mlp_extractor = ActorCriticMLP(self.lstm_hidden_size, self.net_arch, self.activation_fn)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            lstm_hidden_size=self.lstm_hidden_size,
            n_lstm_layers=self.n_lstm_layers,
            shared_lstm=self.shared_lstm,
            enable_critic_lstm=self.enable_critic_lstm,
            lstm_kwargs=self.lstm_kwargs,
        )
        # an LSTM policy's saved keywords stay sb3-contrib's; a *GruPolicy's LSTM must be saved as one
        if "gru" in (self.rnn_type, self._default_rnn_type):
            data["rnn_type"] = self.rnn_type
        return data

    # -- states ---------------------------------------------------------------------------------

    def initial_state(self, n_envs: int) -> LSTMStates:
        """Zero states for ``n_envs`` envs, on the policy's device.

        :param n_envs: the batch dimension of the states.
        :return: actor's and critic's ``(h, c)``, each ``[n_lstm_layers, n_envs, lstm_hidden_size]`` of zeros.
        """

        def zeros() -> tuple[th.Tensor, th.Tensor]:
            shape = (self.n_lstm_layers, n_envs, self.lstm_hidden_size)
            return th.zeros(shape, device=self.device), th.zeros(shape, device=self.device)

        return LSTMStates(zeros(), zeros())

    @staticmethod
    def _memory(lstm_states: LSTMStates, episode_starts: th.Tensor, n_rows: int) -> Memory:
        """One step of each env when there is one row per state, else sb3-contrib's equal-length sequences."""
        if n_rows == lstm_states.pi[0].shape[1]:
            return Step.after(lstm_states, episode_starts)
        return Sequences.from_equal_length(lstm_states, episode_starts)

    # -- network pieces -------------------------------------------------------------------------

    def _recurrent_latents(
        self, obs: PyTorchObs, memory: Memory, critic: bool = True
    ) -> tuple[th.Tensor, th.Tensor | None, LSTMStates | None]:
        """Actor and critic latents (after LSTM and MLP) and, for a :class:`Step`, the states after it."""
        pi_features = self.extract_features(obs, self.pi_features_extractor)
        latent_pi, states_pi = memory.run(self.lstm_actor, pi_features, memory.initial_pi)
        latent_vf, states_vf = None, states_pi
        if critic:
            if self.lstm_critic is not None:
                vf_features = (
                    pi_features
                    if self.share_features_extractor
                    else self.extract_features(obs, self.vf_features_extractor)
                )
                latent_vf, states_vf = memory.run(self.lstm_critic, vf_features, memory.initial_vf)
            elif self.shared_lstm:
                latent_vf = latent_pi.detach()
            else:
                vf_features = (
                    pi_features
                    if self.share_features_extractor
                    else self.extract_features(obs, self.vf_features_extractor)
                )
                latent_vf = self.critic(vf_features)  # type: ignore[misc]
            latent_vf = self.mlp_extractor.forward_critic(latent_vf)
        if self.shared_lstm and states_pi is not None:
            states_vf = (states_pi[0].detach(), states_pi[1].detach())
        states = None if states_pi is None else LSTMStates(states_pi, states_vf)  # type: ignore[arg-type]
        return self.mlp_extractor.forward_actor(latent_pi), latent_vf, states

    def _critic_value(self, obs: PyTorchObs, memory: Memory) -> th.Tensor:
        """``V(s)`` through the critic's memory alone (the actor's LSTM too when it is shared)."""
        if self.shared_lstm:
            features = self.extract_features(obs, self.pi_features_extractor)
            latent_vf = memory.run(self.lstm_actor, features, memory.initial_vf)[0].detach()
        else:
            features = self.extract_features(obs, self.vf_features_extractor)
            if self.lstm_critic is not None:
                latent_vf = memory.run(self.lstm_critic, features, memory.initial_vf)[0]
            else:
                latent_vf = self.critic(features)  # type: ignore[misc]
        return self.value_net(self.mlp_extractor.forward_critic(latent_vf))

    # -- the policy API (sb3-contrib's RecurrentActorCriticPolicy, plus action_masks) -------------

    def forward(  # type: ignore[override]
        self,
        obs: PyTorchObs,
        lstm_states: LSTMStates,
        episode_starts: th.Tensor,
        deterministic: bool = False,
        action_masks: MaybeMasks = None,
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor, LSTMStates]:
        """Act for one step of each env.

        :param obs: one observation per env, as tensors.
        :param lstm_states: the actor's and the critic's states after the previous step.
        :param episode_starts: ``[B]`` flags; an env whose flag is set starts from zero states.
        :param deterministic: the distribution's mode instead of a sample.
        :param action_masks: invalid-action masks ``[B, mask_size]``, or None.
        :return: ``(actions, values [B, 1], log_prob [B], states after the step)``.
        """
        latent_pi, latent_vf, states = self._recurrent_latents(obs, Step.after(lstm_states, episode_starts))
        actions, log_prob = self._act(latent_pi, deterministic, action_masks)
        actions = actions.reshape((-1, *self.action_space.shape))  # type: ignore[misc]
        return actions, self.value_net(latent_vf), log_prob, states  # type: ignore[arg-type,return-value]

    def evaluate_actions(  # type: ignore[override]
        self,
        obs: PyTorchObs,
        actions: th.Tensor,
        lstm_states: LSTMStates | None = None,
        episode_starts: th.Tensor | None = None,
        action_masks: MaybeMasks = None,
        sequences: Sequences | None = None,
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor | None]:
        """``(values [N, 1], log pi(a|s) [N], entropy [N] or None)`` for stored actions, through the LSTMs.

        Give either ``sequences`` (ClippedPPO's minibatches) or sb3-contrib's ``lstm_states`` and
        ``episode_starts`` (``K`` sequences of equal length, one after the other).

        :param obs: ``N`` flat rows of observations, as tensors.
        :param actions: the actions taken, ``[N, *action_shape]``.
        :param lstm_states: sb3-contrib's layout: the states before each of the ``K`` sequences.
        :param episode_starts: sb3-contrib's layout: ``[N]`` flags, sequence after sequence.
        :param action_masks: the masks the actions were taken under, or None.
        :param sequences: the rows' sequence structure and first states (takes precedence over the two above).
        :return: ``(values [N, 1], log pi(a|s) [N], entropy [N] or None)``.
        :raises ValueError: with neither ``sequences`` nor both ``lstm_states`` and ``episode_starts``.
        """
        return self.evaluate_with_params(obs, actions, action_masks, sequences, lstm_states, episode_starts)[:3]  # type: ignore[return-value]

    def evaluate_with_params(  # type: ignore[override]
        self,
        obs: PyTorchObs,
        actions: th.Tensor,
        action_masks: MaybeMasks = None,
        sequences: Sequences | None = None,
        lstm_states: LSTMStates | None = None,
        episode_starts: th.Tensor | None = None,
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor | None, tuple[th.Tensor, ...] | None]:
        """:meth:`evaluate_actions` plus the action head's parameters (None under gSDE), for the reference KL.

        :param obs: ``N`` flat rows of observations, as tensors.
        :param actions: the actions taken, ``[N, *action_shape]``.
        :param action_masks: the masks the actions were taken under, or None.
        :param sequences: the rows' sequence structure and first states; None: built from the two below.
        :param lstm_states: sb3-contrib's layout: the states before each of the ``K`` sequences.
        :param episode_starts: sb3-contrib's layout: ``[N]`` flags, sequence after sequence.
        :return: ``(values [N, 1], log_prob [N], entropy [N] or None, head parameters or None)``.
        :raises ValueError: with neither ``sequences`` nor both ``lstm_states`` and ``episode_starts``.
        """
        if sequences is None:
            if lstm_states is None or episode_starts is None:
                raise ValueError("evaluate_actions needs sequences, or lstm_states and episode_starts.")
            sequences = Sequences.from_equal_length(lstm_states, episode_starts)
        latent_pi, latent_vf, _ = self._recurrent_latents(obs, sequences)
        return self._evaluate_latents(latent_pi, latent_vf, actions, action_masks)  # type: ignore[arg-type]

    def predict_values(  # type: ignore[override]
        self, obs: PyTorchObs, lstm_states: tuple[th.Tensor, th.Tensor], episode_starts: th.Tensor
    ) -> th.Tensor:
        """``V(s)`` given the critic's states (sb3-contrib passes ``lstm_states.vf``).

        :param obs: observations as tensors: one per env, or sb3-contrib's equal-length sequences one after the
            other when there are more rows than states.
        :param lstm_states: the critic's ``(h, c)`` (with ``shared_lstm``: the actor LSTM's, which the critic reads).
        :param episode_starts: one flag per row; a set flag starts from zero states.
        :return: ``[B, 1]`` values.
        """
        states = LSTMStates(lstm_states, lstm_states)
        return self._critic_value(obs, self._memory(states, episode_starts, n_rows(obs)))

    def get_distribution(  # type: ignore[override]
        self,
        obs: PyTorchObs,
        lstm_states: tuple[th.Tensor, th.Tensor],
        episode_starts: th.Tensor,
        action_masks: MaybeMasks = None,
    ) -> tuple[Distribution, tuple[th.Tensor, th.Tensor]]:
        """The action distribution (an SB3 ``Distribution``) and the actor's states after this step.

        :param obs: one observation per env, as tensors.
        :param lstm_states: the actor's ``(h, c)`` after the previous step.
        :param episode_starts: ``[B]`` flags; an env whose flag is set starts from zero states.
        :param action_masks: invalid-action masks, or None.
        :return: ``(distribution, the actor's (h, c) after the step)``.
        """
        latent_pi, _, states = self._recurrent_latents(
            obs, Step.after(LSTMStates(lstm_states, lstm_states), episode_starts), critic=False
        )
        assert states is not None
        if self.action_head is None:
            return self._sde_distribution(latent_pi, action_masks), states.pi
        return self.action_head.to_sb3(self._head_params(latent_pi, action_masks)), states.pi

    def _predict(  # type: ignore[override]
        self,
        observation: PyTorchObs,
        lstm_states: tuple[th.Tensor, th.Tensor],
        episode_starts: th.Tensor,
        deterministic: bool = False,
        action_masks: MaybeMasks = None,
    ) -> tuple[th.Tensor, tuple[th.Tensor, th.Tensor]]:
        """Actions and the actor's new states; the critic is not evaluated."""
        latent_pi, _, states = self._recurrent_latents(
            observation, Step.after(LSTMStates(lstm_states, lstm_states), episode_starts), critic=False
        )
        assert states is not None
        return self._act(latent_pi, deterministic, action_masks)[0], states.pi

    def predict(  # type: ignore[override]
        self,
        observation: np.ndarray | dict[str, np.ndarray],
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
        action_masks: np.ndarray | None = None,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        """sb3-contrib's recurrent ``predict``: returns ``(actions, (h, c))``; pass the states back next step.

        ``state=None`` starts every env from zero states; ``episode_start[i]`` resets env ``i``'s states. With
        ``rnn_type="gru"`` the returned ``c`` is zeros (and the ``c`` given is not read).

        :param observation: the observations (one env, or a batch of envs).
        :param state: the ``(h, c)`` pair ``predict`` returned last step, or None.
        :param episode_start: one flag per env, True where an episode starts.
        :param deterministic: the most likely actions instead of samples.
        :param action_masks: one row of valid-action booleans per observation, or None.
        :return: the actions and the states after the step.
        """
        self.set_training_mode(False)
        obs_tensor, vectorized_env = self.obs_to_tensor(observation)
        n_envs = n_rows(obs_tensor)
        # checked before the LSTM runs: torch's size errors blame the hidden state whichever argument is wrong
        h, c = self._check_state(state, n_envs)
        episode_starts = check_episode_start(episode_start, n_envs)
        if action_masks is not None:
            action_masks = check_action_masks(action_masks, self.action_space, n_envs, step=-1)
        with th.no_grad():
            states = (th.as_tensor(h, device=self.device), th.as_tensor(c, device=self.device))
            starts = th.as_tensor(episode_starts, device=self.device)
            actions, new_states = self._predict(obs_tensor, states, starts, deterministic, action_masks)
        numpy_states = (new_states[0].cpu().numpy(), new_states[1].cpu().numpy())
        actions_np = actions.cpu().numpy().reshape((-1, *self.action_space.shape))  # type: ignore[misc]
        if isinstance(self.action_space, spaces.Box):
            if self.squash_output:
                actions_np = self.unscale_action(actions_np)
            else:
                actions_np = np.clip(actions_np, self.action_space.low, self.action_space.high)
        if not vectorized_env:
            actions_np = actions_np.squeeze(axis=0)
        return actions_np, numpy_states

    def _check_state(self, state: Any, n_envs: int) -> tuple[np.ndarray, np.ndarray]:
        """``predict``'s ``state`` as two float32 arrays ``[n_lstm_layers, n_envs, lstm_hidden_size]`` (zeros for None).

        :raises PredictInputError: for anything but an ``(h, c)`` pair of finite arrays of that shape.
        """
        expected = (self.n_lstm_layers, n_envs, self.lstm_hidden_size)
        if state is None:
            zeros = np.zeros(expected, dtype=np.float32)
            return zeros, zeros
        if not isinstance(state, (tuple, list)) or len(state) != 2:
            if isinstance(state, (np.ndarray, th.Tensor)):
                given = f"one array of shape {tuple(state.shape)}"
            elif isinstance(state, (tuple, list)):
                given = f"a {type(state).__name__} of {len(state)} item(s)"
            else:
                given = f"a {type(state).__name__}"
            raise PredictInputError(
                f"state is {given}, but a recurrent policy's state is an (h, c) pair of arrays of shape {expected} "
                f"(n_lstm_layers, n_envs, lstm_hidden_size). {_STATE_HINT}"
            )
        return _state_array(state[0], "state[0] (h)", expected), _state_array(state[1], "state[1] (c)", expected)


_STATE_HINT = (
    "Pass back the state predict() returned for the same envs (a tuple (h, c)), or state=None to start every env "
    "from zero states."
)


def _state_array(part: Any, name: str, expected: tuple[int, int, int]) -> np.ndarray:
    """One half of an LSTM state as a float32 array of shape ``expected``, or a :class:`PredictInputError`."""
    try:
        array = np.asarray(part.detach().cpu() if isinstance(part, th.Tensor) else part, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise PredictInputError(f"{name} is not an array of numbers ({error}). {_STATE_HINT}") from error
    if array.shape != expected:
        layers, n_envs, hidden = expected
        reasons = []
        if array.ndim != 3:
            reasons.append(f"it has {array.ndim} dimension(s), not 3")
        else:
            if array.shape[0] != layers:
                reasons.append(f"{array.shape[0]} LSTM layer(s), the model has n_lstm_layers={layers}")
            if array.shape[1] != n_envs:
                reasons.append(f"states for {array.shape[1]} env(s), but {n_envs} observation(s) were given")
            if array.shape[2] != hidden:
                reasons.append(f"hidden size {array.shape[2]}, the model has lstm_hidden_size={hidden}")
        raise PredictInputError(
            f"{name} has shape {array.shape}, expected {expected} (n_lstm_layers, n_envs, lstm_hidden_size): "
            f"{'; '.join(reasons)}. {_STATE_HINT}"
        )
    if not np.isfinite(array).all():
        raise PredictInputError(f"{name} contains NaN or inf. {_STATE_HINT}")
    return array


def check_episode_start(episode_start: Any, n_envs: int) -> np.ndarray:
    """``predict``'s ``episode_start`` as float32 ``[n_envs]`` of 0/1 (zeros for None).

    :param episode_start: None, or one flag per env (booleans or 0/1; an array, a list or a tensor).
    :param n_envs: the number of observations ``predict`` got.
    :return: float32 ``[n_envs]`` of 0.0 and 1.0.
    :raises PredictInputError: for a length other than ``n_envs`` or values other than booleans or 0/1.
    """
    if episode_start is None:
        return np.zeros(n_envs, dtype=np.float32)
    hint = (
        f"Pass one flag per observation, shape ({n_envs},): True where that env's episode starts (its state is then "
        "reset to zeros), e.g. the dones of the previous step."
    )
    value = episode_start.detach().cpu() if isinstance(episode_start, th.Tensor) else episode_start
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise PredictInputError(f"episode_start={episode_start!r} is not an array of booleans. {hint}") from error
    if array.size != n_envs:
        raise PredictInputError(
            f"episode_start has shape {array.shape} ({array.size} flag(s)), but predict() got {n_envs} "
            f"observation(s). {hint}"
        )
    array = array.reshape(n_envs)
    if not np.isin(array, (0.0, 1.0)).all():
        raise PredictInputError(f"episode_start must be booleans (or 0/1); got {array.tolist()}. {hint}")
    return array


class RecurrentActorCriticCnnPolicy(RecurrentActorCriticPolicy):
    """:class:`RecurrentActorCriticPolicy` with SB3's NatureCNN features extractor (``CnnLstmPolicy``).

    The other arguments are :class:`RecurrentActorCriticPolicy`'s, passed on.

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


class RecurrentMultiInputActorCriticPolicy(RecurrentActorCriticPolicy):
    """:class:`RecurrentActorCriticPolicy` for Dict observations, SB3's CombinedExtractor (``MultiInputLstmPolicy``).

    The other arguments are :class:`RecurrentActorCriticPolicy`'s, passed on.

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


class GruActorCriticPolicy(RecurrentActorCriticPolicy):
    """:class:`RecurrentActorCriticPolicy` with ``rnn_type="gru"`` by default (``MlpGruPolicy``).

    :param rnn_type: ``"gru"`` (default) or ``"lstm"``; the other arguments are the parent class's.
    """

    _default_rnn_type = "gru"

    def __init__(self, *args: Any, rnn_type: str = "gru", **kwargs: Any) -> None:
        super().__init__(*args, rnn_type=rnn_type, **kwargs)


class GruActorCriticCnnPolicy(RecurrentActorCriticCnnPolicy):
    """:class:`RecurrentActorCriticCnnPolicy` with ``rnn_type="gru"`` by default (``CnnGruPolicy``).

    :param rnn_type: ``"gru"`` (default) or ``"lstm"``; the other arguments are the parent class's.
    """

    _default_rnn_type = "gru"

    def __init__(self, *args: Any, rnn_type: str = "gru", **kwargs: Any) -> None:
        super().__init__(*args, rnn_type=rnn_type, **kwargs)


class GruMultiInputActorCriticPolicy(RecurrentMultiInputActorCriticPolicy):
    """:class:`RecurrentMultiInputActorCriticPolicy` with ``rnn_type="gru"`` by default (``MultiInputGruPolicy``).

    :param rnn_type: ``"gru"`` (default) or ``"lstm"``; the other arguments are the parent class's.
    """

    _default_rnn_type = "gru"

    def __init__(self, *args: Any, rnn_type: str = "gru", **kwargs: Any) -> None:
        super().__init__(*args, rnn_type=rnn_type, **kwargs)


MlpLstmPolicy = RecurrentActorCriticPolicy
CnnLstmPolicy = RecurrentActorCriticCnnPolicy
MultiInputLstmPolicy = RecurrentMultiInputActorCriticPolicy
MlpGruPolicy = GruActorCriticPolicy
CnnGruPolicy = GruActorCriticCnnPolicy
MultiInputGruPolicy = GruMultiInputActorCriticPolicy
