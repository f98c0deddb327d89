"""Aggregate run results: final returns over seeds, IQM with bootstrap CIs (rliable), summary.md.

Score of a run = the mean return of its last evaluation. Per env and algorithm the summary gives the
mean +- std over seeds and the interquartile mean (IQM) with a 95% percentile-bootstrap CI over seeds
(Agarwal et al. 2021, via ``rliable``); across envs, scores are normalized to
``(score - random) / (reference - random)`` with :data:`REFERENCE_SCORES`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rliable import library as rly
from rliable import metrics

from sb3_ppo_ext.benchmark.ablations import ABLATIONS
from sb3_ppo_ext.benchmark.runs import ALGOS, load_result, write_json
from sb3_ppo_ext.checkpoints import atomic_write

#: env id -> (uniform-random policy return, reference return). Random: measured with uniformly random
#: actions (50 episodes classic control, 10 MuJoCo). Reference: Gymnasium's ``reward_threshold``, or
#: where there is none (Pendulum, Walker2d) a round return of a good policy. Used only to put envs on
#: one scale for the aggregate plot; envs not listed are min-max normalized over the benchmark's runs.
REFERENCE_SCORES: dict[str, tuple[float, float]] = {
    "CartPole-v1": (25.1, 475.0),
    "Acrobot-v1": (-494.2, -100.0),
    "Pendulum-v1": (-1227.8, -150.0),
    "LunarLander-v3": (-210.2, 200.0),
    "HalfCheetah-v5": (-233.7, 4800.0),
    "Hopper-v5": (31.1, 3800.0),
    "Walker2d-v5": (5.7, 4000.0),
    # hiding velocities changes neither a random policy's return nor the threshold
    "CartPoleNoVel-v1": (25.1, 475.0),
    "PendulumNoVel-v1": (-1227.8, -150.0),
    # random actions are invalid 7 times in 8 at once: -1; reference: the optimal return
    "MaskedMemory-v0": (-1.0, 1.0),
}

AGGREGATE_METRICS = ("Median", "IQM", "Mean", "Optimality Gap")
_AGGREGATE_FUNCS = (
    metrics.aggregate_median,
    metrics.aggregate_iqm,
    metrics.aggregate_mean,
    metrics.aggregate_optimality_gap,
)

Results = dict[str, dict[str, list[dict[str, Any]]]]  # env -> label -> runs (sorted by seed)


def load_results(out: Path) -> Results:
    """Every finished run under ``out/raw``, grouped by env and label, labels in the benchmark's order."""
    results: Results = {}
    for path in sorted(Path(out).glob("raw/*/*/seed*.json")):
        result = load_result(path)
        if result is None:
            continue
        spec = result["spec"]
        label = spec["variant"] or spec["algo"]
        results.setdefault(spec["env_id"], {}).setdefault(label, []).append(result)
    return {
        env: {label: sorted(runs[label], key=lambda r: r["spec"]["seed"]) for label in sorted(runs, key=_label_order)}
        for env, runs in results.items()
    }


def _label_order(label: str) -> tuple[int, str]:
    # algorithms in ALGOS order, then ablation variants in their table order
    order = list(ALGOS) + [variant for variants in ABLATIONS.values() for variant in variants]
    return (order.index(label) if label in order else len(order), label)


def final_scores(runs: Sequence[dict[str, Any]]) -> np.ndarray:
    """Final evaluation returns of ``runs``, shape ``[n_runs]``."""
    return np.array([run["final_return"] for run in runs], dtype=float)


def interval_estimates(
    scores: dict[str, np.ndarray], func: Any, reps: int = 2000, seed: int = 0
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Rliable's ``get_interval_estimates`` (95% stratified percentile bootstrap), reproducible by ``seed``.

    :param scores: label -> scores ``[n_runs, n_tasks, ...]``.
    :param func: scores -> array of statistics.
    """
    with warnings.catch_warnings():
        # arch deprecates RandomState seeding; rliable 1.2 still passes one
        warnings.simplefilter("ignore", FutureWarning)
        return rly.get_interval_estimates(scores, func, reps=reps, random_state=np.random.RandomState(seed))


def iqm_ci(scores: np.ndarray, reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """IQM of ``scores`` (``[n_runs]``) with its 95% percentile-bootstrap CI: ``(iqm, low, high)``."""
    points, intervals = interval_estimates(
        {"x": scores.reshape(-1, 1)}, lambda s: np.array([metrics.aggregate_iqm(s)]), reps, seed
    )
    return float(points["x"][0]), float(intervals["x"][0, 0]), float(intervals["x"][1, 0])


@dataclass
class Row:
    """One line of the summary table: one algorithm (or ablation variant) on one env."""

    env_id: str
    label: str
    seeds: int
    timesteps: int
    zoo_timesteps: int | None
    mean: float
    std: float
    iqm: float
    iqm_low: float
    iqm_high: float
    wall_min: float
    steps_per_s: float


def summarize(results: Results, reps: int = 2000) -> list[Row]:
    """One :class:`Row` per (env, label)."""
    rows = []
    for env_id, by_label in results.items():
        for label, runs in by_label.items():
            scores = final_scores(runs)
            iqm, low, high = iqm_ci(scores, reps)
            rows.append(
                Row(
                    env_id=env_id,
                    label=label,
                    seeds=len(runs),
                    timesteps=int(np.mean([run["total_timesteps"] for run in runs])),
                    zoo_timesteps=runs[0].get("zoo_timesteps"),
                    mean=float(scores.mean()),
                    std=float(scores.std()),
                    iqm=iqm,
                    iqm_low=low,
                    iqm_high=high,
                    wall_min=float(np.mean([run["wall_s"] for run in runs]) / 60),
                    steps_per_s=float(np.mean([run["steps_per_s"] for run in runs])),
                )
            )
    return rows


def normalize(env_id: str, scores: np.ndarray, all_env_scores: Iterable[float]) -> np.ndarray:
    """Scores on the ``(score - random) / (reference - random)`` scale of :data:`REFERENCE_SCORES`."""
    if env_id in REFERENCE_SCORES:
        low, high = REFERENCE_SCORES[env_id]
    else:
        values = list(all_env_scores)
        low, high = min(values), max(values)
    return (scores - low) / (high - low) if high != low else np.zeros_like(scores)


def normalized_score_matrices(results: Results) -> dict[str, np.ndarray]:
    """Normalized final scores per label, ``[n_runs, n_envs]`` over the envs every label ran on.

    rliable needs the same number of runs per env, so each label keeps its first common seeds.
    """
    labels = [label for label in next(iter(results.values()), {}) if all(label in r for r in results.values())]
    matrices = {}
    for label in labels:
        n_runs = min(len(by_label[label]) for by_label in results.values())
        columns = []
        for env_id, by_label in results.items():
            all_scores = np.concatenate([final_scores(runs) for runs in by_label.values()])
            columns.append(normalize(env_id, final_scores(by_label[label][:n_runs]), all_scores))
        matrices[label] = np.stack(columns, axis=1)
    return matrices


def aggregate(results: Results, reps: int = 2000) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The aggregate metrics (:data:`AGGREGATE_METRICS`, rliable) across envs: point estimates and CIs."""
    return interval_estimates(
        normalized_score_matrices(results), lambda s: np.array([func(s) for func in _AGGREGATE_FUNCS]), reps
    )


def _k(steps: float | None) -> str:
    # 768 -> "768", 100000 -> "100k", 1500000 -> "1.5M"
    if steps is None:
        return "?"
    if steps < 1e3:
        return f"{steps:.0f}"
    return f"{steps / 1e3:.3g}k" if steps < 1e6 else f"{steps / 1e6:.3g}M"


def summary_markdown(
    results: Results,
    rows: Sequence[Row],
    aggregates: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None,
    *,
    title: str,
    command: str,
    plots: Sequence[str] = (),
) -> str:
    """The text of ``summary.md``."""
    lines = [f"# {title}", "", "Reproduce with:", "", "```", command, "```", ""]
    lines += [
        "Score of a run: mean return over the episodes of its last evaluation (separate eval env,",
        "deterministic actions except on Atari, as in the RL Zoo). Mean +- std over seeds; IQM =",
        "interquartile mean with a 95% percentile-bootstrap CI over seeds (rliable). Env steps: the",
        "budget run (the RL Zoo's budget in brackets when it differs). Wall-clock: mean per run,",
        "training and evaluation; env-steps/s: training steps per second of training time, one CPU thread.",
        "",
        "| env | algorithm | seeds | env steps | final return (mean ± std) | IQM [95% CI] "
        "| wall-clock / run | env-steps/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        budget = _k(row.timesteps)
        if row.zoo_timesteps and row.zoo_timesteps != row.timesteps:
            budget += f" (Zoo {_k(row.zoo_timesteps)})"
        lines.append(
            f"| {row.env_id} | {row.label} | {row.seeds} | {budget} | {row.mean:.1f} ± {row.std:.1f} "
            f"| {row.iqm:.1f} [{row.iqm_low:.1f}, {row.iqm_high:.1f}] | {row.wall_min:.1f} min "
            f"| {row.steps_per_s:.0f} |"
        )
    if aggregates is not None:
        points, intervals = aggregates
        lines += [
            "",
            f"## Aggregate over {len(results)} envs (normalized scores)",
            "",
            "Normalized score = (score - random) / (reference - random); 95% stratified-bootstrap CIs.",
            "",
            "| algorithm | " + " | ".join(AGGREGATE_METRICS) + " |",
            "|---|" + "---:|" * len(AGGREGATE_METRICS),
        ]
        for label, point in points.items():
            cells = [f"{p:.2f} [{lo:.2f}, {hi:.2f}]" for p, lo, hi in zip(point, *intervals[label], strict=True)]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines += ["", "| env | random | reference |", "|---|---:|---:|"]
        for env_id in results:
            low, high = REFERENCE_SCORES.get(env_id, (float("nan"), float("nan")))
            note = "" if env_id in REFERENCE_SCORES else " (min-max over these runs)"
            lines.append(f"| {env_id}{note} | {low:g} | {high:g} |")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def write_summary(out: Path, rows: Sequence[Row], markdown: str) -> tuple[Path, Path]:
    """Write ``summary.md`` and ``summary.json`` (the rows) atomically; return their paths."""
    out = Path(out)
    md_path, json_path = out / "summary.md", out / "summary.json"
    write_json(json_path, [asdict(row) for row in rows])
    with atomic_write(md_path) as file:
        file.write(markdown.encode())
    return md_path, json_path
