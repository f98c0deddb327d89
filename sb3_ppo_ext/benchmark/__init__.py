"""RL-Zoo-style benchmark harness: multi-seed runs, rliable statistics, plots, ablations.

Command line: ``python -m sb3_ppo_ext.benchmark --help``. The same steps from Python::

    from sb3_ppo_ext.benchmark import execute, plan
    specs = plan(["CartPole-v1"], ["clipped_ppo", "ppo"], seeds=range(3), budgets={"CartPole-v1": 100_000})
    execute(specs, "results/", n_jobs=2)

Modules, in the order data flows: ``runner`` (plan, run in parallel, resume) -> ``runs`` (train and
evaluate one run, write its JSON atomically) -> ``statistics`` (final scores, IQM and CIs,
summary.md) -> ``plots``; ``ablations`` holds the variants. The Zoo YAML files are in
``sb3_ppo_ext/zoo/hyperparams/`` (read by ``sb3_ppo_ext.zoo.presets``), the envs built by ``sb3_ppo_ext.zoo.envs``.
"""

from sb3_ppo_ext.benchmark.runner import Outcome, execute, plan
from sb3_ppo_ext.benchmark.runs import ALGOS, RunSpec, train_and_evaluate

__all__ = ["ALGOS", "Outcome", "RunSpec", "execute", "plan", "train_and_evaluate"]
