"""Every script in examples/ runs standalone at a tiny budget (EXAMPLE_TIMESTEPS) and does what it says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SWAPPED_IMPORT = "from sb3_ppo_ext import ClippedPPO as PPO"
SB3_IMPORT = "from stable_baselines3 import PPO"


def run_script(path: Path, cwd: Path, timesteps: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "EXAMPLE_TIMESTEPS": str(timesteps), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(path), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"{path.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_the_examples_folder_holds_the_four_documented_scripts():
    names = {p.name for p in EXAMPLES.glob("*.py")}
    assert {
        "cartpole_quickstart.py",
        "continuous_vecnormalize.py",
        "callbacks_checkpoints.py",
        "sb3_script_swapped.py",
    } <= names


def test_cartpole_quickstart(tmp_path):
    out = run_script(EXAMPLES / "cartpole_quickstart.py", tmp_path, 512).stdout
    assert "evaluation: mean return" in out
    assert "one episode with the loaded model" in out
    assert (tmp_path / "clipped_ppo_cartpole.zip").exists()


def test_continuous_vecnormalize_saves_stats_with_the_model(tmp_path):
    # n_steps=1024 x 4 envs: the smallest budget is one rollout
    out = run_script(EXAMPLES / "continuous_vecnormalize.py", tmp_path, 256).stdout
    assert "evaluation: mean return -" in out
    assert (tmp_path / "clipped_ppo_pendulum.zip").exists()
    assert (tmp_path / "clipped_ppo_pendulum_vecnormalize.pkl").exists()


def test_callbacks_checkpoints_writes_checkpoints_and_evaluations(tmp_path):
    # an unreachable threshold, so training runs its full budget and every periodic callback fires
    args = ("--threshold", "1e9", "--eval-every", "256", "--checkpoint-every", "512", "--log-dir", "logs")
    out = run_script(EXAMPLES / "callbacks_checkpoints.py", tmp_path, 1024, *args).stdout
    checkpoints = sorted(p.name for p in (tmp_path / "logs" / "checkpoints").glob("*.zip"))
    assert checkpoints == ["clipped_ppo_1024_steps.zip", "clipped_ppo_512_steps.zip"]
    assert (tmp_path / "logs" / "evaluations.npz").exists()
    assert (tmp_path / "logs" / "best_model.zip").exists()
    assert "trained 1024 steps in 4 rollouts;" in out


def test_callbacks_checkpoints_stops_at_the_reward_threshold(tmp_path):
    # a threshold every evaluation reaches: training stops at the first evaluation
    args = ("--threshold", "-1", "--eval-every", "256", "--log-dir", "logs")
    out = run_script(EXAMPLES / "callbacks_checkpoints.py", tmp_path, 4096, *args).stdout
    assert "stopped early: threshold reached" in out
    assert "trained 256 steps" in out


def test_swapped_script_differs_from_an_sb3_script_only_in_the_import():
    lines = (EXAMPLES / "sb3_script_swapped.py").read_text().splitlines()
    assert lines.count(SWAPPED_IMPORT) == 1
    assert not any("ClippedPPO" in line for line in lines if line != SWAPPED_IMPORT and not line.startswith(" "))
    assert not any("sb3_ppo_ext" in line for line in lines if line != SWAPPED_IMPORT)


@pytest.mark.parametrize("implementation", ["ClippedPPO", "SB3 PPO"])
def test_swapped_script_runs_with_either_ppo(tmp_path, implementation):
    source = (EXAMPLES / "sb3_script_swapped.py").read_text()
    if implementation == "SB3 PPO":
        source = source.replace(SWAPPED_IMPORT, SB3_IMPORT)
    script = tmp_path / "script.py"
    script.write_text(source)
    out = run_script(script, tmp_path, 1024).stdout
    assert "mean_reward=" in out
    assert "num_timesteps=2048" in out  # 1024, then 1024 // 5 rounded up to one 1024-step rollout
    assert (tmp_path / "ppo_cartpole.zip").exists()


def test_action_masking(tmp_path):
    out = run_script(EXAMPLES / "action_masking.py", tmp_path, 512).stdout
    assert "evaluation: mean return" in out
    chosen = out.strip().splitlines()[-1]
    valid = chosen.split("valid actions now: ")[1].split("]")[0] + "]"
    assert int(chosen.rsplit("chosen: ", 1)[1]) in eval(valid)  # noqa: S307 - a list literal printed by the script


def test_tictactoe_masked(tmp_path):
    out = run_script(EXAMPLES / "tictactoe_masked.py", tmp_path, 512).stdout
    assert "100 games (wins, draws, losses)" in out  # the env raises on an illegal move, so none was played


def test_onnx_deploy(tmp_path):
    pytest.importorskip("onnxruntime")
    # n_steps=1024 x 4 envs: the smallest budget is one rollout
    out = run_script(EXAMPLES / "onnx_deploy.py", tmp_path, 256, "--episodes", "1").stdout
    assert (tmp_path / "pendulum_policy.onnx").exists()
    difference = float(out.split("max |difference| ")[1].split()[0])
    assert difference < 1e-5
    assert "deployed episode 1: return -" in out
    assert "loaded no torch/SB3" in out  # the deployment process ran on onnxruntime and numpy alone


def test_recurrent_masked(tmp_path):
    # one rollout of 8 envs x 128 steps: too short to learn, long enough to run every part
    out = run_script(EXAMPLES / "recurrent_masked.py", tmp_path, 1024).stdout
    assert "evaluation: mean return" in out
    assert out.strip().endswith("invalid actions taken: 0")  # masks applied with the LSTM: never an invalid action


def test_distributed_train_runs_as_one_process_without_torchrun(tmp_path):
    # the torchrun path is tested in tests/test_distributed.py (the train CLI under torchrun)
    out = run_script(EXAMPLES / "distributed_train.py", tmp_path, 512, "--log-dir", "logs").stdout
    assert "rank 0 of 1: 8 envs" in out
    assert "trained 512 env steps on 1 process(es); evaluation: mean return" in out
    assert (tmp_path / "logs" / "clipped_ppo_cartpole.zip").exists()
    assert (tmp_path / "logs" / "evaluations.npz").exists()


def test_rlhf_control(tmp_path):
    # every stage at a toy budget: pretraining, preferences, reward model, the four fine-tunings, summary, plot
    args = ("--quick", "--seeds", "0", "--n-jobs", "1", "--out", "rlhf")
    run_script(EXAMPLES / "rlhf_control.py", tmp_path, 1024, *args)
    out = tmp_path / "rlhf"
    assert (out / "curves.png").exists()
    assert "| beta=0 |" in (out / "summary.md").read_text()
    result = json.loads((out / "raw" / "seed_0.json").read_text())
    assert len(result["runs"]) == 4  # beta = 0, 0.1, 1 and adaptive
    for run in result["runs"].values():
        first, last = run["curve"][0], run["curve"][-1]
        assert first["step"] == 0 and first["kl"] == 0  # the fine-tuning starts from the reference's weights
        assert last["step"] >= 1024
        assert {"learned_return", "true_return", "original_return", "kl"} <= set(last)
    # the penalty in the reward: its runs are added to the same results, the four above kept as they are
    run_script(EXAMPLES / "rlhf_control.py", tmp_path, 1024, *args, "--runs", "reward")
    merged = json.loads((out / "raw" / "seed_0.json").read_text())
    assert len(merged["runs"]) == 9  # and the loss + exact state-KL cost control
    assert all(merged["runs"][label] == run for label, run in result["runs"].items())
    assert merged["runs"]["reward, beta=0.1"]["config"]["mode"] == "reward"
    summary = (out / "summary.md").read_text()
    assert "| reward, beta=1 |" in summary
    assert "| KL per step | penalty: none | penalty: loss | penalty: reward |" in summary
    assert (out / "drift.png").exists()


def test_rlhf_text(tmp_path):
    out = run_script(EXAMPLES / "rlhf_text.py", tmp_path, 1024, "--quick").stdout
    assert "pretrained on" in out
    assert "KL to the pretrained model 0.00 nats" in out  # the pretrained model against itself
    assert "after fine-tuning, beta = 0.05" in out
    assert "beta = 0.05 |" in out  # the closing table


@pytest.mark.parametrize("env_id, observation", [("Hopper-v5", "(11,)"), ("Ant-v5", "(27,)")])
def test_mujoco_tuned_preset_trains_with_both_switches_and_saves_its_statistics(tmp_path, env_id, observation):
    # 8 envs x 256 steps: one rollout is the smallest budget
    args = ("--env", env_id, "--eval-episodes", "1")
    out = run_script(EXAMPLES / "mujoco_tuned_preset.py", tmp_path, 2048, *args).stdout
    assert f"{env_id}: 8 envs, observation {observation}" in out
    assert "'recompute_advantages': True, 'scale_rewards': True" in out
    assert "evaluation: mean return" in out
    assert (tmp_path / f"clipped_ppo_tuned_{env_id}.zip").exists()
    assert (tmp_path / f"clipped_ppo_tuned_{env_id}_vecnormalize.pkl").exists()
