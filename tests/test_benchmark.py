"""``python -m sb3_ppo_ext.benchmark``: tiny end-to-end runs, result files, resume, budgets, ablation plans."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rliable", reason="the benchmark extra (requirements-benchmark.txt) is not installed")
pytest.importorskip("matplotlib", reason="the benchmark extra (requirements-benchmark.txt) is not installed")

from sb3_ppo_ext.benchmark import ablations, cli  # noqa: E402
from sb3_ppo_ext.benchmark.runner import Outcome, execute, plan  # noqa: E402
from sb3_ppo_ext.benchmark.runs import RunSpec, is_finished, load_result, write_json  # noqa: E402
from sb3_ppo_ext.schedules import LinearDecay  # noqa: E402
from sb3_ppo_ext.zoo import presets  # noqa: E402
from sb3_ppo_ext.zoo.presets import zoo_settings  # noqa: E402

# Tiny Zoo-format settings: two rollouts of 2 x 64 steps per run, so a run takes about a second.
TINY_YAML = """
CartPole-v1:
  n_envs: 2
  n_timesteps: !!float 1e5
  n_steps: 64
  batch_size: 64
  n_epochs: 2
  learning_rate: lin_1e-3
Pendulum-v1:
  n_envs: 2
  n_timesteps: !!float 1e5
  n_steps: 64
  batch_size: 64
  n_epochs: 2
  gamma: 0.9
  normalize: true
"""
ENVS = ["CartPole-v1", "Pendulum-v1"]
ALGOS = ["clipped_ppo", "ppo"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _args(out: Path, hyperparams: Path) -> list[str]:
    return [
        "--envs", ",".join(ENVS),
        "--algos", ",".join(ALGOS),
        "--seeds", "2",
        "--timesteps", "256",
        "--eval-freq", "128",
        "--eval-episodes", "2",
        "--hyperparams", str(hyperparams),
        "--bootstrap-reps", "100",
        "--out", str(out),
        "--no-progress",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def hyperparams_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hyperparams")
    (folder / "clipped_ppo.yml").write_text(TINY_YAML)
    return folder


@pytest.fixture(scope="module")
def finished(tmp_path_factory, hyperparams_dir) -> Path:
    """An output folder after one tiny benchmark: 2 envs x 2 algorithms x 2 seeds."""
    out = tmp_path_factory.mktemp("bench")
    assert cli.main(_args(out, hyperparams_dir)) == 0
    return out


def _result(out: Path, env_id: str, algo: str, seed: int) -> dict:
    return json.loads((out / "raw" / env_id / algo / f"seed{seed}.json").read_text())


def test_every_run_writes_its_result_file(finished):
    files = sorted(p.relative_to(finished).as_posix() for p in (finished / "raw").rglob("*"))
    expected = [f"raw/{env}/{algo}/seed{seed}.json" for env in ENVS for algo in ALGOS for seed in (0, 1)]
    assert [f for f in files if f.endswith(".json")] == sorted(expected)
    assert not [f for f in files if f.endswith(".tmp")]


def test_result_records_evaluations_timesteps_returns_and_wall_clock(finished):
    result = _result(finished, "CartPole-v1", "clipped_ppo", 1)
    spec = result["spec"]
    assert (spec["env_id"], spec["algo"], spec["seed"], spec["timesteps"]) == ("CartPole-v1", "clipped_ppo", 1, 256)
    evaluations = result["evaluations"]
    steps = evaluations["timesteps"]
    # at 0, every 128 env steps (checked once per vec step of 2 envs), and at the end
    assert steps == [0, 128, 256]
    assert result["total_timesteps"] == 256
    assert len(evaluations["mean_return"]) == len(evaluations["std_return"]) == len(evaluations["wall_s"]) == 3
    assert all(r >= 8 for r in evaluations["mean_return"])  # CartPole gives at least 8 steps of reward 1
    assert result["final_return"] == evaluations["mean_return"][-1]
    assert np.all(np.diff(evaluations["wall_s"]) > 0)
    assert 0 < result["train_s"] <= result["wall_s"]
    assert result["steps_per_s"] == pytest.approx(256 / result["train_s"])
    # one thread per run: the process's CPU time cannot exceed its wall-clock by much
    assert 0 < result["cpu_s"] <= 1.5 * result["wall_s"]
    assert result["cpu_share"] == pytest.approx(result["cpu_s"] / result["wall_s"])
    assert result["host"].endswith(f" x{os.cpu_count()}")
    hyper = result["hyperparameters"]
    assert (hyper["n_envs"], hyper["n_steps"], hyper["batch_size"]) == (2, 64, 64)
    assert hyper["learning_rate"] == repr(LinearDecay(1e-3))
    assert result["zoo_timesteps"] == 100_000
    assert {"torch", "stable_baselines3", "sb3_ppo_ext"} <= set(result["versions"])


def test_normalized_env_is_evaluated_on_raw_returns(finished):
    result = _result(finished, "Pendulum-v1", "ppo", 0)
    assert result["hyperparameters"]["normalize"] == {"gamma": 0.9}
    # Pendulum rewards are in [-16.3, 0] per step over 200 steps: unnormalized returns are in the hundreds
    assert all(-3300 < r < -50 for r in result["evaluations"]["mean_return"])


def test_seeds_give_different_runs_and_algorithms_share_the_settings(finished):
    a, b = (_result(finished, "CartPole-v1", "ppo", seed) for seed in (0, 1))
    assert a["evaluations"]["mean_return"] != b["evaluations"]["mean_return"]
    assert _result(finished, "CartPole-v1", "clipped_ppo", 0)["hyperparameters"] == a["hyperparameters"]


def test_summary_md_has_a_row_per_env_and_algorithm(finished):
    text = (finished / "summary.md").read_text()
    assert "python -m sb3_ppo_ext.benchmark --envs CartPole-v1,Pendulum-v1" in text
    table = text.split("## Aggregate")[0]
    rows = [line for line in table.splitlines() if line.startswith(("| CartPole-v1 |", "| Pendulum-v1 |"))]
    assert len(rows) == 4
    for row, (env, algo) in zip(rows, [(e, a) for e in ENVS for a in ALGOS], strict=True):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[:4] == [env, algo, "2", "256 (Zoo 100k)"]
        assert "±" in cells[4] and "[" in cells[5] and cells[6].endswith("min") and float(cells[7]) > 0
    assert "## Aggregate over 2 envs" in text
    assert "| clipped_ppo |" in text.split("## Aggregate")[1]
    for name in ["curves_CartPole-v1.png", "curves_Pendulum-v1.png", "summary_aggregate.png"]:
        assert f"]({name})" in text


def test_report_only_rebuilds_the_summary_with_the_command_that_reproduces_it(finished, hyperparams_dir):
    before = (finished / "summary.md").read_text()
    assert cli.main([*_args(finished, hyperparams_dir), "--report-only"]) == 0
    after = (finished / "summary.md").read_text()
    assert "--report-only" not in after and after == before


def test_summary_json_matches_the_result_files(finished):
    rows = json.loads((finished / "summary.json").read_text())
    row = next(r for r in rows if (r["env_id"], r["label"]) == ("CartPole-v1", "ppo"))
    finals = [_result(finished, "CartPole-v1", "ppo", seed)["final_return"] for seed in (0, 1)]
    assert row["seeds"] == 2
    assert row["mean"] == pytest.approx(np.mean(finals)) and row["std"] == pytest.approx(np.std(finals))
    assert min(finals) <= row["iqm_low"] <= row["iqm"] <= row["iqm_high"] <= max(finals)


def test_plots_are_png_files(finished):
    for name in ["curves_CartPole-v1.png", "curves_Pendulum-v1.png", "summary_aggregate.png"]:
        data = (finished / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5_000


def test_rerun_skips_finished_runs(finished, hyperparams_dir):
    paths = list((finished / "raw").rglob("*.json"))
    before = {p: p.stat().st_mtime_ns for p in paths}
    specs = plan(ENVS, ALGOS, range(2), dict.fromkeys(ENVS, 256), eval_freq=128, eval_episodes=2)
    outcome = execute(specs, finished, hyperparams_dir=hyperparams_dir, show_progress=False)
    assert (len(outcome.skipped), outcome.completed, outcome.failed) == (8, [], {})
    assert {p: p.stat().st_mtime_ns for p in paths} == before
    # the command too: nothing trains again, the summary is rebuilt
    assert cli.main(_args(finished, hyperparams_dir)) == 0
    assert {p: p.stat().st_mtime_ns for p in paths} == before


def test_resume_reruns_only_missing_changed_or_corrupt_runs(tmp_path, finished, hyperparams_dir):
    specs = plan(["CartPole-v1"], ["ppo"], range(2), {"CartPole-v1": 256}, eval_freq=128, eval_episodes=2)
    for spec in specs:
        target = spec.result_path(tmp_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(spec.result_path(finished).read_bytes())
    # seed 1's file was cut short by a crash; a run with another budget is a different run
    specs[1].result_path(tmp_path).write_text('{"spec": {"env_id": "CartPole-v1", "algo"')
    changed = dataclasses.replace(specs[0], timesteps=128)
    assert is_finished(specs[0], tmp_path) and not is_finished(specs[1], tmp_path)
    assert not is_finished(changed, tmp_path)
    outcome = execute(specs, tmp_path, hyperparams_dir=hyperparams_dir, show_progress=False)
    assert outcome.skipped == [specs[0]] and outcome.completed == [specs[1]]
    assert load_result(specs[1].result_path(tmp_path))["spec"]["seed"] == 1


def test_parallel_jobs_run_in_worker_processes(tmp_path, hyperparams_dir):
    # one run through a 2-process pool: spawn, progress queue and result transport (one trains at a time)
    (spec,) = plan(["CartPole-v1"], ["clipped_ppo"], [3], {"CartPole-v1": 128}, eval_episodes=1)
    outcome = execute([spec], tmp_path, n_jobs=2, hyperparams_dir=hyperparams_dir, show_progress=False)
    assert outcome.completed == [spec] and not outcome.failed
    assert load_result(spec.result_path(tmp_path))["total_timesteps"] == 128


def test_a_failing_run_is_reported_and_left_for_the_next_call(tmp_path, hyperparams_dir):
    (spec,) = plan(["CartPole-v1"], ["ppo"], [0], {"CartPole-v1": 128})
    broken = hyperparams_dir.parent / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "clipped_ppo.yml").write_text("CartPole-v1:\n  n_steps: 64\n  no_such_argument: 1\n")
    outcome = execute([spec], tmp_path, hyperparams_dir=broken, show_progress=False)
    assert list(outcome.failed) == [spec.key] and "no_such_argument" in outcome.failed[spec.key]
    assert not spec.result_path(tmp_path).exists()


def test_write_json_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "a" / "seed0.json"
    write_json(path, {"spec": 1})
    with pytest.raises(TypeError):
        write_json(path, {"spec": object()})
    assert json.loads(path.read_text()) == {"spec": 1}
    # a failure while writing (disk full, ...): checkpoints.atomic_write leaves the old file and no temporary

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        write_json(path, {"spec": 2})
    assert json.loads(path.read_text()) == {"spec": 1}
    assert os.listdir(path.parent) == ["seed0.json"]


# -- budgets and plans ---------------------------------------------------------------------------------


def _budgets(*argv: str) -> dict[str, int]:
    return cli.resolve_budgets(cli.build_parser().parse_args(["--out", "x", *argv]))


def test_budgets_default_to_the_zoo_ppo_budget_and_scale():
    assert _budgets("--envs", "CartPole-v1,Acrobot-v1") == {"CartPole-v1": 100_000, "Acrobot-v1": 1_000_000}
    assert _budgets("--envs", "Hopper-v5", "--timesteps-scale", "0.2") == {"Hopper-v5": 200_000}
    assert _budgets("--envs", "Hopper-v5,CartPole-v1", "--timesteps", "5e4") == {
        "Hopper-v5": 50_000,
        "CartPole-v1": 50_000,
    }


def test_per_env_budget_overrides_win():
    budgets = _budgets("--envs", "Hopper-v5,CartPole-v1", "--timesteps-scale", "0.5", "--budget", "Hopper-v5=3e5")
    assert budgets == {"Hopper-v5": 300_000, "CartPole-v1": 50_000}


def test_plan_crosses_envs_algorithms_and_seeds_with_default_eval_freq():
    specs = plan(
        ["CartPole-v1", "Pendulum-v1"], ["ppo", "a2c", "trpo"], range(3), {"CartPole-v1": 1000, "Pendulum-v1": 2000}
    )
    assert len(specs) == 18 and len(set(specs)) == 18
    assert {s.eval_freq for s in specs if s.env_id == "Pendulum-v1"} == {100}
    with pytest.raises(ValueError, match="unknown algorithms"):
        plan(["CartPole-v1"], ["sac"], [0], {"CartPole-v1": 1})


def test_ablation_plans_one_run_per_variant_and_seed():
    specs = plan(["CartPole-v1"], ["clipped_ppo"], range(2), {"CartPole-v1": 10}, ablation="details")
    assert [s.variant for s in specs[::2]] == list(ablations.ABLATIONS["details"])
    assert specs[0].result_path(Path("o")) == Path("o/raw/CartPole-v1/all_on/seed0.json")
    assert [s.label for s in plan(["CartPole-v1"], ["ppo"], [0], {"CartPole-v1": 10}, ablation="lambda")] == [
        "lambda=0.95",
        "lambda=0",
        "lambda=1",
    ]
    with pytest.raises(ValueError, match="one algorithm"):
        plan(["CartPole-v1"], ["ppo"], [0], {"CartPole-v1": 10}, ablation="details")


def test_ablation_cli_defaults_to_clipped_ppo(tmp_path, monkeypatch):
    planned = []
    monkeypatch.setattr(cli, "execute", lambda specs, *a, **k: planned.extend(specs) or Outcome())
    monkeypatch.setattr(cli, "report", lambda *a, **k: 0)
    assert cli.main(["--envs", "CartPole-v1", "--ablation", "lambda", "--seeds", "1", "--out", str(tmp_path)]) == 0
    assert {s.algo for s in planned} == {"clipped_ppo"} and len(planned) == 3


# -- ablation settings -----------------------------------------------------------------------------------


def test_lambda_variants_set_gae_lambda_only():
    base = zoo_settings("clipped_ppo", "Pendulum-v1")
    for variant, value in [("lambda=0", 0.0), ("lambda=0.95", 0.95), ("lambda=1", 1.0)]:
        s = ablations.apply("lambda", variant, base)
        assert s.model_kwargs == {**base.model_kwargs, "gae_lambda": value} and s.normalize == base.normalize


def test_details_baseline_switches_every_detail_on():
    s = ablations.apply("details", "all_on", zoo_settings("clipped_ppo", "CartPole-v1"))
    kw = s.model_kwargs
    assert kw["normalize_advantage"] is True and kw["clip_range_vf"] is None
    assert kw["ent_coef"] == 0.01  # the Zoo's CartPole uses 0
    assert kw["learning_rate"] == LinearDecay(1e-3) and kw["max_grad_norm"] == 0.5
    assert kw["policy_kwargs"]["ortho_init"] is True
    assert s.normalize == {"norm_obs": True, "norm_reward": False, "gamma": 0.98}
    hopper = ablations.apply("details", "all_on", zoo_settings("clipped_ppo", "Hopper-v5"))
    assert hopper.model_kwargs["policy_kwargs"]["ortho_init"] is True  # the Zoo's Hopper turns it off
    assert hopper.model_kwargs["learning_rate"] == LinearDecay(9.80828e-05)


@pytest.mark.parametrize(
    ("variant", "changed"),
    [
        ("no_adv_norm", {"normalize_advantage": False}),
        ("value_clip_on", {"clip_range_vf": 0.2}),
        ("no_entropy", {"ent_coef": 0.0}),
        ("no_lr_anneal", {"learning_rate": 1e-3}),
        ("no_grad_clip", {"max_grad_norm": None}),
    ],
)
def test_each_detail_variant_switches_exactly_one_argument(variant, changed):
    zoo = zoo_settings("clipped_ppo", "CartPole-v1")
    base = ablations.apply("details", "all_on", zoo)
    s = ablations.apply("details", variant, zoo)
    assert {k: v for k, v in s.model_kwargs.items() if base.model_kwargs.get(k) != v} == changed
    assert s.normalize == base.normalize


def test_ortho_init_and_obs_norm_variants():
    zoo = zoo_settings("clipped_ppo", "Hopper-v5")
    base = ablations.apply("details", "all_on", zoo)
    assert ablations.apply("details", "no_ortho_init", zoo).model_kwargs["policy_kwargs"] == {
        **base.model_kwargs["policy_kwargs"],
        "ortho_init": False,
    }
    # Hopper normalizes rewards too: that stays, only observations lose normalization
    assert ablations.apply("details", "no_obs_norm", zoo).normalize == {**base.normalize, "norm_obs": False}
    cartpole = zoo_settings("clipped_ppo", "CartPole-v1")
    assert ablations.apply("details", "no_obs_norm", cartpole).normalize is None


@pytest.mark.parametrize(
    ("variant", "changed"),
    [
        ("zoo", {}),
        ("dual_clip", {"dual_clip": 3.0}),
        ("rpo", {"rpo_alpha": 0.5}),
        ("adaptive_lr", {"adaptive_lr_kl": 0.01}),
        ("value_norm", {"normalize_value_targets": True}),
        ("popart", {"normalize_value_targets": True, "popart": True}),
    ],
)
def test_each_stabilizer_variant_adds_only_its_switches(variant, changed):
    zoo = zoo_settings("clipped_ppo", "HalfCheetah-v5")
    s = ablations.apply("stabilizers", variant, zoo)
    assert {k: v for k, v in s.model_kwargs.items() if zoo.model_kwargs.get(k, "unset") != v} == changed
    assert s.normalize == zoo.normalize


def test_rpo_variant_turns_gsde_off_and_no_sde_control_runs_only_where_the_zoo_uses_gsde():
    pendulum = zoo_settings("clipped_ppo", "Pendulum-v1")
    assert pendulum.model_kwargs["use_sde"]
    rpo = ablations.apply("stabilizers", "rpo", pendulum)
    control = ablations.apply("stabilizers", "no_sde", pendulum)
    assert rpo.model_kwargs["use_sde"] is False and rpo.model_kwargs["rpo_alpha"] == 0.5
    assert {k: v for k, v in rpo.model_kwargs.items() if control.model_kwargs.get(k, "unset") != v} == {
        "rpo_alpha": 0.5
    }
    variants = {
        e: {s.variant for s in plan([e], ["clipped_ppo"], [0], {e: 10}, ablation="stabilizers")}
        for e in ("Pendulum-v1", "HalfCheetah-v5")
    }
    assert "no_sde" in variants["Pendulum-v1"] and "no_sde" not in variants["HalfCheetah-v5"]
    assert variants["Pendulum-v1"] - variants["HalfCheetah-v5"] == {"no_sde"}


def test_stabilizer_ablation_runs_every_variant(tmp_path):
    (tmp_path / "clipped_ppo.yml").write_text(TINY_YAML)
    specs = plan(["Pendulum-v1"], ["clipped_ppo"], [0], {"Pendulum-v1": 128}, ablation="stabilizers", eval_episodes=1)
    outcome = execute(specs, tmp_path / "out", show_progress=False, hyperparams_dir=tmp_path)
    assert not outcome.failed and len(outcome.completed) == len(ablations.ABLATIONS["stabilizers"])


def test_zoo_variant_reuses_a_plain_run_with_the_same_spec_and_hyperparameters(tmp_path):
    (tmp_path / "clipped_ppo.yml").write_text(TINY_YAML)
    plain_out, ablation_out = tmp_path / "plain", tmp_path / "ablation"
    plain = plan(["Pendulum-v1"], ["clipped_ppo"], [0], {"Pendulum-v1": 128}, eval_episodes=1)
    assert not execute(plain, plain_out, show_progress=False, hyperparams_dir=tmp_path).failed
    specs = [
        s
        for s in plan(
            ["Pendulum-v1"],
            ["clipped_ppo"],
            [0],
            {"Pendulum-v1": 128},
            ablation="stabilizers",
            eval_episodes=1,
            hyperparams_dir=tmp_path,
        )
        if s.variant in ("zoo", "dual_clip")
    ]
    outcome = execute(specs, ablation_out, show_progress=False, hyperparams_dir=tmp_path, reuse=[plain_out])
    assert [s.variant for s in outcome.skipped] == ["zoo"] and [s.variant for s in outcome.completed] == ["dual_clip"]
    zoo = next(s for s in specs if s.variant == "zoo")
    reused, original = load_result(zoo.result_path(ablation_out)), load_result(plain[0].result_path(plain_out))
    assert reused["reused_from"] == str(plain[0].result_path(plain_out))
    assert reused["evaluations"] == original["evaluations"] and is_finished(zoo, ablation_out)

    # a plain run with other hyperparameters does not stand in
    other = load_result(plain[0].result_path(plain_out))
    other["hyperparameters"]["gamma"] = 0.5
    write_json(plain[0].result_path(plain_out), other)
    zoo.result_path(ablation_out).unlink()
    outcome = execute([zoo], ablation_out, show_progress=False, hyperparams_dir=tmp_path, reuse=[plain_out])
    assert [s.variant for s in outcome.completed] == ["zoo"]
    assert "reused_from" not in load_result(zoo.result_path(ablation_out))


def test_env_without_a_zoo_budget_asks_for_one(tmp_path):
    (tmp_path / "clipped_ppo.yml").write_text("CartPole-v1:\n  n_steps: 64\n")
    with pytest.raises(ValueError, match="--timesteps or --budget"):
        _budgets("--envs", "CartPole-v1", "--hyperparams", str(tmp_path))
    assert _budgets("--envs", "CartPole-v1", "--hyperparams", str(tmp_path), "--timesteps", "10") == {"CartPole-v1": 10}


def test_result_spec_round_trips(tmp_path):
    spec = RunSpec("CartPole-v1", "ppo", 0, 10, 5)
    write_json(spec.result_path(tmp_path), {"spec": dataclasses.asdict(spec)})
    assert is_finished(spec, tmp_path)


def test_masked_task_runs_and_is_evaluated_with_its_masks(tmp_path, monkeypatch):
    """ClippedPPO and MaskablePPO on a masked test env; evaluation goes through sb3-contrib's masked evaluate_policy."""
    from sb3_ppo_ext.benchmark import runs

    calls = []
    original = runs.evaluate_masked

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(runs, "evaluate_masked", spy)
    for algo in ("clipped_ppo", "maskable_ppo"):
        spec = RunSpec("InvalidActionEnvDiscrete-v0", algo, 0, 1024, 1024, eval_episodes=1)
        result = runs.train_and_evaluate(spec, tmp_path)
        assert result["total_timesteps"] >= 1024 and np.isfinite(result["final_return"])
    assert len(calls) >= 4  # at 0 and at the end, for each algorithm


def test_recurrent_algorithms_read_the_zoo_lstm_settings_and_run_only_when_named(tmp_path, monkeypatch):
    from sb3_ppo_ext.benchmark import runs

    for algo in ("clipped_ppo_lstm", "recurrent_ppo"):
        settings = runs.run_settings(RunSpec("CartPoleNoVel-v1", algo, 0, 10, 5))
        assert settings.policy == "MlpLstmPolicy" and settings.model_kwargs["policy_kwargs"]["lstm_hidden_size"] == 64
    # the NoVel tasks are in the Zoo's ppo_lstm.yml only: their budget comes from there
    assert _budgets("--envs", "CartPoleNoVel-v1,PendulumNoVel-v1,MaskedMemory-v0") == dict.fromkeys(
        ["CartPoleNoVel-v1", "PendulumNoVel-v1", "MaskedMemory-v0"], 100_000
    )
    planned = []
    monkeypatch.setattr(cli, "execute", lambda specs, *a, **k: planned.extend(specs) or Outcome())
    monkeypatch.setattr(cli, "report", lambda *a, **k: 0)
    assert cli.main(["--envs", "CartPole-v1", "--seeds", "1", "--timesteps", "10", "--out", str(tmp_path)]) == 0
    assert {s.algo for s in planned} == set(runs.ALGOS) - set(runs.NAMED_ONLY_ALGOS)


def test_masked_memory_task_runs_for_each_algorithm_with_the_right_evaluation(tmp_path, monkeypatch):
    """LSTM + masks: masks and states at evaluation; RecurrentPPO: no masks; MaskablePPO: sb3-contrib's."""
    from sb3_ppo_ext.benchmark import runs

    used = []
    for name in ("evaluate_policy", "evaluate_masked", "evaluate_masked_recurrent"):
        original = getattr(runs, name)
        monkeypatch.setattr(runs, name, lambda *a, _f=original, _n=name, **k: used.append(_n) or _f(*a, **k))
    expected = {
        "clipped_ppo_lstm": "evaluate_masked_recurrent",
        "recurrent_ppo": "evaluate_policy",  # RecurrentPPO takes no masks: it trains and plays without them
        "maskable_ppo": "evaluate_masked",
    }
    for algo, evaluation in expected.items():
        used.clear()
        spec = RunSpec("MaskedMemory-v0", algo, 0, 1024, 1024, eval_episodes=2)
        result = runs.train_and_evaluate(spec, tmp_path)  # one rollout of 8 envs x 128 steps
        assert result["total_timesteps"] == 1024 and set(used) == {evaluation} and len(used) == 2
        assert -1.0 <= result["final_return"] <= 1.0


def test_masked_recurrent_evaluation_carries_the_lstm_states():
    from sb3_ppo_ext import ClippedPPO
    from sb3_ppo_ext.benchmark import runs
    from sb3_ppo_ext.zoo.envs import make_env

    settings = presets.parse_zoo_block({"n_envs": 2})
    env = make_env("MaskedMemory-v0", settings, seed=0)
    model = ClippedPPO("MlpLstmPolicy", env, n_steps=16, batch_size=32, seed=0, policy_kwargs={"lstm_hidden_size": 8})
    seen = []
    predict = model.predict

    def spy(observation, state=None, episode_start=None, deterministic=False, action_masks=None):
        seen.append((state, episode_start.copy(), action_masks))
        return predict(observation, state, episode_start, deterministic, action_masks)

    model.predict = spy  # type: ignore[method-assign]
    returns = runs.evaluate_masked_recurrent(model, make_env("MaskedMemory-v0", settings, 1, 5), 3, True)
    assert len(returns) == 3 and all(r in (-1.0, 0.0, 1.0) for r in returns)
    assert seen[0][0] is None and all(state is not None for state, _, _ in seen[1:])
    assert seen[0][1].all() and not seen[1][1].any()  # the episode start resets the states, later steps keep them
    assert all(masks.shape == (1, 32) and masks.sum() == 4 for _, _, masks in seen)


class _Interrupted(Exception):
    pass


@pytest.mark.parametrize(
    ("env_id", "algo"),
    [
        ("MountainCar-v0", "clipped_ppo"),
        ("MountainCar-v0", "ppo"),
        # LSTM policies: the Zoo's MountainCarNoVel settings (16 envs x 16 steps, normalized too)
        ("MountainCarNoVel-v0", "clipped_ppo_lstm"),
        ("MountainCarNoVel-v0", "recurrent_ppo"),
    ],
)
def test_an_interrupted_run_resumes_from_its_last_checkpoint(tmp_path, env_id, algo):
    """A run stopped mid-way continues from its checkpoint: curve, statistics and step count carry over."""
    from sb3_ppo_ext.benchmark import runs

    # MountainCar's Zoo settings normalize observations: the statistics must survive the restart
    spec = RunSpec(env_id, algo, 0, 2048, 512, eval_episodes=1)
    done_steps = []

    def stop_after_1024(_key, steps):
        done_steps.append(steps)
        if sum(done_steps) >= 1280:  # past the checkpoints at 512 and 1024
            raise _Interrupted

    with pytest.raises(_Interrupted):
        runs.train_and_evaluate(spec, tmp_path, report=stop_after_1024)
    state = runs.load_checkpoint(spec, tmp_path)
    assert state is not None and state["num_timesteps"] == 1024
    assert state["history"]["timesteps"] == [0, 512, 1024]
    assert not spec.result_path(tmp_path).exists()
    saved_stats = pickle.loads((spec.partial_dir(tmp_path) / state["vecnormalize"]).read_bytes()).obs_rms

    resumed_report = []
    seen = {}
    original_learn = presets.import_object(runs.ALGOS[algo]).learn

    def spy_learn(self, total_timesteps, *args, **kwargs):
        seen["start"] = self.num_timesteps
        seen["obs_mean"] = self.get_vec_normalize_env().obs_rms.mean.copy()
        seen["learn_steps"] = total_timesteps
        return original_learn(self, total_timesteps, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(presets.import_object(runs.ALGOS[algo]), "learn", spy_learn)
        result = runs.train_and_evaluate(spec, tmp_path, report=lambda _key, steps: resumed_report.append(steps))
    assert seen["start"] == 1024 and seen["learn_steps"] == 1024
    np.testing.assert_array_equal(seen["obs_mean"], saved_stats.mean)
    assert result["segments"] == 2
    assert result["evaluations"]["timesteps"] == [0, 512, 1024, 1536, 2048]
    assert result["total_timesteps"] == 2048 and sum(resumed_report) == 2048
    walls = result["evaluations"]["wall_s"]
    assert walls == sorted(walls) and result["wall_s"] >= walls[-1] > state["wall_s"]
    assert result["cpu_s"] > state["cpu_s"] > 0  # both segments' CPU time
    assert state["hosts"] == [runs.host_description()]
    assert result["hosts"] == [runs.host_description()] * 2 and result["host"] == runs.host_description()
    assert not spec.partial_dir(tmp_path).exists()
    assert is_finished(spec, tmp_path)


def test_a_run_resumed_on_another_machine_has_no_single_host(monkeypatch):
    """Checkpoints travel between sessions' machines: a run's speed then belongs to no one machine."""
    from sb3_ppo_ext.benchmark import runs

    monkeypatch.setattr(runs, "host_description", lambda: "CPU B x2")
    assert runs.segment_hosts(None) == ["CPU B x2"]
    assert runs.segment_hosts({"segments": 2, "hosts": ["CPU A x2", "CPU A x2"]}) == ["CPU A x2"] * 2 + ["CPU B x2"]
    # a checkpoint from before per-segment hosts: its segments' machines are unknown
    assert runs.segment_hosts({"segments": 1}) == [None, "CPU B x2"]
    assert runs.single_host(["CPU B x2", "CPU B x2"]) == "CPU B x2"
    assert runs.single_host(["CPU A x2", "CPU B x2"]) is None
    assert runs.single_host([None, "CPU B x2"]) is None


def test_a_checkpoint_of_another_spec_is_ignored(tmp_path):
    from sb3_ppo_ext.benchmark import runs

    spec = RunSpec("CartPole-v1", "ppo", 0, 10, 5)
    folder = spec.partial_dir(tmp_path)
    other = dataclasses.replace(spec, timesteps=20)
    write_json(folder / "state.json", {"spec": dataclasses.asdict(other), "model": "model_5.zip"})
    (folder / "model_5.zip").write_bytes(b"")
    assert runs.load_checkpoint(spec, tmp_path) is None
    assert runs.load_checkpoint(other, tmp_path) is not None


def test_env_kwargs_are_recorded_where_set(tmp_path: Path) -> None:
    from sb3_ppo_ext.benchmark.runs import recorded_hyperparameters

    block = "Pendulum-v1:\n  n_envs: 2\n  policy: 'MlpPolicy'\n  env_kwargs:\n    g: 9.0\n"
    (tmp_path / "clipped_ppo.yml").write_text(block)
    with_kwargs = recorded_hyperparameters(zoo_settings("clipped_ppo", "Pendulum-v1", tmp_path / "clipped_ppo.yml"))
    assert with_kwargs["env_kwargs"] == {"g": 9.0}
    # without env_kwargs the record keeps its earlier form, so older result files stay comparable for --reuse
    assert "env_kwargs" not in recorded_hyperparameters(zoo_settings("clipped_ppo", "Pendulum-v1"))
