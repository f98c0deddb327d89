"""Preference-based reward learning on Pendulum-v1: sb3_ppo_ext.rlhf.preferences + ClippedPPO against the
`imitation` library's PreferenceComparisons + SB3's PPO, with the same synthetic labeller and the same budget.

Both sides run the same loop (Christiano et al. 2017, as imitation implements it):

1. sample ``initial_pairs`` segment pairs from the untrained agent's own (stochastic) episodes, label them, fit
   the reward model for ``initial_epochs`` epochs;
2. then ``iterations`` times: the agent collects one PPO rollout (4 envs x 1024 steps) on the learned reward and
   trains on it; ``pairs_per_iteration`` new pairs are cut from that rollout's episodes, labelled, and the reward
   model is refitted for ``epochs`` epochs on all pairs so far;
3. one last rollout and PPO update (imitation trains the agent once more after its last refit; so do we).

The labeller, for both: segment 1 is preferred with probability ``sigmoid((R1 - R2) / temperature)``, ``R`` the
segment's sum of true env rewards (Bradley-Terry, sampled; imitation's ``SyntheticGatherer`` and our
``SyntheticPreferenceCollector`` implement exactly this formula, each with its own random stream).

Measured per run: the final agent's true return (10 deterministic episodes on the true reward) and, afterwards,
both reward models of a seed on the same held-out pairs (:func:`heldout`), labelled by the true return.

Run everything (about an hour on one core; see README.md)::

    bash benchmarks/rlhf_anchor/setup_imitation_env.sh /tmp/imit-venv
    nice -n 10 python benchmarks/rlhf_anchor/compare.py all --imitation-python /tmp/imit-venv/bin/python

``run`` (one method, one seed), ``heldout`` (one seed's cross-evaluation, needs the imitation venv) and
``summary`` are the steps ``all`` chains; a step whose result file exists is skipped (delete it to rerun).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
RESULTS = HERE / "results"

ENV_ID = "Pendulum-v1"
N_ENVS = 4
# the RL Zoo's PPO settings for Pendulum-v1 (hyperparams/ppo.yml), for both agents
PPO_KWARGS = dict(
    n_steps=1024,
    batch_size=64,
    gae_lambda=0.95,
    gamma=0.9,
    n_epochs=10,
    ent_coef=0.0,
    learning_rate=1e-3,
    clip_range=0.2,
    use_sde=True,
    sde_sample_freq=4,
)
ROLLOUT_STEPS = N_ENVS * PPO_KWARGS["n_steps"]  # 4096 env steps per PPO update

BUDGET = dict(
    segment_length=25,  # steps per segment (Pendulum episodes are 200 steps)
    temperature=1.0,  # Bradley-Terry labeller, in true-return units (imitation's default)
    iterations=24,  # refits after the initial fit; the agent trains iterations + 1 rollouts
    initial_pairs=120,  # labelled before the agent trains (imitation: initial_comparison_frac = 0.2)
    pairs_per_iteration=20,  # 120 + 24 * 20 = 600 comparisons in all
    epochs=3,  # reward-model epochs over all pairs at each refit (imitation's script default)
    initial_epochs=60,  # the first fit (imitation: initial_epoch_multiplier = 20)
    batch_size=32,  # reward-model minibatch (imitation's default)
    lr=1e-3,  # reward-model learning rate (both libraries' default)
    net_arch=(64, 64),  # reward-model MLP on (observation, action), ReLU, no input normalisation
    # imitation cuts each iteration's pairs from the newest finished episodes, this many transitions
    # (transition_oversampling * 2 * pairs * segment_length): 20 episodes, i.e. the last rollout's
    sample_steps_per_iteration=4000,
    eval_episodes=10,
    heldout_steps_per_env=1000,  # per source, 4 envs: the final policy's stochastic steps (and random actions)
    heldout_pairs=3000,  # pooled pairs; plus 1000 within each source
)
QUICK = dict(
    BUDGET,
    iterations=2,
    initial_pairs=10,
    pairs_per_iteration=8,
    initial_epochs=3,
    eval_episodes=2,
    heldout_steps_per_env=200,
    heldout_pairs=200,
    sample_steps_per_iteration=800,
)
QUICK_PPO = dict(PPO_KWARGS, n_steps=256, n_epochs=2)

METHODS = ("ours", "imitation")

# "Which difference matters": ours with ONE of the three differences swapped to imitation's side
VARIANTS = {
    # SB3's PPO (same PPO_KWARGS) instead of ClippedPPO; VecNormalize and Adam kept
    "ours_sb3ppo": dict(agent="sb3", reward_norm="vecnormalize", optimizer="adam"),
    # imitation's per-step running mean/std of the learned reward instead of VecNormalize; ClippedPPO, Adam kept
    "ours_runningnorm": dict(agent="clipped", reward_norm="running", optimizer="adam"),
    # AdamW (torch's default weight decay 0.01, as imitation's BasicRewardTrainer) instead of Adam
    "ours_adamw": dict(agent="clipped", reward_norm="vecnormalize", optimizer="adamw"),
}
OURS_DEFAULT = dict(agent="clipped", reward_norm="vecnormalize", optimizer="adam")


def total_pairs(budget: dict) -> int:
    return budget["initial_pairs"] + budget["iterations"] * budget["pairs_per_iteration"]


def oversampling(budget: dict) -> float:
    """imitation's transition_oversampling: transitions sampled per transition that goes into a pair."""
    return budget["sample_steps_per_iteration"] / (2 * budget["pairs_per_iteration"] * budget["segment_length"])


def make_env(n_envs: int, seed: int):
    from stable_baselines3.common.env_util import make_vec_env

    return make_vec_env(ENV_ID, n_envs=n_envs, seed=seed)


def record(venv, n_steps: int, predict=None) -> dict[str, np.ndarray]:
    """``n_steps`` steps of every env of ``venv`` (reset first): observations before each step, actions, true
    rewards and dones, ``[T, N, ...]``; ``predict(obs) -> actions`` or uniform random actions."""
    obs = venv.reset()
    out: dict[str, list] = {"obs": [], "actions": [], "rewards": [], "dones": []}
    for _ in range(n_steps):
        actions = (
            np.stack([venv.action_space.sample() for _ in range(venv.num_envs)]) if predict is None else predict(obs)
        )
        new_obs, rewards, dones, _ = venv.step(actions)
        for key, value in zip(out, (obs, actions, rewards, dones), strict=True):
            out[key].append(np.array(value))
        obs = new_obs
    return {key: np.stack(values) for key, values in out.items()}


class RolloutLog:
    """SB3 callback (built lazily: the class needs SB3): the true episode return after every rollout."""

    @staticmethod
    def make(curve: list):
        from stable_baselines3.common.callbacks import BaseCallback

        class _Log(BaseCallback):
            def _on_step(self) -> bool:
                return True

            def _on_rollout_end(self) -> None:
                # Monitor sits inside the VecEnv, under any reward wrapper: these are true returns
                buffer = self.model.ep_info_buffer
                if buffer:
                    curve.append([int(self.num_timesteps), float(np.mean([info["r"] for info in buffer]))])

        return _Log()


def evaluate_true_return(model, seed: int, episodes: int) -> list[float]:
    from stable_baselines3.common.evaluation import evaluate_policy

    env = make_env(1, seed + 100)
    returns, _ = evaluate_policy(model, env, n_eval_episodes=episodes, deterministic=True, return_episode_rewards=True)
    return [float(r) for r in returns]


def save_heldout_source(model, seed: int, budget: dict, path: Path) -> None:
    """The final policy's own (stochastic) behaviour, for the held-out pairs."""
    venv = make_env(N_ENVS, seed + 200)
    data = record(venv, budget["heldout_steps_per_env"], lambda obs: model.predict(obs, deterministic=False)[0])
    np.savez_compressed(path, **data)


# ── ours ───────────────────────────────────────────────────────────────────────────────────────────────


class ImitationRunningNorm:
    """imitation's ``NormalizedRewardNet(RunningNorm)`` applied to the learned reward, as a VecEnv wrapper
    (built lazily: the class needs SB3): each step's batch of rewards (one per env) is normalised with the
    running mean and variance of all rewards before it, ``(r - mean) / sqrt(var + 1e-5)``, then the statistics
    are updated with the batch (cumulative, count-weighted; never reset, also not when the model is refitted).
    """

    @staticmethod
    def make(venv):
        from stable_baselines3.common.vec_env import VecEnvWrapper

        class _Norm(VecEnvWrapper):
            def __init__(self, venv) -> None:
                super().__init__(venv)
                self.mean, self.var, self.count = 0.0, 1.0, 0

            def update(self, batch: np.ndarray) -> None:
                batch = np.asarray(batch, dtype=np.float64).reshape(-1)
                b_mean, b_var, b_count = batch.mean(), batch.var(), batch.size
                delta = b_mean - self.mean
                total = self.count + b_count
                self.mean += delta * b_count / total
                self.var = (self.var * self.count + b_var * b_count + delta**2 * self.count * b_count / total) / total
                self.count = total

            def reset(self):
                return self.venv.reset()

            def step_wait(self):
                obs, rewards, dones, infos = self.venv.step_wait()
                normed = ((rewards - self.mean) / np.sqrt(self.var + 1e-5)).astype(np.float32)
                self.update(rewards)
                return obs, normed, dones, infos

        return _Norm(venv)


def run_ours(seed: int, budget: dict, ppo_kwargs: dict, out: Path, variant: dict | None = None) -> dict:
    """Our pipeline; ``variant`` (a value of :data:`VARIANTS`) swaps the agent, the reward scaling or the
    reward-model optimiser for imitation's; None: :data:`OURS_DEFAULT`."""
    import torch as th
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import VecNormalize

    from sb3_ppo_ext import ClippedPPO
    from sb3_ppo_ext.rlhf.preferences import (
        LearnedRewardWrapper,
        PreferenceDataset,
        RewardModel,
        RewardModelRefitCallback,
        SyntheticPreferenceCollector,
        Trajectories,
        fit,
    )

    variant = OURS_DEFAULT if variant is None else variant
    th.manual_seed(seed)
    rollout_steps = N_ENVS * ppo_kwargs["n_steps"]
    venv = make_env(N_ENVS, seed)
    reward_model = RewardModel(venv.observation_space, venv.action_space, net_arch=budget["net_arch"])
    wrapper = LearnedRewardWrapper(venv, reward_model, mode="replace")
    if variant["reward_norm"] == "vecnormalize":
        # the documented order: the reward model sees raw observations, VecNormalize scales the learned reward
        env = VecNormalize(wrapper, norm_obs=False, norm_reward=True, gamma=ppo_kwargs["gamma"])
    else:
        env = ImitationRunningNorm.make(wrapper)
    agent_cls = ClippedPPO if variant["agent"] == "clipped" else PPO
    model = agent_cls("MlpPolicy", env, seed=seed, verbose=0, **ppo_kwargs)

    collector = SyntheticPreferenceCollector(
        budget["segment_length"],
        temperature=budget["temperature"],
        capacity=rollout_steps,  # segments from the last rollout only, as imitation's newest episodes
        seed=seed,
    )
    dataset = PreferenceDataset()
    final_steps = rollout_steps * (budget["iterations"] + 1)

    class Refit(RewardModelRefitCallback):
        """No refit after the last rollout: imitation's loop ends with agent training, not with a refit."""

        def _on_rollout_end(self) -> None:
            if self.num_timesteps >= final_steps:
                self.wrapper.pop_recording()
                return
            super()._on_rollout_end()

    refit = Refit(
        reward_model,
        collector,
        dataset,
        refit_every=1,
        pairs_per_refit=budget["pairs_per_iteration"],
        epochs=budget["epochs"],
        batch_size=budget["batch_size"],
        lr=budget["lr"],
        wrapper=wrapper,
    )
    if variant["optimizer"] == "adamw":
        # imitation's BasicRewardTrainer: th.optim.AdamW(params, lr=lr), i.e. torch's weight_decay=0.01;
        # one optimiser for the first fit and all refits, as with our Adam
        refit.optimizer = th.optim.AdamW(reward_model.parameters(), lr=budget["lr"])

    start, cpu_start = time.perf_counter(), time.process_time()
    # 1. initial pairs from the untrained agent's stochastic episodes (as imitation's first sample)
    initial_steps = math.ceil(oversampling(budget) * 2 * budget["initial_pairs"] * budget["segment_length"] / N_ENVS)
    steps = record(venv, initial_steps, lambda obs: model.predict(obs, deterministic=False)[0])
    if variant["reward_norm"] == "running":
        # imitation samples these steps through its reward wrapper: the untrained net's rewards enter the stats
        for obs_t, act_t in zip(steps["obs"], steps["actions"], strict=True):
            env.update(reward_model.predict_reward(obs_t, act_t))
    collector.add(Trajectories(steps["obs"], steps["actions"], steps["rewards"], steps["dones"]))
    collector.collect(budget["initial_pairs"], dataset)
    fit(
        reward_model,
        dataset,
        epochs=budget["initial_epochs"],
        batch_size=budget["batch_size"],
        optimizer=refit.optimizer,
        seed=seed,
    )
    # 2. and 3. PPO on the learned reward, a refit after each rollout but the last
    curve: list = []
    from stable_baselines3.common.callbacks import CallbackList

    model.learn(final_steps, callback=CallbackList([refit, RolloutLog.make(curve)]))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    all_env_steps = int(sum(venv.env_method("get_total_steps")))  # the Monitors': training and sampling

    th.save({"state_dict": reward_model.state_dict(), "net_arch": list(budget["net_arch"])}, out / "reward_model.pt")
    save_heldout_source(model, seed, budget, out / "final_policy_steps.npz")
    returns = evaluate_true_return(model, seed, budget["eval_episodes"])
    return {
        "variant": variant,
        "agent_env_steps": int(model.num_timesteps),
        "preference_sampling_env_steps": all_env_steps - int(model.num_timesteps),
        "comparisons": len(dataset),
        "train_accuracy_on_new_pairs": [h["accuracy"] for h in refit.history],
        "curve_true_return": curve,
        "final_returns": returns,
        "wall_s": wall,
        "cpu_s": cpu,
    }


# ── imitation ──────────────────────────────────────────────────────────────────────────────────────────


def run_imitation(seed: int, budget: dict, ppo_kwargs: dict, out: Path) -> dict:
    import torch as th
    from imitation.algorithms import preference_comparisons as pc
    from imitation.rewards.reward_nets import BasicRewardNet, NormalizedRewardNet
    from imitation.util import logger as imit_logger
    from imitation.util.networks import RunningNorm
    from stable_baselines3 import PPO

    th.manual_seed(seed)
    rng = np.random.default_rng(seed)
    rollout_steps = N_ENVS * ppo_kwargs["n_steps"]
    venv = make_env(N_ENVS, seed)
    base = BasicRewardNet(venv.observation_space, venv.action_space, hid_sizes=budget["net_arch"])
    # imitation's scripts' default: the agent sees the reward through a running normalisation
    reward_net = NormalizedRewardNet(base, normalize_output_layer=RunningNorm)
    logger = imit_logger.configure(folder=str(out / "imitation_log"), format_strs=["csv"])
    agent = PPO("MlpPolicy", venv, seed=seed, verbose=0, **ppo_kwargs)
    trajectory_generator = pc.AgentTrainer(agent, reward_net, venv, rng=rng, exploration_frac=0.0, custom_logger=logger)
    preference_model = pc.PreferenceModel(reward_net)
    reward_trainer = pc.BasicRewardTrainer(
        preference_model,
        pc.CrossEntropyRewardLoss(),
        rng=rng,
        batch_size=budget["batch_size"],
        epochs=budget["epochs"],
        lr=budget["lr"],
        custom_logger=logger,
    )
    algorithm = pc.PreferenceComparisons(
        trajectory_generator,
        reward_net,
        num_iterations=budget["iterations"],
        fragmenter=pc.RandomFragmenter(rng=rng, warning_threshold=0, custom_logger=logger),
        preference_gatherer=pc.SyntheticGatherer(
            temperature=budget["temperature"], sample=True, rng=rng, custom_logger=logger
        ),
        reward_trainer=reward_trainer,
        fragment_length=budget["segment_length"],
        transition_oversampling=oversampling(budget),
        initial_comparison_frac=budget["initial_pairs"] / total_pairs(budget),
        initial_epoch_multiplier=budget["initial_epochs"] / budget["epochs"],
        query_schedule="constant",
        custom_logger=logger,
    )
    curve: list = []
    log_cb = RolloutLog.make(curve)

    def train_with_log(steps: int, **kwargs) -> None:
        # AgentTrainer passes its own callback; ours only reads the Monitor's true returns
        from stable_baselines3.common.callbacks import CallbackList

        n_transitions = trajectory_generator.buffering_wrapper.n_transitions
        if n_transitions:
            raise RuntimeError(f"{n_transitions} transitions left in the buffer")
        agent.learn(
            total_timesteps=steps,
            reset_num_timesteps=False,
            callback=CallbackList([trajectory_generator.log_callback, log_cb]),
            **kwargs,
        )

    trajectory_generator.train = train_with_log  # same as AgentTrainer.train, plus the curve

    start, cpu_start = time.perf_counter(), time.process_time()
    stats = algorithm.train(total_timesteps=rollout_steps * budget["iterations"], total_comparisons=total_pairs(budget))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    all_env_steps = int(sum(venv.env_method("get_total_steps")))  # the Monitors': training and sampling

    th.save(base, out / "reward_net.pt")
    save_heldout_source(agent, seed, budget, out / "final_policy_steps.npz")
    returns = evaluate_true_return(agent, seed, budget["eval_episodes"])
    return {
        "agent_env_steps": int(agent.num_timesteps),
        "preference_sampling_env_steps": all_env_steps - int(agent.num_timesteps),
        "comparisons": len(algorithm.dataset),
        "imitation_final_train_accuracy": float(stats["reward_accuracy"]),
        "curve_true_return": curve,
        "final_returns": returns,
        "wall_s": wall,
        "cpu_s": cpu,
    }


# ── held-out reward-model accuracy ─────────────────────────────────────────────────────────────────────


def _segments(data: dict, length: int) -> np.ndarray:
    """Valid (t, n) starts of ``length``-step segments that stay in one episode."""
    dones = data["dones"].astype(bool)
    steps = dones.shape[0]
    crossing = np.zeros((steps - length + 1, dones.shape[1]), dtype=bool)
    for offset in range(length - 1):
        crossing |= dones[offset : offset + steps - length + 1]
    return np.argwhere(~crossing)


def heldout(seed: int, budget: dict, quick: bool, variants: tuple[str, ...] = ()) -> dict:
    """Both reward models of ``seed`` on the same pairs, labelled by the true return (noiseless); with
    ``variants``, those runs' reward models too, on the very same pairs (the sources and draws do not change)."""
    import gymnasium as gym
    import torch as th

    from sb3_ppo_ext.rlhf.preferences import RewardModel

    length = budget["segment_length"]
    env = gym.make(ENV_ID)
    sources = {
        "random": record(make_env(N_ENVS, seed + 300), budget["heldout_steps_per_env"]),
        "ours_final": dict(np.load(run_dir("ours", seed, quick) / "final_policy_steps.npz")),
        "imitation_final": dict(np.load(run_dir("imitation", seed, quick) / "final_policy_steps.npz")),
    }
    saved = th.load(run_dir("ours", seed, quick) / "reward_model.pt")
    ours = RewardModel(env.observation_space, env.action_space, net_arch=saved["net_arch"])
    ours.load_state_dict(saved["state_dict"])
    theirs = th.load(run_dir("imitation", seed, quick) / "reward_net.pt", weights_only=False)
    extra = {}
    for name in variants:
        saved = th.load(run_dir(name, seed, quick) / "reward_model.pt")
        extra[name] = RewardModel(env.observation_space, env.action_space, net_arch=saved["net_arch"])
        extra[name].load_state_dict(saved["state_dict"])

    def predicted(data: dict) -> dict[str, np.ndarray]:
        obs = data["obs"].reshape(-1, *env.observation_space.shape)
        act = data["actions"].reshape(-1, *env.action_space.shape)
        shape = data["dones"].shape
        # BasicRewardNet(use_next_state=False, use_done=False) ignores next_state and done
        theirs_r = theirs.predict(obs, act, obs, np.zeros(len(obs), dtype=bool))
        return {
            "ours": ours.predict_reward(obs, act).reshape(shape),
            "imitation": theirs_r.reshape(shape),
            "true": data["rewards"].reshape(shape),
        } | {name: model.predict_reward(obs, act).reshape(shape) for name, model in extra.items()}

    rewards = {name: predicted(data) for name, data in sources.items()}
    starts = {name: _segments(data, length) for name, data in sources.items()}
    rng = np.random.default_rng(10_000 + seed)

    def draw(names: list[str]) -> dict[str, float]:
        name = names[rng.integers(len(names))]
        t, n = starts[name][rng.integers(len(starts[name]))]
        return {key: float(r[t : t + length, n].sum()) for key, r in rewards[name].items()}

    def accuracy(names: list[str], n_pairs: int) -> dict[str, float]:
        hits = {"ours": 0, "imitation": 0} | {name: 0 for name in extra}
        counted = 0
        for _ in range(n_pairs):
            a, b = draw(names), draw(names)
            if abs(a["true"] - b["true"]) < 1e-6:
                continue
            counted += 1
            for method in hits:
                hits[method] += (a[method] > b[method]) == (a["true"] > b["true"])
        return {method: hit / counted for method, hit in hits.items()} | {"pairs": counted}

    names = list(sources)
    result = {"pooled": accuracy(names, budget["heldout_pairs"])}
    for name in names:
        result[name] = accuracy([name], budget["heldout_pairs"] // 3)
    return result


# ── driver ─────────────────────────────────────────────────────────────────────────────────────────────


def run_dir(method: str, seed: int, quick: bool) -> Path:
    return RESULTS / ("quick" if quick else "") / f"{method}_seed{seed}"


def cmd_run(args) -> None:
    import torch as th

    th.set_num_threads(1)
    budget, ppo_kwargs = (QUICK, QUICK_PPO) if args.quick else (BUDGET, PPO_KWARGS)
    out = run_dir(args.method, args.seed, args.quick)
    out.mkdir(parents=True, exist_ok=True)
    if args.method == "imitation":
        result = run_imitation(args.seed, budget, ppo_kwargs, out)
    else:
        result = run_ours(args.seed, budget, ppo_kwargs, out, VARIANTS.get(args.method))
    import gymnasium
    import stable_baselines3

    versions = {
        "stable_baselines3": stable_baselines3.__version__,
        "gymnasium": gymnasium.__version__,
        "torch": th.__version__,
        "python": platform.python_version(),
    }
    if args.method == "imitation":
        import importlib.metadata

        versions["imitation"] = importlib.metadata.version("imitation")
    result = {
        "method": args.method,
        "seed": args.seed,
        "env": ENV_ID,
        "budget": budget,
        "ppo": ppo_kwargs,
        "versions": versions,
        **result,
        "final_return_mean": float(np.mean(result["final_returns"])),
        "final_return_std": float(np.std(result["final_returns"])),
    }
    (out.parent / f"{args.method}_seed{args.seed}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"{args.method} seed {args.seed}: return {result['final_return_mean']:.1f}, {result['wall_s']:.0f} s")


def cmd_heldout(args) -> None:
    import torch as th

    th.set_num_threads(1)
    budget = QUICK if args.quick else BUDGET
    result = heldout(args.seed, budget, args.quick)
    path = (RESULTS / ("quick" if args.quick else "")) / f"heldout_seed{args.seed}.json"
    path.write_text(json.dumps({"seed": args.seed, **result}, indent=1) + "\n")
    print(f"held-out seed {args.seed}: {result['pooled']}")


def cmd_heldout_variants(args) -> None:
    import torch as th

    th.set_num_threads(1)
    budget = QUICK if args.quick else BUDGET
    folder = RESULTS / ("quick" if args.quick else "")
    variants = tuple(name for name in VARIANTS if (folder / f"{name}_seed{args.seed}.json").exists())
    result = heldout(args.seed, budget, args.quick, variants)
    path = folder / f"heldout_variants_seed{args.seed}.json"
    path.write_text(json.dumps({"seed": args.seed, "variants": list(variants), **result}, indent=1) + "\n")
    print(f"held-out (variants) seed {args.seed}: {result['pooled']}")


VARIANT_LABEL = {
    "ours": ("sb3_ppo_ext as committed", "-"),
    "ours_sb3ppo": ("ours, SB3 `PPO` as the agent", "(1) PPO implementation"),
    "ours_runningnorm": ("ours, imitation's running-norm reward", "(2) reward scaling"),
    "ours_adamw": ("ours, AdamW (wd 0.01) for the reward model", "(3) RM optimiser"),
    "imitation": ("imitation 1.0.1 (SB3 PPO)", "all three"),
}
FAILED_EPISODE = -1000.0  # a deterministic Pendulum episode below this never swung up (about -1500 when it fails)


def variants_section(folder: Path) -> list[str]:
    """The "Which difference matters" section: every method/variant, over every seed it has a result for."""
    rows: dict[str, list[dict]] = {}
    for method in ("ours", *VARIANTS, "imitation"):
        for seed in range(10):
            path = folder / f"{method}_seed{seed}.json"
            if not path.exists():
                continue
            run = json.loads(path.read_text())
            held_name = f"heldout_seed{seed}.json" if method in METHODS else f"heldout_variants_seed{seed}.json"
            held_path = folder / held_name
            held = json.loads(held_path.read_text()) if held_path.exists() else None
            rows.setdefault(method, []).append(
                {
                    "seed": seed,
                    "return": run["final_return_mean"],
                    "failed": sum(r < FAILED_EPISODE for r in run["final_returns"]),
                    "episodes": len(run["final_returns"]),
                    "train_last": float(np.mean([point[1] for point in run["curve_true_return"][-3:]])),
                    # how far the training return fell from its best point to its last (late degradation)
                    "drop": float(
                        max(point[1] for point in run["curve_true_return"]) - run["curve_true_return"][-1][1]
                    ),
                    "acc_pooled": held["pooled"][method] if held and method in held["pooled"] else float("nan"),
                    "acc_random": held["random"][method] if held and method in held["random"] else float("nan"),
                    "cpu": run["cpu_s"],
                }
            )
    if len(rows) <= 2:
        return []
    lines = [
        "",
        "## Which difference matters",
        "",
        "Ours with ONE of the three differences swapped to imitation's side (`VARIANTS` in compare.py; "
        "`compare.py variants`), same seeds, budgets, labeller and evaluation. RM accuracy: the same held-out "
        "pairs as above (`heldout_variants_seed*.json` rescore ours and imitation on them too, identically). "
        "Failed: deterministic evaluation episodes below -1000 (the pendulum never swings up), of all the "
        "method's episodes. ± is the std over seeds; per-seed values in seed order.",
        "",
    ]
    common = sorted(set.intersection(*({r["seed"] for r in sel} for sel in rows.values())))
    for seeds, title in ((common, "seeds common to all"), (None, "every seed run")):
        lines += [
            f"### {title}" + (f" ({', '.join(map(str, common))})" if seeds else ""),
            "",
            "| method | swapped | seeds | RM acc. pooled | RM acc. random | final return | per seed "
            "| failed episodes | training return | per seed | best-to-last drop | CPU time (s) |",
            "|---|---|---:|---:|---:|---:|---|---:|---:|---|---:|---:|",
        ]
        for method, sel in rows.items():
            sel = [r for r in sel if seeds is None or r["seed"] in seeds]

            def ms(key: str, fmt: str, sel: list[dict] = sel) -> str:
                values = np.array([r[key] for r in sel])
                return f"{np.nanmean(values):{fmt}} ± {np.nanstd(values):{fmt}}"

            def per_seed(sel: list[dict], key: str) -> str:
                return ", ".join(f"{r[key]:.0f}" for r in sel)

            lines.append(
                f"| {VARIANT_LABEL[method][0]} | {VARIANT_LABEL[method][1]} | "
                f"{','.join(str(r['seed']) for r in sel)} | "
                f"{ms('acc_pooled', '.3f')} | {ms('acc_random', '.3f')} | {ms('return', '.0f')} | "
                f"{per_seed(sel, 'return')} | "
                f"{sum(r['failed'] for r in sel)}/{sum(r['episodes'] for r in sel)} | {ms('train_last', '.0f')} | "
                f"{per_seed(sel, 'train_last')} | {ms('drop', '.0f')} | {ms('cpu', '.0f')} |"
            )
        lines.append("")
    lines += ["Paired by seed against ours as committed (variant minus ours, over the seeds both have):", ""]
    base = {r["seed"]: r for r in rows["ours"]}
    for method, sel in rows.items():
        if method == "ours":
            continue
        pairs = [(r, base[r["seed"]]) for r in sel if r["seed"] in base]
        parts = []
        for key, what in (("return", "final return"), ("train_last", "training return")):
            diffs = [r[key] - b[key] for r, b in pairs]
            parts.append(
                f"{what} {', '.join(f'{d:+.0f}' for d in diffs)} (mean {np.mean(diffs):+.0f}, "
                f"better on {sum(d > 0 for d in diffs)} of {len(diffs)})"
            )
        lines.append(f"- {VARIANT_LABEL[method][0]}: " + "; ".join(parts))
    lines += [
        "",
        "Best-to-last drop: the training return's best point minus its last (each point the mean true "
        "return of the last 100 training episodes, after each rollout); large when the agent got worse "
        "late in training.",
        "",
    ]
    return lines


def cmd_summary(args) -> None:
    folder = RESULTS / ("quick" if args.quick else "")
    rows = []
    for method in METHODS:
        for seed in args.seeds:
            run = json.loads((folder / f"{method}_seed{seed}.json").read_text())
            held = json.loads((folder / f"heldout_seed{seed}.json").read_text())
            rows.append(
                {
                    "method": method,
                    "seed": seed,
                    "acc_pooled": held["pooled"][method],
                    "acc_random": held["random"][method],
                    "acc_ours_final": held["ours_final"][method],
                    "acc_imitation_final": held["imitation_final"][method],
                    "return": run["final_return_mean"],
                    "return_std": run["final_return_std"],
                    # the stochastic policy's true episode returns over its last 3 training rollouts (Monitor)
                    "train_last": float(np.mean([point[1] for point in run["curve_true_return"][-3:]])),
                    "steps": run["agent_env_steps"],
                    "pairs": run["comparisons"],
                    "wall": run["wall_s"],
                    "cpu": run["cpu_s"],
                }
            )
    label = {"ours": "sb3_ppo_ext (ClippedPPO)", "imitation": "imitation 1.0.1 (SB3 PPO)"}
    lines = [
        f"# Anchor: preference-based reward learning on {ENV_ID}, sb3_ppo_ext against imitation",
        "",
        "Written by `benchmarks/rlhf_anchor/compare.py summary`; method and caveats in README.md.",
        "",
        "RM accuracy: share of held-out segment pairs (ties dropped) that the reward model orders as the true "
        "return does; *pooled*: segments from a random policy and both methods' final policies of that seed; "
        "*random*, *ours' agent*, *imitation's agent*: pairs within one source (the same pairs for both reward "
        "models of a seed). Final return: the trained agent, 10 deterministic "
        "episodes, true reward (mean ± std over the episodes). Training return: the true episode return of the "
        "stochastic policy over its last 3 training rollouts (less noisy than 10 deterministic episodes).",
        "",
        "| method | seed | RM acc. pooled | RM acc. random | RM acc. ours' agent | RM acc. imitation's agent "
        "| final return | training return | agent steps | comparisons | wall time (s) | CPU time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {label[r['method']]} | {r['seed']} | {r['acc_pooled']:.3f} | {r['acc_random']:.3f} | "
            f"{r['acc_ours_final']:.3f} | {r['acc_imitation_final']:.3f} | {r['return']:.1f} ± {r['return_std']:.1f} | "
            f"{r['train_last']:.1f} | {r['steps']} | {r['pairs']} | {r['wall']:.0f} | {r['cpu']:.0f} |"
        )
    lines += [
        "",
        "Means over seeds (± std over seeds):",
        "",
        "| method | RM acc. pooled | RM acc. random | RM acc. ours' agent | RM acc. imitation's agent "
        "| final return | training return | wall time (s) | CPU time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    means = {}
    for method in METHODS:
        sel = [r for r in rows if r["method"] == method]

        def ms(key: str, fmt: str, sel: list[dict] = sel) -> str:
            values = np.array([r[key] for r in sel])
            return f"{values.mean():{fmt}} ± {values.std():{fmt}}"

        means[method] = {
            key: float(np.mean([r[key] for r in sel])) for key in ("acc_pooled", "acc_random", "return", "train_last")
        }
        lines.append(
            f"| {label[method]} | {ms('acc_pooled', '.3f')} | {ms('acc_random', '.3f')} | "
            f"{ms('acc_ours_final', '.3f')} | {ms('acc_imitation_final', '.3f')} | {ms('return', '.1f')} | "
            f"{ms('train_last', '.1f')} | {ms('wall', '.0f')} | {ms('cpu', '.0f')} |"
        )
    lines += [
        "",
        "Paired by seed (ours minus imitation; the same seed gives both the same env seeds and held-out pairs):",
        "",
    ]
    for key, what, fmt in (
        ("acc_pooled", "RM accuracy, pooled", ".3f"),
        ("acc_random", "RM accuracy, random", ".3f"),
        ("return", "final return", ".1f"),
        ("train_last", "training return", ".1f"),
    ):
        diffs = [
            next(r for r in rows if r["method"] == "ours" and r["seed"] == seed)[key]
            - next(r for r in rows if r["method"] == "imitation" and r["seed"] == seed)[key]
            for seed in args.seeds
        ]
        wins = sum(d >= 0 for d in diffs)
        lines.append(
            f"- {what}: "
            + ", ".join(f"{d:+{fmt}}" for d in diffs)
            + f" (mean {np.mean(diffs):+{fmt}}; ours >= imitation on {wins} of {len(diffs)} seeds)"
        )
    lines += variants_section(folder)
    (folder / "summary.md").write_text("\n".join(lines) + "\n")
    (folder / "summary.json").write_text(json.dumps({"rows": rows, "means": means}, indent=1) + "\n")
    print("\n".join(lines))


def cmd_all(args) -> None:
    folder = RESULTS / ("quick" if args.quick else "")
    folder.mkdir(parents=True, exist_ok=True)
    quick = ["--quick"] if args.quick else []
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1")
    pythons = {"ours": sys.executable, "imitation": args.imitation_python}
    for seed in args.seeds:
        for method in METHODS:
            if not (folder / f"{method}_seed{seed}.json").exists():
                subprocess.run(
                    [pythons[method], __file__, "run", "--method", method, "--seed", str(seed), *quick],
                    check=True,
                    env=env,
                )
        if not (folder / f"heldout_seed{seed}.json").exists():
            subprocess.run(
                [args.imitation_python, __file__, "heldout", "--seed", str(seed), *quick], check=True, env=env
            )
    cmd_summary(args)


def cmd_variants(args) -> None:
    """The ablation: each of ``--methods`` (default: every variant) for every seed, one process at a time,
    method by method; then each seed's held-out evaluations and the summary (main table for ``--summary-seeds``)."""
    folder = RESULTS / ("quick" if args.quick else "")
    folder.mkdir(parents=True, exist_ok=True)
    quick = ["--quick"] if args.quick else []
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1")
    for method in args.methods:
        python = args.imitation_python if method == "imitation" else sys.executable
        for seed in args.seeds:
            if not (folder / f"{method}_seed{seed}.json").exists():
                subprocess.run(
                    [python, __file__, "run", "--method", method, "--seed", str(seed), *quick], check=True, env=env
                )
    for seed in args.seeds:
        if not all((folder / f"{m}_seed{seed}.json").exists() for m in METHODS):
            continue
        if not (folder / f"heldout_seed{seed}.json").exists():
            subprocess.run(
                [args.imitation_python, __file__, "heldout", "--seed", str(seed), *quick], check=True, env=env
            )
        subprocess.run(
            [args.imitation_python, __file__, "heldout-variants", "--seed", str(seed), *quick], check=True, env=env
        )
    args.seeds = args.summary_seeds
    cmd_summary(args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="one method, one seed")
    p_run.add_argument("--method", choices=(*METHODS, *VARIANTS), required=True)
    p_run.add_argument("--seed", type=int, required=True)
    p_held = sub.add_parser(
        "heldout", help="both reward models of one seed on the same held-out pairs (imitation venv)"
    )
    p_held.add_argument("--seed", type=int, required=True)
    p_sum = sub.add_parser("summary", help="results/summary.md from the JSON files")
    p_sum.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p_all = sub.add_parser("all", help="every run, held-out evaluation and the summary, one process at a time")
    p_all.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p_all.add_argument("--imitation-python", default="/tmp/imit-venv/bin/python")
    p_hv = sub.add_parser(
        "heldout-variants", help="every reward model of one seed (variants too) on the held-out pairs"
    )
    p_hv.add_argument("--seed", type=int, required=True)
    p_var = sub.add_parser("variants", help="the one-difference-at-a-time ablation, its held-out scores, the summary")
    p_var.add_argument("--methods", nargs="+", choices=(*METHODS, *VARIANTS), default=list(VARIANTS))
    p_var.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p_var.add_argument("--summary-seeds", type=int, nargs="+", default=[0, 1, 2])
    p_var.add_argument("--imitation-python", default="/tmp/imit-venv/bin/python")
    for p in (p_run, p_held, p_sum, p_all, p_hv, p_var):
        p.add_argument("--quick", action="store_true", help="a toy budget in seconds, results under results/quick/")
    args = parser.parse_args()
    {
        "run": cmd_run,
        "heldout": cmd_heldout,
        "summary": cmd_summary,
        "all": cmd_all,
        "heldout-variants": cmd_heldout_variants,
        "variants": cmd_variants,
    }[args.command](args)


if __name__ == "__main__":
    main()
