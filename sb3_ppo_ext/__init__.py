"""sb3_ppo_ext: ClippedPPO, a from-scratch, drop-in Proximal Policy Optimization for Stable-Baselines3."""

from sb3_ppo_ext import _aliases

_aliases.install()  # old module paths (sb3_ppo_ext.reference, ...) keep working

# ruff: noqa: E402

from sb3_ppo_ext.policies import (
    ActorCriticCnnPolicy,
    ActorCriticPolicy,
    CnnPolicy,
    MlpPolicy,
    MultiInputActorCriticPolicy,
    MultiInputPolicy,
)
from sb3_ppo_ext.ppo import ClippedPPO

__version__ = "0.1.0"

__all__ = [
    "ActorCriticCnnPolicy",
    "ActorCriticPolicy",
    "ClippedPPO",
    "CnnPolicy",
    "MlpPolicy",
    "MultiInputActorCriticPolicy",
    "MultiInputPolicy",
    "__version__",
]
