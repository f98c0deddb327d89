"""One benchmark run: its spec, where its result lives, and how it is trained and evaluated."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import pickle
import platform
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import sb3_contrib
import stable_baselines3
import torch
from sb3_contrib.common.maskable.evaluation import evaluate_policy as evaluate_masked
from sb3_contrib.common.maskable.utils import is_masking_supported
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import VecEnv, VecNormalize, sync_envs_normalization

import sb3_ppo_ext
from sb3_ppo_ext import distributed
from sb3_ppo_ext.benchmark import ablations
from sb3_ppo_ext.evaluation import evaluate_policy as evaluate_policy_with_states
from sb3_ppo_ext.evaluation import predict_takes_masks
from sb3_ppo_ext.fast.cpu import cpu_model
from sb3_ppo_ext.recurrent.policies import RecurrentActorCriticPolicy
from sb3_ppo_ext.reliability.checkpoints import atomic_write
from sb3_ppo_ext.zoo import presets
from sb3_ppo_ext.zoo.envs import is_atari, make_env

#: Benchmark algorithm name -> dotted class path (the seed's algorithm table, plus ClippedPPO).
ALGOS: dict[str, str] = {
    "clipped_ppo": "sb3_ppo_ext.ClippedPPO",
    "ppo": "stable_baselines3.PPO",
    "a2c": "stable_baselines3.A2C",
    "trpo": "sb3_contrib.TRPO",
    "maskable_ppo": "sb3_contrib.MaskablePPO",
    # LSTM policies, both with the Zoo's ppo_lstm.yml settings (clipped_ppo_lstm.yml)
    "clipped_ppo_lstm": "sb3_ppo_ext.ClippedPPO",
    "recurrent_ppo": "sb3_contrib.RecurrentPPO",
    # ClippedPPO with its tuned MuJoCo preset (zoo/hyperparams/clipped_ppo_mujoco_tuned.yml)
    "clipped_ppo_tuned": "sb3_ppo_ext.ClippedPPO",
}
#: Algorithms that run only when named: their LSTM settings are tuned for few tasks (the NoVel ones).
RECURRENT_ALGOS = ("clipped_ppo_lstm", "recurrent_ppo")
#: Algorithms that run only when named: their settings exist for a few tasks (the NoVel ones, MuJoCo v5).
NAMED_ONLY_ALGOS = (*RECURRENT_ALGOS, "clipped_ppo_tuned")

# Evaluation envs are seeded apart from the training envs (make_vec_env seeds env i with seed + i).
EVAL_SEED_OFFSET = 10_000
RESULT_VERSION = 1

Reporter = Callable[[str, int], None]


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """What one run trains and how it is evaluated; equal specs give interchangeable results.

    :param env_id: Gymnasium id.
    :param algo: a key of :data:`ALGOS`.
    :param seed: seed of the model and the training envs.
    :param timesteps: training budget in env steps.
    :param eval_freq: evaluate every this many env steps (plus at 0 and at the end).
    :param eval_episodes: episodes per evaluation.
    :param ablation: None, or a key of :data:`~sb3_ppo_ext.benchmark.ablations.ABLATIONS` (``"lambda"``, ...).
    :param variant: the ablation's variant name (``""`` without an ablation).
    :param device: torch device.
    """

    env_id: str
    algo: str
    seed: int
    timesteps: int
    eval_freq: int
    eval_episodes: int = 10
    ablation: str | None = None
    variant: str = ""
    device: str = "cpu"

    @property
    def label(self) -> str:
        """The curve/table name: the algorithm, or the ablation variant."""
        return self.variant or self.algo

    @property
    def key(self) -> str:
        """A short unique name for progress messages."""
        return f"{self.env_id}/{self.label}/seed{self.seed}"

    def result_path(self, out: Path) -> Path:
        """Where this run's JSON result is written.

        :param out: the output folder.
        :return: ``out/raw/<env>/<label>/seed<k>.json``.
        """
        return Path(out) / "raw" / self.env_id / self.label / f"seed{self.seed}.json"

    def partial_dir(self, out: Path) -> Path:
        """Where an unfinished run keeps its last checkpoint (deleted once the result is written).

        :param out: the output folder.
        :return: ``out/partial/<env>/<label>/seed<k>``.
        """
        return Path(out) / "partial" / self.env_id / self.label / f"seed{self.seed}"


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON through :func:`sb3_ppo_ext.reliability.checkpoints.atomic_write`, creating the folder.

    Readers see the old file or the whole new one, never a partial one.

    :param path: the file to write.
    :param data: anything ``json.dumps`` accepts.
    """
    text = json.dumps(data, indent=1)  # serialized before the file is opened: a failure leaves no trace
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as file:
        file.write(text.encode())


def load_result(path: Path) -> dict[str, Any] | None:
    """A finished run's result.

    :param path: a result file (:meth:`RunSpec.result_path`).
    :return: the result, or None if the file is missing, unreadable or holds no spec.
    """
    try:
        with open(path) as f:
            result = json.load(f)
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) and "spec" in result else None


def is_finished(spec: RunSpec, out: Path) -> bool:
    """Whether ``out`` already holds a result of exactly this spec (resume skips it).

    :param spec: the run.
    :param out: the output folder.
    :return: True when its result file exists and records the same spec.
    """
    result = load_result(spec.result_path(out))
    return result is not None and result["spec"] == dataclasses.asdict(spec)


def reusable_result(spec: RunSpec, source: Path, hyperparams_dir: Path | None = None) -> dict[str, Any] | None:
    """A finished plain run in ``source`` that trained exactly what ``spec`` (a Zoo-settings variant) would.

    The plain run must match ``spec`` in everything but the ablation fields (env, algorithm, seed, budget,
    evaluation protocol, device) and must have trained with the same hyperparameters. Its result is returned
    with ``spec`` as its spec and ``reused_from`` naming the file.

    :param spec: a run of an ablation variant.
    :param source: the output folder of earlier plain runs.
    :param hyperparams_dir: folder of Zoo-format files (None: the shipped ones).
    :return: the result to write for ``spec``, or None when the variant is not a Zoo-settings one or there is no
        such run.
    """
    if spec.ablation is None or ablations.ZOO_VARIANTS.get(spec.ablation) != spec.variant:
        return None
    plain = dataclasses.replace(spec, ablation=None, variant="")
    path = plain.result_path(source)
    result = load_result(path)
    if result is None or result["spec"] != dataclasses.asdict(plain):
        return None
    if result.get("hyperparameters") != recorded_hyperparameters(run_settings(spec, hyperparams_dir)):
        return None
    return {**result, "spec": dataclasses.asdict(spec), "reused_from": str(path)}


def recorded_hyperparameters(settings: presets.Settings) -> dict[str, Any]:
    """The settings as a result file records them.

    :param settings: a run's settings.
    :return: the policy, ``n_envs``, ``normalize``, the env's ``env_kwargs`` where the settings have some, and the
        model's arguments, as readable JSON values (schedules and classes by name).
    """
    # only where set: the files written before env_kwargs were recorded stay comparable (``reusable_result``)
    env = {"env_kwargs": settings.env_kwargs} if settings.env_kwargs else {}
    return _jsonable(
        {
            "policy": settings.policy,
            "n_envs": settings.n_envs,
            "normalize": settings.normalize,
            **env,
            **settings.model_kwargs,
        }
    )


def run_settings(spec: RunSpec, hyperparams_dir: Path | None = None) -> presets.Settings:
    """The settings this run trains with: the Zoo's for its algorithm and env, then its ablation variant.

    :param spec: the run.
    :param hyperparams_dir: folder of Zoo-format files (None: the shipped ones).
    :return: the settings.
    """
    path = None if hyperparams_dir is None else Path(hyperparams_dir) / presets.HYPERPARAMS_FILES[spec.algo]
    settings = presets.zoo_settings(spec.algo, spec.env_id, path)
    return ablations.apply(spec.ablation, spec.variant, settings)


class EvalRecorder(BaseCallback):
    """Evaluates on a separate env at 0, every ``eval_freq`` env steps and at the end.

    Records env steps, mean/std return and wall-clock; time spent evaluating is kept apart so
    that env-steps/s measures training alone. Under torchrun it runs on rank 0 only.

    :param eval_env: the evaluation env (its VecNormalize statistics are copied from training before each one).
    :param spec: the run.
    :param deterministic: evaluate with deterministic actions.
    :param report: called with the run's key and the env steps done since the last call (progress bars), or None.
    :param checkpoint: called with this recorder at the first rollout boundary after an evaluation, or None.
    :param resumed: the state of the checkpoint the run resumes from (its history and clocks), or None.
    """

    rank_zero_only = True  # data-parallel runs: rank 0 evaluates, reports and checkpoints

    def __init__(
        self,
        eval_env: Any,
        spec: RunSpec,
        deterministic: bool,
        report: Reporter | None,
        checkpoint: Callable[[EvalRecorder], None] | None = None,
        resumed: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.eval_env = eval_env
        self.spec = spec
        self.deterministic = deterministic
        self.report = report
        self.checkpoint = checkpoint
        self.history: dict[str, list[float]] = {
            "timesteps": [],
            "mean_return": [],
            "std_return": [],
            "wall_s": [],
            "train_s": [],
        }
        self.eval_s = 0.0
        #: wall-clock of the earlier segments of a resumed run
        self.prior_wall_s = 0.0
        #: CPU seconds of the earlier segments; None when a segment did not record them
        self.prior_cpu_s: float | None = 0.0
        if resumed is not None:
            self.history = resumed["history"]
            self.eval_s = resumed["eval_s"]
            self.prior_wall_s = resumed["wall_s"]
            self.prior_cpu_s = resumed.get("cpu_s")
        self._next_eval = 0
        self._checkpointed_evals = len(self.history["timesteps"])
        self._last_reported = 0
        self._start = 0.0
        self._cpu_start = 0.0

    def elapsed(self) -> float:
        """Wall-clock of the whole run so far, earlier segments included.

        :return: seconds since training started, plus the earlier segments'.
        """
        return self.prior_wall_s + time.perf_counter() - self._start

    def cpu_seconds(self) -> float | None:
        """CPU time of this process over the whole run so far (all its threads, earlier segments included).

        With one thread per run, ``cpu_seconds() / elapsed()`` is the share of a core the run had: about 1
        when it ran alone on its core, lower when other processes shared the CPU or the run was paused.
        :return: CPU seconds, or None when an earlier segment did not record its CPU time.
        """
        if self.prior_cpu_s is None:
            return None
        return self.prior_cpu_s + time.process_time() - self._cpu_start

    def _on_training_start(self) -> None:
        self._start = time.perf_counter()
        self._cpu_start = time.process_time()
        if self.history["timesteps"]:  # resumed: the earlier segments' steps count as done
            if self.report is not None:
                self.report(self.spec.key, min(self.num_timesteps, self.spec.timesteps))
            self._last_reported = min(self.num_timesteps, self.spec.timesteps)
            self._schedule_next_eval()
        else:
            self._evaluate()

    def _on_rollout_start(self) -> None:
        # after an update, before new env steps: a checkpoint here resumes at a rollout boundary
        evaluated = len(self.history["timesteps"])
        if self.checkpoint is not None and evaluated > self._checkpointed_evals:
            if 0 < self.num_timesteps < self.spec.timesteps:
                self.checkpoint(self)
            self._checkpointed_evals = evaluated

    def _on_step(self) -> bool:
        if self.num_timesteps >= self._next_eval:
            self._evaluate()
        return True

    def _on_rollout_end(self) -> None:
        if self.report is not None:
            # capped at the budget: the last rollout may overshoot it, the progress total does not
            done = min(self.num_timesteps, self.spec.timesteps)
            self.report(self.spec.key, done - self._last_reported)
            self._last_reported = done

    def _on_training_end(self) -> None:
        if self.history["timesteps"][-1] != self.num_timesteps:
            self._evaluate()

    def _evaluate(self) -> None:
        began = time.perf_counter()
        sync_envs_normalization(self.training_env, self.eval_env)
        returns = evaluate_returns(self.model, self.eval_env, self.spec.eval_episodes, self.deterministic)
        self.eval_s += time.perf_counter() - began
        wall_s = self.elapsed()
        history = self.history
        history["timesteps"].append(int(self.num_timesteps))
        history["mean_return"].append(float(np.mean(returns)))
        history["std_return"].append(float(np.std(returns)))
        history["wall_s"].append(wall_s)
        history["train_s"].append(wall_s - self.eval_s)
        self._schedule_next_eval()

    def _schedule_next_eval(self) -> None:
        self._next_eval = (self.num_timesteps // self.spec.eval_freq + 1) * self.spec.eval_freq


def evaluate_returns(model: Any, env: VecEnv, n_episodes: int, deterministic: bool) -> list[float]:
    """Episode returns of ``model`` on ``env``, with the env's action masks where both support them.

    Without masks: SB3's ``evaluate_policy`` (which carries LSTM states). With masks: sb3-contrib's
    masked ``evaluate_policy``, except for recurrent policies, which it would run without memory (it
    drops the states ``predict`` returns), so those go through :func:`evaluate_masked_recurrent`.

    :param model: the model being trained.
    :param env: the evaluation env.
    :param n_episodes: episodes to run.
    :param deterministic: deterministic actions.
    :return: the return of each episode.
    """
    if not (is_masking_supported(env) and predict_takes_masks(model)):
        returns, _ = evaluate_policy(
            model, env, n_eval_episodes=n_episodes, deterministic=deterministic, return_episode_rewards=True
        )
    elif isinstance(model.policy, RecurrentActorCriticPolicy):
        returns = evaluate_masked_recurrent(model, env, n_episodes, deterministic)
    else:
        returns, _ = evaluate_masked(
            model, env, n_eval_episodes=n_episodes, deterministic=deterministic, return_episode_rewards=True
        )
    return [float(r) for r in returns]


def evaluate_masked_recurrent(model: Any, env: VecEnv, n_episodes: int, deterministic: bool) -> list[float]:
    """Episode returns from :func:`sb3_ppo_ext.evaluation.evaluate_policy` (masks and LSTM states together).

    sb3-contrib 2.9's masked ``evaluate_policy`` assigns ``predict``'s new states to ``state`` and passes ``states``
    (always ``None``) back in, so a recurrent policy would start from zero states at every step.

    :param model: a model with a recurrent policy.
    :param env: the evaluation env, which provides masks.
    :param n_episodes: episodes to run.
    :param deterministic: deterministic actions.
    :return: the return of each episode.
    """
    returns, _ = evaluate_policy_with_states(
        model, env, n_eval_episodes=n_episodes, deterministic=deterministic, return_episode_rewards=True, warn=False
    )
    return list(returns)


def _versions() -> dict[str, str]:
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "stable_baselines3": stable_baselines3.__version__,
        "sb3_contrib": sb3_contrib.__version__,
        "gymnasium": gym.__version__,
        "sb3_ppo_ext": getattr(sb3_ppo_ext, "__version__", "unknown"),
    }
    try:  # the physics engine of the MuJoCo tasks, where installed
        versions["mujoco"] = importlib.metadata.version("mujoco")
    except importlib.metadata.PackageNotFoundError:
        pass
    return versions


def segment_hosts(state: dict[str, Any] | None) -> list[str | None]:
    """The machine of each segment of a run, this one last; ``None`` for a segment that did not record it.

    Checkpoints travel between machines (a later session resumes them elsewhere), so one run's wall-clock can
    span machines; only a run trained on one machine throughout says how fast that machine runs the code.

    :param state: the checkpoint the run resumes from, or None for a new run.
    :return: one entry per segment, this machine's (:func:`host_description`) last.
    """
    if state is None:
        return [host_description()]
    earlier = state.get("hosts") or [None] * state["segments"]
    return [*earlier, host_description()]


def code_commit() -> str | None:
    """The git commit of the code this process runs (``+dirty`` with uncommitted changes), if it is a checkout.

    :return: the commit's hash, or None outside a git checkout.
    """
    root = Path(sb3_ppo_ext.__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", "sb3_ppo_ext"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def segment_commits(state: dict[str, Any] | None) -> list[str | None]:
    """The code's commit in each segment of a run, this one last (a run resumed across sessions spans several).

    :param state: the checkpoint the run resumes from, or None for a new run.
    :return: one entry per segment; ``None`` for a segment that did not record it.
    """
    if state is None:
        return [code_commit()]
    earlier = state.get("commits") or [None] * state["segments"]
    return [*earlier, code_commit()]


def single_host(hosts: Sequence[str | None]) -> str | None:
    """The one machine all segments ran on.

    :param hosts: each segment's machine (:func:`segment_hosts`).
    :return: that machine, or None where they ran on several or did not say.
    """
    return hosts[0] if hosts and hosts[0] is not None and all(h == hosts[0] for h in hosts) else None


def host_description() -> str:
    """The machine a run trains on.

    :return: its CPU model and logical CPU count (e.g. ``"Intel(R) Xeon(R) Processor x2"``).
    """
    return f"{cpu_model()} x{os.cpu_count()}"


def _jsonable(value: Any) -> Any:
    # Hyperparameters as readable JSON: schedules and classes by repr/name.
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    return repr(value)


# Files of a run's checkpoint in its partial folder; state.json is written last and names the others.
_STATE_FILE = "state.json"


def save_checkpoint(
    spec: RunSpec,
    out: Path,
    recorder: EvalRecorder,
    segments: int,
    hosts: list[str | None],
    commits: list[str | None] | None = None,
) -> None:
    """Save the model, its VecNormalize statistics and the recorder's history so the run can resume.

    Files carry the step count in their names and ``state.json`` is replaced last, atomically: a
    machine that stops mid-save leaves the previous checkpoint intact.

    :param spec: the run.
    :param out: the output folder; the checkpoint goes to ``spec.partial_dir(out)``.
    :param recorder: the run's recorder, whose model, history and clocks are saved.
    :param segments: the number of this segment (1: the run was never resumed).
    :param hosts: the machine of each segment so far (see :func:`segment_hosts`).
    :param commits: the code's commit in each segment so far (see :func:`segment_commits`).
    """
    model = recorder.model
    folder = spec.partial_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    steps = int(model.num_timesteps)
    model_file = f"model_{steps}.zip"
    model.save(folder / model_file)
    vec_normalize = model.get_vec_normalize_env()
    stats_file = None
    if vec_normalize is not None:
        stats_file = f"vecnormalize_{steps}.pkl"
        vec_normalize.save(str(folder / stats_file))
    state = {
        "spec": dataclasses.asdict(spec),
        "num_timesteps": steps,
        "model": model_file,
        "vecnormalize": stats_file,
        "history": recorder.history,
        "eval_s": recorder.eval_s,
        "wall_s": recorder.elapsed(),
        "cpu_s": recorder.cpu_seconds(),
        "segments": segments,
        "hosts": hosts,
        "commits": commits,
    }
    write_json(folder / _STATE_FILE, state)
    for path in folder.iterdir():
        if path.name not in (_STATE_FILE, model_file, stats_file):
            path.unlink()


def load_checkpoint(spec: RunSpec, out: Path) -> dict[str, Any] | None:
    """The checkpoint of an unfinished run of exactly this spec.

    :param spec: the run.
    :param out: the output folder.
    :return: the checkpoint's state (``state.json``), or None when there is none for this spec or its model file
        is missing.
    """
    folder = spec.partial_dir(out)
    try:
        with open(folder / _STATE_FILE) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    if state.get("spec") != dataclasses.asdict(spec) or not (folder / state["model"]).exists():
        return None
    return state


def _restore_normalization(env: Any, path: Path) -> None:
    # the statistics only: the env's own wrapper stack (and its venv) stays as make_env built it
    target = next((e for e in _wrapper_chain(env) if isinstance(e, VecNormalize)), None)
    if target is None:
        raise ValueError(f"checkpoint has VecNormalize statistics ({path}) but the run's env does not normalize")
    with open(path, "rb") as f:
        saved = pickle.load(f)
    target.obs_rms, target.ret_rms = saved.obs_rms, saved.ret_rms


def _wrapper_chain(env: Any) -> list[Any]:
    chain = [env]
    while hasattr(chain[-1], "venv"):
        chain.append(chain[-1].venv)
    return chain


def _new_or_resumed_model(
    spec: RunSpec, settings: presets.Settings, env: VecEnv, state: dict[str, Any] | None, folder: Path, env_seed: int
) -> Any:
    """The run's model: new, or loaded from its checkpoint (with its VecNormalize statistics) and reseeded."""
    algo_class = presets.import_object(ALGOS[spec.algo])
    if state is None:
        return algo_class(settings.policy, env, seed=spec.seed, device=spec.device, verbose=0, **settings.model_kwargs)
    if state["vecnormalize"] is not None:
        _restore_normalization(env, folder / state["vecnormalize"])
    model = algo_class.load(folder / state["model"], env=env, device=spec.device)
    model.set_random_seed(env_seed)
    return model


def train_and_evaluate(
    spec: RunSpec,
    out: Path,
    report: Reporter | None = None,
    hyperparams_dir: Path | None = None,
    *,
    checkpoints: bool = True,
) -> dict[str, Any]:
    """Train one run, evaluating along the way, and write its result file atomically.

    With ``checkpoints``, the run saves itself after each evaluation under ``spec.partial_dir(out)``
    and a later call continues from there (fresh env episodes, the same model, optimizer, schedules,
    normalization statistics and learning curve) instead of starting over.

    :param spec: the run.
    :param out: the output folder.
    :param report: called with the run's key and the env steps done since the last call, or None.
    :param hyperparams_dir: folder of Zoo-format files (None: the shipped ones).
    :param checkpoints: save a checkpoint after each evaluation and resume from one.
    :return: the result written to ``spec.result_path(out)`` (empty on ranks other than 0 under torchrun).
    """
    torch.set_num_threads(1)  # one core per run: runs are parallelised across processes instead
    settings = run_settings(spec, hyperparams_dir)
    state = load_checkpoint(spec, out) if checkpoints else None
    segments = 1 if state is None else state["segments"] + 1
    hosts, commits = segment_hosts(state), segment_commits(state)
    # a resumed segment's envs get fresh seeds: replaying the first segment's episodes would be a bias
    env_seed = spec.seed + (segments - 1) * 1_000_000
    env = make_env(spec.env_id, settings, seed=env_seed)
    # statistics are copied from the training env before each evaluation; returns unscaled
    eval_env = make_env(spec.env_id, settings, 1, env_seed + EVAL_SEED_OFFSET, evaluation=True)
    model = _new_or_resumed_model(spec, settings, env, state, spec.partial_dir(out), env_seed)

    def checkpoint(recorder: EvalRecorder) -> None:
        save_checkpoint(spec, out, recorder, segments, hosts, commits)

    # the Zoo evaluates deterministically except on Atari (and MiniGrid)
    recorder = EvalRecorder(
        eval_env,
        spec,
        deterministic=not is_atari(spec.env_id),
        report=report,
        checkpoint=checkpoint if checkpoints else None,
        resumed=state,
    )
    model.learn(spec.timesteps - model.num_timesteps, callback=recorder, reset_num_timesteps=state is None)
    if not distributed.is_main_process():  # torchrun: rank 0 evaluated and writes the result
        env.close()
        eval_env.close()
        return {}
    wall_s, cpu_s = recorder.elapsed(), recorder.cpu_seconds()
    env.close()
    eval_env.close()

    history = recorder.history
    train_s = wall_s - recorder.eval_s
    result = {
        "version": RESULT_VERSION,
        "spec": dataclasses.asdict(spec),
        "hyperparameters": recorded_hyperparameters(settings),
        "zoo_timesteps": settings.n_timesteps,
        "evaluations": history,
        "final_return": history["mean_return"][-1],
        "total_timesteps": int(model.num_timesteps),
        "wall_s": wall_s,
        "train_s": train_s,
        "steps_per_s": model.num_timesteps / train_s if train_s > 0 else float("nan"),
        # share of a core the run had over its wall-clock (None: not recorded); see EvalRecorder.cpu_seconds
        "cpu_s": cpu_s,
        "cpu_share": cpu_s / wall_s if cpu_s is not None and wall_s > 0 else None,
        # one machine throughout, else None: then the run's speed compares with nothing (see segment_hosts)
        "host": single_host(hosts),
        "hosts": hosts,
        # the code's commit in each segment: results of a resumed run span these
        "commits": commits,
        # >1: resumed from a checkpoint this many times minus one (each segment restarts its episodes)
        "segments": segments,
        "versions": _versions(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(spec.result_path(out), result)
    shutil.rmtree(spec.partial_dir(out), ignore_errors=True)
    return result
