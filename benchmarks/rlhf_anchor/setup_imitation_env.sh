#!/usr/bin/env bash
# A separate virtual environment in which the `imitation` library (1.0.1) runs beside SB3 2.9 and gymnasium 1.x.
#
# imitation 1.0.1 pins stable-baselines3~=2.2.1 and gymnasium~=0.29, so `pip install imitation` would downgrade
# SB3 and gymnasium (and may pull another torch). Instead this venv:
#   * sees the main environment's packages (--system-site-packages): torch (CPU), SB3, gymnasium, numpy, scipy,
#     tqdm and sb3_ppo_ext itself, exactly as installed there; nothing in the main environment is changed;
#   * installs imitation==1.0.1 with --no-deps;
#   * installs only the third-party modules that the preference-comparisons code path imports and that the
#     main environment lacks (on this project's machine: none; scipy and tqdm are checked), never torch, SB3
#     or gymnasium;
#   * checks the imports and prints the versions it will run with.
# imitation's other declared dependencies (sacred, seals, datasets, huggingface_sb3, optuna, scikit-learn,
# matplotlib) serve its command-line scripts, datasets and other algorithms, which compare.py does not use.
#
# Usage: bash benchmarks/rlhf_anchor/setup_imitation_env.sh [VENV_DIR]   (default /tmp/imit-venv)
set -euo pipefail

VENV="${1:-/tmp/imit-venv}"
PYTHON="${PYTHON:-python}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv --system-site-packages "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

"${PIP[@]}" install --no-deps "imitation==1.0.1"

# third-party modules imported by imitation.algorithms.preference_comparisons and imitation.rewards (besides
# torch, numpy, gymnasium and stable_baselines3, which must come from the main environment)
missing=()
for pair in "scipy:scipy" "tqdm:tqdm"; do
    module="${pair%%:*}"
    package="${pair##*:}"
    if ! "$VENV/bin/python" -c "import $module" 2>/dev/null; then
        missing+=("$package")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    # --no-deps: never let a resolver replace numpy/torch that the main environment provides
    "${PIP[@]}" install --no-deps "${missing[@]}"
fi

"$VENV/bin/python" - <<'PY'
import importlib.metadata as md

import gymnasium
import stable_baselines3
import torch
from imitation.algorithms import preference_comparisons  # noqa: F401
from imitation.rewards import reward_nets, reward_wrapper  # noqa: F401
from imitation.util import networks  # noqa: F401

import sb3_ppo_ext  # noqa: F401  (the held-out evaluation loads both reward models in this venv)

print(
    f"imitation {md.version('imitation')}, stable-baselines3 {stable_baselines3.__version__}, "
    f"gymnasium {gymnasium.__version__}, torch {torch.__version__}: imports OK"
)
PY
echo "imitation venv ready: $VENV/bin/python"
