"""Constructor arguments: SB3 PPO's signature and defaults, our extensions, and that each switch really acts.

Which values are rejected, and with which message, is tested in test_checks.py.
"""

from __future__ import annotations

import inspect
import pickle
import warnings

import cloudpickle
import numpy as np
import pytest
import torch as th
from conftest import TINY, collect_rollout, recording_logger
from stable_baselines3 import PPO
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.utils import ConstantSchedule, FloatSchedule

from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext.schedules import LinearDecay, linear, parse_schedule


def cartpole(n_envs: int = 2, seed: int = 0):
    return make_vec_env("CartPole-v1", n_envs=n_envs, seed=seed)


def collect(model: ClippedPPO) -> None:
    """Fill the rollout buffer once, without training."""
    collect_rollout(model)


# -- SB3 PPO's signature -------------------------------------------------------------------------------------


def test_every_sb3_ppo_argument_has_same_name_position_and_default() -> None:
    ours = list(inspect.signature(ClippedPPO.__init__).parameters.values())
    sb3 = list(inspect.signature(PPO.__init__).parameters.values())
    assert len(ours) > len(sb3)
    for mine, theirs in zip(ours[: len(sb3)], sb3, strict=True):
        assert mine.name == theirs.name
        assert mine.kind == theirs.kind, mine.name
        assert mine.default == theirs.default, mine.name
    # our additions cannot shift a positional call written for SB3
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in ours[len(sb3) :])
    assert {p.name for p in ours[len(sb3) :]} >= {"vf_clip_mode"}


def test_defaults_after_construction_equal_sb3_ppo() -> None:
    ours = ClippedPPO("MlpPolicy", "CartPole-v1")
    sb3 = PPO("MlpPolicy", "CartPole-v1")
    for attr in (
        "n_steps",
        "batch_size",
        "n_epochs",
        "gamma",
        "gae_lambda",
        "ent_coef",
        "vf_coef",
        "max_grad_norm",
        "use_sde",
        "sde_sample_freq",
        "target_kl",
        "normalize_advantage",
        "clip_range_vf",
        "verbose",
        "_stats_window_size",
    ):
        assert getattr(ours, attr) == getattr(sb3, attr), attr
    for progress in (1.0, 0.3):
        assert ours.clip_range(progress) == sb3.clip_range(progress)
        assert ours.lr_schedule(progress) == sb3.lr_schedule(progress)
    assert ours.vf_clip_mode == "max"
    assert ours.policy.optimizer.defaults["eps"] == sb3.policy.optimizer.defaults["eps"] == 1e-5
    assert sum(p.numel() for p in ours.policy.parameters()) == sum(p.numel() for p in sb3.policy.parameters())
    assert ours.rollout_buffer.buffer_size == sb3.rollout_buffer.buffer_size == 2048


def test_positional_arguments_written_for_sb3_work() -> None:
    # PPO(policy, env, learning_rate, n_steps, batch_size, n_epochs, gamma, gae_lambda, clip_range)
    model = ClippedPPO("MlpPolicy", cartpole(), 1e-3, 16, 8, 2, 0.95, 0.9, 0.1)
    assert (model.n_steps, model.batch_size, model.n_epochs, model.gamma, model.gae_lambda) == (16, 8, 2, 0.95, 0.9)
    assert model.clip_range(1.0) == 0.1 and model.lr_schedule(1.0) == 1e-3


def test_init_setup_model_false_and_setup_twice() -> None:
    model = ClippedPPO("MlpPolicy", cartpole(), _init_setup_model=False, **TINY)
    assert getattr(model, "policy", None) is None
    model._setup_model()
    model._setup_model()  # load() runs it again on a restored model: must stay valid
    assert model.clip_range(0.5) == 0.2
    model.learn(64)
    assert model.num_timesteps == 64


def test_same_seed_same_training() -> None:
    # torch's RNG is global (as in SB3): build and train one model after the other
    a = ClippedPPO("MlpPolicy", cartpole(seed=0), seed=3, **TINY).learn(128)
    b = ClippedPPO("MlpPolicy", cartpole(seed=0), seed=3, **TINY).learn(128)
    for name, param in a.policy.state_dict().items():
        assert th.equal(param, b.policy.state_dict()[name]), name


def test_stats_window_size_and_device() -> None:
    model = ClippedPPO("MlpPolicy", cartpole(), stats_window_size=7, device="cpu", **TINY)
    model.learn(640)
    assert model.ep_info_buffer.maxlen == 7 and len(model.ep_info_buffer) == 7
    assert model.device == th.device("cpu")


# -- advantage normalization modes ---------------------------------------------------------------------------


def train_once(
    mode, advantages: np.ndarray | None = None, batch_size: int = 16, n_steps: int = 32, buffer_class=None
) -> tuple[ClippedPPO, np.ndarray]:
    """Collect one rollout (same seed: same rollout), optionally overwrite its advantages, train one call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # batch sizes that do not divide the rollout
        model = ClippedPPO(
            "MlpPolicy",
            cartpole(),
            normalize_advantage=mode,
            n_steps=n_steps,
            batch_size=batch_size,
            n_epochs=2,
            seed=0,
            rollout_buffer_class=buffer_class,
        )
    collect(model)
    if advantages is not None:
        model.rollout_buffer.advantages[...] = advantages
    raw = model.rollout_buffer.advantages.copy()
    th.manual_seed(123)  # same minibatch order in every run
    model.train()
    return model, raw


def same_params(a: ClippedPPO, b: ClippedPPO, exact: bool = True) -> bool:
    state_b = b.policy.state_dict()
    if exact:
        return all(th.equal(p, state_b[k]) for k, p in a.policy.state_dict().items())
    return all(th.allclose(p, state_b[k], rtol=1e-5, atol=1e-6) for k, p in a.policy.state_dict().items())


def test_true_and_minibatch_are_the_same_mode() -> None:
    true, _ = train_once(True)
    minibatch, _ = train_once("minibatch")
    off, _ = train_once(False)
    assert same_params(true, minibatch)
    assert not same_params(true, off)


@pytest.mark.parametrize("buffer_class", [None, RolloutBuffer], ids=["our-buffer", "sb3-buffer"])
def test_batch_mode_normalizes_the_whole_rollout_once(buffer_class) -> None:
    """``"batch"`` on raw advantages == no normalisation on advantages normalised over the whole rollout."""
    batch, raw = train_once("batch", buffer_class=buffer_class)
    flat = raw.astype(np.float64)
    normalized = ((flat - flat.mean()) / (flat.std(ddof=1) + 1e-8)).astype(np.float32)
    reference, _ = train_once(False, advantages=normalized, buffer_class=buffer_class)
    assert same_params(batch, reference, exact=False)
    # (SB3's buffer reorders its arrays env-major once sampled: compare as multisets)
    stored = np.sort(np.asarray(batch.rollout_buffer.advantages).reshape(-1))
    np.testing.assert_allclose(stored, np.sort(normalized.reshape(-1)), rtol=1e-4, atol=1e-5)
    # several minibatches per epoch: per-batch and per-minibatch normalisation are different updates
    minibatch, _ = train_once("minibatch", buffer_class=buffer_class)
    assert not same_params(batch, minibatch, exact=False)


def test_per_minibatch_normalization_is_per_batch_for_a_single_minibatch() -> None:
    minibatch, raw = train_once("minibatch", batch_size=64)
    batch, _ = train_once("batch", batch_size=64)
    assert same_params(minibatch, batch, exact=False)
    np.testing.assert_array_equal(minibatch.rollout_buffer.advantages, raw)  # the buffer itself is untouched


def test_normalization_is_scale_invariant_and_off_is_not() -> None:
    """Normalised advantages do not care about the reward scale; raw ones do."""
    for mode, invariant in ((True, True), ("batch", True), (False, False)):
        base, raw = train_once(mode)
        scaled, _ = train_once(mode, advantages=raw * 100.0)
        assert same_params(base, scaled, exact=False) is invariant, mode


def test_minibatch_of_one_is_left_unchanged() -> None:
    """33 samples in minibatches of 16: the last holds one sample, whose std is undefined (NaN)."""
    model, _ = train_once(True, n_steps=33, batch_size=16)
    model_off, _ = train_once(False, n_steps=33, batch_size=16)
    assert all(th.isfinite(p).all() for p in model.policy.parameters())
    assert not same_params(model, model_off)


# -- value clipping switches ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fast_update", [True, False], ids=["fast-update", "autograd"])
def test_value_clipping_on_off_and_mode_change_the_loss_on_the_same_batch(fast_update: bool) -> None:
    """One full-batch minibatch, value head shifted after collection: the logged value loss is each form's."""
    model = ClippedPPO("MlpPolicy", cartpole(), n_steps=32, batch_size=64, n_epochs=1, seed=0, fast_update=fast_update)
    collect(model)
    buffer = model.rollout_buffer
    # shift V by the median of R - V_old: half the samples overshoot their return (max form = unclipped error),
    # half fall short of it (max form = clipped error), so the three forms differ
    shift = float(np.median(buffer.returns - buffer.values))
    assert shift > 0.2
    with th.no_grad():
        model.policy.value_net.bias += shift
    state = {k: v.clone() for k, v in model.policy.state_dict().items()}
    obs = th.as_tensor(buffer.observations.reshape(-1, 4))
    with th.no_grad():
        v_new = model.policy.predict_values(obs).flatten().double().numpy()
    v_old = buffer.values.reshape(-1).astype(np.float64)
    returns = buffer.returns.reshape(-1).astype(np.float64)
    v_clip = v_old + np.clip(v_new - v_old, -0.1, 0.1)
    expected = {
        "off": np.mean((v_new - returns) ** 2),
        "sb3": np.mean((v_clip - returns) ** 2),
        "max": np.mean(np.maximum((v_new - returns) ** 2, (v_clip - returns) ** 2)),
    }
    logged = {}
    for name in expected:
        model.policy.load_state_dict(state)
        model.clip_range_vf = None if name == "off" else FloatSchedule(0.1)
        model.vf_clip_mode = "max" if name == "off" else name
        logger, writer = recording_logger()
        model.set_logger(logger)
        model.train()
        logger.dump()
        logged[name] = writer.last("train/value_loss")
    for name, value in expected.items():
        assert logged[name] == pytest.approx(value, rel=1e-4), name
    assert logged["max"] > max(logged["off"], logged["sb3"]) + 1e-3


def test_vf_clip_mode_changes_training() -> None:
    runs = {}
    for mode in ("max", "sb3"):
        model = ClippedPPO("MlpPolicy", cartpole(), clip_range_vf=0.01, vf_clip_mode=mode, seed=0, **TINY)
        model.learn(128)
        runs[mode] = model.policy.value_net.weight.detach().clone()
    assert not th.equal(runs["max"], runs["sb3"])


# -- ortho_init, gradient clipping, target_kl ----------------------------------------------------------------


def test_ortho_init_switch_changes_singular_values() -> None:
    def hidden_singular_values(ortho: bool) -> th.Tensor:
        model = ClippedPPO("MlpPolicy", cartpole(), policy_kwargs=dict(ortho_init=ortho), seed=0, **TINY)
        return th.linalg.svdvals(model.policy.mlp_extractor.value_net[2].weight.detach().double())

    on, off = hidden_singular_values(True), hidden_singular_values(False)
    th.testing.assert_close(on, th.full_like(on, np.sqrt(2)), rtol=1e-5, atol=1e-6)
    assert (off - np.sqrt(2)).abs().max() > 0.5


def test_max_grad_norm_none_disables_clipping() -> None:
    def trained(max_grad_norm):
        return ClippedPPO("MlpPolicy", cartpole(), max_grad_norm=max_grad_norm, seed=0, **TINY).learn(128)

    unclipped = trained(None)
    assert same_params(unclipped, trained(1e12))
    assert not same_params(unclipped, trained(0.5))


def test_max_grad_norm_really_limits_the_step() -> None:
    """Adam normalises the gradient scale, but a gradient clipped far below its eps barely moves the weights."""
    moves = {}
    for max_grad_norm in (None, 1e-9):
        model = ClippedPPO("MlpPolicy", cartpole(), max_grad_norm=max_grad_norm, seed=0, **TINY)
        before = model.policy.action_net.weight.detach().clone()
        model.learn(128)
        moves[max_grad_norm] = (model.policy.action_net.weight.detach() - before).abs().max().item()
    assert moves[1e-9] < 1e-3 * moves[None]


def _count_optimizer_steps(model) -> list[int]:
    steps: list[int] = []
    original = model.policy.optimizer.step
    model.policy.optimizer.step = lambda *a, **k: (steps.append(1), original(*a, **k))[1]
    return steps


@pytest.mark.parametrize("algo", [ClippedPPO, PPO], ids=["ClippedPPO", "sb3-PPO"])
def test_target_kl_early_stopping_stops(algo, capsys: pytest.CaptureFixture[str]) -> None:
    # 4 minibatches per epoch, 10 epochs; the first minibatch has KL 0, the second exceeds 1.5 * 1e-6
    model = algo("MlpPolicy", cartpole(), n_steps=32, batch_size=16, n_epochs=10, target_kl=1e-6, verbose=1, seed=0)
    steps = _count_optimizer_steps(model)
    model.learn(64)
    assert model._n_updates == 1
    assert len(steps) == 1
    assert "Early stopping at step 0" in capsys.readouterr().out


def test_without_target_kl_every_epoch_runs() -> None:
    model = ClippedPPO("MlpPolicy", cartpole(), n_steps=32, batch_size=16, n_epochs=10, seed=0)
    steps = _count_optimizer_steps(model)
    model.learn(64)
    assert model._n_updates == 10 and len(steps) == 40


def test_target_kl_stops_later_with_a_looser_bound() -> None:
    """A looser target lets more updates through before the KL check fires."""
    counts = {}
    for target in (1e-6, 0.005):
        model = ClippedPPO(
            "MlpPolicy",
            cartpole(),
            n_steps=64,
            batch_size=16,
            n_epochs=20,
            target_kl=target,
            learning_rate=3e-3,
            seed=0,
        )
        steps = _count_optimizer_steps(model)
        model.learn(128)
        counts[target] = len(steps)
        assert model._n_updates == len(steps) // 8 + 1  # 8 minibatches per epoch; stopped inside the last one
    assert counts[1e-6] == 1
    assert 1 < counts[0.005] < 20 * 8


# -- schedules -----------------------------------------------------------------------------------------------


def test_linear_schedule_values() -> None:
    schedule = linear(3e-4)
    assert isinstance(schedule, LinearDecay)
    assert schedule(1.0) == pytest.approx(3e-4)
    assert schedule(0.5) == pytest.approx(1.5e-4)
    assert schedule(0.0) == 0.0
    # progress overshoots slightly below 0 on the last rollout: clamped, never negative
    assert schedule(-0.01) == 0.0 and schedule(1.2) == pytest.approx(3e-4)
    assert linear(0.3, 0.1)(0.5) == pytest.approx(0.2)
    assert ConstantSchedule(0.7)(0.1) == 0.7


def test_parse_schedule_reads_rl_zoo_strings() -> None:
    assert parse_schedule("lin_3e-4") == linear(3e-4)
    assert parse_schedule("0.25") == 0.25
    assert parse_schedule(0.1) == 0.1


def test_schedules_pickle_and_drive_training() -> None:
    for schedule in (linear(1e-3), ConstantSchedule(0.2)):
        for restored in (pickle.loads(pickle.dumps(schedule)), cloudpickle.loads(cloudpickle.dumps(schedule))):
            assert [restored(p) for p in (1.0, 0.5, 0.0)] == [schedule(p) for p in (1.0, 0.5, 0.0)]
    model = ClippedPPO("MlpPolicy", cartpole(), learning_rate=linear(1e-3), clip_range=linear(0.2), **TINY)
    logger, writer = recording_logger()
    model.set_logger(logger)
    model.learn(128)  # two rollouts: train() runs at progress 0.5 and 0.0
    assert model.policy.optimizer.param_groups[0]["lr"] == pytest.approx(0.0)
    assert writer.last("train/learning_rate") == pytest.approx(5e-4)
    assert writer.last("train/clip_range") == pytest.approx(0.1)


def test_rl_zoo_cartpole_schedule_runs_to_the_end_of_training() -> None:
    """The last rollout overshoots total_timesteps; linear schedules must not fail there."""
    model = ClippedPPO(
        "MlpPolicy", cartpole(), learning_rate=linear(1e-3), clip_range=linear(0.2), n_steps=16, batch_size=32
    )
    model.learn(40)  # 48 steps collected: progress ends at -0.2
    assert model.num_timesteps == 64 or model.num_timesteps == 48
