"""RL Baselines3 Zoo plug-in: ``clipped_ppo`` as an rl_zoo3 algorithm.

rl_zoo3 keeps its algorithms in a plain dict (``rl_zoo3.utils.ALGOS``) and reads ``--algo``'s choices
from it when its command line is built, before ``--gym-packages`` are imported; it has no entry-point
plug-in mechanism. So ClippedPPO must be registered before ``rl_zoo3.utils`` is used. This is done by
a start-up hook, ``sb3_ppo_ext_rl_zoo3.pth``: Python runs it at start-up; it only installs a small
import hook (no import of torch or of this package) that registers ClippedPPO right after rl_zoo3
loads its registry. With it, ``python -m rl_zoo3.train --algo clipped_ppo ...`` and
``python -m rl_zoo3.enjoy ...`` work unchanged.

* ``pip install sb3_ppo_ext[zoo]`` (a wheel, built from a checkout or an sdist) puts the hook into
  site-packages as one of the package's files (``setup.py`` writes it), and ``pip uninstall`` removes
  it. Nothing else to do.
* Editable installs (``pip install -e .``) cannot ship it: setuptools' editable wheels hold only the
  path hooks to the source tree, not the build's extra files. There, run
  ``python -m sb3_ppo_ext.zoo install-hook`` once, and ``uninstall-hook`` before ``pip uninstall``
  (which does not know the file).
* Or, without any hook: ``python -m sb3_ppo_ext.zoo train --algo clipped_ppo --env CartPole-v1`` (and
  ``enjoy``, ``record_video``) registers, then runs rl_zoo3's own script with the remaining arguments.

Registering adds ClippedPPO to ``ALGOS``, PPO's optuna sampler and converter under ``clipped_ppo``
(so ``-optimize`` works), and makes ``sb3_ppo_ext/zoo/hyperparams/clipped_ppo.yml`` (a mirror of the
Zoo's ``ppo.yml``) the default ``--conf-file`` for ``--algo clipped_ppo``.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import runpy
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

# This module's top level imports the standard library only: setup.py loads it on its own, without
# torch or this package, to write the hook into the wheel (hook_line()).

#: The algorithm name rl_zoo3 knows ClippedPPO by (``--algo clipped_ppo``, ``logs/clipped_ppo/``).
ALGO_NAME = "clipped_ppo"
#: The Zoo-format hyperparameters used by default for ``--algo clipped_ppo`` (in ``presets.HYPERPARAMS_DIR``).
HYPERPARAMS_PATH = Path(__file__).resolve().parent / "hyperparams" / "clipped_ppo.yml"
#: File name of the start-up hook, in site-packages (shipped in the wheel, or written by ``install-hook``).
PTH_NAME = "sb3_ppo_ext_rl_zoo3.pth"

# rl_zoo3 scripts that ``python -m sb3_ppo_ext.zoo <name>`` can run after registering.
_SCRIPTS = {
    "train": ("rl_zoo3.train", "train"),
    "enjoy": ("rl_zoo3.enjoy", "enjoy"),
    "record_video": ("rl_zoo3.record_video", None),
    "record_training": ("rl_zoo3.record_training", None),
}

# The start-up hook, run from a .pth line: a meta-path finder that wraps the loading of the three
# rl_zoo3 modules holding registries, and hands each module to patch_module() once it has run.
_HOOK_SOURCE = '''
import sys


class ClippedPPOZooHook:
    """Registers sb3_ppo_ext's ClippedPPO with rl_zoo3 as rl_zoo3 loads (written by sb3_ppo_ext.zoo)."""

    modules = frozenset({"rl_zoo3.utils", "rl_zoo3.hyperparams_opt", "rl_zoo3.exp_manager"})

    def find_spec(self, name, path=None, target=None):
        if name not in self.modules:
            return None
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            try:
                from sb3_ppo_ext import zoo
            except ModuleNotFoundError as exc:
                if exc.name == "sb3_ppo_ext":
                    return  # the package was uninstalled: leave rl_zoo3 as it is
                raise
            zoo.patch_module(module)

        spec.loader.exec_module = exec_module
        return spec


if not any(type(finder).__name__ == "ClippedPPOZooHook" for finder in sys.meta_path):
    sys.meta_path.insert(0, ClippedPPOZooHook())
'''


def _patch_algos(utils: ModuleType) -> None:
    from sb3_ppo_ext import ClippedPPO

    utils.ALGOS.setdefault(ALGO_NAME, ClippedPPO)


def _patch_optuna(hyperparams_opt: ModuleType) -> None:
    # ClippedPPO takes PPO's arguments: PPO's search space and parameter conversion apply as they are
    hyperparams_opt.HYPERPARAMS_SAMPLER.setdefault(ALGO_NAME, hyperparams_opt.HYPERPARAMS_SAMPLER["ppo"])
    hyperparams_opt.HYPERPARAMS_CONVERTER.setdefault(ALGO_NAME, hyperparams_opt.HYPERPARAMS_CONVERTER["ppo"])


def _patch_default_config(exp_manager: ModuleType) -> None:
    # ExperimentManager looks for hyperparams/<algo>.yml inside rl_zoo3; point clipped_ppo at ours
    cls = exp_manager.ExperimentManager
    original = cls.__init__
    if getattr(original, "_sb3_ppo_ext_patched", False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(*args: object, **kwargs: object) -> None:
        bound = signature.bind(*args, **kwargs)
        if bound.arguments.get("algo") == ALGO_NAME and not bound.arguments.get("config"):
            bound.arguments["config"] = str(HYPERPARAMS_PATH)
        original(*bound.args, **bound.kwargs)

    __init__._sb3_ppo_ext_patched = True  # type: ignore[attr-defined]
    cls.__init__ = __init__


_PATCHES = {
    "rl_zoo3.utils": _patch_algos,
    "rl_zoo3.hyperparams_opt": _patch_optuna,
    "rl_zoo3.exp_manager": _patch_default_config,
}


def patch_module(module: ModuleType) -> None:
    """Register ClippedPPO in one freshly loaded rl_zoo3 module (the import hook calls this).

    :param module: ``rl_zoo3.utils``, ``rl_zoo3.hyperparams_opt`` or ``rl_zoo3.exp_manager``.
    :raises KeyError: for another module.
    """
    _PATCHES[module.__name__](module)


def register() -> None:
    """Register ClippedPPO as ``clipped_ppo`` with rl_zoo3 (idempotent), in the running interpreter.

    :raises ModuleNotFoundError: when ``rl_zoo3`` is not installed (``pip install ".[zoo]"``).
    """
    for name in _PATCHES:
        patch_module(importlib.import_module(name))


def hook_line() -> str:
    """The one line of the ``.pth`` start-up hook (site runs lines that start with ``import``).

    :return: the line, newline included.
    """
    return f"import sys; exec({_HOOK_SOURCE!r}, {{'__name__': 'sb3_ppo_ext_rl_zoo3_hook'}})\n"


def install_hook(site_dir: str | Path | None = None) -> Path:
    """Write the start-up hook (for editable installs, which cannot ship it).

    :param site_dir: the folder for the ``.pth`` file; None: this interpreter's site-packages.
    :return: the path written.
    """
    path = Path(site_dir or sysconfig.get_path("purelib")) / PTH_NAME
    path.write_text(hook_line())
    return path


def uninstall_hook(site_dir: str | Path | None = None) -> Path | None:
    """Remove the start-up hook.

    :param site_dir: the folder of the ``.pth`` file; None: this interpreter's site-packages.
    :return: the path removed, or None if there was no hook.
    """
    path = Path(site_dir or sysconfig.get_path("purelib")) / PTH_NAME
    if not path.exists():
        return None
    path.unlink()
    return path


def run_script(name: str, argv: Sequence[str]) -> None:
    """Register, then run rl_zoo3's script ``name`` as if called as ``python -m rl_zoo3.<name> argv``.

    :param name: ``"train"``, ``"enjoy"``, ``"record_video"`` or ``"record_training"``.
    :param argv: the script's command-line arguments.
    """
    module_name, function = _SCRIPTS[name]
    register()
    saved_argv, sys.argv = sys.argv, [module_name, *argv]  # rl_zoo3's scripts parse sys.argv
    try:
        if function is None:
            runpy.run_module(module_name, run_name="__main__", alter_sys=True)
        else:
            getattr(importlib.import_module(module_name), function)()
    finally:
        sys.argv = saved_argv


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sb3_ppo_ext.zoo``: run an rl_zoo3 script with ClippedPPO registered, or manage the hook.

    :param argv: the command line without the program name; None: ``sys.argv[1:]``.
    :return: the exit status, 0.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m sb3_ppo_ext.zoo",
        description="Use ClippedPPO from the RL Baselines3 Zoo as --algo clipped_ppo. A wheel install "
        f"(pip install 'sb3_ppo_ext[zoo]') ships the start-up hook {PTH_NAME}, so that plain "
        "`python -m rl_zoo3.train --algo clipped_ppo` works; install-hook/uninstall-hook are for editable "
        "installs (pip install -e), which cannot ship it.",
        epilog="Everything after train/enjoy/record_video/record_training goes to rl_zoo3, e.g. "
        "python -m sb3_ppo_ext.zoo train --algo clipped_ppo --env CartPole-v1",
    )
    parser.add_argument(
        "command",
        choices=[*_SCRIPTS, "install-hook", "uninstall-hook", "hyperparams"],
        help="run an rl_zoo3 script with clipped_ppo registered; (editable installs) write or remove the "
        "start-up hook; print the path of the default clipped_ppo.yml",
    )
    parser.add_argument("--site-dir", default=None, help="(install-hook/uninstall-hook) folder for the .pth file")
    if not argv or argv[0] not in _SCRIPTS:
        args = parser.parse_args(argv)
    else:
        args, rest = parser.parse_args(argv[:1]), argv[1:]
    if args.command in _SCRIPTS:
        run_script(args.command, rest)
    elif args.command == "install-hook":
        print(f"wrote {install_hook(args.site_dir)}: `python -m rl_zoo3.train --algo {ALGO_NAME}` now works")
    elif args.command == "uninstall-hook":
        removed = uninstall_hook(args.site_dir)
        print(f"removed {removed}" if removed else "no hook installed")
    else:
        print(HYPERPARAMS_PATH)
    return 0


if __name__ == "__main__":
    sys.exit(main())
