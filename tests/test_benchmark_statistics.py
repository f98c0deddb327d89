"""The benchmark summary's statistics: probability of improvement, CPU-sharing marks, published anchors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

pytest.importorskip("rliable", reason="the benchmark extra (requirements-benchmark.txt) is not installed")

from sb3_ppo_ext.benchmark import runs, statistics  # noqa: E402
from sb3_ppo_ext.benchmark.runs import EvalRecorder, RunSpec  # noqa: E402


def _run(env_id: str, label: str, seed: int, score: float, **extra: object) -> dict:
    algo, variant = (label, "") if label in runs.ALGOS else ("clipped_ppo", label)
    return {
        "spec": {"env_id": env_id, "algo": algo, "seed": seed, "variant": variant},
        "final_return": score,
        "total_timesteps": extra.pop("total_timesteps", 1_000_448),
        "zoo_timesteps": 1_000_000,
        "wall_s": 600.0,
        "steps_per_s": 2000.0,
        **extra,
    }


def _results(scores: dict[str, dict[str, list[float]]], **extra: object) -> statistics.Results:
    return {
        env: {label: [_run(env, label, i, s, **extra) for i, s in enumerate(values)] for label, values in by.items()}
        for env, by in scores.items()
    }


def _pairwise(x: list[float], y: list[float]) -> float:
    # the definition, counted over every pair of runs: wins 1, ties 1/2
    return np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(x, y)])


def test_probability_of_improvement_counts_the_pairs_of_runs_x_wins():
    x, y = [3.0, 5.0, 7.0, 4.0], [4.0, 4.0, 6.0]
    rows = statistics.probability_of_improvement(_results({"A-v0": {"clipped_ppo": x, "ppo": y}}), reps=200)
    assert len(rows) == 1
    scope, label_x, label_y, p, low, high, n_x, n_y = rows[0]
    assert (scope, label_x, label_y, n_x, n_y) == ("A-v0", "clipped_ppo", "ppo", 4, 3)
    assert p == pytest.approx(_pairwise(x, y)) == pytest.approx(6 / 12)  # 3: 0, 5: 2, 7: 3, 4: two ties
    assert 0.0 <= low <= p <= high <= 1.0 and low < high


def test_probability_of_improvement_over_envs_is_the_mean_of_the_envs():
    scores = {
        "A-v0": {"ppo": [1.0, 2.0, 3.0], "clipped_ppo": [2.5, 3.5, 0.5]},
        "B-v0": {"ppo": [10.0, 11.0, 12.0], "clipped_ppo": [20.0, 21.0, 22.0]},
    }
    rows = {row[0]: row for row in statistics.probability_of_improvement(_results(scores), reps=200)}
    assert set(rows) == {"A-v0", "B-v0", "all 2 envs"}
    per_env = [_pairwise(scores[env]["clipped_ppo"], scores[env]["ppo"]) for env in ("A-v0", "B-v0")]
    assert rows["B-v0"][3] == 1.0 and rows["B-v0"][4:6] == (1.0, 1.0)  # every resample: X wins every pair
    assert rows["A-v0"][3] == pytest.approx(per_env[0])
    assert rows["all 2 envs"][1:4] == ("clipped_ppo", "ppo", pytest.approx(np.mean(per_env)))


@pytest.mark.parametrize(
    ("labels", "pairs"),
    [
        (["clipped_ppo", "ppo", "a2c"], [("clipped_ppo", "ppo"), ("clipped_ppo", "a2c")]),
        (["ppo", "a2c"], [("ppo", "a2c")]),
        (["zoo", "dual_clip", "popart"], [("dual_clip", "zoo"), ("popart", "zoo")]),
        # where gSDE is on, rpo also turns it off: its control no_sde isolates RPO
        (["zoo", "rpo", "no_sde"], [("rpo", "zoo"), ("no_sde", "zoo"), ("rpo", "no_sde")]),
        (["all_on", "no_adv_norm"], [("no_adv_norm", "all_on")]),
        (["clipped_ppo"], []),
    ],
)
def test_improvement_pairs_put_clipped_ppo_or_the_variant_first(labels, pairs):
    assert statistics.improvement_pairs(labels) == pairs


def test_labels_follow_their_own_ablation_where_variant_names_recur():
    # no_obs_norm is a variant of the details ablation (listed earlier) and of the tuned one: the tuned
    # ablation's reference must still come first, or every variant would be compared with no_obs_norm
    labels = ["no_obs_norm", "adv_norm", "tuned", "no_reward_scaling"]
    ordered = statistics.ordered_labels(labels)
    assert ordered == ["tuned", "no_reward_scaling", "adv_norm", "no_obs_norm"]  # the tuned table's order
    assert statistics.improvement_pairs(ordered) == [(label, "tuned") for label in ordered[1:]]
    assert statistics.ordered_labels(["ppo", "clipped_ppo"]) == ["clipped_ppo", "ppo"]
    assert statistics.ordered_labels(["no_obs_norm", "all_on"])[0] == "all_on"  # the details ablation's reference


def test_recorder_adds_the_cpu_time_of_earlier_segments(monkeypatch):
    spec = RunSpec("Pendulum-v1", "clipped_ppo", 0, 100, 50)
    resumed = {"history": {"timesteps": [0, 50]}, "eval_s": 1.0, "wall_s": 10.0, "cpu_s": 4.0}
    recorder = EvalRecorder(None, spec, True, None, resumed=resumed)
    recorder._start, recorder._cpu_start = 100.0, 30.0
    monkeypatch.setattr(runs.time, "perf_counter", lambda: 110.0)  # 10 s of wall-clock this segment
    monkeypatch.setattr(runs.time, "process_time", lambda: 35.0)  # ... with 5 s of CPU: half a core
    assert recorder.elapsed() == 20.0 and recorder.cpu_seconds() == 9.0
    # a checkpoint written before CPU time was recorded leaves the whole run's CPU time unknown
    old = EvalRecorder(None, spec, True, None, resumed={k: v for k, v in resumed.items() if k != "cpu_s"})
    assert old.cpu_seconds() is None


@pytest.mark.parametrize(("share", "shared"), [(0.99, False), (0.9, False), (0.89, True), (0.3, True), (None, None)])
def test_a_run_below_the_threshold_shared_the_cpu(share, shared):
    assert statistics.shared_cpu({"cpu_share": share}) is shared


def test_summary_counts_shared_runs_and_names_the_machines():
    results = _results({"A-v0": {"clipped_ppo": [1.0, 2.0, 3.0]}})
    for run, share in zip(results["A-v0"]["clipped_ppo"], [0.98, 0.5, None], strict=True):
        run.update(cpu_share=share, host="CPU Z x2" if share else None)
    rows = statistics.summarize(results, reps=100)
    assert (rows[0].shared_cpu, rows[0].cpu_unrecorded, rows[0].hosts) == (1, 1, ["CPU Z x2"])
    text = statistics.summary_markdown(results, rows, None, title="t", command="c", reps=100)
    row = next(line for line in text.splitlines() if line.startswith("| A-v0 | clipped_ppo |"))
    assert row.rstrip().endswith("| 1 of 2 (+1 n/r) |")
    assert "Machines (where recorded): CPU Z x2." in text


def test_published_anchors_appear_beside_runs_at_one_million_steps_only():
    at_1m = _results({"Hopper-v5": {"clipped_ppo": [2000.0, 3000.0], "ppo": [2500.0, 2600.0]}})
    text = statistics.summary_markdown(at_1m, statistics.summarize(at_1m, 100), None, title="t", command="c", reps=100)
    section = text.split("## Beside published PPO results at 1M env steps")[1]
    assert "| Hopper-v5 | clipped_ppo | 2 | 2500 ± 500 |" in section and "| 2410 | 2383 |" in section
    assert "CleanRL: " in section and "RL Zoo: " in section
    short = _results({"Hopper-v5": {"clipped_ppo": [900.0, 950.0]}}, total_timesteps=50_000)
    text = statistics.summary_markdown(short, statistics.summarize(short, 100), None, title="t", command="c", reps=100)
    assert "published" not in text


def test_the_probability_of_improvement_interval_reproduces_and_leaves_numpy_s_generator_alone():
    results = _results({"A-v0": {"clipped_ppo": [1.0, 2.0, 3.0], "ppo": [1.5, 0.5, 2.5]}})
    np.random.seed(123)
    expected_next = np.random.random()
    np.random.seed(123)
    first = statistics.probability_of_improvement(results, reps=100)
    assert np.random.random() == expected_next
    assert statistics.probability_of_improvement(results, reps=100) == first


def test_each_run_has_a_line_with_its_core_share_segments_and_machine():
    results = _results({"A-v0": {"clipped_ppo": [1.0, 2.0, 4.0], "ppo": [3.0]}})
    first, second, moved = results["A-v0"]["clipped_ppo"]
    first.update(cpu_share=0.97, host="CPU Z x2", segments=1)
    second.update(cpu_share=0.4, host="CPU Y x4", segments=3)
    # resumed on another machine: no single host, each segment's machine named
    moved.update(cpu_share=0.95, host=None, hosts=["CPU Z x2", "CPU Z x2", "CPU W x2"], segments=3)
    rows = statistics.summarize(results, 100)
    assert rows[0].hosts == ["CPU W x2", "CPU Y x4", "CPU Z x2"]
    text = statistics.summary_markdown(results, rows, None, title="t", command="c")
    section = text.split("## Each run")[1]
    assert "Machines: A: CPU W x2. B: CPU Y x4. C: CPU Z x2." in section
    lines = [line for line in section.splitlines() if line.startswith("| A-v0 |")]
    assert lines == [
        "| A-v0 | clipped_ppo | 0 | 1.0 | 10.0 min | 2000 | 0.97 | 1 | C |",
        "| A-v0 | clipped_ppo | 1 | 2.0 | 10.0 min | 2000 | 0.40 (shared) | 3 | B |",
        "| A-v0 | clipped_ppo | 2 | 4.0 | 10.0 min | 2000 | 0.95 | 3 | C+A |",
        "| A-v0 | ppo | 0 | 3.0 | 10.0 min | 2000 | n/r | 1 | n/r |",
    ]
    assert statistics.unshared_speeds(results) == {("A-v0", "CPU Z x2", "clipped_ppo"): [2000.0]}


def test_speed_ratios_use_only_unshared_runs_on_the_same_machine():
    results = _results({"A-v0": {"clipped_ppo": [1.0, 2.0, 3.0], "ppo": [1.0, 2.0]}})
    fast, shared, elsewhere = results["A-v0"]["clipped_ppo"]
    fast.update(cpu_share=0.99, host="M x2", steps_per_s=900.0)
    shared.update(cpu_share=0.5, host="M x2", steps_per_s=100.0)  # left out: shared the CPU
    elsewhere.update(cpu_share=0.99, host="N x8", steps_per_s=5000.0)  # another machine: its own row
    for run in results["A-v0"]["ppo"]:
        run.update(cpu_share=0.95, host="M x2", steps_per_s=300.0)
    speeds = statistics.unshared_speeds(results)
    assert speeds == {("A-v0", "M x2", "clipped_ppo"): [900.0], ("A-v0", "N x8", "clipped_ppo"): [5000.0],
                      ("A-v0", "M x2", "ppo"): [300.0, 300.0]}  # fmt: skip
    text = statistics.summary_markdown(results, statistics.summarize(results, 100), None, title="t", command="c")
    section = text.split("## Speed on one machine")[1].split("##")[0]
    assert "| A-v0 | M x2 | clipped_ppo | 1 | 900 | 3.00x ppo |" in section
    assert "| A-v0 | N x8 | clipped_ppo | 1 | 5000 |  |" in section


def test_an_env_without_reference_scores_is_min_max_normalized_over_its_runs_and_says_so():
    results = _results({"Hopper-v5": {"clipped_ppo": [1000.0, 2000.0], "ppo": [500.0, 1500.0]},
                        "Unlisted-v0": {"clipped_ppo": [3.0, 7.0], "ppo": [5.0, -1.0]}})  # fmt: skip
    assert statistics.normalization_bounds("Unlisted-v0", results["Unlisted-v0"]) == (-1.0, 7.0)
    low, high = statistics.REFERENCE_SCORES["Hopper-v5"]
    assert statistics.normalization_bounds("Hopper-v5", results["Hopper-v5"]) == (low, high)
    matrix = statistics.score_matrix(results, "ppo", normalized=True)
    np.testing.assert_allclose(matrix[:, 0], (np.array([500.0, 1500.0]) - low) / (high - low))
    np.testing.assert_allclose(matrix[:, 1], [6 / 8, 0.0])
    aggregates = statistics.aggregate(results, reps=100)
    text = statistics.summary_markdown(results, statistics.summarize(results, 100), aggregates, title="t", command="c")
    assert "| Unlisted-v0 (min-max over these runs) | -1 | 7 |" in text
