"""Results do not move when code moves: parameters after short trainings, pinned by digest.

Each case trains a few updates on CartPole-v1 (closed-form and autograd paths) or HalfCheetah-v5 and hashes
every parameter and buffer of the policy, the optimizer's state and the reference controller's beta. The
digests in ``tests/data/bit_identity.json`` were written by the code before a refactoring; a refactoring
that changes any bit of any case fails here. Floating-point results depend on the CPU's kernels and torch's
version, so the file is keyed by both; on another platform the test skips and says how to pin it there:

    SB3_PPO_EXT_PIN_DIGESTS=1 python -m pytest tests/test_bit_identity.py   # at the commit before a change

Pinned at 3290d67 (before the issue-27 refactoring); pinned again after issue 32's deliberate arithmetic
changes (flat gradient clip and Adam on flat buffers, NumPy acting), at the commit that says so. AVX512 pinned
at 96367f3's code, then again when tanh layers took PyTorch's fused kernels there (``fast/stacked.FUSED_TANH``).
AMD EPYC with AVX512 pinned after its own choices of arithmetic (``fast/cpu.py``: NumPy's tanh, narrow weight
gradients transposed), and again when its closed-form update took the heads, then the layers, to NumPy
(``fast/numpy_head.py``, ``fast/numpy_layers.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecNormalize

from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext.fast.cpu import cpu_model

DIGESTS = Path(__file__).parent / "data" / "bit_identity.json"
PIN = os.environ.get("SB3_PPO_EXT_PIN_DIGESTS") == "1"


class _MaskedCartPole(gym.Wrapper):
    """CartPole whose action 1 is invalid while the cart is left of the centre (masks vary within episodes)."""

    def action_masks(self) -> np.ndarray:
        x = self.env.unwrapped.state[0]
        return np.array([True, bool(x >= 0.0)])


def _platform_keys() -> list[str]:
    """This platform's key, then the older key without the CPU model (the AVX2 pins, made on AMD EPYC VMs).

    BLAS picks kernels by CPU as well as by vector unit: pins made since carry the CPU's model name, so that
    another vendor's CPU with the same capability skips instead of failing.
    """
    generic = f"torch {th.__version__} | {th.backends.cpu.get_cpu_capability()} | {platform.machine()}"
    return [f"{generic} | {cpu_model()}", generic]


def _digest(model: ClippedPPO) -> str:
    """SHA-256 over the policy's state, the optimizer's moments and beta (the bits a refactoring must keep)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.policy.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    for state in model.policy.optimizer.state_dict()["state"].values():
        for key in sorted(state):
            value = state[key]
            h.update(np.asarray(value.cpu() if isinstance(value, th.Tensor) else value).tobytes())
    h.update(repr(model.ref_kl_coef).encode())
    h.update(repr(model.num_timesteps).encode())
    return h.hexdigest()


def _cartpole(n_envs: int = 4, masked: bool = False) -> Any:
    return make_vec_env("CartPole-v1", n_envs=n_envs, seed=0, wrapper_class=_MaskedCartPole if masked else None)


def _cheetah(normalize: bool = False) -> Any:
    env = make_vec_env("HalfCheetah-v5", n_envs=2, seed=0)
    return VecNormalize(env) if normalize else env


CARTPOLE = dict(n_steps=64, batch_size=64, n_epochs=3, seed=0)
CHEETAH = dict(n_steps=128, batch_size=64, n_epochs=2, seed=0, policy_kwargs=dict(net_arch=[64, 64]))


def _reference(env: Any, seed: int = 7) -> ClippedPPO:
    """A reference policy that differs from the trained one (another seed, a few updates)."""
    return ClippedPPO("MlpPolicy", env, n_steps=64, batch_size=64, n_epochs=1, seed=seed).learn(256)


CASES: dict[str, Callable[[], tuple[ClippedPPO, int]]] = {
    "cartpole-plain": lambda: (ClippedPPO("MlpPolicy", _cartpole(), **CARTPOLE), 768),
    "cartpole-autograd": lambda: (ClippedPPO("MlpPolicy", _cartpole(), fast_update=False, **CARTPOLE), 512),
    "cartpole-batch-adv-vf-clip": lambda: (
        ClippedPPO(
            "MlpPolicy", _cartpole(), normalize_advantage="batch", clip_range_vf=0.2, target_kl=0.01, **CARTPOLE
        ),
        768,
    ),
    "cartpole-masked": lambda: (ClippedPPO("MlpPolicy", _cartpole(masked=True), **CARTPOLE), 768),
    "cartpole-recurrent": lambda: (
        ClippedPPO("MlpLstmPolicy", _cartpole(), n_steps=32, batch_size=64, n_epochs=2, seed=0),
        384,
    ),
    "cartpole-recurrent-masked": lambda: (
        ClippedPPO("MlpLstmPolicy", _cartpole(masked=True), n_steps=32, batch_size=64, n_epochs=2, seed=0),
        384,
    ),
    "cartpole-ref-reward-adaptive": lambda: (
        ClippedPPO(
            "MlpPolicy",
            _cartpole(),
            ref_policy=_reference(_cartpole()),
            ref_kl_coef="adaptive",
            ref_kl_target=0.01,
            ref_kl_horizon=1000,
            **CARTPOLE,
        ),
        768,
    ),
    "cartpole-ref-loss": lambda: (
        ClippedPPO("MlpPolicy", _cartpole(), ref_policy=_reference(_cartpole()), ref_kl_mode="loss", **CARTPOLE),
        768,
    ),
    "cartpole-ref-loss-masked": lambda: (
        ClippedPPO(
            "MlpPolicy",
            _cartpole(masked=True),
            ref_policy=_reference(_cartpole(masked=True)),
            ref_kl_mode="loss",
            ref_kl_coef=0.5,
            **CARTPOLE,
        ),
        768,
    ),
    "cartpole-stabilizers": lambda: (
        ClippedPPO(
            "MlpPolicy",
            _cartpole(),
            dual_clip=3.0,
            adaptive_lr_kl=0.01,
            normalize_value_targets=True,
            popart=True,
            **CARTPOLE,
        ),
        768,
    ),
    "cartpole-adaptive-lr-minibatch": lambda: (
        ClippedPPO(
            "MlpPolicy",
            _cartpole(),
            adaptive_lr_kl=0.005,
            adaptive_lr_every="minibatch",
            **{**CARTPOLE, "batch_size": 32},
        ),
        512,
    ),
    "cheetah-plain": lambda: (ClippedPPO("MlpPolicy", _cheetah(), **CHEETAH), 768),
    "cheetah-vecnormalize-value-norm": lambda: (
        ClippedPPO("MlpPolicy", _cheetah(normalize=True), normalize_value_targets=True, **CHEETAH),
        768,
    ),
    "cheetah-rpo-dual-clip": lambda: (
        ClippedPPO("MlpPolicy", _cheetah(), rpo_alpha=0.5, dual_clip=3.0, **CHEETAH),
        768,
    ),
    "cheetah-ref-loss-adaptive": lambda: (
        ClippedPPO(
            "MlpPolicy",
            _cheetah(),
            ref_policy=ClippedPPO("MlpPolicy", _cheetah(), seed=3, **{k: v for k, v in CHEETAH.items() if k != "seed"}),
            ref_kl_mode="loss",
            ref_kl_coef="adaptive",
            ref_kl_target=0.02,
            **CHEETAH,
        ),
        768,
    ),
    "cheetah-ref-reward": lambda: (
        ClippedPPO(
            "MlpPolicy",
            _cheetah(),
            ref_policy=ClippedPPO("MlpPolicy", _cheetah(), seed=3, **{k: v for k, v in CHEETAH.items() if k != "seed"}),
            ref_kl_coef=0.2,
            **CHEETAH,
        ),
        768,
    ),
    "cheetah-sde": lambda: (ClippedPPO("MlpPolicy", _cheetah(), use_sde=True, sde_sample_freq=16, **CHEETAH), 768),
    "cheetah-recurrent": lambda: (
        ClippedPPO("MlpLstmPolicy", _cheetah(), n_steps=64, batch_size=64, n_epochs=2, seed=0),
        256,
    ),
}


def _train(name: str) -> str:
    th.manual_seed(0)
    np.random.seed(0)
    model, steps = CASES[name]()
    model.learn(steps)
    return _digest(model)


def _pinned() -> dict[str, Any]:
    return json.loads(DIGESTS.read_text()) if DIGESTS.exists() else {}


@pytest.mark.parametrize("name", sorted(CASES))
def test_parameters_after_training_are_pinned(name: str) -> None:
    digest = _train(name)
    if PIN:
        pinned = _pinned()
        pinned.setdefault(_platform_keys()[0], {})[name] = digest
        DIGESTS.parent.mkdir(exist_ok=True)
        DIGESTS.write_text(json.dumps(pinned, indent=1, sort_keys=True) + "\n")
        return
    pinned = _pinned()
    key = next((key for key in _platform_keys() if key in pinned), None)
    on_this_platform = pinned.get(key, {}) if key else {}
    if name not in on_this_platform:
        pytest.skip(f"no digest pinned for {name!r} on {_platform_keys()[0]} (SB3_PPO_EXT_PIN_DIGESTS=1 pins them)")
    assert digest == on_this_platform[name], f"{name}: parameters after training moved"


def test_training_twice_gives_the_same_digest() -> None:
    """The digest is a function of the code alone (else the pins above would be meaningless)."""
    assert _train("cartpole-masked") == _train("cartpole-masked")
    assert _train("cheetah-rpo-dual-clip") != _train("cheetah-plain")
