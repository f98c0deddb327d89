"""Aggregate run results: final returns over seeds, IQM with bootstrap CIs (rliable), summary.md.

Score of a run = the mean return of its last evaluation. Per env and algorithm the summary gives the
mean +- std over seeds and the interquartile mean (IQM) with a 95% percentile-bootstrap CI over seeds
(Agarwal et al. 2021, via ``rliable``); across envs, scores are normalized to
``(score - random) / (reference - random)`` with :data:`REFERENCE_SCORES`. The probability of improvement
``P(X > Y)`` (rliable's Mann-Whitney form) compares ClippedPPO with each other algorithm, or each ablation
variant with the ablation's reference; runs trained at 1M env steps are set beside :data:`PUBLISHED_1M`.
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

from sb3_ppo_ext.benchmark.ablations import ABLATIONS, CONTROLS
from sb3_ppo_ext.benchmark.runs import ALGOS, load_result, write_json
from sb3_ppo_ext.reliability.checkpoints import atomic_write

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
    "Ant-v5": (-17.2, 6000.0),
    # hiding velocities changes neither a random policy's return nor the threshold
    "CartPoleNoVel-v1": (25.1, 475.0),
    "PendulumNoVel-v1": (-1227.8, -150.0),
    # random actions are invalid 7 times in 8 at once: -1; reference: the optimal return
    "MaskedMemory-v0": (-1.0, 1.0),
}

#: Published PPO returns at 1M env steps: env -> source -> return (issue 16's anchors). Each source's own
#: protocol differs from ours; :data:`PUBLISHED_CAVEATS` says how.
PUBLISHED_1M: dict[str, dict[str, float]] = {
    "HalfCheetah-v5": {"RL Zoo": 5819.0, "CleanRL": 1443.0},
    "Hopper-v5": {"RL Zoo": 2410.0, "CleanRL": 2383.0},
    "Walker2d-v5": {"RL Zoo": 3479.0, "CleanRL": 2288.0},
    "Ant-v5": {"RL Zoo": 1327.0},
}
PUBLISHED_CAVEATS: dict[str, str] = {
    "RL Zoo": "rl-baselines3-zoo benchmark.md, SB3 PPO with the Zoo's tuned settings on the v3 envs, one training "
    "run, its mean return over 150k steps of deterministic evaluation",
    "CleanRL": "CleanRL's ppo_continuous_action on the v4 envs with CleanRL's own settings (not the Zoo's), 3 seeds, "
    "returns of its training episodes (stochastic actions)",
}
#: A run with less than this share of a core over its wall-clock shared the CPU with other work (or was paused).
SHARED_CPU_BELOW = 0.9

AGGREGATE_METRICS = ("Median", "IQM", "Mean", "Optimality Gap")
_AGGREGATE_FUNCS = (
    metrics.aggregate_median,
    metrics.aggregate_iqm,
    metrics.aggregate_mean,
    metrics.aggregate_optimality_gap,
)

Results = dict[str, dict[str, list[dict[str, Any]]]]  # env -> label -> runs (sorted by seed)


def load_results(out: Path) -> Results:
    """Every finished run under ``out/raw``, grouped by env and label.

    :param out: the output folder.
    :return: env -> label -> result records sorted by seed; labels in the benchmark's order (unreadable files
        are skipped).
    """
    results: Results = {}
    for path in sorted(Path(out).glob("raw/*/*/seed*.json")):
        result = load_result(path)
        if result is None:
            continue
        spec = result["spec"]
        label = spec["variant"] or spec["algo"]
        results.setdefault(spec["env_id"], {}).setdefault(label, []).append(result)
    return {
        env: {label: sorted(runs[label], key=lambda r: r["spec"]["seed"]) for label in ordered_labels(runs)}
        for env, runs in results.items()
    }


def ordered_labels(labels: Iterable[str]) -> list[str]:
    """Labels in the benchmark's order: algorithms as in ``ALGOS``, then variants as in their ablation's table.

    Variant names recur across ablations (``no_obs_norm`` is in ``details`` and in ``tuned``), so the ablation
    holding most of the labels gives the order: its reference comes first, and the other variants are compared
    with it (:func:`improvement_pairs`).

    :param labels: algorithm or variant names.
    :return: the distinct labels, ordered.
    """
    labels = set(labels)
    ablation = max(ABLATIONS.values(), key=lambda variants: len(labels & set(variants)))  # ties: the first
    order = [*ALGOS, *ablation, *(variant for variants in ABLATIONS.values() for variant in variants)]
    return sorted(labels, key=lambda label: (order.index(label) if label in order else len(order), label))


def final_scores(runs: Sequence[dict[str, Any]]) -> np.ndarray:
    """Final evaluation returns of ``runs``.

    :param runs: result records.
    :return: each run's ``final_return``, shape ``[n_runs]``.
    """
    return np.array([run["final_return"] for run in runs], dtype=float)


def interval_estimates(
    scores: dict[str, np.ndarray], func: Any, reps: int = 2000, seed: int = 0
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Rliable's ``get_interval_estimates`` (95% stratified percentile bootstrap), reproducible by ``seed``.

    :param scores: label -> scores ``[n_runs, n_tasks, ...]``.
    :param func: scores -> array of statistics.
    :param reps: bootstrap resamples.
    :param seed: seed of the resampling (NumPy's global generator is restored afterwards).
    :return: per label the point estimates, and per label their CIs (``[2, n_statistics]``: low, high).
    """
    global_state = np.random.get_state()
    # rliable 1.2's bootstrap over pairs of score arrays (probability of improvement) draws from NumPy's
    # global generator, not from random_state: seeded here, and restored after, so summaries reproduce
    np.random.seed(seed)
    try:
        with warnings.catch_warnings():
            # arch deprecates RandomState seeding; rliable 1.2 still passes one
            warnings.simplefilter("ignore", FutureWarning)
            return rly.get_interval_estimates(scores, func, reps=reps, random_state=np.random.RandomState(seed))
    finally:
        np.random.set_state(global_state)


def iqm_ci(scores: np.ndarray, reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """IQM of ``scores`` with its 95% percentile-bootstrap CI.

    :param scores: one score per run, ``[n_runs]``.
    :param reps: bootstrap resamples.
    :param seed: seed of the resampling.
    :return: ``(iqm, low, high)``.
    """
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
    #: runs that had less than :data:`SHARED_CPU_BELOW` of a core, and runs that did not record it
    shared_cpu: int
    cpu_unrecorded: int
    #: the machines the runs trained on (empty where the result files do not say)
    hosts: list[str]


def summarize(results: Results, reps: int = 2000) -> list[Row]:
    """One :class:`Row` per (env, label).

    :param results: result records by env and label (:func:`load_results`).
    :param reps: bootstrap resamples for the IQM's CI.
    :return: the rows, in the order of ``results``.
    """
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
                    shared_cpu=sum(shared_cpu(run) is True for run in runs),
                    cpu_unrecorded=sum(shared_cpu(run) is None for run in runs),
                    hosts=sorted({host for run in runs for host in run_hosts(run) if host}),
                )
            )
    return rows


def shared_cpu(run: dict[str, Any]) -> bool | None:
    """Whether a run shared the CPU (had less than :data:`SHARED_CPU_BELOW` of a core).

    :param run: a result record.
    :return: True or False, or None where the run did not record its CPU share.
    """
    share = run.get("cpu_share")
    return None if share is None else bool(share < SHARED_CPU_BELOW)


def improvement_pairs(labels: Sequence[str]) -> list[tuple[str, str]]:
    """The ``(X, Y)`` pairs whose ``P(X > Y)`` the summary reports.

    Algorithms: ClippedPPO (or the first label) over each other one. Ablation variants: each variant over
    the ablation's reference, the first label, and over its control (``ablations.CONTROLS``) where that ran.

    :param labels: the labels that ran, in the benchmark's order.
    :return: the ``(X, Y)`` pairs (none with fewer than two labels).
    """
    if len(labels) < 2:
        return []
    variants = {variant for variants in ABLATIONS.values() for variant in variants}
    first, others = labels[0], labels[1:]
    if first in variants:
        controls = [(label, CONTROLS[label]) for label in others if CONTROLS.get(label) in others]
        return [(label, first) for label in others] + controls
    if "clipped_ppo" in labels:
        first, others = "clipped_ppo", [label for label in labels if label != "clipped_ppo"]
    return [(first, label) for label in others]


def probability_of_improvement(
    results: Results, reps: int = 2000, seed: int = 0
) -> list[tuple[str, str, str, float, float, float, int, int]]:
    """``P(X > Y)`` with its 95% stratified-bootstrap CI, per env and, with several envs, over them.

    ``P(X > Y)`` is the probability that a run of X scores higher than a run of Y (ties count half),
    averaged over envs (rliable's ``probability_of_improvement``, Agarwal et al. 2021). Over several envs each
    label keeps its first common seeds, as for the aggregate metrics.

    :param results: result records by env and label (:func:`load_results`).
    :param reps: bootstrap resamples.
    :param seed: seed of the resampling.
    :return: rows ``(env or "all envs", X, Y, p, low, high, runs of X, runs of Y)``.
    """
    rows = []
    labels = ordered_labels(label for by_label in results.values() for label in by_label)

    def estimate(scope: str, x: np.ndarray, y: np.ndarray, label_x: str, label_y: str) -> None:
        points, intervals = interval_estimates(
            {"pair": [x, y]}, lambda a, b: np.array([metrics.probability_of_improvement(a, b)]), reps, seed
        )
        low, high = intervals["pair"][:, 0]
        rows.append((scope, label_x, label_y, float(points["pair"][0]), float(low), float(high), len(x), len(y)))

    for label_x, label_y in improvement_pairs(labels):
        both = {env: runs for env, runs in results.items() if label_x in runs and label_y in runs}
        scopes = [(env_id, {env_id: by_label}) for env_id, by_label in both.items()]
        if len(both) > 1:
            scopes.append((f"all {len(both)} envs", both))
        for scope, envs in scopes:
            estimate(scope, score_matrix(envs, label_x), score_matrix(envs, label_y), label_x, label_y)
    return rows


def normalization_bounds(env_id: str, by_label: dict[str, list[dict[str, Any]]]) -> tuple[float, float]:
    """``(random, reference)`` scores of an env, the ends of its normalised scale.

    :param env_id: the env.
    :param by_label: the env's result records, by label.
    :return: :data:`REFERENCE_SCORES`'s entry, else the min and max final score over all its runs here.
    """
    if env_id in REFERENCE_SCORES:
        return REFERENCE_SCORES[env_id]
    values = np.concatenate([final_scores(runs) for runs in by_label.values()])
    return float(values.min()), float(values.max())


def normalize(scores: np.ndarray, bounds: tuple[float, float]) -> np.ndarray:
    """Scores on the ``(score - random) / (reference - random)`` scale.

    :param scores: raw scores.
    :param bounds: ``(random, reference)`` (:func:`normalization_bounds`).
    :return: the normalised scores (zeros where the bounds are equal).
    """
    low, high = bounds
    return (scores - low) / (high - low) if high != low else np.zeros_like(scores)


def score_matrix(results: Results, label: str, *, normalized: bool = False) -> np.ndarray:
    """Final scores of ``label``, ``[n_runs, n_envs]`` over the envs of ``results`` (each must have run it).

    rliable needs the same number of runs per env, so the label keeps its first common seeds. With
    ``normalized``, each env's column is put on the :func:`normalize` scale.

    :param results: result records by env and label; every env must have runs of ``label``.
    :param label: the algorithm or variant.
    :param normalized: normalise each env's scores.
    :return: the scores, ``[n_runs, n_envs]``.
    """
    n_runs = min(len(by_label[label]) for by_label in results.values())
    columns = []
    for env_id, by_label in results.items():
        scores = final_scores(by_label[label][:n_runs])
        if normalized:
            scores = normalize(scores, normalization_bounds(env_id, by_label))
        columns.append(scores)
    return np.stack(columns, axis=1)


def normalized_score_matrices(results: Results) -> dict[str, np.ndarray]:
    """Normalized final scores per label (:func:`score_matrix`).

    :param results: result records by env and label.
    :return: label -> ``[n_runs, n_envs]`` for the labels that ran on every env.
    """
    labels = [label for label in next(iter(results.values()), {}) if all(label in r for r in results.values())]
    return {label: score_matrix(results, label, normalized=True) for label in labels}


def aggregate(results: Results, reps: int = 2000) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The aggregate metrics (:data:`AGGREGATE_METRICS`, rliable) across envs.

    :param results: result records by env and label.
    :param reps: bootstrap resamples.
    :return: per label the metrics' point estimates, and per label their 95% CIs.
    """
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
    reps: int = 2000,
) -> str:
    """The text of ``summary.md``.

    :param results: result records by env and label (:func:`load_results`).
    :param rows: the table's rows (:func:`summarize`).
    :param aggregates: the aggregate estimates across envs (:func:`aggregate`), or None with one env.
    :param title: the heading.
    :param command: the command that reproduces the results.
    :param plots: file names of the plots to show, in the output folder.
    :param reps: bootstrap resamples for the probabilities of improvement.
    :return: the Markdown text.
    """
    lines = [f"# {title}", "", "Reproduce with:", "", "```", command, "```", ""]
    lines += [
        "Score of a run: mean return over the episodes of its last evaluation (separate eval env,",
        "deterministic actions except on Atari, as in the RL Zoo). Mean +- std over seeds; IQM =",
        "interquartile mean with a 95% percentile-bootstrap CI over seeds (rliable). Env steps: the",
        "budget run (the RL Zoo's budget in brackets when it differs). Wall-clock: mean per run,",
        "training and evaluation; env-steps/s: training steps per second of training time, one CPU thread.",
        f"Shared CPU: runs that had less than {SHARED_CPU_BELOW:.0%} of a core over their wall-clock (other work",
        "on the machine, or paused), so their wall-clock and env-steps/s are slower than the machine's;",
        "'n/r': not recorded (result files written before the harness measured it).",
        "",
        "| env | algorithm | seeds | env steps | final return (mean ± std) | IQM [95% CI] "
        "| wall-clock / run | env-steps/s | shared CPU |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        budget = _k(row.timesteps)
        if row.zoo_timesteps and row.zoo_timesteps != row.timesteps:
            budget += f" (Zoo {_k(row.zoo_timesteps)})"
        lines.append(
            f"| {row.env_id} | {row.label} | {row.seeds} | {budget} | {row.mean:.1f} ± {row.std:.1f} "
            f"| {row.iqm:.1f} [{row.iqm_low:.1f}, {row.iqm_high:.1f}] | {row.wall_min:.1f} min "
            f"| {row.steps_per_s:.0f} | {_shared_cell(row)} |"
        )
    hosts = sorted({host for row in rows for host in row.hosts})
    if hosts:
        lines += ["", "Machines (where recorded): " + "; ".join(hosts) + "."]
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
        for env_id, by_label in results.items():
            low, high = normalization_bounds(env_id, by_label)
            note = "" if env_id in REFERENCE_SCORES else " (min-max over these runs)"
            lines.append(f"| {env_id}{note} | {low:g} | {high:g} |")
    lines += _improvement_lines(results, reps)
    lines += _published_lines(rows)
    lines += _speed_lines(results)
    lines += _run_lines(results)
    if plots:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def _shared_cell(row: Row) -> str:
    recorded = row.seeds - row.cpu_unrecorded
    if recorded == 0:
        return "n/r"
    cell = f"{row.shared_cpu} of {recorded}"
    return cell + (f" (+{row.cpu_unrecorded} n/r)" if row.cpu_unrecorded else "")


def _improvement_lines(results: Results, reps: int) -> list[str]:
    rows = probability_of_improvement(results, reps)
    if not rows:
        return []
    lines = [
        "",
        "## Probability of improvement",
        "",
        "P(X > Y): the probability that a run of X ends with a higher score than a run of Y (ties count half;",
        "over several envs, the mean over envs), with a 95% stratified-bootstrap CI (rliable). 0.5: no difference;",
        "a CI that excludes 0.5 is a difference beyond seed noise.",
        "",
        "| envs | X | Y | P(X > Y) [95% CI] | runs (X / Y) |",
        "|---|---|---|---:|---:|",
    ]
    for scope, label_x, label_y, p, low, high, n_x, n_y in rows:
        lines.append(f"| {scope} | {label_x} | {label_y} | {p:.2f} [{low:.2f}, {high:.2f}] | {n_x} / {n_y} |")
    return lines


def _published_lines(rows: Sequence[Row]) -> list[str]:
    # only runs trained at the anchors' budget (1M env steps) are comparable with them
    at_1m = [row for row in rows if row.env_id in PUBLISHED_1M and abs(row.timesteps - 1e6) <= 0.01e6]
    if not at_1m:
        return []
    sources = list(dict.fromkeys(source for row in at_1m for source in PUBLISHED_1M[row.env_id]))
    lines = [
        "",
        "## Beside published PPO results at 1M env steps",
        "",
        "| env | algorithm | seeds | final return (mean ± std) | IQM | " + " | ".join(sources) + " |",
        "|---|---|---:|---:|---:|" + "---:|" * len(sources),
    ]
    for row in at_1m:
        anchors = [f"{PUBLISHED_1M[row.env_id][s]:.0f}" if s in PUBLISHED_1M[row.env_id] else "" for s in sources]
        lines.append(
            f"| {row.env_id} | {row.label} | {row.seeds} | {row.mean:.0f} ± {row.std:.0f} | {row.iqm:.0f} | "
            + " | ".join(anchors)
            + " |"
        )
    lines += ["", "Caveats: ours are v5 envs, final deterministic evaluation of each seed (see above)."]
    lines += [f"{source}: {PUBLISHED_CAVEATS[source]}." for source in sources]
    return lines


def run_hosts(run: dict[str, Any]) -> list[str | None]:
    """The machine of each segment of a run.

    :param run: a result record.
    :return: one machine per segment (None: not recorded); a result from before per-segment hosts gives one.
    """
    return list(run.get("hosts") or [run.get("host")])


def unshared_speeds(results: Results) -> dict[tuple[str, str, str], list[float]]:
    """Env-steps/s of the runs that had a core to themselves, by ``(env, machine, label)``.

    Only these compare across algorithms: a run that shared the CPU, or did not record whether it did,
    or ran on another machine, says how busy the machine was as much as how fast the code is. A run
    resumed on another machine has no single ``host`` and is left out too.

    :param results: result records by env and label.
    :return: ``(env, machine, label)`` -> the env-steps/s of each such run.
    """
    speeds: dict[tuple[str, str, str], list[float]] = {}
    for env_id, by_label in results.items():
        for label, runs in by_label.items():
            for run in runs:
                if shared_cpu(run) is False and run.get("host"):
                    speeds.setdefault((env_id, run["host"], label), []).append(float(run["steps_per_s"]))
    return speeds


def _speed_lines(results: Results) -> list[str]:
    speeds = unshared_speeds(results)
    if not speeds:
        return []
    lines = [
        "",
        "## Speed on one machine",
        "",
        "Median env-steps/s of the runs that had a core to themselves, per machine; the ratio is to the",
        "second label's median on the same env and machine (improvement pairs as above).",
        "",
        "| env | machine | algorithm | unshared runs | env-steps/s (median) | ratio |",
        "|---|---|---|---:|---:|---|",
    ]
    pairs = improvement_pairs(ordered_labels(label for _, _, label in speeds))
    for (env_id, host, label), values in speeds.items():
        ratios = [
            f"{np.median(values) / np.median(speeds[env_id, host, y]):.2f}x {y}"
            for x, y in pairs
            if x == label and (env_id, host, y) in speeds
        ]
        lines.append(f"| {env_id} | {host} | {label} | {len(values)} | {np.median(values):.0f} | {', '.join(ratios)} |")
    return lines


def _run_lines(results: Results) -> list[str]:
    runs = [(env_id, label, run) for env_id, by in results.items() for label, rs in by.items() for run in rs]
    hosts = sorted({host for _, _, run in runs for host in run_hosts(run) if host})
    letters = {host: chr(ord("A") + i) for i, host in enumerate(hosts)}
    legend = "".join(f" {letters[host]}: {host}." for host in hosts)
    lines = [
        "",
        "## Each run",
        "",
        "Core share: CPU time / wall-clock of the run (1.00: a core to itself); segments > 1: resumed from a",
        f"checkpoint. Machines:{legend or ' not recorded.'}",
        "",
        "| env | algorithm | seed | final return | wall-clock | env-steps/s | core share | segments | machine |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for env_id, label, run in runs:
        share = run.get("cpu_share")
        share_cell = "n/r" if share is None else f"{share:.2f}" + (" (shared)" if shared_cpu(run) else "")
        machine = "+".join(dict.fromkeys(letters.get(host, "n/r") for host in run_hosts(run)))
        lines.append(
            f"| {env_id} | {label} | {run['spec']['seed']} | {run['final_return']:.1f} | {run['wall_s'] / 60:.1f} min "
            f"| {run['steps_per_s']:.0f} | {share_cell} | {run.get('segments', 1)} | {machine} |"
        )
    return lines


def write_summary(out: Path, rows: Sequence[Row], markdown: str) -> tuple[Path, Path]:
    """Write ``summary.md`` and ``summary.json`` (the rows) atomically.

    :param out: the output folder.
    :param rows: the table's rows, for ``summary.json``.
    :param markdown: the text of ``summary.md``.
    :return: the paths of ``summary.md`` and ``summary.json``.
    """
    out = Path(out)
    md_path, json_path = out / "summary.md", out / "summary.json"
    write_json(json_path, [asdict(row) for row in rows])
    with atomic_write(md_path) as file:
        file.write(markdown.encode())
    return md_path, json_path
