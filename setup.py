"""Build script: setup.cfg holds the metadata; this adds the rl_zoo3 start-up hook to the wheel.

``sb3_ppo_ext_rl_zoo3.pth`` goes to the root of the wheel's purelib, i.e. into site-packages next to
the package, so that ``python -m rl_zoo3.train --algo clipped_ppo`` works after ``pip install`` and
``pip uninstall`` removes the file again (it is listed in the wheel's RECORD). ``data_files`` cannot do
this: they are installed relative to the prefix, not to site-packages.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _zoo_module() -> ModuleType:
    # loaded on its own: importing the package would need torch, which the build environment lacks
    spec = importlib.util.spec_from_file_location("_sb3_ppo_ext_zoo", ROOT / "sb3_ppo_ext" / "zoo" / "plugin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithZooHook(build_py):
    """``build_py`` that also writes the rl_zoo3 start-up hook at the root of ``build_lib``."""

    def run(self) -> None:
        """Build the package as usual, then write the hook."""
        super().run()
        zoo = _zoo_module()
        target = Path(self.build_lib) / zoo.PTH_NAME
        target.write_text(zoo.hook_line())

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        """The package's files and the hook (what the wheel's RECORD lists)."""
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / _zoo_module().PTH_NAME)]


setup(cmdclass={"build_py": BuildPyWithZooHook})
