"""``ClippedPPO``: Proximal Policy Optimization with the clipped surrogate objective, as an SB3 algorithm."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.base_class import maybe_make_env
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, Schedule
from stable_baselines3.common.utils import FloatSchedule, explained_variance, obs_as_tensor
from stable_baselines3.common.vec_env import VecEnv

from sb3_ppo_ext import distributed as data_parallel
from sb3_ppo_ext import losses
from sb3_ppo_ext.backends import Backend, select_backend
from sb3_ppo_ext.buffers import (
    DictGAERolloutBuffer,
    GAERolloutBuffer,
    RecurrentDictGAERolloutBuffer,
    RecurrentGAERolloutBuffer,
)
from sb3_ppo_ext.checks import (
    SUPPORTED_ACTION_SPACES,
    check_clip_range_vf,
    check_schedule_value,
    validate_hyperparameters,
    validate_image_observation,
    validate_policy,
    validate_rollout_size,
    validate_spaces,
    validate_stabilizers,
)
from sb3_ppo_ext.errors import ConfigurationError
from sb3_ppo_ext.finite import check_env_data, non_finite_update_error
from sb3_ppo_ext.losses import LossTerms, PPOBatch, PPOLoss
from sb3_ppo_ext.masking import check_action_masks, env_provides_masks, policy_applies_masks, read_action_masks
from sb3_ppo_ext.normalizers import ValueNormalizer
from sb3_ppo_ext.optim import KLAdaptiveLearningRate, LeanAdamStep, clip_grad_norm
from sb3_ppo_ext.policies import ActorCriticCnnPolicy, ActorCriticPolicy, MultiInputActorCriticPolicy
from sb3_ppo_ext.recurrent_policies import (
    RecurrentActorCriticCnnPolicy,
    RecurrentActorCriticPolicy,
    RecurrentMultiInputActorCriticPolicy,
)
from sb3_ppo_ext.reference import (
    DEFAULT_REF_KL_COEF,
    DEFAULT_REF_KL_HORIZON,
    KLController,
    ReferencePolicy,
    RefKLMode,
    build_reference,
    check_ref_kl_mode,
    check_reference_spaces,
    make_kl_controller,
    reference_spec,
    resolve_reference,
)
from sb3_ppo_ext.reliability import ReliabilityMixin
from sb3_ppo_ext.sequences import LSTMStates

SelfClippedPPO = TypeVar("SelfClippedPPO", bound="ClippedPPO")
# the constructor arguments that validate_hyperparameters checks, passed by name
HYPERPARAMETER_NAMES = tuple(inspect.signature(validate_hyperparameters).parameters)


class ClippedPPO(ReliabilityMixin, OnPolicyAlgorithm):
    """Proximal Policy Optimization, clip version (Schulman et al. 2017), drop-in for SB3's ``PPO``.

    Every argument of SB3 2.9's ``PPO`` is accepted with the same name, default and meaning. The
    additions are keyword-only.

    :param policy: ``"MlpPolicy"``, ``"CnnPolicy"``, ``"MultiInputPolicy"``, their recurrent versions
        ``"MlpLstmPolicy"``, ``"CnnLstmPolicy"``, ``"MultiInputLstmPolicy"`` (sb3-contrib's ``RecurrentPPO``
        policies and keywords), or a policy class.
    :param env: the environment, or its registered id.
    :param learning_rate: a float or a schedule of progress remaining (1 -> 0), e.g.
        :func:`sb3_ppo_ext.schedules.linear`.
    :param n_steps: steps per environment per rollout; the rollout holds ``n_steps * n_envs`` samples.
    :param batch_size: minibatch size.
    :param n_epochs: passes over each rollout (K in the seed).
    :param gamma: discount factor.
    :param gae_lambda: GAE lambda (0: one-step TD, 1: Monte Carlo).
    :param clip_range: epsilon of the clipped surrogate, float or schedule.
    :param clip_range_vf: value clipping around the old values, float or schedule; ``None`` disables it.
        Depends on the reward scale.
    :param normalize_advantage: ``True``/``"minibatch"``: per minibatch (SB3's default);
        ``"batch"``: once over the whole rollout; ``False``: off.
    :param ent_coef: entropy bonus coefficient (c2).
    :param vf_coef: value loss coefficient (c1).
    :param max_grad_norm: global gradient-norm clip; ``None`` disables clipping.
    :param use_sde: generalized State-Dependent Exploration.
    :param sde_sample_freq: resample the gSDE matrix every n steps (-1: once per rollout).
    :param rollout_buffer_class: buffer class; default :class:`~sb3_ppo_ext.buffers.GAERolloutBuffer`
        (or its Dict variant). SB3's ``RolloutBuffer``/``DictRolloutBuffer`` work too.
    :param rollout_buffer_kwargs: extra keyword arguments for the buffer.
    :param target_kl: stop the epoch loop once the approximate KL exceeds ``1.5 * target_kl``.
    :param stats_window_size: episodes averaged in the ``rollout/`` logs.
    :param tensorboard_log: tensorboard log folder (None: no tensorboard).
    :param policy_kwargs: keyword arguments for the policy.
    :param verbose: 0 silent, 1 info, 2 debug.
    :param seed: random seed.
    :param device: torch device, or ``"auto"``.
    :param _init_setup_model: build the networks now.
    :param vf_clip_mode: form of the value clipping when ``clip_range_vf`` is set: ``"max"`` (the seed's
        ``max((V - R)^2, (V_clip - R)^2)``) or ``"sb3"`` (SB3's ``(V_clip - R)^2``).
    :param check_finite: raise a clear error when an env returns NaN/inf observations or rewards.
    :param fast_update: for plain MLP policies (Flatten features, Tanh/ReLU layers, Categorical or Gaussian
        actions), compute the loss gradients in closed form (:mod:`sb3_ppo_ext.fast_update`) instead of
        through autograd: same update, fewer operations. Other policies always use autograd.
    :param ref_policy: a reference policy to stay close to (the seed's RLHF setting, :mod:`sb3_ppo_ext.reference`):
        a model, a policy or the path of a saved model, with the env's spaces; frozen and saved with the model.
        None (default): no reference, SB3's PPO.
    :param ref_kl_coef: beta, a float >= 0 (default 0.1), or ``"adaptive"``: Ziegler et al.'s controller
        towards ``ref_kl_target`` over ``ref_kl_horizon`` env steps.
    :param ref_kl_mode: ``"reward"`` (default): ``r_t - beta * (log pi_old - log pi_ref)(a_t|s_t)`` before GAE;
        ``"loss"``: ``beta * KL(pi_theta || pi_ref)`` added to the loss.
    :param ref_kl_target: the KL per step the adaptive controller holds.
    :param ref_kl_horizon: env steps over which the adaptive beta may change by about 20%.
    :param dual_clip: c > 1 of dual-clip PPO (Ye et al. 2020): the surrogate of a negative advantage is bounded
        below by ``c * A``; None (default): off.
    :param rpo_alpha: RPO (Rahman and Xue 2022): uniform noise in ``[-alpha, alpha]`` on the Gaussian mean during
        the update (Box actions); None (default): off.
    :param adaptive_lr_kl: target KL of the KL-adaptive learning rate (rsl_rl, SBX): after each epoch (or
        minibatch) the rate is divided by 1.5 above twice the target, multiplied by 1.5 below half of it; it
        replaces the ``learning_rate`` schedule (whose first value starts it). None (default): off.
    :param adaptive_lr_every: ``"epoch"`` (default) or ``"minibatch"``.
    :param adaptive_lr_bounds: ``(min, max)`` learning rate of the adaptive rule.
    :param normalize_value_targets: the critic learns returns normalised by their running mean and std, and its
        output is de-normalised for GAE (:mod:`sb3_ppo_ext.normalizers`).
    :param popart: with ``normalize_value_targets``, PopArt's output-preserving rescaling of the value head.
    :param distributed: data-parallel training on ``torch.distributed`` (:mod:`sb3_ppo_ext.distributed`): None
        (default) detects ``torchrun`` (``WORLD_SIZE > 1``) or an initialised process group of several ranks;
        False: never; True, a :class:`~sb3_ppo_ext.distributed.DistributedConfig` or a dict of its fields: with
        options. ``n_envs``, ``n_steps`` and ``batch_size`` are per rank. One process trains exactly as without it.
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpPolicy": ActorCriticPolicy,
        "CnnPolicy": ActorCriticCnnPolicy,
        "MultiInputPolicy": MultiInputActorCriticPolicy,
        "MlpLstmPolicy": RecurrentActorCriticPolicy,
        "CnnLstmPolicy": RecurrentActorCriticCnnPolicy,
        "MultiInputLstmPolicy": RecurrentMultiInputActorCriticPolicy,
    }
    policy: ActorCriticPolicy
    # learn(use_masking=...) sets it; collect_rollouts called directly applies the env's masks too
    _use_masking: bool = True
    rollout_buffer: RolloutBuffer
    # recurrent policies: each env's LSTM states after its last step (sb3-contrib's name)
    _last_lstm_states: LSTMStates | None = None

    def __init__(
        self,
        policy: str | type[ActorCriticPolicy],
        env: GymEnv | str,
        learning_rate: float | Schedule = 3e-4,
        n_steps: int = 2048,
        batch_size: int = 64,
        n_epochs: int = 10,
        gamma: float = 0.99,
        gae_lambda: float = 0.95,
        clip_range: float | Schedule = 0.2,
        clip_range_vf: float | Schedule | None = None,
        normalize_advantage: bool | str = True,
        ent_coef: float = 0.0,
        vf_coef: float = 0.5,
        max_grad_norm: float | None = 0.5,
        use_sde: bool = False,
        sde_sample_freq: int = -1,
        rollout_buffer_class: type[RolloutBuffer] | None = None,
        rollout_buffer_kwargs: dict[str, Any] | None = None,
        target_kl: float | None = None,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        _init_setup_model: bool = True,
        *,
        vf_clip_mode: losses.ValueClipMode = "max",
        check_finite: bool = True,
        fast_update: bool = True,
        ref_policy: Any = None,
        ref_kl_coef: float | str | None = None,
        ref_kl_mode: RefKLMode = "reward",
        ref_kl_target: float | None = None,
        ref_kl_horizon: int = DEFAULT_REF_KL_HORIZON,
        dual_clip: float | None = None,
        rpo_alpha: float | None = None,
        adaptive_lr_kl: float | None = None,
        adaptive_lr_every: str = "epoch",
        adaptive_lr_bounds: tuple[float, float] = (1e-5, 1e-2),
        normalize_value_targets: bool = False,
        popart: bool = False,
        distributed: bool | data_parallel.DistributedConfig | dict[str, Any] | None = None,
    ) -> None:
        # reliability: every argument is checked before the env is created or stepped (sb3_ppo_ext.checks)
        validate_policy(policy, self.policy_aliases)
        arguments = locals()
        validate_hyperparameters(**{name: arguments[name] for name in HYPERPARAMETER_NAMES})
        check_ref_kl_mode(ref_kl_mode)
        self._ref_kl_controller: KLController | None = None
        if ref_policy is not None:
            coef = DEFAULT_REF_KL_COEF if ref_kl_coef is None else ref_kl_coef
            self._ref_kl_controller = make_kl_controller(coef, ref_kl_target, ref_kl_horizon)
        env = maybe_make_env(env, verbose)  # as SB3 does first thing in super().__init__
        # data-parallel: the process group (torchrun) and this rank's device; one process: a no-op context
        self._dist, device = data_parallel.setup(distributed, device)
        if env is not None:
            validate_spaces(env.observation_space, env.action_space, policy=policy, use_sde=use_sde)
        validate_stabilizers(
            dual_clip=dual_clip,
            rpo_alpha=rpo_alpha,
            adaptive_lr_kl=adaptive_lr_kl,
            adaptive_lr_every=adaptive_lr_every,
            adaptive_lr_bounds=adaptive_lr_bounds,
            normalize_value_targets=normalize_value_targets,
            popart=popart,
            action_space=None if env is None else env.action_space,
            use_sde=use_sde,
        )
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
            n_steps=n_steps,
            gamma=gamma,
            gae_lambda=gae_lambda,
            ent_coef=ent_coef,
            vf_coef=vf_coef,
            max_grad_norm=max_grad_norm,  # type: ignore[arg-type]
            use_sde=use_sde,
            sde_sample_freq=sde_sample_freq,
            rollout_buffer_class=rollout_buffer_class,
            rollout_buffer_kwargs=rollout_buffer_kwargs,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            device=device,
            seed=seed,
            _init_setup_model=False,
            supported_action_spaces=SUPPORTED_ACTION_SPACES,
        )
        if self.env is not None:
            # SB3's assertion on n_steps * n_envs (same exception type), then clear warnings
            validate_rollout_size(self.n_steps, self.env.num_envs, batch_size, normalize_advantage)
            if _init_setup_model:  # load() passes neither the saved policy_kwargs nor True here
                image_check = dict(policy=policy, policy_aliases=self.policy_aliases, policy_kwargs=policy_kwargs)
                validate_image_observation(self.observation_space, **image_check)
        self.batch_size = batch_size
        self.n_epochs = n_epochs
        self.clip_range = clip_range
        self.clip_range_vf = clip_range_vf
        self.normalize_advantage = normalize_advantage
        self.target_kl = target_kl
        self.vf_clip_mode = vf_clip_mode
        self.check_finite = check_finite
        self.fast_update = fast_update
        self.ref_kl_mode = ref_kl_mode
        self._ref_policy_source = ref_policy
        # the reference's class and constructor arguments: load() rebuilds it from them, then restores its weights
        self._ref_policy_spec: dict[str, Any] | None = None
        self._reference: ReferencePolicy | None = None
        self.ref_policy: th.nn.Module | None = None
        self.dual_clip = dual_clip
        self.rpo_alpha = rpo_alpha
        self.adaptive_lr_kl = adaptive_lr_kl
        self.adaptive_lr_every = adaptive_lr_every
        self.adaptive_lr_bounds = tuple(adaptive_lr_bounds)
        self._adaptive_lr: KLAdaptiveLearningRate | None = None
        self.normalize_value_targets = normalize_value_targets
        self.popart = popart
        self.value_normalizer = ValueNormalizer(popart) if normalize_value_targets else None
        if _init_setup_model:
            self._setup_model()

    def _setup_model(self) -> None:
        recurrent = self._is_recurrent()
        if self.rollout_buffer_class is None:
            is_dict = isinstance(self.observation_space, spaces.Dict)
            if recurrent:
                self.rollout_buffer_class = RecurrentDictGAERolloutBuffer if is_dict else RecurrentGAERolloutBuffer
            else:
                self.rollout_buffer_class = DictGAERolloutBuffer if is_dict else GAERolloutBuffer
        elif recurrent and "lstm_states" not in inspect.signature(self.rollout_buffer_class.add).parameters:
            raise ConfigurationError(
                f"rollout_buffer_class={self.rollout_buffer_class.__name__} cannot store the LSTM states a recurrent "
                "policy needs (its add() has no lstm_states argument). Use ClippedPPO's default buffer "
                "(sb3_ppo_ext.buffers.RecurrentGAERolloutBuffer)."
            )
        if env_provides_masks(self.env) and not policy_applies_masks(self.policy_class):
            # sampling without the masks would take invalid actions (sb3-contrib raises here too)
            raise ConfigurationError(
                f"policy={self.policy_class.__name__} cannot apply the invalid-action masks this env provides (its "
                "forward() has no action_masks argument). Use 'MlpPolicy'/'CnnPolicy'/'MultiInputPolicy' (or a "
                "subclass of sb3_ppo_ext.ActorCriticPolicy), or remove the env's action_masks() method."
            )
        super()._setup_model()
        self._setup_reference()
        # RPO's noise belongs to the policy's evaluation; the fast path refuses policies with it (autograd instead)
        self.policy.rpo_alpha = self.rpo_alpha
        if self.adaptive_lr_kl is not None and self._adaptive_lr is None:
            initial = self.lr_schedule(1.0)
            self._adaptive_lr = KLAdaptiveLearningRate(initial, self.adaptive_lr_kl, self.adaptive_lr_bounds)
        self.clip_range = FloatSchedule(self.clip_range)
        if self.clip_range_vf is not None:
            # load() gets here with saved values and custom_objects (RL Zoo's enjoy.py replaces clip_range with
            # `lambda _: 0.0`), which are not re-validated; only SB3's own check remains
            check_clip_range_vf(self.clip_range_vf)
            self.clip_range_vf = FloatSchedule(self.clip_range_vf)
        self._dist.broadcast_model(self)  # data-parallel: every rank starts from rank 0's parameters

    def _setup_reference(self) -> None:
        """The frozen reference policy: from ``ref_policy``, or rebuilt from the saved spec by ``load``."""
        source = getattr(self, "_ref_policy_source", None)
        if source is not None:
            self._reference = resolve_reference(source, self.device)
            self._ref_policy_spec = reference_spec(self._reference.policy)
            self._ref_policy_source = None  # the caller's model is neither kept nor pickled
        elif self._ref_policy_spec is not None:
            self._reference = build_reference(self._ref_policy_spec, self.device)
        if self._reference is not None:
            check_reference_spaces(self._reference, self.observation_space, self.action_space)
            self.ref_policy = self._reference.policy

    def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
        state_dicts, variables = super()._get_torch_save_params()
        return ([*state_dicts, "ref_policy"] if self.ref_policy is not None else state_dicts), variables

    # -- data-parallel training (sb3_ppo_ext.distributed): one call at each synchronisation point -------

    @property
    def distributed(self) -> data_parallel.SingleProcess:
        """The data-parallel context: ``rank``, ``world_size``, ``is_main_process`` (one process: 0, 1, True)."""
        return self._dist

    def set_random_seed(self, seed: int | None = None) -> None:
        """SB3's seeding; with several ranks, rank r seeds with ``seed + r * n_envs`` (env i: ``+ i``)."""
        super().set_random_seed(self._dist.rank_seed(seed, getattr(self, "n_envs", 1) or 1))

    def set_parameters(
        self, load_path_or_dict: Any, exact_match: bool = True, device: th.device | str = "auto"
    ) -> None:
        """SB3's ``set_parameters``; with several ranks, rank 0's are then broadcast (call it on every rank)."""
        super().set_parameters(load_path_or_dict, exact_match=exact_match, device=device)
        self._dist.broadcast_model(self)

    def _setup_learn(
        self,
        total_timesteps: int,
        callback: MaybeCallback = None,
        reset_num_timesteps: bool = True,
        tb_log_name: str = "run",
        progress_bar: bool = False,
    ) -> tuple[int, BaseCallback]:
        self._learn_backend_cache = None  # hooks, fast_update or the policy may have changed since: choose again
        # with several ranks: same settings checked, rank 0 alone logs and runs I/O callbacks, statistics aligned
        setup = super()._setup_learn
        return self._dist.setup_learn(
            self, setup, total_timesteps, callback, reset_num_timesteps, tb_log_name, progress_bar
        )

    @property
    def ref_kl_coef(self) -> float | None:
        """The current beta of the reference-KL term (None without a reference)."""
        return None if self._ref_kl_controller is None else self._ref_kl_controller.value

    def _is_recurrent(self) -> bool:
        """Whether the policy has memory (``MlpLstmPolicy`` and the like): rollouts then carry LSTM states."""
        return isinstance(self.policy_class, type) and issubclass(self.policy_class, RecurrentActorCriticPolicy)

    def _excluded_save_params(self) -> list[str]:
        # the states belong to the episodes in flight, not to the model (a loaded model starts from zeros); the
        # reference's weights are saved as a state dict (_get_torch_save_params), its spec as data
        return [
            *super()._excluded_save_params(),
            "_last_lstm_states",
            "ref_policy",
            "_reference",
            "_ref_policy_source",
            "_rollout_ref_kl",
            "_dist",
            "_lean_step",
            "_learn_backend_cache",
        ]

    # -- rollout collection ----------------------------------------------------------------------

    def _bootstrap_truncations(
        self,
        rewards: np.ndarray,
        dones: np.ndarray,
        infos: list[dict[str, Any]],
        lstm_states: LSTMStates | None = None,
    ) -> None:
        """Add ``gamma * V(terminal_obs)`` to the reward of every time-limit truncation, in one forward pass.

        A true termination is never bootstrapped: its future value is zero by definition. A recurrent
        critic continues from its states after the episode's last step (``lstm_states``).
        """
        if not dones.any():
            return
        truncated = [
            i
            for i in np.flatnonzero(dones)
            if infos[i].get("TimeLimit.truncated", False) and infos[i].get("terminal_observation") is not None
        ]
        if not truncated:
            return
        terminal = [infos[i]["terminal_observation"] for i in truncated]
        if isinstance(terminal[0], dict):
            batch: Any = {key: np.stack([obs[key] for obs in terminal]) for key in terminal[0]}
        else:
            batch = np.stack(terminal)
        obs_tensor, _ = self.policy.obs_to_tensor(batch)
        rows = None
        if lstm_states is not None:
            index = th.as_tensor(truncated, dtype=th.long, device=self.device)
            rows = LSTMStates(*(tuple(s.index_select(1, index) for s in pair) for pair in lstm_states))
        with th.inference_mode():
            terminal_values = self._predict_values(obs_tensor, rows, np.zeros(len(truncated), dtype=bool))
        rewards[truncated] += self.gamma * terminal_values.flatten().cpu().numpy()

    def _predict_values(self, obs: Any, lstm_states: LSTMStates | None, episode_starts: np.ndarray) -> th.Tensor:
        """``V(s)`` in reward units; a recurrent critic reads its ``lstm_states`` (reset where ``episode_starts``)."""
        if lstm_states is None:
            return self._denormalize_values(self.policy.predict_values(obs))
        starts = th.as_tensor(episode_starts, dtype=th.float32, device=self.device)
        return self._denormalize_values(self.policy.predict_values(obs, lstm_states.vf, starts))  # type: ignore[call-arg]

    def _denormalize_values(self, values: th.Tensor) -> th.Tensor:
        """The critic's output in reward units (it learns normalised targets with ``normalize_value_targets``)."""
        return values if self.value_normalizer is None else self.value_normalizer.denormalize(values)

    def _check_env_data(self, new_obs: Any, rewards: np.ndarray | None, step: int) -> None:
        """NaN/inf check of what the env returned (``step=-1``, ``rewards=None``: the reset observations)."""
        check_env_data(new_obs, rewards, step=step, n_steps=self.n_steps, num_timesteps=self.num_timesteps)

    def collect_rollouts(
        self,
        env: VecEnv,
        callback: BaseCallback,
        rollout_buffer: RolloutBuffer,
        n_rollout_steps: int,
    ) -> bool:
        """Fill ``rollout_buffer`` with ``n_rollout_steps`` steps of every env, then compute GAE.

        With several ranks, training goes on only if it does on every rank (a callback's stop reaches all), and
        the VecNormalize statistics and episode statistics are merged.
        """
        return self._dist.end_rollout(self, self._collect_rollouts(env, callback, rollout_buffer, n_rollout_steps))

    def _collect_rollouts(
        self,
        env: VecEnv,
        callback: BaseCallback,
        rollout_buffer: RolloutBuffer,
        n_rollout_steps: int,
    ) -> bool:
        assert self._last_obs is not None, "No previous observation was provided"
        self.policy.set_training_mode(False)
        n_steps = 0
        rollout_buffer.reset()
        if self.use_sde:
            self.policy.reset_noise(env.num_envs)
        callback.on_rollout_start()
        is_discrete = isinstance(self.action_space, spaces.Discrete)
        act = self._learn_backend().act
        use_masks = self._masks_in_use(env, rollout_buffer)
        masks = None
        inputs: dict[str, Any] = {}  # the policy's inputs besides the observations (masks)
        lstm_states = self._rollout_lstm_states(env.num_envs)
        reference = self._reference if self.ref_kl_mode == "reward" else None
        ref_kl_sum, self._rollout_ref_kl = 0.0, None

        while n_steps < n_rollout_steps:
            if self.use_sde and self.sde_sample_freq > 0 and n_steps % self.sde_sample_freq == 0:
                self.policy.reset_noise(env.num_envs)
            if use_masks:
                masks = read_action_masks(env, self.action_space, step=n_steps)
            with th.inference_mode():
                obs_tensor = obs_as_tensor(self._last_obs, self.device)  # type: ignore[arg-type]
                if masks is not None:
                    inputs["action_masks"] = th.as_tensor(masks, device=self.device)
                if lstm_states is None:
                    actions, values, log_probs = act(obs_tensor, **inputs)
                else:
                    starts = th.as_tensor(self._last_episode_starts, dtype=th.float32, device=self.device)
                    actions, values, log_probs, next_states = act(obs_tensor, lstm_states, starts, **inputs)
                values = self._denormalize_values(values)
                if reference is not None:
                    # log pi_old - log pi_ref of the taken actions: the seed's per-step KL penalty
                    step_kl = log_probs - reference.log_prob(obs_tensor, actions, inputs.get("action_masks"))
            actions = actions.cpu().numpy()
            new_obs, rewards, dones, infos = env.step(self._env_actions(actions))
            if reference is not None:
                rewards, ref_kl_sum = self._penalize_rewards(rewards, step_kl), ref_kl_sum + step_kl.sum().item()
            self.num_timesteps += self._dist.global_steps(env.num_envs)  # every rank's steps
            if self.check_finite:
                self._check_env_data(new_obs, rewards, n_steps)

            callback.update_locals(locals())
            if not callback.on_step():
                return False
            self._update_info_buffer(infos, dones)
            n_steps += 1
            if is_discrete:
                actions = actions.reshape(-1, 1)
            self._bootstrap_truncations(rewards, dones, infos, None if lstm_states is None else next_states)
            rollout_buffer.add(
                self._last_obs,  # type: ignore[arg-type]
                actions,
                rewards,
                self._last_episode_starts,  # type: ignore[arg-type]
                values,
                log_probs,
                **({} if masks is None else {"action_masks": masks}),
                **({} if lstm_states is None else {"lstm_states": lstm_states}),
            )
            self._last_obs = new_obs  # type: ignore[assignment]
            self._last_episode_starts = dones
            if lstm_states is not None:
                lstm_states = self._last_lstm_states = next_states

        with th.inference_mode():
            obs_tensor = obs_as_tensor(new_obs, self.device)  # type: ignore[arg-type]
            values = self._predict_values(obs_tensor, lstm_states, dones)
        rollout_buffer.compute_returns_and_advantage(last_values=values, dones=dones)
        if reference is not None:
            self._rollout_ref_kl = ref_kl_sum / (n_steps * env.num_envs)
        callback.update_locals(locals())
        callback.on_rollout_end()
        return True

    def _penalize_rewards(self, rewards: np.ndarray, step_kl: th.Tensor) -> np.ndarray:
        """``r_t - beta * KL_t`` (``ref_kl_mode="reward"``); beta = 0 leaves the rewards untouched, bit for bit."""
        beta = self.ref_kl_coef
        if not beta:
            return rewards
        return (rewards - beta * step_kl.cpu().numpy()).astype(rewards.dtype, copy=False)

    def _rollout_lstm_states(self, n_envs: int) -> LSTMStates | None:
        """A recurrent policy's states to continue from (zeros for a new or resized set of envs); else None."""
        if not isinstance(self.policy, RecurrentActorCriticPolicy):
            return None
        states = self._last_lstm_states
        if states is None or states.pi[0].shape[1] != n_envs or states.pi[0].device != self.device:
            states = self._last_lstm_states = self.policy.initial_state(n_envs)
        return states

    def _env_actions(self, actions: np.ndarray) -> np.ndarray:
        """The actions the env receives: Box actions unscaled (squashed gSDE) or clipped to the bounds."""
        if not isinstance(self.action_space, spaces.Box):
            return actions
        if self.policy.squash_output:
            return self.policy.unscale_action(actions)
        # an unbounded Gaussian sample must be clipped to the env's bounds; the buffer keeps the unclipped
        # action so that its log-probability stays consistent. np.clip's values, without its Python layers
        # (~10 us per step at batch 1)
        return np.minimum(np.maximum(actions, self.action_space.low), self.action_space.high)

    def _masks_in_use(self, env: VecEnv, rollout_buffer: RolloutBuffer) -> bool:
        """Whether this rollout applies the env's invalid-action masks (``learn(use_masking=True)``, the default)."""
        if not (self._use_masking and env_provides_masks(env)):
            return False
        if "action_masks" not in inspect.signature(rollout_buffer.add).parameters:
            raise ConfigurationError(
                f"rollout_buffer_class={type(rollout_buffer).__name__} cannot store the env's action masks (its add() "
                "has no action_masks argument). Use ClippedPPO's default buffer, or pass use_masking=False to learn()."
            )
        return True

    # -- optimisation ----------------------------------------------------------------------------

    def _normalize_rollout_advantages(self) -> None:
        """The seed's per-batch variant: normalise all advantages of the rollout once, in place."""
        advantages = self.rollout_buffer.advantages
        flat = th.as_tensor(advantages).reshape(-1)
        normalized = self._dist.normalize_advantages(flat).reshape(advantages.shape)  # over every rank's rollout
        advantages[...] = normalized.numpy() if isinstance(advantages, np.ndarray) else normalized

    def _current_clip_range(self, schedule: Schedule, name: str) -> float:
        # the last rollout usually overshoots total_timesteps, so progress ends at or slightly below 0, where
        # linear schedules (RL Zoo's among them) reach 0 or below; SB3 trains through that, and so do we
        progress = self._current_progress_remaining
        return check_schedule_value(name, schedule(progress), progress)

    def train(self) -> None:
        """Run ``n_epochs`` passes of minibatch updates on the current rollout (seed section 5, step 3)."""
        self.policy.set_training_mode(True)
        if self._adaptive_lr is None:
            self._update_learning_rate(self.policy.optimizer)
        else:
            self._adaptive_lr.apply(self.policy.optimizer)
        if self.value_normalizer is not None:
            head = self.policy.value_net if self.popart else None
            # several ranks: the returns of all of them, so that every rank's statistics (and PopArt head) agree
            self.value_normalizer.update(self._dist.all_gather(np.asarray(self.rollout_buffer.returns)), head)
        clip_range = self._current_clip_range(self.clip_range, "clip_range")  # type: ignore[arg-type]
        clip_range_vf = None
        if self.clip_range_vf is not None:
            clip_range_vf = self._current_clip_range(self.clip_range_vf, "clip_range_vf")  # type: ignore[arg-type]
        if self.normalize_advantage == "batch":
            self._normalize_rollout_advantages()
        ref_kl_coef = self.ref_kl_coef if self.ref_kl_mode == "loss" else None
        loss = PPOLoss(
            clip_range,
            clip_range_vf,
            self.vf_clip_mode,
            self.ent_coef,
            self.vf_coef,
            ref_kl_coef or 0.0,
            self.dual_clip,
        )
        history = self._train_epochs(self._learn_backend(), loss)
        self._record_reference_kl(history)
        if self._adaptive_lr is not None:
            self.logger.record("train/learning_rate", self._adaptive_lr.value)

        self.logger.record("train/entropy_loss", _mean(history, "entropy_loss"))
        self.logger.record("train/policy_gradient_loss", _mean(history, "policy_loss"))
        self.logger.record("train/value_loss", _mean(history, "value_loss"))
        # SB3 logs the approximate KL of the last epoch only
        self.logger.record("train/approx_kl", _mean(history[-1], "approx_kl"))
        self.logger.record("train/clip_fraction", _mean(history, "clip_fraction"))
        if self.dual_clip is not None:
            self.logger.record("train/dual_clip_fraction", _mean(history, "dual_clip_fraction"))
        self.logger.record("train/loss", history[-1][-1].loss.item() if history[-1] else float("nan"))
        self.logger.record(
            "train/explained_variance",
            explained_variance(
                np.asarray(self.rollout_buffer.values).flatten(), np.asarray(self.rollout_buffer.returns).flatten()
            ),
        )
        if hasattr(self.policy, "log_std"):
            self.logger.record("train/std", th.exp(self.policy.log_std).mean().item())
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/clip_range", clip_range)
        if clip_range_vf is not None:
            self.logger.record("train/clip_range_vf", clip_range_vf)

    def _record_reference_kl(self, history: list[list[LossTerms]]) -> None:
        """Log the KL to the reference and beta, then let the controller move beta (Ziegler et al.)."""
        if self._ref_kl_controller is None:
            return
        if self.ref_kl_mode == "reward":
            kl = getattr(self, "_rollout_ref_kl", None)
        else:
            measured = [t.ref_kl for epoch in history for t in epoch if t.ref_kl is not None]
            kl = th.stack(measured).mean().item() if measured else None
        if kl is not None:
            self.logger.record("train/ref_kl", kl)
            self._ref_kl_controller.update(kl, self._dist.global_steps(self.n_steps * self.n_envs))
        self.logger.record("train/ref_kl_coef", self._ref_kl_controller.value)

    def _train_epochs(self, backend: Backend, loss: PPOLoss) -> list[list[LossTerms]]:
        """The epoch and minibatch loops; returns each epoch's loss terms (statistics stay tensors until logged)."""
        per_minibatch_normalization = self.normalize_advantage in (True, "minibatch")
        discrete_actions = isinstance(self.action_space, spaces.Discrete)
        parameters = [p for p in self.policy.parameters() if p.requires_grad]
        max_grad_norm = float("inf") if self.max_grad_norm is None else self.max_grad_norm
        history: list[list[LossTerms]] = []
        # the reference's view of each minibatch, for the loss's KL term (only when it weighs something, so that
        # beta = 0 trains exactly as without a reference)
        reference = self._reference if loss.ref_kl_coef != 0 else None
        reference_memo: tuple[Any, Any] | None = None
        optimizer_step = self._optimizer_step()
        for epoch in range(self.n_epochs):
            history.append([])
            minibatches = self.rollout_buffer.get(self.batch_size)
            for batch in self._dist.minibatches(minibatches, per_minibatch_normalization):  # several ranks: prefetch
                actions = batch.actions.long().flatten() if discrete_actions else batch.actions
                advantages = batch.advantages
                if per_minibatch_normalization:
                    advantages = self._dist.normalize_advantages(advantages)  # over every rank's minibatch
                old_values, returns = batch.old_values, batch.returns
                if self.value_normalizer is not None:
                    # the critic's targets (and its old outputs, for value clipping) in its normalised units
                    old_values = self.value_normalizer.normalize(old_values)
                    returns = self.value_normalizer.normalize(returns)
                inputs = PPOBatch(
                    batch.observations,
                    actions,
                    batch.old_log_prob,
                    old_values,
                    advantages,
                    returns,
                    getattr(batch, "action_masks", None),
                    getattr(batch, "sequences", None),
                )
                if reference is not None:
                    if reference_memo is None or reference_memo[0] is not batch.observations:
                        targets = reference.targets(inputs.observations, actions, inputs.action_masks)
                        reference_memo = (batch.observations, targets)
                    # one minibatch holding the whole rollout is the same tensor at every epoch, and the reference
                    # is frozen: its outputs are computed once per update, not once per epoch
                    inputs = inputs._replace(reference=reference_memo[1])
                terms = backend.loss_and_grad(loss, inputs)  # sets .grad of every policy parameter
                terms = self._dist.reduce_update(parameters, terms)  # several ranks: mean gradient, KL and losses
                history[-1].append(terms)
                if self.target_kl is not None and terms.approx_kl.item() > 1.5 * self.target_kl:
                    # SB3 stops before this minibatch's step, and logs its losses and KL all the same
                    if self.verbose >= 1:
                        print(f"Early stopping at step {epoch} due to reaching max kl: {terms.approx_kl.item():.2f}")
                    self._n_updates += 1  # SB3 counts the interrupted epoch
                    return history
                grad_norm = clip_grad_norm(parameters, max_grad_norm)
                if not th.isfinite(grad_norm):
                    # stop before the step: parameters and optimizer state stay those of the last good update
                    self.policy.optimizer.zero_grad(set_to_none=True)
                    learning_rate = self.policy.optimizer.param_groups[0]["lr"]
                    raise non_finite_update_error(
                        terms,
                        grad_norm,
                        batch.advantages,
                        self.rollout_buffer,
                        num_timesteps=self.num_timesteps,
                        learning_rate=learning_rate,
                    )
                optimizer_step()
                if self._adaptive_lr is not None and self.adaptive_lr_every == "minibatch":
                    self._adapt_learning_rate(terms.approx_kl.item())
            self._n_updates += 1
            if self._adaptive_lr is not None and self.adaptive_lr_every == "epoch":
                self._adapt_learning_rate(_mean(history[-1], "approx_kl"))
        return history

    def _optimizer_step(self) -> Callable[[], None]:
        """``policy.optimizer.step``, through :class:`~sb3_ppo_ext.optim.LeanAdamStep` (same update, less Python)."""
        optimizer = self.policy.optimizer
        lean = getattr(self, "_lean_step", None)
        if lean is None or lean.optimizer is not optimizer:
            lean = self._lean_step = LeanAdamStep(optimizer)
        return lean.update_steps()

    def _adapt_learning_rate(self, kl: float) -> None:
        """The KL-adaptive rule (:class:`~sb3_ppo_ext.optim.KLAdaptiveLearningRate`), applied to the optimizer."""
        assert self._adaptive_lr is not None
        self._adaptive_lr.update(kl)
        self._adaptive_lr.apply(self.policy.optimizer)

    def _backend(self) -> Backend:
        """Closed-form gradients for plain MLP policies when ``fast_update`` is on, else autograd (one call each)."""
        return select_backend(self.policy, self.fast_update)

    def _learn_backend(self) -> Backend:
        """:meth:`_backend`, chosen once per ``learn()`` call (and again if the policy or ``fast_update`` changes).

        Choosing inspects every module and parameter for hooks (about 1 ms here), which every rollout and
        every ``train()`` of a CartPole run would otherwise pay: ~800 times per 100k steps.
        """
        cached = getattr(self, "_learn_backend_cache", None)
        if cached is None or cached[0] is not self.policy or cached[1] != self.fast_update:
            cached = self._learn_backend_cache = (self.policy, self.fast_update, self._backend())
        return cached[2]

    def predict(
        self,
        observation: np.ndarray | dict[str, np.ndarray],
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
        action_masks: np.ndarray | None = None,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        """SB3's ``predict``, plus sb3-contrib's ``action_masks``: only valid actions are returned."""
        if action_masks is None:
            return super().predict(observation, state, episode_start, deterministic)
        masks = check_action_masks(action_masks, self.action_space, None, step=-1)
        return self.policy.predict(observation, state, episode_start, deterministic, action_masks=masks)

    def export(self, path: str | Path, export_format: str | None = None, **options: Any) -> Path:
        """The deterministic policy as ONNX (``.onnx``) or TorchScript (``.pt``): :func:`sb3_ppo_ext.export.export`."""
        from sb3_ppo_ext.export import export  # deferred: onnx is an optional dependency

        return export(self, path, export_format, **options)  # type: ignore[arg-type]

    def learn(
        self: SelfClippedPPO,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 1,
        tb_log_name: str = "ClippedPPO",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
        use_masking: bool = True,
    ) -> SelfClippedPPO:
        """Train for ``total_timesteps`` env steps (SB3's ``learn`` signature, plus sb3-contrib's ``use_masking``).

        :param use_masking: apply the env's invalid-action masks when it has an ``action_masks()`` method (an
            env without one trains as SB3's PPO); ``False`` ignores them.
        """
        self._use_masking = use_masking
        return super().learn(
            total_timesteps=total_timesteps,
            callback=callback,
            log_interval=log_interval,
            tb_log_name=tb_log_name,
            reset_num_timesteps=reset_num_timesteps,
            progress_bar=progress_bar,
        )


def _mean(terms: list[LossTerms] | list[list[LossTerms]], name: str) -> float:
    """Mean of one field of :class:`LossTerms` over minibatches (nested lists are flattened); NaN if none."""
    flat = [t for item in terms for t in (item if isinstance(item, list) else [item])]
    if not flat:
        return float("nan")
    return th.stack([getattr(t, name) for t in flat]).mean().item()


__all__ = ["ClippedPPO"]
