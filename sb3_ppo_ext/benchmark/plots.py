"""PNG plots: learning curves (IQM over seeds with 95% bootstrap CIs) and rliable's aggregate plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed

import numpy as np  # noqa: E402
import scipy.stats  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402
from rliable import plot_utils  # noqa: E402

from sb3_ppo_ext.benchmark.statistics import AGGREGATE_METRICS, Results, interval_estimates  # noqa: E402

CURVE_POINTS = 50
AGGREGATE_ROW_HEIGHT = 0.5  # inches per algorithm in the aggregate plot


def curve_grid(runs_by_label: dict[str, list[dict[str, Any]]], points: int = CURVE_POINTS) -> np.ndarray:
    """Common env-step grid: 0 to the shortest run's last evaluation (runs overshoot budgets differently).

    :param runs_by_label: the result records of one env, by algorithm or variant.
    :param points: number of grid points.
    :return: ``points`` env-step counts, evenly spaced.
    """
    end = min(run["evaluations"]["timesteps"][-1] for runs in runs_by_label.values() for run in runs)
    return np.linspace(0, end, points)


def interpolated_returns(runs: Sequence[dict[str, Any]], grid: np.ndarray) -> np.ndarray:
    """Each run's evaluation returns linearly interpolated onto ``grid``.

    :param runs: result records, each with its ``evaluations``.
    :param grid: env-step counts (:func:`curve_grid`).
    :return: the returns, shape ``[n_runs, len(grid)]``.
    """
    return np.stack(
        [np.interp(grid, run["evaluations"]["timesteps"], run["evaluations"]["mean_return"]) for run in runs]
    )


def _iqm_per_point(scores: np.ndarray) -> np.ndarray:
    # scores: [n_runs, 1 task, n_points] -> IQM over runs at every point (rliable's aggregate_iqm, vectorised)
    return scipy.stats.trim_mean(scores[:, 0, :], proportiontocut=0.25, axis=0)


def plot_curves(env_id: str, runs_by_label: dict[str, list[dict[str, Any]]], path: Path, reps: int = 2000) -> Path:
    """Learning curves of every label on ``env_id``: IQM of the eval return with a shaded 95% CI.

    :param env_id: the env, for the title.
    :param runs_by_label: the env's result records, by algorithm or variant.
    :param path: the PNG file to write.
    :param reps: bootstrap resamples for the confidence intervals.
    :return: ``path``.
    """
    grid = curve_grid(runs_by_label)
    scores = {label: interpolated_returns(runs, grid)[:, None, :] for label, runs in runs_by_label.items()}
    points, intervals = interval_estimates(scores, _iqm_per_point, reps)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label in runs_by_label:
        n_runs = scores[label].shape[0]
        (line,) = ax.plot(grid, points[label], label=f"{label} ({n_runs} seeds)")
        ax.fill_between(grid, intervals[label][0], intervals[label][1], color=line.get_color(), alpha=0.2)
    ax.set_title(env_id)
    ax.set_xlabel("env steps")
    ax.set_ylabel("eval return (IQM, 95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_aggregate(aggregates: tuple[dict[str, np.ndarray], dict[str, np.ndarray]], path: Path) -> Path:
    """Plot rliable's interval estimates of the aggregate metrics across envs.

    :param aggregates: point estimates and intervals per label, as :func:`~sb3_ppo_ext.benchmark.statistics.aggregate`
        returns them.
    :param path: the PNG file to write.
    :return: ``path``.
    """
    points, intervals = aggregates
    fig, _ = plot_utils.plot_interval_estimates(
        points,
        intervals,
        metric_names=list(AGGREGATE_METRICS),
        algorithms=list(points),
        xlabel="Normalized score (95% CI)",
        subfigure_width=4.0,
        max_ticks=3,
        row_height=AGGREGATE_ROW_HEIGHT,
        # in figure coordinates: 0.45 inch below the axes, whatever the number of rows
        xlabel_y_coordinate=-0.45 / (AGGREGATE_ROW_HEIGHT * len(points)),
    )
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_all(
    out: Path, results: Results, aggregates: tuple[dict[str, Any], dict[str, Any]] | None, reps: int = 2000
) -> list[str]:
    """Write ``curves_<env>.png`` per env and ``summary_aggregate.png``.

    :param out: the output folder.
    :param results: result records by env and label (:func:`~sb3_ppo_ext.benchmark.statistics.load_results`).
    :param aggregates: the aggregate estimates across envs, or None (one env: no aggregate plot).
    :param reps: bootstrap resamples for the curves' confidence intervals.
    :return: the names of the files written, in ``out``.
    """
    out = Path(out)
    names = []
    for env_id, runs_by_label in results.items():
        names.append(plot_curves(env_id, runs_by_label, out / f"curves_{env_id}.png", reps).name)
    if aggregates is not None:
        names.append(plot_aggregate(aggregates, out / "summary_aggregate.png").name)
    return names
