"""Recurrent (LSTM) policies: against sb3-contrib's RecurrentActorCriticPolicy, sequences, rollouts, masks, errors."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from gymnasium.wrappers import TimeLimit
from sb3_contrib.common.envs import InvalidActionEnvDiscrete
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy as TheirPolicy
from sb3_contrib.common.recurrent.type_aliases import RNNStates
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext.backends import select_backend
from sb3_ppo_ext.errors import ConfigurationError
from sb3_ppo_ext.recurrent.buffers import RecurrentGAERolloutBuffer
from sb3_ppo_ext.recurrent.policies import RecurrentActorCriticPolicy
from sb3_ppo_ext.recurrent.sequences import LSTMStates, Sequences, Step, sequence_layout
from tests.conftest import CounterEnv, DictObsEnv, ImageEnv

TINY = dict(n_steps=32, batch_size=16, n_epochs=2, device="cpu")
SMALL_LSTM = dict(lstm_hidden_size=8, net_arch=[16])


def _lr(_: float) -> float:
    return 1e-3


def _policies(action_space: spaces.Space, **kwargs) -> tuple[RecurrentActorCriticPolicy, TheirPolicy]:
    """Ours and sb3-contrib's policy with the same architecture and the same weights."""
    obs_space = spaces.Box(-1, 1, (5,), np.float32)
    th.manual_seed(0)
    theirs = TheirPolicy(obs_space, action_space, _lr, **kwargs)
    ours = RecurrentActorCriticPolicy(obs_space, action_space, _lr, **kwargs)
    ours.load_state_dict(theirs.state_dict())  # strict: same modules under the same names
    return ours, theirs


def _random_states(n_layers: int, batch: int, hidden: int) -> tuple[th.Tensor, th.Tensor]:
    return th.randn(n_layers, batch, hidden), th.randn(n_layers, batch, hidden)


CRITICS = [
    dict(enable_critic_lstm=True),
    dict(enable_critic_lstm=False, shared_lstm=True),
    dict(enable_critic_lstm=False, shared_lstm=False),
]
CRITIC_IDS = ["critic_lstm", "shared_lstm", "no_critic_lstm"]


# -- against sb3-contrib ------------------------------------------------------------------------------------


@pytest.mark.parametrize("critic", CRITICS, ids=CRITIC_IDS)
@pytest.mark.parametrize(
    "action_space", [spaces.Discrete(3), spaces.Box(-1, 1, (2,), np.float32)], ids=["discrete", "box"]
)
def test_evaluate_actions_matches_sb3_contrib_with_episode_starts_inside_sequences(action_space, critic) -> None:
    ours, theirs = _policies(action_space, n_lstm_layers=2, **SMALL_LSTM, **critic)
    n_seq, length = 3, 6
    obs = th.randn(n_seq * length, 5)
    actions = th.as_tensor(np.stack([action_space.sample() for _ in range(n_seq * length)]))
    starts = th.zeros(n_seq * length)
    starts[[0, 4, 9, 10]] = 1.0  # a reset at a sequence's first step, and inside sequences
    states = RNNStates(_random_states(2, n_seq, 8), _random_states(2, n_seq, 8))
    expected = theirs.evaluate_actions(obs, actions, states, starts)
    got = ours.evaluate_actions(obs, actions, LSTMStates(*states), starts)
    for mine, their in zip(got, expected, strict=True):
        th.testing.assert_close(mine.flatten(), their.flatten())


@pytest.mark.parametrize("critic", CRITICS, ids=CRITIC_IDS)
def test_step_by_step_acting_and_values_match_sb3_contrib(critic) -> None:
    ours, theirs = _policies(spaces.Discrete(4), **SMALL_LSTM, **critic)
    n_envs = 4
    states = RNNStates(_random_states(1, n_envs, 8), _random_states(1, n_envs, 8))
    ours_states = LSTMStates(*states)
    for step in range(5):
        obs = th.randn(n_envs, 5)
        starts = th.tensor([step == 0, step == 2, 0.0, step % 2 == 1], dtype=th.float32)
        th.manual_seed(step)
        their_actions, their_values, their_log_prob, states = theirs(obs, states, starts)
        th.manual_seed(step)
        actions, values, log_prob, ours_states = ours(obs, ours_states, starts)
        th.testing.assert_close(actions, their_actions)
        th.testing.assert_close(values, their_values)
        th.testing.assert_close(log_prob, their_log_prob)
        for mine, their in zip((*ours_states.pi, *ours_states.vf), (*states.pi, *states.vf), strict=True):
            th.testing.assert_close(mine, their)
        th.testing.assert_close(
            ours.predict_values(obs, ours_states.vf, starts), theirs.predict_values(obs, states.vf, starts)
        )


def test_predict_matches_sb3_contrib_states_included() -> None:
    ours, theirs = _policies(spaces.Box(-2, 2, (2,), np.float32), **SMALL_LSTM)
    rng = np.random.default_rng(0)
    our_state = their_state = None
    for step in range(6):
        obs = rng.uniform(-1, 1, (3, 5)).astype(np.float32)
        starts = np.array([step == 0, step == 3, False])
        actions, our_state = ours.predict(obs, our_state, starts, deterministic=True)
        their_actions, their_state = theirs.predict(obs, their_state, starts, deterministic=True)
        np.testing.assert_allclose(actions, their_actions, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(our_state[0], their_state[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(our_state[1], their_state[1], rtol=1e-5, atol=1e-6)


# -- sequences ----------------------------------------------------------------------------------------------


def test_sequence_layout_places_rows_on_the_grid() -> None:
    starts = np.array([1, 0, 0, 1, 0, 1], dtype=bool)  # sequences of 3, 2 and 1 rows
    position, first_rows, length, count = sequence_layout(starts)
    assert (length, count) == (3, 3)
    np.testing.assert_array_equal(first_rows, [0, 3, 5])
    # row -> (t, k): (0,0) (1,0) (2,0) (0,1) (1,1) (0,2); position = t * K + k
    np.testing.assert_array_equal(position, [0, 3, 6, 1, 4, 2])


def test_a_sequence_spanning_two_episodes_equals_the_two_episodes_run_separately() -> None:
    """The reset at an episode start inside a sb3-contrib-layout sequence gives the same outputs as two runs."""
    policy, _ = _policies(spaces.Discrete(3), **SMALL_LSTM)
    obs = th.randn(7, 5)
    actions = th.randint(0, 3, (7,))
    starts = th.tensor([1, 0, 0, 1, 0, 0, 0], dtype=th.float32)  # episode A: rows 0-2, episode B: rows 3-6
    zeros = policy.initial_state(1)
    together = policy.evaluate_actions(obs, actions, zeros, starts)
    first = policy.evaluate_actions(obs[:3], actions[:3], zeros, starts[:3])
    garbage = LSTMStates(_random_states(1, 1, 8), _random_states(1, 1, 8))  # reset away by the episode start
    second = policy.evaluate_actions(obs[3:], actions[3:], garbage, starts[3:])
    for joint, *parts in zip(together, first, second, strict=True):
        th.testing.assert_close(joint, th.cat(parts))


def test_sequences_and_single_steps_give_the_same_outputs() -> None:
    """Sequences.run on a padded grid equals stepping the LSTM one step at a time (Step.run), per sequence."""
    lstm = th.nn.LSTM(4, 6, num_layers=2)
    starts = np.array([1, 0, 0, 0, 1, 1, 0], dtype=bool)  # lengths 4, 1, 2
    first = LSTMStates(_random_states(2, 3, 6), _random_states(2, 3, 6))
    reset = np.array([False, True, False])
    sequences = Sequences.from_starts(starts, first, reset)
    features = th.randn(7, 4)
    out, _ = sequences.run(lstm, features, sequences.initial_pi)
    expected = []
    for k, (begin, end) in enumerate([(0, 4), (4, 5), (5, 7)]):
        state = first.pi[0][:, k : k + 1], first.pi[1][:, k : k + 1]
        step = Step.after(LSTMStates(state, state), th.tensor([float(reset[k])]))
        state = step.initial_pi
        for row in range(begin, end):
            output, state = Step(state, state).run(lstm, features[row : row + 1], state)
            expected.append(output)
    th.testing.assert_close(out, th.cat(expected))


# -- the rollout buffer and the rollout ----------------------------------------------------------------------


def _recurrent_model(env, **kwargs) -> ClippedPPO:
    settings = {**TINY, **kwargs}
    policy_kwargs = settings.pop("policy_kwargs", SMALL_LSTM)
    return ClippedPPO("MlpLstmPolicy", env, seed=0, policy_kwargs=policy_kwargs, **settings)


def _rollout(model: ClippedPPO) -> RecurrentGAERolloutBuffer:
    """One rollout with the model's current parameters, no update."""
    _, callback = model._setup_learn(model.n_steps * model.n_envs)
    model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
    return model.rollout_buffer


def _filled_buffer(sequence_length: int | None = None) -> tuple[ClippedPPO, RecurrentGAERolloutBuffer]:
    env = make_vec_env("CartPole-v1", n_envs=3, seed=0)
    model = _recurrent_model(env, n_steps=40, rollout_buffer_kwargs=dict(sequence_length=sequence_length))
    return model, _rollout(model)


@pytest.mark.parametrize("batch_size", [7, 32, 120])
@pytest.mark.parametrize("sequence_length", [None, 5])
def test_training_time_evaluation_reproduces_the_rollouts_log_probs_and_values(batch_size, sequence_length) -> None:
    """Every minibatch of sequences, evaluated with the rollout's parameters, gives back the stored log pi and V.

    The rollout stepped each env through its episodes with (reset) states; training sees shuffled, cut and
    padded sequences with stored first states: the two must agree row for row.
    """
    model, buffer = _filled_buffer(sequence_length)
    assert buffer.episode_starts[1:].any()  # CartPole episodes ended inside the rollout
    seen = []
    with th.no_grad():
        for batch in buffer.get(batch_size):
            assert batch.observations.shape[0] <= batch_size
            values, log_prob, _ = model.policy.evaluate_actions(
                batch.observations, batch.actions.long().flatten(), sequences=batch.sequences
            )
            th.testing.assert_close(log_prob, batch.old_log_prob, rtol=1e-5, atol=1e-5)
            th.testing.assert_close(values.flatten(), batch.old_values, rtol=1e-5, atol=1e-5)
            if sequence_length is not None:
                assert batch.sequences.max_length <= sequence_length
            seen.append(batch.old_log_prob)
    assert sum(len(x) for x in seen) == 120
    # every row once: the stored log-probs come out as a permutation
    th.testing.assert_close(th.cat(seen).sort().values, th.as_tensor(buffer.log_probs.reshape(-1)).sort().values)


def test_sequences_never_cross_an_episode_start_and_follow_one_env() -> None:
    _, buffer = _filled_buffer()
    rows, begins = buffer._shuffled_stream()
    assert sorted(rows.tolist()) == list(range(120))
    starts = buffer.episode_starts.reshape(-1)
    for row, begin, previous in zip(rows[1:], begins[1:], rows[:-1], strict=True):
        if not begin:
            assert row == previous + buffer.n_envs  # the next step of the same env
            assert not starts[row]  # a sequence continues only inside an episode


def test_first_states_are_the_stored_ones_or_zero_at_an_episode_start() -> None:
    _, buffer = _filled_buffer()
    rows = np.arange(120)
    batch = buffer._get_samples(rows)
    sequences = batch.sequences
    first_rows = rows[np.r_[True, (buffer.episode_starts.reshape(-1)[1:] > 0) | (rows[1:] != rows[:-1] + 3)]]
    stored = th.as_tensor(buffer.lstm_states.reshape(120, 4, 1, 8))[first_rows]
    keep = th.as_tensor(buffer.episode_starts.reshape(-1)[first_rows] == 0, dtype=th.float32).view(-1, 1)
    th.testing.assert_close(sequences.initial_pi[0][0], stored[:, 0, 0] * keep)
    th.testing.assert_close(sequences.initial_vf[1][0], stored[:, 3, 0] * keep)


def test_truncations_bootstrap_with_the_critic_state_after_the_last_step() -> None:
    """r_T + gamma * V(s_T | h_T): the critic's state continues the episode into the terminal observation."""
    env = DummyVecEnv([lambda: TimeLimit(CounterEnv(), max_episode_steps=5)])
    model = _recurrent_model(env, n_steps=12, gamma=0.9)
    buffer = _rollout(model)
    rewards = buffer.rewards[:, 0]
    truncated_steps = np.flatnonzero(rewards != 1.0)
    assert len(truncated_steps) >= 1  # episode 0 runs to the time limit
    t = int(truncated_steps[0])
    episode_begin = int(np.flatnonzero(buffer.episode_starts[: t + 1, 0])[-1])
    # replay the episode step by step with the rollout's parameters
    policy = model.policy
    state = policy.initial_state(1)
    with th.no_grad():
        for step in range(episode_begin, t + 1):
            obs = th.as_tensor(buffer.observations[step])
            _, _, _, state = policy(obs, state, th.tensor([float(step == episode_begin)]))
        terminal_obs = th.tensor([[(t - episode_begin + 1) / 10.0]])
        expected_value = policy.predict_values(terminal_obs, state.vf, th.zeros(1)).item()
    assert rewards[t] == pytest.approx(1.0 + 0.9 * expected_value, rel=1e-5, abs=1e-6)


# -- ClippedPPO with recurrent policies ------------------------------------------------------------------------


def test_masks_and_lstm_never_take_a_masked_action() -> None:
    model = _recurrent_model(InvalidActionEnvDiscrete(dim=8, n_invalid_actions=5), n_steps=64)
    model.learn(128)
    buffer = model.rollout_buffer
    assert buffer.action_masks is not None and buffer.lstm_states is not None
    actions = buffer.actions.reshape(-1).astype(int)
    masks = buffer.action_masks.reshape(-1, 8)
    assert masks[np.arange(len(actions)), actions].all()
    batch = next(buffer.get(16))
    assert batch.action_masks.shape == (16, 8) and batch.sequences is not None
    obs = model.env.reset()
    mask = np.zeros((1, 8), dtype=bool)
    mask[0, 3] = True
    for deterministic in (True, False):
        action, state = model.predict(obs, None, np.ones(1, bool), deterministic=deterministic, action_masks=mask)
        assert action.tolist() == [3] and state[0].shape == (1, 1, 8)


def test_saved_recurrent_model_predicts_the_same_with_states(tmp_path) -> None:
    env = make_vec_env("CartPole-v1", n_envs=2, seed=0)
    model = _recurrent_model(
        env, policy_kwargs=dict(lstm_hidden_size=8, n_lstm_layers=2, shared_lstm=True, enable_critic_lstm=False)
    )
    model.learn(64)
    model.save(tmp_path / "model.zip")
    loaded = ClippedPPO.load(tmp_path / "model.zip", device="cpu")
    assert isinstance(loaded.policy, RecurrentActorCriticPolicy) and loaded.policy.n_lstm_layers == 2
    obs = env.reset()
    state_a = state_b = None
    starts = np.ones(2, dtype=bool)
    for _ in range(10):
        action_a, state_a = model.predict(obs, state_a, starts, deterministic=True)
        action_b, state_b = loaded.predict(obs, state_b, starts, deterministic=True)
        np.testing.assert_array_equal(action_a, action_b)
        np.testing.assert_array_equal(state_a[0], state_b[0])
        obs, _, starts, _ = env.step(action_a)


def test_evaluate_policy_threads_the_states() -> None:
    model = _recurrent_model(make_vec_env("CartPole-v1", n_envs=2, seed=0))
    model.learn(64)
    mean, _ = evaluate_policy(model, model.get_env(), n_eval_episodes=2)
    assert mean > 0


@pytest.mark.parametrize(
    ("policy", "env", "kwargs"),
    [
        ("MultiInputLstmPolicy", DictObsEnv(), {}),
        ("CnnLstmPolicy", ImageEnv(), dict(features_extractor_kwargs=dict(features_dim=16))),
        ("MlpLstmPolicy", gym.make("Pendulum-v1"), dict(use_sde=True)),
    ],
    ids=["dict", "image", "gsde"],
)
def test_dict_image_and_gsde_policies_train(policy, env, kwargs) -> None:
    use_sde = kwargs.pop("use_sde", False)
    model = ClippedPPO(policy, env, seed=0, use_sde=use_sde, policy_kwargs={**SMALL_LSTM, **kwargs}, **TINY)
    before = [p.detach().clone() for p in model.policy.lstm_actor.parameters()]
    model.learn(64)
    assert any(not th.equal(a, b) for a, b in zip(before, model.policy.lstm_actor.parameters(), strict=True))


def test_vecnormalize_and_a_loaded_model_with_more_envs(tmp_path) -> None:
    env = VecNormalize(make_vec_env("CartPole-v1", n_envs=2, seed=0))
    model = _recurrent_model(env)
    model.learn(64)
    model.save(tmp_path / "model")
    loaded = ClippedPPO.load(tmp_path / "model", env=VecNormalize(make_vec_env("CartPole-v1", n_envs=4, seed=1)))
    loaded.learn(128)  # the states follow the new number of envs
    assert loaded._last_lstm_states.pi[0].shape[1] == 4


def test_fast_update_is_not_used_for_lstms() -> None:
    from sb3_ppo_ext.backends import AutogradBackend

    model = _recurrent_model("CartPole-v1")
    assert isinstance(select_backend(model.policy, model.fast_update), AutogradBackend)


def test_invalid_recurrent_settings_get_sb3_contribs_errors() -> None:
    with pytest.raises(AssertionError, match="choose between shared LSTM"):
        _recurrent_model("CartPole-v1", policy_kwargs=dict(shared_lstm=True, enable_critic_lstm=True))
    with pytest.raises(ValueError, match="LSTM cannot be shared"):
        _recurrent_model(
            "CartPole-v1",
            policy_kwargs=dict(shared_lstm=True, enable_critic_lstm=False, share_features_extractor=False),
        )
    with pytest.raises(ConfigurationError, match="cannot store the LSTM states"):
        _recurrent_model("CartPole-v1", rollout_buffer_class=RolloutBuffer)


def test_predict_with_states_for_other_envs_is_a_clear_error() -> None:
    model = _recurrent_model("CartPole-v1")
    obs = np.zeros((2, 4), dtype=np.float32)
    state = (np.zeros((1, 3, 8), np.float32), np.zeros((1, 3, 8), np.float32))
    with pytest.raises(ValueError, match="states for 3 env"):
        model.predict(obs, state)


class CueEnv(gym.Env):
    """A cue (one of two) shown at the first step only; the action at the third step must name it (reward 1)."""

    metadata: dict = {"render_modes": []}

    def __init__(self, delay: int = 3) -> None:
        super().__init__()
        self.observation_space = spaces.Box(0, 1, (3,), np.float32)
        self.action_space = spaces.Discrete(2)
        self.delay = delay
        self.cue = self.t = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.cue, self.t = int(self.np_random.integers(2)), 0
        obs = np.zeros(3, np.float32)
        obs[self.cue] = 1
        return obs, {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        self.t += 1
        obs = np.zeros(3, np.float32)
        if self.t < self.delay:
            return obs, 0.0, False, False, {}
        obs[2] = 1  # "answer now"
        return obs, float(int(action) == self.cue), True, False, {}


@pytest.mark.parametrize(("policy", "solved"), [("MlpLstmPolicy", True), ("MlpPolicy", False)])
def test_an_lstm_learns_to_recall_a_cue_that_a_feed_forward_policy_cannot(policy, solved) -> None:
    env = make_vec_env(CueEnv, n_envs=8, seed=0)
    kwargs = dict(policy_kwargs=dict(lstm_hidden_size=16, net_arch=[16])) if solved else {}
    model = ClippedPPO(policy, env, n_steps=32, batch_size=64, n_epochs=4, learning_rate=3e-3, seed=0, **kwargs)
    model.learn(8000)
    mean, _ = evaluate_policy(model, make_vec_env(CueEnv, n_envs=1, seed=5), n_eval_episodes=100)
    if solved:
        assert mean >= 0.95
    else:
        assert mean <= 0.65  # chance is 0.5: the task needs memory
