"""``ClippedPPO``: Proximal Policy Optimization with the clipped surrogate objective, as an SB3 algorithm.

The two loops are the seed's steps and nothing else: :meth:`ClippedPPO._collect_rollouts` (act, step the
envs, store, then GAE) and :meth:`ClippedPPO._train_epochs` (K epochs of shuffled minibatches: normalised
advantages, the clipped objective of :mod:`sb3_ppo_ext.losses` and its gradient, clipping, the optimizer
step). Every feature (masks, LSTM states, the reference KL, the stabilisers, your own) plugs into them
through :mod:`sb3_ppo_ext.extensions`; data-parallel training through :mod:`sb3_ppo_ext.distributed`.
"""

from __future__ import annotations

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
from stable_baselines3.common.utils import FloatSchedule, obs_as_tensor
from stable_baselines3.common.vec_env import VecEnv

from sb3_ppo_ext import distributed as data_parallel
from sb3_ppo_ext import losses
from sb3_ppo_ext.backends import Backend, LearnCache
from sb3_ppo_ext.distributed import DataParallelMixin
from sb3_ppo_ext.distributions import SUPPORTED_ACTION_SPACES
from sb3_ppo_ext.extensions import Extension, Extensions, RolloutStep
from sb3_ppo_ext.features import (
    POLICY_ALIASES,
    configure_features,
    default_rollout_buffer_class,
    feature_extensions,
    is_recurrent,
)
from sb3_ppo_ext.gae import bootstrap_truncations
from sb3_ppo_ext.losses import LossTerms, PPOBatch, PPOLoss
from sb3_ppo_ext.masking import MaskedPredictMixin
from sb3_ppo_ext.policies import ActorCriticPolicy, env_actions
from sb3_ppo_ext.reliability import checks
from sb3_ppo_ext.reliability.finite import check_env_data, refuse_non_finite_update
from sb3_ppo_ext.reliability.mixin import ReliabilityMixin
from sb3_ppo_ext.rlhf.penalty import REFERENCE_UNSAVED, ReferenceKLMixin
from sb3_ppo_ext.rlhf.reference import DEFAULT_REF_KL_HORIZON, AdaptiveKLCoef, RefKLMode
from sb3_ppo_ext.train_log import record_update

SelfClippedPPO = TypeVar("SelfClippedPPO", bound="ClippedPPO")
ExtensionT = TypeVar("ExtensionT", bound=Extension)


class ClippedPPO(MaskedPredictMixin, ReferenceKLMixin, DataParallelMixin, ReliabilityMixin, OnPolicyAlgorithm):
    """Proximal Policy Optimization, clip version (Schulman et al. 2017), drop-in for SB3's ``PPO``.

    Every argument of SB3 2.9's ``PPO`` is accepted with the same name, default and meaning (SB3's documentation
    applies word for word; the fields below say what we add or change). The additions are keyword-only.

    :param policy: ``"MlpPolicy"``, ``"CnnPolicy"``, ``"MultiInputPolicy"``, their recurrent versions
        ``"MlpLstmPolicy"``, ``"CnnLstmPolicy"``, ``"MultiInputLstmPolicy"`` (sb3-contrib's ``RecurrentPPO``
        policies and keywords) or ``"MlpGruPolicy"``, ``"CnnGruPolicy"``, ``"MultiInputGruPolicy"``, or a class.
    :param normalize_advantage: ``True``/``"minibatch"``: per minibatch (SB3's default); ``"batch"``: once over the
        rollout (the seed's variant); ``False``: off.
    :param rollout_buffer_class: default :class:`~sb3_ppo_ext.buffers.GAERolloutBuffer` (or its Dict and recurrent
        variants); SB3's buffers work too.
    :param vf_clip_mode: value clipping's form: ``"max"`` (the seed's ``max((V - R)^2, (V_clip - R)^2)``) or ``"sb3"``.
    :param check_finite: raise a clear error when an env returns NaN/inf observations or rewards.
    :param fast_update: closed-form gradients for plain MLP policies (:mod:`sb3_ppo_ext.fast.kernel`): same update.
    :param ref_policy: a frozen reference to stay close to (a model, a policy, a saved model's path or a
        :class:`~sb3_ppo_ext.rlhf.reference.Reference`), saved with the model; None (default): SB3's PPO.
    :param ref_kl_coef: beta, a float >= 0 (default 0.1), ``"adaptive"`` (Ziegler et al.'s controller) or an
        :class:`~sb3_ppo_ext.rlhf.reference.AdaptiveKLCoef` (its units and initial beta): :mod:`sb3_ppo_ext.rlhf`.
    :param ref_kl_mode: ``"reward"`` (default): ``r_t - beta * (log pi_old - log pi_ref)`` before GAE; ``"loss"``:
        ``beta * KL(pi_theta || pi_ref)`` in the loss.
    :param ref_kl_target: the KL per step the adaptive controller holds.
    :param ref_kl_horizon: env steps over which the adaptive beta may change by about 20%.
    :param dual_clip: c > 1 of dual-clip PPO (Ye et al. 2020); None (default): off. Stabilisers:
        :mod:`sb3_ppo_ext.stabilizers`.
    :param rpo_alpha: RPO's uniform noise on the Gaussian mean during the update (Box actions); None: off.
    :param adaptive_lr_kl: target KL of the KL-adaptive learning rate, which replaces the schedule; None: off.
    :param adaptive_lr_every: ``"epoch"`` (default) or ``"minibatch"``.
    :param adaptive_lr_bounds: ``(min, max)`` learning rate of the adaptive rule.
    :param normalize_value_targets: the critic learns returns normalised by their running mean and std.
    :param popart: with ``normalize_value_targets``, PopArt's output-preserving rescaling of the value head.
    :param recompute_advantages: GAE again with the current critic before every epoch (:mod:`sb3_ppo_ext.details`).
    :param scale_rewards: rewards divided by a running std of the discounted return, inside the algorithm.
    :param distributed: data-parallel training (:mod:`sb3_ppo_ext.distributed`): None (default) detects
        ``torchrun``; False: never; True, a ``DistributedConfig`` or a dict of its fields. Settings are per rank.
    :param extensions: your own :class:`~sb3_ppo_ext.extensions.Extension` objects, called after the package's
        own at every hook; saved with the model.
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = POLICY_ALIASES
    policy: ActorCriticPolicy
    rollout_buffer: RolloutBuffer
    #: whether rollouts apply the env's invalid-action masks (``learn(use_masking=...)``; also when called directly)
    use_masking: bool = True
    # recurrent policies: each env's LSTM states after its last step (sb3-contrib's name)
    _last_lstm_states: Any = None

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
        ref_kl_coef: float | str | AdaptiveKLCoef | None = None,
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
        recompute_advantages: bool = False,
        scale_rewards: bool = False,
        distributed: bool | data_parallel.DistributedConfig | dict[str, Any] | None = None,
        extensions: list[Extension] | None = None,
    ) -> None:
        # reliability: every argument is checked before the env is created or stepped (sb3_ppo_ext.reliability)
        checks.validate_policy(policy, self.policy_aliases)
        checks.validate_hyperparameters(
            learning_rate=learning_rate,
            n_steps=n_steps,
            batch_size=batch_size,
            n_epochs=n_epochs,
            gamma=gamma,
            gae_lambda=gae_lambda,
            clip_range=clip_range,
            clip_range_vf=clip_range_vf,
            normalize_advantage=normalize_advantage,
            ent_coef=ent_coef,
            vf_coef=vf_coef,
            max_grad_norm=max_grad_norm,
            target_kl=target_kl,
            stats_window_size=stats_window_size,
            vf_clip_mode=vf_clip_mode,
        )
        env = maybe_make_env(env, verbose)  # as SB3 does first thing in super().__init__
        # data-parallel: the process group (torchrun) and this rank's device; one process: a no-op context
        self._dist, device = data_parallel.setup(distributed, device)
        if env is not None:
            checks.validate_spaces(env.observation_space, env.action_space, policy=policy, use_sde=use_sde)
        configure_features(
            self,
            None if env is None else env.action_space,
            use_sde=use_sde,
            ref_policy=ref_policy,
            ref_kl_coef=ref_kl_coef,
            ref_kl_mode=ref_kl_mode,
            ref_kl_target=ref_kl_target,
            ref_kl_horizon=ref_kl_horizon,
            dual_clip=dual_clip,
            rpo_alpha=rpo_alpha,
            adaptive_lr_kl=adaptive_lr_kl,
            adaptive_lr_every=adaptive_lr_every,
            adaptive_lr_bounds=adaptive_lr_bounds,
            normalize_value_targets=normalize_value_targets,
            popart=popart,
            recompute_advantages=recompute_advantages,
            scale_rewards=scale_rewards,
            extensions=extensions,
        )
        super().__init__(
            *(policy, env, learning_rate, n_steps, gamma, gae_lambda, ent_coef, vf_coef, max_grad_norm, use_sde),
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
            checks.validate_rollout_size(self.n_steps, self.env.num_envs, batch_size, normalize_advantage)
            if _init_setup_model:  # load() passes neither the saved policy_kwargs nor True here
                image_check = dict(policy=policy, policy_aliases=self.policy_aliases, policy_kwargs=policy_kwargs)
                checks.validate_image_observation(self.observation_space, **image_check)
        self.batch_size = batch_size
        self.n_epochs = n_epochs
        self.clip_range = clip_range
        self.clip_range_vf = clip_range_vf
        self.normalize_advantage = normalize_advantage
        self.target_kl = target_kl
        self.vf_clip_mode = vf_clip_mode
        self.check_finite = check_finite
        self.fast_update = fast_update
        if _init_setup_model:
            self._setup_model()

    def _setup_model(self) -> None:
        recurrent = is_recurrent(self.policy_class)
        if self.rollout_buffer_class is None:
            self.rollout_buffer_class = default_rollout_buffer_class(self.observation_space, recurrent)
        checks.validate_policy_and_buffer(self.policy_class, self.rollout_buffer_class, self.env, recurrent=recurrent)
        super()._setup_model()
        self._learn = LearnCache()
        self._extensions = Extensions([*feature_extensions(self), *getattr(self, "extensions", [])])
        self._extensions.setup(self)
        self.clip_range = FloatSchedule(self.clip_range)
        if self.clip_range_vf is not None:
            # load() gets here with saved values and custom_objects (RL Zoo's enjoy.py replaces clip_range with
            # `lambda _: 0.0`), which are not re-validated; only SB3's own check remains
            checks.check_clip_range_vf(self.clip_range_vf)
            self.clip_range_vf = FloatSchedule(self.clip_range_vf)
        self._dist.broadcast_model(self)  # data-parallel: every rank starts from rank 0's parameters

    def extension(self, kind: type[ExtensionT]) -> ExtensionT | None:
        """The model's first extension of class ``kind`` (its own features included), or None.

        :param kind: an :class:`~sb3_ppo_ext.extensions.Extension` subclass.
        :return: the extension, or None.
        """
        return next((e for e in self._extensions.extensions if isinstance(e, kind)), None)

    def _excluded_save_params(self) -> list[str]:
        # LSTM states belong to the episodes in flight; the reference is saved as a state dict and a spec; the
        # feature extensions are rebuilt from the settings (their state lives in value_normalizer, _adaptive_lr...)
        excluded = ["_last_lstm_states", *REFERENCE_UNSAVED, "_extensions"]
        return [*super()._excluded_save_params(), *excluded, "_dist", "_learn"]

    # -- rollout collection (seed section 5, steps 1-2) --------------------------------------------------

    def collect_rollouts(
        self, env: VecEnv, callback: BaseCallback, rollout_buffer: RolloutBuffer, n_rollout_steps: int
    ) -> bool:
        """Fill ``rollout_buffer`` with ``n_rollout_steps`` steps of every env, then compute GAE.

        With several ranks, training goes on only if it does on every rank (a callback's stop reaches all), the
        VecNormalize statistics and episode statistics are merged, and so are the extensions' statistics.

        :param env: the training env.
        :param callback: the learn call's callback, called at every step.
        :param rollout_buffer: the buffer to fill.
        :param n_rollout_steps: steps per env.
        :return: False when a callback stopped training.
        """
        going_on = self._collect_rollouts(env, callback, rollout_buffer, n_rollout_steps)
        extensions = self._extensions
        going_on, statistics = self._dist.end_rollout(
            self, going_on, extensions.take_statistics(), extensions.statistic_names
        )
        extensions.rollout_statistics(statistics)
        return going_on

    def _collect_rollouts(
        self, env: VecEnv, callback: BaseCallback, rollout_buffer: RolloutBuffer, n_rollout_steps: int
    ) -> bool:
        assert self._last_obs is not None, "No previous observation was provided"
        self.policy.set_training_mode(False)
        rollout_buffer.reset()
        if self.use_sde:
            self.policy.reset_noise(env.num_envs)
        callback.on_rollout_start()
        act, extensions = self._learn.backend(self.policy, self.fast_update).act, self._extensions
        extensions.rollout_start(self, env, rollout_buffer)
        n_steps, discrete = 0, isinstance(self.action_space, spaces.Discrete)
        while n_steps < n_rollout_steps:
            if self.use_sde and self.sde_sample_freq > 0 and n_steps % self.sde_sample_freq == 0:
                self.policy.reset_noise(env.num_envs)
            with th.inference_mode():
                obs_tensor = obs_as_tensor(self._last_obs, self.device)  # type: ignore[arg-type]
                inputs = extensions.policy_inputs(n_steps)
                actions, values, log_probs, *outputs = act(obs_tensor, **inputs)
                values = extensions.values_in_reward_units(values)
                step = RolloutStep(n_steps, obs_tensor, actions, log_probs, inputs, tuple(outputs))
                extensions.acted(step)
            actions = actions.cpu().numpy()
            new_obs, rewards, dones, infos = env.step(env_actions(self.policy, self.action_space, actions))
            rewards = extensions.shape_rewards(rewards, step)
            self.num_timesteps += self._dist.global_steps(env.num_envs)  # every rank's steps
            if self.check_finite:
                check_env_data(new_obs, rewards, step=n_steps, n_steps=self.n_steps, num_timesteps=self.num_timesteps)

            callback.update_locals(locals())
            if not callback.on_step():
                return False
            self._update_info_buffer(infos, dones)
            n_steps += 1
            if discrete:
                actions = actions.reshape(-1, 1)
            bootstrap_truncations(rewards, dones, infos, self.gamma, self.policy.obs_to_tensor, self._state_values)
            rollout_buffer.add(
                self._last_obs,  # type: ignore[arg-type]
                actions,
                rewards,
                self._last_episode_starts,  # type: ignore[arg-type]
                values,
                log_probs,
                **extensions.buffer_fields(),
            )
            self._last_obs, self._last_episode_starts = new_obs, dones  # type: ignore[assignment]
            extensions.step_end(self)

        values = self._state_values(obs_as_tensor(new_obs, self.device), dones)  # type: ignore[arg-type]
        rollout_buffer.compute_returns_and_advantage(last_values=values, dones=dones)
        extensions.rollout_end(self)
        callback.update_locals(locals())
        callback.on_rollout_end()
        return True

    def _state_values(self, obs: Any, episode_starts: np.ndarray, rows: np.ndarray | None = None) -> th.Tensor:
        """``V(s)`` in reward units after the current step, of every env or of ``rows`` only (inference mode)."""
        with th.inference_mode():
            inputs = self._extensions.value_inputs(rows, episode_starts)
            return self._extensions.values_in_reward_units(self.policy.predict_values(obs, **inputs))

    # -- optimisation (seed section 5, step 3) ------------------------------------------------------------

    def train(self) -> None:
        """Run ``n_epochs`` passes of minibatch updates on the current rollout (seed section 5, step 3)."""
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        self._extensions.update_start(self)
        clip_range = self._current_clip_range(self.clip_range, "clip_range")  # type: ignore[arg-type]
        clip_range_vf = None
        if self.clip_range_vf is not None:
            clip_range_vf = self._current_clip_range(self.clip_range_vf, "clip_range_vf")  # type: ignore[arg-type]
        if self.normalize_advantage == "batch":
            self._normalize_rollout_advantages()
        options = dict(dual_clip=self.dual_clip, **self._extensions.loss_options())
        loss = PPOLoss(clip_range, clip_range_vf, self.vf_clip_mode, self.ent_coef, self.vf_coef, **options)
        history = self._train_epochs(self._learn.backend(self.policy, self.fast_update), loss)
        self._extensions.update_end(self, history)
        record_update(self, history, clip_range, clip_range_vf)

    def _current_clip_range(self, schedule: Schedule, name: str) -> float:
        # the last rollout usually overshoots total_timesteps, so progress ends at or slightly below 0, where
        # linear schedules (RL Zoo's among them) reach 0 or below; SB3 trains through that, and so do we
        progress = self._current_progress_remaining
        return checks.check_schedule_value(name, schedule(progress), progress)

    def _normalize_rollout_advantages(self) -> None:
        """The seed's per-batch variant: normalise all advantages of the rollout once, in place."""
        advantages = self.rollout_buffer.advantages
        flat = th.as_tensor(advantages).reshape(-1)
        normalized = self._dist.normalize_advantages(flat).reshape(advantages.shape)  # over every rank's rollout
        advantages[...] = normalized.numpy() if isinstance(advantages, np.ndarray) else normalized

    def _train_epochs(self, backend: Backend, loss: PPOLoss) -> list[list[LossTerms]]:
        """The epoch and minibatch loops; returns each epoch's loss terms (statistics stay tensors until logged)."""
        per_minibatch_normalization = self.normalize_advantage in (True, "minibatch")
        discrete_actions = isinstance(self.action_space, spaces.Discrete)
        parameters = [p for p in self.policy.parameters() if p.requires_grad]
        max_grad_norm = float("inf") if self.max_grad_norm is None else self.max_grad_norm
        update, extensions = self._learn.optimizer_steps(self.policy.optimizer), self._extensions
        history: list[list[LossTerms]] = []
        for epoch in range(self.n_epochs):
            history.append([])
            extensions.epoch_start(self, epoch)
            minibatches = self.rollout_buffer.get(self.batch_size)
            for batch in self._dist.minibatches(minibatches, per_minibatch_normalization):  # several ranks: prefetch
                advantages = batch.advantages
                if per_minibatch_normalization:
                    advantages = self._dist.normalize_advantages(advantages)  # over every rank's minibatch
                inputs = extensions.minibatch(PPOBatch.from_minibatch(batch, advantages, discrete_actions))
                terms = backend.loss_and_grad(loss, inputs)  # sets .grad of every policy parameter
                terms = self._dist.reduce_update(parameters, terms)  # several ranks: mean gradient, KL and losses
                history[-1].append(terms)
                if self.target_kl is not None and terms.approx_kl.item() > 1.5 * self.target_kl:
                    # SB3 stops before this minibatch's step, and logs its losses and KL all the same
                    if self.verbose >= 1:
                        print(f"Early stopping at step {epoch} due to reaching max kl: {terms.approx_kl.item():.2f}")
                    self._n_updates += 1  # SB3 counts the interrupted epoch
                    return history
                grad_norm = update.clip_grad_norm(parameters, max_grad_norm)
                if not np.isfinite(float(grad_norm)):  # a Python float: a tensor op costs ~10 us here
                    refuse_non_finite_update(self, terms, grad_norm, batch.advantages)  # before the step
                update.step()
                extensions.minibatch_done(self, terms)
            self._n_updates += 1
            extensions.epoch_done(self, history[-1])
        return history

    def export(self, path: str | Path, export_format: str | None = None, **options: Any) -> Path:
        """The deterministic policy as ONNX (``.onnx``) or TorchScript (``.pt``): :func:`sb3_ppo_ext.export.export`.

        :param path: the file to write.
        :param export_format: ``"onnx"`` or ``"torchscript"``; None: from the suffix.
        :return: the path written.
        """
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

        :param total_timesteps: env steps to train for (all envs, all ranks).
        :param callback: SB3 callback(s) called at every step.
        :param log_interval: updates between two logger dumps.
        :param tb_log_name: the TensorBoard run's name.
        :param reset_num_timesteps: start the step count (and the schedules) at 0; False continues a run.
        :param progress_bar: show a progress bar (tqdm and rich).
        :param use_masking: apply the env's invalid-action masks when it has an ``action_masks()`` method (an
            env without one trains as SB3's PPO); ``False`` ignores them.
        :return: the trained model.
        """
        self.use_masking = use_masking
        self._learn = LearnCache()  # hooks, fast_update or the policy may have changed since: choose again
        return super().learn(total_timesteps, callback, log_interval, tb_log_name, reset_num_timesteps, progress_bar)


__all__ = ["ClippedPPO"]
