"""sb3_ppo_ext.export: the exported ONNX and TorchScript graphs act exactly as ``predict(deterministic=True)``.

Every parity test runs the same observations through ``model.predict``, onnxruntime and the TorchScript
module, at batch sizes 1 and 64 (the graphs are traced at batch 2, so both sizes exercise the dynamic
axis). Discrete actions must be equal, Box actions within 1e-5. The models are tiny and barely trained:
parity needs no learning, and the action layer is scaled up so that Box actions reach their bounds and
discrete logits are far apart. Recurrent policies are rolled for 20 steps on envs whose episodes end
inside them, the graphs carrying their own LSTM state, at batch sizes 1 and 4.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from conftest import DictObsEnv, ImageEnv
from gymnasium import spaces
from stable_baselines3.common.preprocessing import is_image_space
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecNormalize, VecTransposeImage

import sb3_ppo_ext
from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext import __main__ as cli
from sb3_ppo_ext.errors import ExportError, UnsupportedExportError
from sb3_ppo_ext.export import METADATA_FILE, PolicyExportModule, read_metadata, to_onnx, to_torchscript
from sb3_ppo_ext.recurrent.sequences import LSTMStates

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

BATCH_SIZES = (1, 64)
SMALL = dict(n_steps=32, batch_size=32, n_epochs=1, policy_kwargs=dict(net_arch=[16]))


class SpacesEnv(gym.Env):
    """Random observations from ``observation_space``."""

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Space) -> None:
        super().__init__()
        self.observation_space, self.action_space = observation_space, action_space

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[Any, dict]:
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        return self.observation_space.sample(), float(np.sum(action)), False, False, {}


class MaskedSpacesEnv(SpacesEnv):
    """:class:`SpacesEnv` with random invalid-action masks."""

    def action_masks(self) -> np.ndarray:
        return random_masks(self.action_space, 1, self.np_random)[0]


def random_masks(action_space: spaces.Space, n: int, rng: np.random.Generator) -> np.ndarray:
    """Random masks with at least one valid choice per sub-space (sb3-contrib's layout)."""
    if isinstance(action_space, spaces.Discrete):
        groups = [int(action_space.n)]
    elif isinstance(action_space, spaces.MultiDiscrete):
        groups = [int(k) for k in action_space.nvec]
    else:
        groups = [2] * int(action_space.n)
    parts = []
    for size in groups:
        part = rng.random((n, size)) < 0.5
        part[np.arange(n), rng.integers(size, size=n)] = True
        parts.append(part)
    return np.concatenate(parts, axis=1)


def make_model(env: gym.Env, policy: str = "MlpPolicy", steps: int = 32, **kwargs: Any) -> ClippedPPO:
    """A tiny model after one short rollout and update, its action layer scaled up (far-apart logits, clipping)."""
    model = ClippedPPO(policy, env, seed=0, device="cpu", **{**SMALL, **kwargs})
    model.learn(steps)
    with th.no_grad():
        model.policy.action_net.weight.mul_(30.0)
    return model


def sample_obs(space: spaces.Space, n: int, seed: int = 1) -> Any:
    space.seed(seed)
    samples = [space.sample() for _ in range(n)]
    if isinstance(space, spaces.Dict):
        return {key: np.stack([s[key] for s in samples]) for key in space.spaces}
    return np.stack(samples)


def as_inputs(space: spaces.Space, obs: Any) -> list[np.ndarray]:
    """Observations as the graph's input arrays (float32, int64 indices, uint8 images)."""
    if isinstance(space, spaces.Dict):
        return [as_inputs(space[key], obs[key])[0] for key in space.spaces]
    if isinstance(space, (spaces.Discrete, spaces.MultiDiscrete)):
        return [np.asarray(obs, np.int64)]
    if isinstance(space, spaces.Box) and space.dtype == np.uint8:
        return [np.asarray(obs, np.uint8)]
    return [np.asarray(obs, np.float32)]


def session(path: Path) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_both(onnx_path: Path, ts_path: Path, inputs: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Outputs of the ONNX model (onnxruntime) and of the TorchScript module for the same inputs."""
    sess = session(onnx_path)
    from_onnx = sess.run(None, {i.name: x for i, x in zip(sess.get_inputs(), inputs, strict=True)})
    out = th.jit.load(str(ts_path))(*[th.as_tensor(x) for x in inputs])
    from_ts = [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]
    return from_onnx, from_ts


def export_both(model: ClippedPPO, tmp_path: Path, **options: Any) -> tuple[Path, Path]:
    return to_onnx(model, tmp_path / "policy.onnx", **options), to_torchscript(model, tmp_path / "policy.pt", **options)


def assert_same_actions(got: np.ndarray, want: np.ndarray, space: spaces.Space) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
    if isinstance(space, spaces.Box):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    else:
        np.testing.assert_array_equal(got, want)


def check_parity(model: ClippedPPO, tmp_path: Path, masks: bool = False, **options: Any) -> None:
    """Exported actions (and values) equal predict's (and predict_values') at batch 1 and 64."""
    onnx_path, ts_path = export_both(model, tmp_path, action_masks=masks, with_value=True, **options)
    space = model.observation_space
    for n in BATCH_SIZES:
        obs = sample_obs(space, n)
        inputs = as_inputs(space, obs)
        predict_kwargs = {}
        if masks:
            predict_kwargs["action_masks"] = random_masks(model.action_space, n, np.random.default_rng(n))
            inputs.append(predict_kwargs["action_masks"])
        want, _ = model.predict(obs, deterministic=True, **predict_kwargs)
        want = want.reshape((n, *model.action_space.shape))
        with th.no_grad():
            values = model.policy.predict_values(model.policy.obs_to_tensor(obs)[0]).numpy()
        for action, value in run_both(onnx_path, ts_path, inputs):
            assert_same_actions(action, want, model.action_space)
            np.testing.assert_allclose(value, values, rtol=0, atol=1e-5)


# -- parity ------------------------------------------------------------------------------------------

BOX_ACTIONS = spaces.Box(np.array([-1.0, -0.1, 0.0], np.float32), np.array([1.0, 0.2, 3.0], np.float32))
ACTION_SPACES = {
    "Box": BOX_ACTIONS,
    "Discrete": spaces.Discrete(4),
    "MultiDiscrete": spaces.MultiDiscrete([3, 2, 4]),
    "MultiBinary": spaces.MultiBinary(5),
}
OBS_SPACES = {
    "Box": spaces.Box(-2.0, 2.0, (6,), np.float32),
    "Discrete": spaces.Discrete(7),
    "MultiDiscrete": spaces.MultiDiscrete([2, 5]),
    "MultiBinary": spaces.MultiBinary(4),
}


@pytest.mark.parametrize("action_space", ACTION_SPACES.values(), ids=ACTION_SPACES.keys())
def test_actions_and_values_equal_predict(tmp_path, action_space):
    model = make_model(SpacesEnv(OBS_SPACES["Box"], action_space))
    check_parity(model, tmp_path)


@pytest.mark.parametrize("name", ["Discrete", "MultiDiscrete", "MultiBinary"])
def test_discrete_observations_are_one_hot_encoded_in_the_graph(tmp_path, name):
    model = make_model(SpacesEnv(OBS_SPACES[name], spaces.Discrete(3)))
    check_parity(model, tmp_path)


def test_box_actions_are_clipped_to_the_bounds_as_predict_does(tmp_path):
    model = make_model(SpacesEnv(OBS_SPACES["Box"], BOX_ACTIONS))
    onnx_path = to_onnx(model, tmp_path / "policy.onnx")
    obs = sample_obs(model.observation_space, 64)
    (actions,) = session(onnx_path).run(None, {"obs": obs})
    at_bounds = np.isclose(actions, BOX_ACTIONS.low) | np.isclose(actions, BOX_ACTIONS.high)
    assert at_bounds.any() and not at_bounds.all()  # the scaled-up head reaches the bounds: clipping is exercised
    assert (actions >= BOX_ACTIONS.low).all() and (actions <= BOX_ACTIONS.high).all()


@pytest.mark.parametrize("squash_output", [False, True], ids=["gSDE", "gSDE-squashed"])
def test_gsde_exports_its_deterministic_action(tmp_path, squash_output):
    # gSDE's noise only enters sampling: the deterministic action is the mean (tanh-squashed and unscaled
    # to the bounds with squash_output), which the graph computes
    env = SpacesEnv(OBS_SPACES["Box"], spaces.Box(-2.0, 1.0, (2,), np.float32))
    policy_kwargs = dict(net_arch=[16], squash_output=squash_output)
    model = make_model(env, use_sde=True, policy_kwargs=policy_kwargs)
    check_parity(model, tmp_path)


def test_image_observations_are_scaled_in_the_graph(tmp_path):
    model = make_model(ImageEnv(), "CnnPolicy", policy_kwargs=dict(features_extractor_kwargs=dict(features_dim=16)))
    assert model.observation_space.shape == (3, 36, 36)  # channel-first after VecTransposeImage, as predict sees it
    check_parity(model, tmp_path)
    assert read_metadata(tmp_path / "policy.onnx")["inputs"][0] == {
        "name": "obs",
        "shape": ["batch", 3, 36, 36],
        "dtype": "uint8",
    }


def test_dict_observations_are_named_inputs(tmp_path):
    model = make_model(DictObsEnv(discrete=False), "MultiInputPolicy")
    check_parity(model, tmp_path)
    names = [i.name for i in session(tmp_path / "policy.onnx").get_inputs()]
    assert names == list(model.observation_space.spaces)  # "index", "other", "vec": the space's (sorted) order


# -- masks -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Discrete", "MultiDiscrete", "MultiBinary"])
def test_masked_actions_equal_predict_with_masks_and_are_valid(tmp_path, name):
    action_space = ACTION_SPACES[name]
    model = make_model(MaskedSpacesEnv(OBS_SPACES["Box"], action_space))
    check_parity(model, tmp_path, masks=True)

    obs = sample_obs(model.observation_space, 64)
    masks = random_masks(action_space, 64, np.random.default_rng(7))
    (actions,) = session(to_onnx(model, tmp_path / "masked.onnx", action_masks=True)).run(
        None, {"obs": obs, "action_masks": masks}
    )
    rows = np.arange(64)
    if name == "Discrete":
        assert masks[rows, actions].all()
    elif name == "MultiDiscrete":
        offsets = np.concatenate([[0], np.cumsum(action_space.nvec)[:-1]])
        assert masks[rows[:, None], offsets + actions].all()
    else:
        pairs = masks.reshape(64, -1, 2)
        assert np.take_along_axis(pairs, actions.astype(np.int64)[..., None], axis=2).all()


@pytest.mark.parametrize("masks", [False, True], ids=["unmasked", "masked"])
def test_two_logit_multibinary_head_exports_as_predict(tmp_path, masks):
    env_class = MaskedSpacesEnv if masks else SpacesEnv
    model = make_model(
        env_class(OBS_SPACES["Box"], ACTION_SPACES["MultiBinary"]),
        policy_kwargs=dict(multibinary_head="categorical"),
    )
    assert model.policy.action_net.out_features == 10
    check_parity(model, tmp_path, masks=masks)


def test_torchscript_accepts_float_masks(tmp_path):
    model = make_model(MaskedSpacesEnv(OBS_SPACES["Box"], spaces.Discrete(4)))
    module = th.jit.load(str(to_torchscript(model, tmp_path / "policy.pt", action_masks=True)))
    obs = th.as_tensor(sample_obs(model.observation_space, 8))
    masks = th.as_tensor(random_masks(model.action_space, 8, np.random.default_rng(0)))
    assert th.equal(module(obs, masks), module(obs, masks.float()))


# -- VecNormalize --------------------------------------------------------------------------------------


def normalized_model(
    env: gym.Env, policy: str = "MlpPolicy", keys: list[str] | None = None
) -> tuple[ClippedPPO, VecNormalize]:
    venv = VecNormalize(DummyVecEnv([lambda: env]), clip_obs=1.5, norm_obs_keys=keys)
    model = make_model(venv, policy, steps=64)
    return model, venv


def test_vecnormalize_statistics_baked_in_take_raw_observations(tmp_path):
    # an observation scale far from the unit one: without the statistics the actions would differ
    env = SpacesEnv(spaces.Box(np.float32(5.0), np.float32(40.0), (6,), np.float32), spaces.Box(-1, 1, (2,)))
    model, venv = normalized_model(env)
    venv.save(str(tmp_path / "stats.pkl"))
    stats = tmp_path / "stats.pkl"
    onnx_path = to_onnx(model, tmp_path / "policy.onnx", vecnormalize=stats)
    ts_path = to_torchscript(model, tmp_path / "policy.pt", vecnormalize=venv)
    raw = sample_obs(model.observation_space, 64)
    want, _ = model.predict(venv.normalize_obs(raw), deterministic=True)
    for (action,) in run_both(onnx_path, ts_path, [raw]):
        np.testing.assert_allclose(action, want, rtol=0, atol=1e-5)
    options = read_metadata(onnx_path)["export_options"]
    assert options["vecnormalize"] and options["clip_obs"] == 1.5 and options["epsilon"] == venv.epsilon


def test_vecnormalize_with_dict_observations_normalises_its_keys_only(tmp_path):
    # VecNormalize normalises Box keys only: the Discrete one is one-hot encoded from the raw index
    model, venv = normalized_model(DictObsEnv(discrete=True), "MultiInputPolicy", keys=["vec", "other"])
    onnx_path, ts_path = export_both(model, tmp_path, vecnormalize=venv)
    raw = sample_obs(model.observation_space, 64)
    want, _ = model.predict(venv.normalize_obs(raw), deterministic=True)
    for (action,) in run_both(onnx_path, ts_path, as_inputs(model.observation_space, raw)):
        np.testing.assert_array_equal(action, want)


def test_a_model_trained_with_vecnormalize_warns_when_exported_without_statistics(tmp_path):
    model, _ = normalized_model(SpacesEnv(OBS_SPACES["Box"], spaces.Discrete(2)))
    with pytest.warns(UserWarning, match="vecnormalize=model.get_vec_normalize_env()"):
        to_onnx(model, tmp_path / "policy.onnx")


def test_statistics_of_another_env_are_refused(tmp_path):
    model = make_model(SpacesEnv(OBS_SPACES["Box"], spaces.Discrete(2)))
    other = VecNormalize(DummyVecEnv([lambda: SpacesEnv(spaces.Box(-1, 1, (3,)), spaces.Discrete(2))]))
    with pytest.raises(ExportError, match=r"shape \(3,\).*another env"):
        to_onnx(model, tmp_path / "policy.onnx", vecnormalize=other)
    dict_stats = VecNormalize(DummyVecEnv([DictObsEnv]), norm_obs_keys=["vec"])
    with pytest.raises(ExportError, match=r"per key, keys \['vec'\]\) do not fit.*another env"):
        to_onnx(model, tmp_path / "policy.onnx", vecnormalize=dict_stats)


# -- file format, metadata, API ------------------------------------------------------------------------


def test_metadata_describes_spaces_versions_and_options(tmp_path):
    model = make_model(MaskedSpacesEnv(OBS_SPACES["Box"], spaces.Discrete(4)))
    onnx_path, ts_path = export_both(model, tmp_path, action_masks=True)
    for path, export_format in ((onnx_path, "onnx"), (ts_path, "torchscript")):
        meta = read_metadata(path)
        assert meta["format"] == export_format
        assert meta["observation_space"] == repr(model.observation_space)
        assert meta["action_space"] == repr(model.action_space)
        assert meta["torch_version"] == th.__version__
        assert meta["sb3_ppo_ext_version"] == sb3_ppo_ext.__version__
        assert meta["stable_baselines3_version"]
        assert meta["export_options"]["action_masks"] and not meta["export_options"]["with_value"]
        assert [i["name"] for i in meta["inputs"]] == ["obs", "action_masks"]
        assert meta["outputs"] == [{"name": "action", "shape": ["batch"], "dtype": "int64"}]
        assert meta["recurrent"] is False and "lstm_state" not in meta
    # read by onnxruntime alone, as a deployment would
    assert session(onnx_path).get_modelmeta().custom_metadata_map["action_space"] == repr(model.action_space)
    extra = {METADATA_FILE: ""}
    th.jit.load(str(ts_path), _extra_files=extra)
    assert b"observation_space" in extra[METADATA_FILE]  # type: ignore[operator]


def test_onnx_graph_has_a_dynamic_batch_axis(tmp_path):
    model = make_model(SpacesEnv(OBS_SPACES["Box"], BOX_ACTIONS))
    graph = onnx.load(str(to_onnx(model, tmp_path / "policy.onnx", with_value=True))).graph
    for value in [*graph.input, *graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch", value.name


def test_model_export_picks_the_format_from_the_suffix_and_keeps_the_training_mode(tmp_path):
    model = make_model(SpacesEnv(OBS_SPACES["Box"], spaces.Discrete(3)))
    model.policy.set_training_mode(True)
    assert model.export(tmp_path / "a.onnx") == tmp_path / "a.onnx"
    assert read_metadata(model.export(tmp_path / "a.pt"))["format"] == "torchscript"
    assert read_metadata(model.export(tmp_path / "b.bin", "onnx"))["format"] == "onnx"
    assert model.policy.training
    with pytest.raises(ExportError, match="export_format='onnx'"):
        model.export(tmp_path / "policy.bin")


def test_an_sb3_ppo_model_exports_too(tmp_path):
    from stable_baselines3 import PPO

    model = PPO("MlpPolicy", SpacesEnv(OBS_SPACES["Box"], BOX_ACTIONS), device="cpu", **SMALL)
    check_parity(model, tmp_path)


# -- recurrent policies ----------------------------------------------------------------------------------

LSTM_KWARGS = dict(lstm_hidden_size=8, net_arch=[8])
N_ENVS = (1, 4)  # batch sizes of the rollouts; the graphs are traced at batch 2


class EpisodesEnv(SpacesEnv):
    """:class:`SpacesEnv` whose episodes end after ``ep_length`` steps (so the rollouts cross episode starts)."""

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Space, ep_length: int) -> None:
        super().__init__(observation_space, action_space)
        self.ep_length, self._t = ep_length, 0

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[Any, dict]:
        self._t = 0
        return super().reset(seed=seed)

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        self._t += 1
        obs, reward, _, _, info = super().step(action)
        return obs, reward, self._t >= self.ep_length, False, info


def vec_env(make_env: Any, n_envs: int) -> VecEnv:
    """``n_envs`` envs with episodes of 3, 4, 5... steps: resets at different steps in different rows."""
    venv = DummyVecEnv([lambda length=3 + i: make_env(length) for i in range(n_envs)])
    venv.seed(0)
    # channel-first images, as the model's env and the exported graph see them
    return VecTransposeImage(venv) if is_image_space(venv.observation_space) else venv


def recurrent_model(make_env: Any, policy: str = "MlpLstmPolicy", **policy_kwargs: Any) -> ClippedPPO:
    """A random-init tiny recurrent model (parity needs no training), its action layer scaled up as make_model's."""
    kwargs = {**LSTM_KWARGS, **policy_kwargs}
    model = ClippedPPO(
        policy, vec_env(make_env, 1), n_steps=8, batch_size=8, seed=0, device="cpu", policy_kwargs=kwargs
    )
    with th.no_grad():
        model.policy.action_net.weight.mul_(30.0)
    return model


def roll_recurrent(
    model: ClippedPPO, make_env: Any, tmp_path: Path, masks: bool = False, with_value: bool = False, steps: int = 20
) -> None:
    """Roll ``predict`` and the exported ONNX and TorchScript graphs side by side, each carrying its own state.

    Actions (and values) must equal the reference's and the states stay within 1e-5 at every step, at batch
    sizes 1 and 4. The reference is ``predict(obs, state, episode_start, deterministic=True)``, and for the
    value and the critic's state the rollout's ``policy.forward``.
    """
    onnx_path, ts_path = export_both(model, tmp_path, action_masks=masks, with_value=with_value)
    sess, ts_module = session(onnx_path), th.jit.load(str(ts_path))
    policy = model.policy
    critic_state = with_value and policy.enable_critic_lstm
    for n_envs in N_ENVS:
        venv = vec_env(make_env, n_envs)
        zeros = np.zeros((policy.n_lstm_layers, n_envs, policy.lstm_hidden_size), np.float32)
        state: tuple[np.ndarray, ...] = (zeros, zeros)
        reference = LSTMStates((th.as_tensor(zeros),) * 2, (th.as_tensor(zeros),) * 2)
        carried = {"onnx": [zeros] * (4 if critic_state else 2), "torchscript": [zeros] * (4 if critic_state else 2)}
        obs, starts, n_starts = venv.reset(), np.ones(n_envs, np.float32), 0
        for _ in range(steps):
            extra = {"action_masks": np.stack(venv.env_method("action_masks"))} if masks else {}
            action, state = model.predict(obs, state, starts, deterministic=True, **extra)
            want = [action, *state]
            if with_value:
                with th.no_grad():
                    obs_tensor = policy.obs_to_tensor(obs)[0]
                    _, value, _, reference = policy(obs_tensor, reference, th.as_tensor(starts), True, **extra)
                np.testing.assert_allclose(reference.pi[0].numpy(), state[0], rtol=0, atol=1e-6)
                want.append(value.numpy())
                if critic_state:
                    want.extend(s.numpy() for s in reference.vf)
            for runtime, carry in carried.items():
                inputs = [*as_inputs(model.observation_space, obs), carry[0], carry[1], starts, *extra.values()]
                inputs.extend(carry[2:])
                if runtime == "onnx":
                    got = sess.run(None, {i.name: x for i, x in zip(sess.get_inputs(), inputs, strict=True)})
                else:
                    got = [t.numpy() for t in ts_module(*[th.as_tensor(x) for x in inputs])]
                assert len(got) == len(want), runtime
                assert_same_actions(got[0], want[0], model.action_space)
                for have, expected in zip(got[1:], want[1:], strict=True):
                    np.testing.assert_allclose(have, expected, rtol=0, atol=1e-5, err_msg=runtime)
                # the graph's own states go into its next step (values are not states)
                carried[runtime] = [got[1], got[2], *(got[4:] if critic_state else [])]
            obs, _, dones, _ = venv.step(action)
            starts = dones.astype(np.float32)
            n_starts += int(dones.sum())
        assert n_starts >= n_envs, "episodes must end inside the rollout so that episode_start resets are checked"


RECURRENT_CASES = {
    "Discrete-critic-LSTM": (spaces.Discrete(3), {}),
    "Box-critic-LSTM": (BOX_ACTIONS, {}),
    "Box-2-layers-shared-LSTM": (BOX_ACTIONS, dict(n_lstm_layers=2, shared_lstm=True, enable_critic_lstm=False)),
    "Discrete-2-layers-no-critic-LSTM": (spaces.Discrete(3), dict(n_lstm_layers=2, enable_critic_lstm=False)),
}


@pytest.mark.parametrize("case", RECURRENT_CASES.values(), ids=RECURRENT_CASES.keys())
def test_lstm_rolled_for_20_steps_keeps_predicts_actions_values_and_states(tmp_path, case):
    action_space, policy_kwargs = case

    def make_env(length: int) -> EpisodesEnv:
        return EpisodesEnv(OBS_SPACES["Box"], action_space, length)

    model = recurrent_model(make_env, **policy_kwargs)
    roll_recurrent(model, make_env, tmp_path, with_value=True)


@pytest.mark.parametrize("with_value", [False, True], ids=["action", "action-value"])
def test_lstm_with_dict_observations_rolls_as_predict(tmp_path, with_value):
    def make_env(length: int) -> DictObsEnv:
        return DictObsEnv(discrete=False, ep_length=length)

    roll_recurrent(recurrent_model(make_env, "MultiInputLstmPolicy"), make_env, tmp_path, with_value=with_value)


def test_lstm_with_image_observations_rolls_as_predict(tmp_path):
    def make_env(length: int) -> ImageEnv:
        return ImageEnv(ep_length=length)

    cnn = dict(features_extractor_kwargs=dict(features_dim=16))
    model = recurrent_model(make_env, "CnnLstmPolicy", **cnn)
    # the channels-last image scaling is in place, which keeps freezing from folding the LSTM's weights: the
    # TorchScript module is saved while they need no gradient (its outputs go to .numpy() in the rollout)
    assert model.policy.channels_last
    roll_recurrent(model, make_env, tmp_path)
    assert all(parameter.requires_grad for parameter in model.policy.parameters())  # given back as they were


@pytest.mark.parametrize("with_value", [False, True], ids=["action", "action-value"])
def test_masked_lstm_rolls_as_predict_with_masks(tmp_path, with_value):
    from sb3_contrib.common.envs import InvalidActionEnvDiscrete

    def make_env(length: int) -> InvalidActionEnvDiscrete:
        return InvalidActionEnvDiscrete(dim=6, ep_length=length, n_invalid_actions=3)

    roll_recurrent(recurrent_model(make_env), make_env, tmp_path, masks=True, with_value=with_value)


def test_recurrent_metadata_inputs_and_dynamic_axes(tmp_path):
    model = recurrent_model(lambda length: EpisodesEnv(OBS_SPACES["Box"], spaces.Discrete(3), length), n_lstm_layers=2)
    onnx_path, ts_path = export_both(model, tmp_path, with_value=True)
    state = {"shape": [2, "batch", 8], "dtype": "float32"}
    for path in (onnx_path, ts_path):
        meta = read_metadata(path)
        assert meta["recurrent"] is True
        assert meta["lstm_state"]["state_shape"] == [2, "batch", 8] and meta["lstm_state"]["critic_state"]
        assert meta["inputs"][1:] == [
            {"name": "state_h", **state},
            {"name": "state_c", **state},
            {"name": "episode_start", "shape": ["batch"], "dtype": "float32"},
            {"name": "critic_state_h", **state},
            {"name": "critic_state_c", **state},
        ]
        names = [spec["name"] for spec in meta["outputs"]]
        assert names == ["action", "state_h_out", "state_c_out", "value", "critic_state_h_out", "critic_state_c_out"]
    graph = onnx.load(str(onnx_path)).graph
    for value in [*graph.input, *graph.output]:
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        assert "batch" in dims and dims[0 if "state" not in value.name else 1] == "batch", (value.name, dims)
    assert read_metadata(to_onnx(model, tmp_path / "ff.onnx", with_value=False))["lstm_state"]["critic_state"] is False


def test_torchscript_takes_bool_episode_starts(tmp_path):
    model = recurrent_model(lambda length: EpisodesEnv(OBS_SPACES["Box"], spaces.Discrete(3), length))
    module = th.jit.load(str(to_torchscript(model, tmp_path / "policy.pt")))
    obs = th.as_tensor(sample_obs(model.observation_space, 4))
    state = th.randn(1, 4, 8)
    starts = th.tensor([True, False, True, False])
    for want, got in zip(module(obs, state, state, starts.float()), module(obs, state, state, starts), strict=True):
        assert th.equal(want, got)


def test_cli_exports_a_saved_recurrent_model(tmp_path, capsys):
    model = recurrent_model(lambda length: EpisodesEnv(OBS_SPACES["Box"], spaces.Discrete(3), length))
    model.save(tmp_path / "agent.zip")
    assert cli.main(["export", "--load", str(tmp_path / "agent.zip"), "--with-value"]) == 0
    out = capsys.readouterr().out
    assert "state_h[1, 'batch', 8] float32" in out and "critic_state_c_out[1, 'batch', 8] float32" in out
    loaded = ClippedPPO.load(tmp_path / "agent.zip", device="cpu")
    obs = sample_obs(model.observation_space, 3)
    state = np.random.default_rng(0).normal(size=(2, 1, 3, 8)).astype(np.float32)
    starts = np.array([1.0, 0.0, 0.0], np.float32)
    action, state_h, state_c, *_ = session(tmp_path / "agent.onnx").run(
        None,
        {
            "obs": obs,
            "state_h": state[0],
            "state_c": state[1],
            "episode_start": starts,
            "critic_state_h": state[0],
            "critic_state_c": state[1],
        },
    )
    want, (h, c) = loaded.predict(obs, (state[0], state[1]), starts, deterministic=True)
    np.testing.assert_array_equal(action, want)
    np.testing.assert_allclose(state_h, h, rtol=0, atol=1e-5)
    np.testing.assert_allclose(state_c, c, rtol=0, atol=1e-5)


# -- errors --------------------------------------------------------------------------------------------


def test_masks_for_box_actions_are_refused_with_what_to_do(tmp_path):
    model = make_model(SpacesEnv(OBS_SPACES["Box"], BOX_ACTIONS))
    with pytest.raises(ExportError, match="action_masks=False"):
        to_onnx(model, tmp_path / "policy.onnx", action_masks=True)


def test_sb3_contrib_recurrent_policies_are_refused_as_not_implemented(tmp_path):
    from sb3_contrib import RecurrentPPO

    model = RecurrentPPO("MlpLstmPolicy", SpacesEnv(OBS_SPACES["Box"], spaces.Discrete(2)), n_steps=8, device="cpu")
    with pytest.raises(UnsupportedExportError, match="sb3_contrib.*ClippedPPO's MlpLstmPolicy.*model.predict\\("):
        to_torchscript(model, tmp_path / "policy.pt")
    with pytest.raises(NotImplementedError):
        to_onnx(model.policy, tmp_path / "policy.onnx")


def test_observation_keys_clashing_with_the_state_inputs_are_refused(tmp_path):
    env = SpacesEnv(spaces.Dict({"state_h": OBS_SPACES["Box"]}), spaces.Discrete(2))
    model = ClippedPPO("MultiInputLstmPolicy", env, n_steps=8, batch_size=8, device="cpu", policy_kwargs=LSTM_KWARGS)
    with pytest.raises(ExportError, match=r"\['state_h'\] clash.*rename"):
        to_onnx(model, tmp_path / "policy.onnx")


def test_a_broken_trace_is_caught_by_the_check(tmp_path, monkeypatch):
    # a module whose traced graph keeps the trace's batch size: the check at another batch size notices
    model = make_model(SpacesEnv(OBS_SPACES["Box"], spaces.Discrete(3)))
    original = PolicyExportModule._postprocess

    def batch_baked_in(self: PolicyExportModule, actions: th.Tensor) -> th.Tensor:
        return original(self, actions)[: int(actions.shape[0])] * (2 if int(actions.shape[0]) == 2 else 1)

    monkeypatch.setattr(PolicyExportModule, "_postprocess", batch_baked_in)
    with pytest.raises(ExportError, match="disagrees with the policy"):
        to_torchscript(model, tmp_path / "policy.pt")


def test_not_a_model_is_refused(tmp_path):
    with pytest.raises(ExportError, match="ClippedPPO model"):
        to_onnx(object(), tmp_path / "policy.onnx")  # type: ignore[arg-type]


# -- command line --------------------------------------------------------------------------------------


def test_cli_export_round_trip_with_saved_vecnormalize_stats(tmp_path, capsys):
    env = SpacesEnv(spaces.Box(np.float32(5.0), np.float32(40.0), (6,), np.float32), spaces.Discrete(3))
    model, venv = normalized_model(env)
    model.save(tmp_path / "agent.zip")
    venv.save(str(cli.vecnormalize_path(tmp_path / "agent.zip")))  # where `train` puts them: found by default

    assert cli.main(["export", "--load", str(tmp_path / "agent.zip"), "--with-value"]) == 0
    out = capsys.readouterr().out
    assert f"-> {tmp_path / 'agent.onnx'} (onnx)" in out and "agent_vecnormalize.pkl" in out
    assert "outputs: action['batch'] int64, value['batch', 1] float32" in out
    raw = sample_obs(model.observation_space, 64)
    loaded = ClippedPPO.load(tmp_path / "agent.zip", device="cpu")
    want, _ = loaded.predict(venv.normalize_obs(raw), deterministic=True)
    action, _ = session(tmp_path / "agent.onnx").run(None, {"obs": raw})
    np.testing.assert_array_equal(action, want)

    args = ["export", "--load", str(tmp_path / "agent.zip"), "--out", str(tmp_path / "ts" / "p.pt"), "--torchscript"]
    assert cli.main([*args, "--no-vecnormalize"]) == 0
    assert "VecNormalize: none" in capsys.readouterr().out
    with th.no_grad():
        want, _ = loaded.predict(raw, deterministic=True)
    np.testing.assert_array_equal(th.jit.load(str(tmp_path / "ts" / "p.pt"))(th.as_tensor(raw)).numpy(), want)


def test_cli_export_reports_an_unsupported_option(tmp_path, capsys):
    make_model(SpacesEnv(OBS_SPACES["Box"], BOX_ACTIONS)).save(tmp_path / "agent.zip")
    assert cli.main(["export", "--load", str(tmp_path / "agent.zip"), "--action-masks"]) == 2
    assert "export failed: action_masks=True needs Discrete" in capsys.readouterr().err


def test_saved_statistics_are_a_plain_pickle_of_vecnormalize(tmp_path):
    # to_onnx(vecnormalize=path) reads the file without a VecEnv, which relies on VecNormalize's pickling
    _, venv = normalized_model(SpacesEnv(OBS_SPACES["Box"], spaces.Discrete(2)))
    venv.save(str(tmp_path / "stats.pkl"))
    with open(tmp_path / "stats.pkl", "rb") as file:
        loaded = pickle.load(file)  # noqa: S301 - written by this test
    np.testing.assert_array_equal(loaded.obs_rms.mean, venv.obs_rms.mean)
