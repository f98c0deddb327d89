"""The import paths of modules that moved into sub-packages keep working (code, pickles, saved models).

``import sb3_ppo_ext.reference`` gives the module now at ``sb3_ppo_ext.rlhf.reference``, the same object, so
``isinstance`` checks, monkeypatching and unpickling a model saved before the move all behave as before.
docs/architecture.md lists which paths are public.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Any

#: old path -> the module's home
MOVED_MODULES: dict[str, str] = {
    "sb3_ppo_ext.recurrent_policies": "sb3_ppo_ext.recurrent.policies",
    "sb3_ppo_ext.sequences": "sb3_ppo_ext.recurrent.sequences",
    "sb3_ppo_ext.reference": "sb3_ppo_ext.rlhf.reference",
    "sb3_ppo_ext.preferences": "sb3_ppo_ext.rlhf.preferences",
    "sb3_ppo_ext.normalizers": "sb3_ppo_ext.stabilizers.value_normalization",
    "sb3_ppo_ext.checks": "sb3_ppo_ext.reliability.checks",
    "sb3_ppo_ext.finite": "sb3_ppo_ext.reliability.finite",
    "sb3_ppo_ext.checkpoints": "sb3_ppo_ext.reliability.checkpoints",
    "sb3_ppo_ext.worker_guard": "sb3_ppo_ext.reliability.worker_guard",
    "sb3_ppo_ext.presets": "sb3_ppo_ext.zoo.presets",
    "sb3_ppo_ext.envs": "sb3_ppo_ext.zoo.envs",
    "sb3_ppo_ext.fast.matmul": "sb3_ppo_ext.matmul",
}


class _AliasLoader(importlib.abc.Loader):
    """Loads an old path as the module at its new home (imported once, shared under both names)."""

    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(self.target)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module at the new path has run already."""


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds the old paths of :data:`MOVED_MODULES`."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        """A spec that loads the module's new home, for an old path; None for every other name."""
        home = MOVED_MODULES.get(fullname)
        if home is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(home))


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (importing ``sb3_ppo_ext`` does this)."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
