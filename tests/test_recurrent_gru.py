"""GRU recurrent policies (``rnn_type="gru"``, ``MlpGruPolicy``; issue 28, sb3-contrib #295, SB3 #2215).

The GRU's step is checked against the GRU equations written out with ``torch.nn.functional``; training's
sequences against the rollout's steps; masks, save/load, ``predict`` with states and the exported graphs against
``predict``; and a GRU learns the cue-recall task that a feed-forward policy cannot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch as th
import torch.nn.functional as F
from sb3_contrib.common.envs import InvalidActionEnvDiscrete
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import DummyVecEnv
from torch import nn

from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext.errors import ConfigurationError, ParameterMismatchError
from sb3_ppo_ext.export import read_metadata, to_onnx, to_torchscript
from sb3_ppo_ext.recurrent.policies import MlpGruPolicy, PairedStateGRU, RecurrentActorCriticPolicy
from sb3_ppo_ext.recurrent.sequences import LSTMStates
from tests.test_recurrent import CueEnv

TINY = dict(n_steps=32, batch_size=16, n_epochs=2, device="cpu", seed=0)
GRU = dict(lstm_hidden_size=8, net_arch=[16], rnn_type="gru")


def gru_model(env: Any, **policy_kwargs: Any) -> ClippedPPO:
    return ClippedPPO("MlpLstmPolicy", env, policy_kwargs={**GRU, **policy_kwargs}, **TINY)


def gru_by_hand(gru: nn.GRU, x: th.Tensor, h: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
    """One step of a stacked GRU from its equations (PyTorch's gate order r, z, n): the output and every layer's h.

    r = sigmoid(W_ir x + b_ir + W_hr h + b_hr), z = sigmoid(W_iz x + b_iz + W_hz h + b_hz),
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn)), h' = (1 - z) * n + z * h.
    """
    layer_input, new_h = x, []
    for layer in range(gru.num_layers):
        gates_x = F.linear(layer_input, getattr(gru, f"weight_ih_l{layer}"), getattr(gru, f"bias_ih_l{layer}"))
        gates_h = F.linear(h[layer], getattr(gru, f"weight_hh_l{layer}"), getattr(gru, f"bias_hh_l{layer}"))
        x_r, x_z, x_n = gates_x.chunk(3, dim=1)
        h_r, h_z, h_n = gates_h.chunk(3, dim=1)
        r, z = th.sigmoid(x_r + h_r), th.sigmoid(x_z + h_z)
        n = th.tanh(x_n + r * h_n)
        layer_input = (1 - z) * n + z * h[layer]
        new_h.append(layer_input)
    return layer_input, th.stack(new_h)


def test_the_recurrent_layers_are_grus_and_lstm_stays_the_default() -> None:
    env = make_vec_env("CartPole-v1", n_envs=2, seed=0)
    gru = gru_model(env).policy
    assert isinstance(gru.lstm_actor, PairedStateGRU) and isinstance(gru.lstm_critic, nn.GRU)
    assert gru.lstm_actor.weight_ih_l0.shape == (3 * 8, 4)  # three gates (r, z, n)
    lstm = ClippedPPO("MlpLstmPolicy", env, policy_kwargs=dict(lstm_hidden_size=8), **TINY).policy
    assert type(lstm.lstm_actor) is nn.LSTM and lstm.rnn_type == "lstm"
    assert "rnn_type" not in lstm._get_constructor_parameters()  # an LSTM's saved keywords stay sb3-contrib's
    # the class and the option build the same policy
    by_class = ClippedPPO(MlpGruPolicy, env, policy_kwargs=dict(lstm_hidden_size=8, net_arch=[16]), **TINY).policy
    assert by_class.rnn_type == "gru"
    for (name, a), (_, b) in zip(gru.state_dict().items(), by_class.state_dict().items(), strict=True):
        assert th.equal(a, b), name


@pytest.mark.parametrize("critic", ["critic_gru", "shared_gru"])
def test_a_step_equals_the_gru_equations_with_resets(critic: str) -> None:
    kwargs = dict(n_lstm_layers=2)
    if critic == "shared_gru":
        kwargs.update(shared_lstm=True, enable_critic_lstm=False)
    model = gru_model(make_vec_env("CartPole-v1", n_envs=3, seed=0), **kwargs)
    policy = model.policy
    generator = th.Generator().manual_seed(0)
    obs = th.randn(3, 4, generator=generator)
    h_pi, h_vf = th.randn(2, 3, 8, generator=generator), th.randn(2, 3, 8, generator=generator)
    starts = th.tensor([0.0, 1.0, 0.0])  # env 1 starts an episode: its state is reset to zeros
    garbage_c = th.full((2, 3, 8), 5.0)  # a GRU has no cell state: c is not read
    keep = (1 - starts).view(1, 3, 1)
    with th.no_grad():
        out_pi, expected_h_pi = gru_by_hand(policy.lstm_actor, obs, h_pi * keep)
        logits = policy.action_net(policy.mlp_extractor.forward_actor(out_pi))
        actions, (h, c) = policy.predict(obs.numpy(), (h_pi.numpy(), garbage_c.numpy()), starts.numpy(), True)
        np.testing.assert_allclose(h, expected_h_pi.numpy(), rtol=0, atol=1e-6)
        assert not c.any()
        np.testing.assert_array_equal(actions, logits.argmax(dim=1).numpy())
        # the rollout's step: actions, values and both memories at once
        critic_lstm = policy.lstm_critic if critic == "critic_gru" else policy.lstm_actor
        out_vf, expected_h_vf = gru_by_hand(critic_lstm, obs, (h_vf if critic == "critic_gru" else h_pi) * keep)
        states = LSTMStates((h_pi, garbage_c), (h_vf if critic == "critic_gru" else h_pi, garbage_c))
        _, values, _, after = policy(obs, states, starts, deterministic=True)
        expected_values = policy.value_net(policy.mlp_extractor.forward_critic(out_vf))
        th.testing.assert_close(values, expected_values, rtol=0, atol=1e-6)
        th.testing.assert_close(after.pi[0], expected_h_pi, rtol=0, atol=1e-6)
        th.testing.assert_close(after.vf[0], expected_h_vf, rtol=0, atol=1e-6)


@pytest.mark.parametrize("batch_size", [7, 120])
def test_training_sequences_reproduce_the_rollouts_log_probs_and_values(batch_size: int) -> None:
    """Shuffled, cut and padded sequences through the GRU give back what the rollout's steps computed."""
    settings = {**TINY, "n_steps": 40, "batch_size": 24}
    model = ClippedPPO("MlpLstmPolicy", make_vec_env("CartPole-v1", n_envs=3, seed=0), policy_kwargs=GRU, **settings)
    _, callback = model._setup_learn(120)
    model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
    buffer = model.rollout_buffer
    assert buffer.episode_starts[1:].any()
    with th.no_grad():
        for batch in buffer.get(batch_size):
            values, log_prob, _ = model.policy.evaluate_actions(
                batch.observations, batch.actions.long().flatten(), sequences=batch.sequences
            )
            th.testing.assert_close(log_prob, batch.old_log_prob, rtol=1e-5, atol=1e-5)
            th.testing.assert_close(values.flatten(), batch.old_values, rtol=1e-5, atol=1e-5)


def test_masks_and_gru_never_take_a_masked_action() -> None:
    model = gru_model(InvalidActionEnvDiscrete(dim=8, n_invalid_actions=5))
    model.learn(96)
    buffer = model.rollout_buffer
    actions = buffer.actions.reshape(-1).astype(int)
    assert buffer.action_masks.reshape(-1, 8)[np.arange(len(actions)), actions].all()
    obs = model.env.reset()
    mask = np.zeros((1, 8), dtype=bool)
    mask[0, 3] = True
    for deterministic in (True, False):
        action, state = model.predict(obs, None, np.ones(1, bool), deterministic=deterministic, action_masks=mask)
        assert action.tolist() == [3] and state[0].shape == (1, 1, 8) and not state[1].any()


def test_saved_gru_model_loads_as_a_gru_and_predicts_the_same_with_states(tmp_path: Path) -> None:
    env = make_vec_env("CartPole-v1", n_envs=2, seed=0)
    model = gru_model(env, n_lstm_layers=2)
    model.learn(64)
    model.save(tmp_path / "gru.zip")
    loaded = ClippedPPO.load(tmp_path / "gru.zip", device="cpu")
    assert loaded.policy.rnn_type == "gru" and isinstance(loaded.policy.lstm_actor, PairedStateGRU)
    obs, starts = env.reset(), np.ones(2, dtype=bool)
    state_a = state_b = None
    for _ in range(10):
        action_a, state_a = model.predict(obs, state_a, starts, deterministic=True)
        action_b, state_b = loaded.predict(obs, state_b, starts, deterministic=True)
        np.testing.assert_array_equal(action_a, action_b)
        np.testing.assert_array_equal(state_a[0], state_b[0])
        obs, _, starts, _ = env.step(action_a)
    # a GRU's weights do not fit an LSTM (3 gates, not 4): refused, nothing loaded
    lstm = ClippedPPO("MlpLstmPolicy", env, policy_kwargs=dict(GRU, rnn_type="lstm", n_lstm_layers=2), **TINY)
    before = {k: v.clone() for k, v in lstm.policy.state_dict().items()}
    with pytest.raises(ParameterMismatchError, match=r"lstm_actor\.weight_ih_l0 \(24, 4\) \(the model's \(32, 4\)\)"):
        lstm.set_parameters(str(tmp_path / "gru.zip"))
    assert all(th.equal(before[k], v) for k, v in lstm.policy.state_dict().items())


def test_an_lstm_chosen_on_a_gru_policy_class_is_saved_as_an_lstm(tmp_path: Path) -> None:
    model = ClippedPPO(
        MlpGruPolicy, make_vec_env("CartPole-v1", n_envs=1), policy_kwargs=dict(GRU, rnn_type="lstm"), **TINY
    )
    model.save(tmp_path / "model.zip")
    assert type(ClippedPPO.load(tmp_path / "model.zip").policy.lstm_actor) is nn.LSTM


def test_an_unknown_rnn_type_is_refused_by_name() -> None:
    with pytest.raises(ConfigurationError, match=r"rnn_type='rnn' is invalid: pass 'lstm' .* or 'gru'"):
        gru_model(make_vec_env("CartPole-v1", n_envs=1), rnn_type="rnn")


# -- export --------------------------------------------------------------------------------------------


def roll_exported_gru(model: ClippedPPO, venv: DummyVecEnv, tmp_path: Path, with_value: bool, masks: bool) -> None:
    """``predict`` (and the rollout's ``forward``) against the TorchScript and ONNX graphs, each carrying its own h.

    The env's observations are ``Discrete`` indices (int64 inputs, one-hot encoded in the graph).
    """
    options = dict(with_value=with_value, action_masks=masks)
    modules = {"torchscript": th.jit.load(str(to_torchscript(model, tmp_path / "gru.pt", **options)))}
    try:
        import onnxruntime as ort

        session = ort.InferenceSession(str(to_onnx(model, tmp_path / "gru.onnx", **options)))
        modules["onnx"] = session
    except ImportError:
        pass
    policy, n_envs = model.policy, venv.num_envs
    critic_state = with_value and policy.lstm_critic is not None
    zeros = np.zeros((policy.n_lstm_layers, n_envs, policy.lstm_hidden_size), np.float32)
    state, reference = (zeros, zeros), LSTMStates((th.as_tensor(zeros),) * 2, (th.as_tensor(zeros),) * 2)
    carried = {name: [zeros] * (2 if critic_state else 1) for name in modules}
    obs, starts, n_starts = venv.reset(), np.ones(n_envs, np.float32), 0
    for _ in range(20):
        extra = {"action_masks": np.stack(venv.env_method("action_masks"))} if masks else {}
        action, state = model.predict(obs, state, starts, deterministic=True, **extra)
        want = [action, state[0]]
        if with_value:
            with th.no_grad():
                obs_tensor = policy.obs_to_tensor(obs)[0]
                _, value, _, reference = policy(obs_tensor, reference, th.as_tensor(starts), True, **extra)
            want.append(value.numpy())
            if critic_state:
                want.append(reference.vf[0].numpy())
        for name, module in modules.items():
            inputs = [np.asarray(obs, np.int64), carried[name][0], starts, *extra.values(), *carried[name][1:]]
            if name == "onnx":
                got = module.run(None, {i.name: x for i, x in zip(module.get_inputs(), inputs, strict=True)})
            else:
                got = [t.numpy() for t in module(*[th.as_tensor(x) for x in inputs])]
            assert len(got) == len(want), name
            np.testing.assert_array_equal(got[0], want[0], err_msg=name)
            for have, expected in zip(got[1:], want[1:], strict=True):
                np.testing.assert_allclose(have, expected, rtol=0, atol=1e-5, err_msg=name)
            carried[name] = [got[1], *(got[3:] if critic_state else [])]
        obs, _, dones, _ = venv.step(action)
        starts = dones.astype(np.float32)
        n_starts += int(dones.sum())
    assert n_starts >= n_envs


@pytest.mark.parametrize(
    ("policy_kwargs", "with_value", "masks"),
    [(dict(), True, True), (dict(n_lstm_layers=2, shared_lstm=True, enable_critic_lstm=False), False, False)],
    ids=["critic-gru-value-masks", "2-layers-shared-action"],
)
def test_exported_gru_rolls_as_predict(tmp_path: Path, policy_kwargs: dict, with_value: bool, masks: bool) -> None:
    def make_env(length: int) -> InvalidActionEnvDiscrete:
        return InvalidActionEnvDiscrete(dim=6, ep_length=length, n_invalid_actions=3)

    venv = DummyVecEnv([lambda length=3 + i: make_env(length) for i in range(3)])
    venv.seed(0)
    model = ClippedPPO("MlpLstmPolicy", venv, n_steps=8, batch_size=8, seed=0, policy_kwargs={**GRU, **policy_kwargs})
    with th.no_grad():
        model.policy.action_net.weight.mul_(30.0)  # logits far apart: argmax is not decided by rounding
    roll_exported_gru(model, venv, tmp_path, with_value, masks)
    meta = read_metadata(tmp_path / "gru.pt")
    inputs = [spec["name"] for spec in meta["inputs"]]
    outputs = [spec["name"] for spec in meta["outputs"]]
    assert meta["lstm_state"]["rnn_type"] == "gru" and meta["lstm_state"]["state_names"] == ["h"]
    if with_value:
        assert inputs == ["obs", "state_h", "episode_start", "action_masks", "critic_state_h"]
        assert outputs == ["action", "state_h_out", "value", "critic_state_h_out"]
    else:
        assert inputs == ["obs", "state_h", "episode_start"] and outputs == ["action", "state_h_out"]


def test_export_of_an_lstm_keeps_its_two_states(tmp_path: Path) -> None:
    model = ClippedPPO("MlpLstmPolicy", make_vec_env("CartPole-v1", n_envs=1), policy_kwargs=dict(lstm_hidden_size=8))
    meta = read_metadata(to_torchscript(model, tmp_path / "lstm.pt"))
    assert [spec["name"] for spec in meta["inputs"]] == ["obs", "state_h", "state_c", "episode_start"]
    assert meta["lstm_state"]["rnn_type"] == "lstm" and meta["lstm_state"]["state_names"] == ["h", "c"]


# -- learning ------------------------------------------------------------------------------------------


def test_a_gru_learns_to_recall_a_cue() -> None:
    """The task of tests/test_recurrent.py that a feed-forward policy cannot solve (it scores about 0.5)."""
    env = make_vec_env(CueEnv, n_envs=8, seed=0)
    model = ClippedPPO(
        "MlpLstmPolicy",
        env,
        n_steps=32,
        batch_size=64,
        n_epochs=4,
        learning_rate=3e-3,
        seed=0,
        policy_kwargs=dict(lstm_hidden_size=16, net_arch=[16], rnn_type="gru"),
    )
    model.learn(8000)
    mean, _ = evaluate_policy(model, make_vec_env(CueEnv, n_envs=1, seed=5), n_eval_episodes=100)
    assert mean >= 0.95
    assert isinstance(model.policy, RecurrentActorCriticPolicy)
