"""The wheel ships the rl_zoo3 start-up hook: pip install makes clipped_ppo a Zoo algorithm, uninstall undoes it.

Builds the wheel from a copy of the sources (no network: ``--no-build-isolation``, ``--no-index``) and
installs it into a throwaway venv that borrows this environment's packages (torch, rl_zoo3) through a
path file. About 30 s.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.packaging

ROOT = Path(__file__).resolve().parents[1]
PTH_NAME = "sb3_ppo_ext_rl_zoo3.pth"


def _can_build_offline() -> str | None:
    """Why the wheel cannot be built here without the network, or ``None``."""
    if importlib.util.find_spec("rl_zoo3") is None:
        return "rl_zoo3 is not installed"
    try:
        from setuptools.command import bdist_wheel  # noqa: F401  (setuptools >= 70.1)
    except ImportError:
        if importlib.util.find_spec("wheel") is None:
            return "building without isolation needs setuptools >= 70.1 (or the wheel package)"
    pip_help = subprocess.run([sys.executable, "-m", "pip", "--help"], capture_output=True, text=True)
    if pip_help.returncode != 0:
        return "pip is not available"
    return None if "--python" in pip_help.stdout else "pip >= 22.3 is needed for --python"


def _run(*args: str | Path, cwd: Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{args}\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_wheel_installs_the_zoo_hook_and_uninstall_removes_it(tmp_path):
    reason = _can_build_offline()
    if reason:
        pytest.skip(reason)
    # a copy of the sources: the build's build/ and egg-info folders stay out of the checkout
    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.py", "setup.cfg", "pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "sb3_ppo_ext", source / "sb3_ppo_ext", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip"]
    wheels = tmp_path / "wheels"
    _run(*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", wheels, source, cwd=tmp_path)
    (wheel,) = wheels.glob("sb3_ppo_ext-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        record = archive.read(next(n for n in names if n.endswith(".dist-info/RECORD"))).decode()
    assert PTH_NAME in names and f"\n{PTH_NAME}," in "\n" + record  # at the root, listed for uninstall
    assert "sb3_ppo_ext/zoo/hyperparams/clipped_ppo.yml" in names

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = Path(_run(python, "-c", purelib, cwd=tmp_path).stdout.strip())
    # torch, SB3, rl_zoo3, ... from this environment (a plain path line: its own .pth files, among them an
    # editable install of sb3_ppo_ext, are not run)
    (site / "_borrowed_site_packages.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run(*pip, "--python", python, "install", "--no-deps", "--no-index", wheel, cwd=tmp_path)
    assert (site / PTH_NAME).exists()

    check = (
        "import sys; cheap = 'torch' not in sys.modules and 'sb3_ppo_ext' not in sys.modules\n"
        "from rl_zoo3.utils import ALGOS\n"
        "import sb3_ppo_ext\n"
        "print(cheap, 'clipped_ppo' in ALGOS, sb3_ppo_ext.__file__)\n"
    )
    cheap, registered, location = _run(python, "-c", check, cwd=tmp_path).stdout.split()
    assert cheap == "True" and registered == "True"  # the hook costs nothing at start-up, then registers
    assert Path(location).is_relative_to(site)  # the wheel's copy, not this checkout

    _run(*pip, "--python", python, "uninstall", "-y", "sb3_ppo_ext", cwd=tmp_path)
    assert not (site / PTH_NAME).exists()
    assert not (site / "sb3_ppo_ext").exists()
