"""RLHF on a control task: fine-tune a pretrained CartPole policy on a reward learned from preferences, KL-penalised.

    python examples/rlhf_control.py --out results/          # 3 seeds x 4 fine-tunings: 30 min on 2 busy cores
    python examples/rlhf_control.py --runs all --out results/   # and the penalty in the reward: 8 fine-tunings
    python examples/rlhf_control.py --quick                 # seconds: every stage at a toy budget
    python examples/rlhf_control.py --timesteps 50000 --seeds 0   # or EXAMPLE_TIMESTEPS=50000

The seed's RLHF setting (section 7), with a cart instead of a language model:

1. **Pretrain** a reference policy on CartPole-v1 (the RL Zoo's settings, 50k steps): it balances the pole
   for all 500 steps, with the cart wherever its training left it.
2. **A changed goal**, known only to a synthetic labeller: keep balancing, *and* hold the cart 0.5 to the
   right of where the reference keeps it. The hidden true reward per step is ``1 + bonus(x)``, ``bonus`` a bump
   of height 2 and width 0.25 around the target.
3. **Preferences**: 300 pairs of 25-step segments of the reference (with 30% random actions, for some
   variety), labelled by a Boltzmann-rational labeller on the true return (temperature 1, so the learned
   reward has the true reward's scale).
4. **A reward model** ``r(s)`` fitted on them (Bradley-Terry). It saw the cart within about 0.5 of where the
   reference keeps it, mostly much closer, and rarely past the target: there "further right is better" is
   most of what the labels say, so it extrapolates that past the target (and picks up spurious features).
   Its mean on the reference's states is shifted to 0 and it is floored at their lowest reward
   (:class:`ShiftedRewardModel`).
5. **Fine-tune** with ClippedPPO on ``env reward + r(s)`` (``LearnedRewardWrapper(mode="add")``), starting
   from the reference, ``ref_policy`` = the reference, for beta = 0, 0.1, 1 and adaptive, the penalty in the
   loss (``ref_kl_mode="loss"``). ``--runs reward`` (or ``all``) adds the penalty in the reward (the default
   mode): at beta 0.1 it protects the balancing skill less than in the loss at the same drift, with or without
   an extra +1 per step alive (``docs/benchmark.md`` has the investigation).

Each evaluation (8 sampled episodes, every 15k steps) records the learned-reward return (what the fine-tuning
maximises, without the penalty), the true return, the original task's return (the episode length: the
balancing skill) and the KL to the reference per step. ``--out DIR`` writes ``raw/seed_*.json``,
``summary.json``, ``summary.md`` and ``curves.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecEnvWrapper

from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext.rlhf.preferences import (
    LearnedRewardWrapper,
    RewardModel,
    Segment,
    SyntheticPreferenceCollector,
    Trajectories,
    evaluate,
    fit,
    record_rollout,
)

ENV_ID = "CartPole-v1"
SHIFT, TARGET_WIDTH, BONUS_HEIGHT = 0.5, 0.25, 2.0


@dataclass(frozen=True)
class Goal:
    """The changed goal: keep balancing, with a bonus of up to 2 per step for the cart near ``target``."""

    target: float

    def bonus(self, x: np.ndarray) -> np.ndarray:
        """The extra true reward per step at cart position ``x``: a bump of height 2 and width 0.25."""
        return BONUS_HEIGHT * np.exp(-0.5 * ((np.asarray(x) - self.target) / TARGET_WIDTH) ** 2)

    def score(self, segment: Segment) -> float:
        """What the hidden labeller scores: the segment's true return, the env's alive bonus included."""
        return float(np.sum(segment.env_rewards + self.bonus(segment.obs[:, 0])))


class ShiftedRewardModel(RewardModel):
    """A reward model whose rewards, as the wrapper sees them, are ``max(r(s), floor) - offset``.

    Bradley-Terry fixes rewards only up to a constant: ``offset`` makes their mean on the reference's states
    0 (InstructGPT's normalisation), so the alive bonus keeps its meaning. ``floor``, the lowest reward on
    the reference's states, keeps a step alive worth more than nothing wherever the model extrapolates
    downwards: a learned reward below -1 per step would pay the policy to drop the pole and end the episode,
    a failure of its own (Christiano et al. removed termination from their tasks for this reason). Upwards
    the model extrapolates freely.
    """

    floor: float = -math.inf
    offset: float = 0.0

    def predict_reward(self, obs: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """The model's rewards, floored and shifted."""
        return (np.maximum(super().predict_reward(obs, actions), self.floor) - self.offset).astype(np.float32)


class StateKLCost(VecEnvWrapper):
    """``r_t - beta * KL(pi(.|s_t) || pi_ref(.|s_t))``: the exact per-state KL as a cost in the rewards.

    With the penalty also in the loss (which pulls the policy towards the reference at each state), this is the
    sampled reward-mode penalty without its noise: the loss term gives the current state's gradient, this cost
    the future states' KL through the returns. Alone it would be no regulariser at all (a state-only cost does
    not pull the policy where it is charged). ``policy`` is set once the model exists.
    """

    def __init__(self, venv: Any, reference: ClippedPPO, beta: float) -> None:
        super().__init__(venv)
        self.reference, self.beta = reference, beta
        self.policy: Any = None
        self._obs: np.ndarray | None = None

    def reset(self) -> np.ndarray:
        self._obs = self.venv.reset()
        return self._obs

    def step_wait(self) -> Any:
        obs, rewards, dones, infos = self.venv.step_wait()
        if self.policy is not None and self._obs is not None:
            with th.no_grad():
                states = th.as_tensor(self._obs)
                pi = self.policy.get_distribution(states).distribution
                pi_ref = self.reference.policy.get_distribution(states).distribution
                rewards = rewards - self.beta * th.distributions.kl_divergence(pi, pi_ref).numpy()
        self._obs = obs
        return obs, rewards.astype(np.float32), dones, infos


@dataclass(frozen=True)
class Run:
    """One fine-tuning: a label, the KL coefficient (a float or "adaptive") and where the penalty goes."""

    label: str
    coef: float | str
    mode: str = "loss"
    target: float | None = None
    alive_bonus: float = 0.0  # added to every step's reward while fine-tuning (a control for the reward mode)
    state_kl_cost: bool = False  # also subtract beta * KL(pi || pi_ref)(s_t) from the rewards (StateKLCost)


RUNS = (
    Run("beta=0", 0.0),
    Run("loss, beta=0.1", 0.1),
    Run("loss, beta=1", 1.0),
    Run("loss, adaptive (KL 1)", "adaptive", target=1.0),
)
# the penalty in the reward (the default mode), run with ``--runs reward``: see the module docstring
REWARD_RUNS = (
    Run("reward, beta=0.1", 0.1, mode="reward"),
    Run("reward, beta=0.1, +1 alive", 0.1, mode="reward", alive_bonus=1.0),
    Run("reward, beta=1", 1.0, mode="reward"),
    Run("reward, adaptive (KL 1)", "adaptive", mode="reward", target=1.0),
    Run("loss + exact KL cost in the reward, beta=0.1", 0.1, state_kl_cost=True),
)


@dataclass(frozen=True)
class Budget:
    """Sizes of every stage (the full run's defaults; ``--quick`` shrinks them)."""

    pretrain_steps: int = 50_000
    finetune_steps: int = 150_000
    eval_every: int = 15_000
    eval_episodes: int = 8
    preference_steps: int = 1_000
    pairs: int = 300
    rm_epochs: int = 50


QUICK = Budget(
    pretrain_steps=2048,
    finetune_steps=1024,
    eval_every=512,
    eval_episodes=2,
    preference_steps=300,
    pairs=32,
    rm_epochs=2,
)


# ── the stages ─────────────────────────────────────────────────────────────────────────────────────────


def pretrain(seed: int, steps: int) -> ClippedPPO:
    """The reference: the RL Zoo's CartPole-v1 settings."""
    env = make_vec_env(ENV_ID, n_envs=8, seed=seed)
    model = ClippedPPO(
        "MlpPolicy",
        env,
        n_steps=32,
        batch_size=256,
        gae_lambda=0.8,
        gamma=0.98,
        n_epochs=20,
        learning_rate=lambda progress: 1e-3 * progress,
        clip_range=lambda progress: 0.2 * progress,
        seed=seed,
    )
    return model.learn(steps)


def record_reference(reference: ClippedPPO, seed: int, steps: int, epsilon: float = 0.3) -> Trajectories:
    """Steps of the reference with ``epsilon`` random actions: the only states the reward model will see."""
    rng = np.random.default_rng(seed)

    def noisy(obs: np.ndarray) -> np.ndarray:
        actions, _ = reference.predict(obs, deterministic=False)
        random = rng.random(len(actions)) < epsilon
        return np.where(random, rng.integers(0, 2, len(actions)), actions)

    return record_rollout(make_vec_env(ENV_ID, n_envs=8, seed=seed + 100), steps, noisy)


def learn_reward(
    trajectories: Trajectories, goal: Goal, seed: int, budget: Budget
) -> tuple[ShiftedRewardModel, dict[str, float]]:
    """Label segment pairs with the hidden goal, fit ``r(s)``, floor and centre it on the reference's states."""
    collector = SyntheticPreferenceCollector(25, goal.score, temperature=1.0, seed=seed)
    collector.add(trajectories)
    train, held_out = collector.collect(budget.pairs), collector.collect(max(budget.pairs // 2, 8))
    env = make_vec_env(ENV_ID, n_envs=1)
    th.manual_seed(seed)
    reward_model = ShiftedRewardModel(env.observation_space, env.action_space, use_action=False)
    fit(reward_model, train, epochs=budget.rm_epochs, seed=seed)
    states = trajectories.obs.reshape(-1, trajectories.obs.shape[-1])
    raw = RewardModel.predict_reward(reward_model, states, np.zeros(len(states)))
    reward_model.floor, reward_model.offset = float(raw.min()), float(raw.mean())
    return reward_model, {"held_out_" + key: value for key, value in evaluate(reward_model, held_out).items()}


@th.no_grad()
def rollout_metrics(
    model: ClippedPPO, reference: ClippedPPO, reward_model: RewardModel, goal: Goal, episodes: int, seed: int
) -> dict[str, float]:
    """Mean over ``episodes`` sampled episodes: learned, true and original returns, KL per step, cart position."""
    env = make_vec_env(ENV_ID, n_envs=episodes, seed=seed)
    obs = env.reset()
    done = np.zeros(episodes, dtype=bool)
    learned, true, original = (np.zeros(episodes) for _ in range(3))
    kls, xs = [], []
    while not done.all():
        obs_t = th.as_tensor(obs)
        pi = model.policy.get_distribution(obs_t).distribution
        pi_ref = reference.policy.get_distribution(obs_t).distribution
        live = ~done
        kls.append(th.distributions.kl_divergence(pi, pi_ref).numpy()[live])
        xs.append(obs[live, 0])
        actions, _ = model.predict(obs, deterministic=False)
        learned_bonus = reward_model.predict_reward(obs, actions)
        true_bonus = goal.bonus(obs[:, 0])
        obs, rewards, dones, _ = env.step(actions)
        learned += live * (rewards + learned_bonus)
        true += live * (rewards + true_bonus)
        original += live * rewards
        done |= dones
    return {
        "learned_return": float(learned.mean()),
        "true_return": float(true.mean()),
        "original_return": float(original.mean()),
        "kl": float(np.concatenate(kls).mean()),
        "x": float(np.concatenate(xs).mean()),
    }


class PeriodicMetrics(BaseCallback):
    """Calls ``measure`` after the first rollout past every ``every`` env steps."""

    def __init__(self, measure: Callable[[], dict[str, float]], every: int) -> None:
        super().__init__()
        self.measure, self.every, self.next = measure, every, every
        self.history: list[dict[str, float]] = []

        self.rollouts: list[dict[str, float]] = []

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        self.rollouts.append(rollout_rewards(self.model))
        if self.num_timesteps >= self.next:
            self.next += self.every
            since = {key: float(np.mean([r[key] for r in self.rollouts])) for key in self.rollouts[0]}
            self.rollouts.clear()
            self.history.append(
                {"step": self.num_timesteps, **self.measure(), "beta": self.model.ref_kl_coef, "rollout": since}
            )


def rollout_rewards(model: ClippedPPO) -> dict[str, float]:
    """What the fine-tuning was paid in the last rollout: the rewards GAE saw (penalty included, if in them).

    ``negative``: the share of steps paid less than nothing, where ending the episode sooner pays more.
    """
    rewards = model.rollout_buffer.rewards
    return {
        "reward": float(rewards.mean()),
        "negative": float((rewards < 0).mean()),
        "lowest": float(rewards.min()),
        "episode_starts": float(model.rollout_buffer.episode_starts.mean()),
    }


def finetune(
    run: Run, reference: ClippedPPO, reward_model: ShiftedRewardModel, goal: Goal, seed: int, budget: Budget
) -> list[dict[str, float]]:
    """ClippedPPO from the reference's weights on ``env reward + r(s)``, KL-penalised to the reference."""
    paid = reward_model
    if run.alive_bonus:
        paid = copy.deepcopy(reward_model)
        paid.offset -= run.alive_bonus
    env = LearnedRewardWrapper(make_vec_env(ENV_ID, n_envs=8, seed=seed + 10), paid, mode="add")
    if run.state_kl_cost:
        env = StateKLCost(env, reference, float(run.coef))
    model = ClippedPPO(
        "MlpPolicy",
        env,
        n_steps=64,
        batch_size=256,
        n_epochs=10,
        learning_rate=1e-3,
        ref_policy=reference,
        ref_kl_coef=run.coef,
        ref_kl_mode=run.mode,
        ref_kl_target=run.target,
        seed=seed,
    )
    model.policy.load_state_dict(reference.policy.state_dict())
    if run.state_kl_cost:
        env.policy = model.policy

    def measure() -> dict[str, float]:
        # the same start states at every evaluation
        metrics = rollout_metrics(model, reference, reward_model, goal, budget.eval_episodes, seed + 1000)
        print(f"seed {seed} {run.label} {model.num_timesteps}: {metrics}", flush=True)  # progress, for long runs
        return metrics

    callback = PeriodicMetrics(measure, budget.eval_every)
    start = {"step": 0, **measure(), "beta": model.ref_kl_coef}
    model.learn(budget.finetune_steps, callback=callback)
    return [start, *callback.history]


def run_seed(seed: int, budget: Budget, runs: tuple[Run, ...] = RUNS) -> dict[str, Any]:
    """The whole pipeline for one seed."""
    th.set_num_threads(1)  # one core per seed: the runs are small and the machine is shared
    started = time.perf_counter()
    reference = pretrain(seed, budget.pretrain_steps)
    trajectories = record_reference(reference, seed, budget.preference_steps)
    xs = trajectories.obs[..., 0]
    # the new goal is relative to where this seed's reference keeps the cart, so that every seed has as far to go
    goal = Goal(target=float(xs.mean()) + SHIFT)
    reward_model, rm_stats = learn_reward(trajectories, goal, seed, budget)
    result: dict[str, Any] = {
        "seed": seed,
        "target_x": goal.target,
        "reward_model": {**rm_stats, "x_seen_min": float(xs.min()), "x_seen_max": float(xs.max())},
        "runs": {},
    }
    for run in runs:
        curve = finetune(run, reference, reward_model, goal, seed, budget)
        result["runs"][run.label] = {"config": asdict(run), "curve": curve}
        last = curve[-1]
        print(
            f"seed {seed} {run.label:>22}: true {last['true_return']:7.1f}  learned {last['learned_return']:7.1f}  "
            f"original {last['original_return']:5.1f}  KL {last['kl']:.2f}  x {last['x']:+.2f}",
            flush=True,
        )
    result["minutes"] = (time.perf_counter() - started) / 60
    return result


# ── summary and plots ──────────────────────────────────────────────────────────────────────────────────

METRICS = (
    ("learned_return", "learned-reward return"),
    ("true_return", "true (new-goal) return"),
    ("original_return", "original return (balancing)"),
    ("kl", "KL(pi || pi_ref) per step"),
)


def summarise(results: list[dict[str, Any]], out: Path, budget: Budget) -> str:
    """``summary.json``, ``summary.md`` (mean ± std over seeds) and ``curves.png`` from the per-seed results."""
    known = [run.label for run in RUNS + REWARD_RUNS]  # the catalogue's order: loss-mode runs, then reward-mode ones
    labels = sorted(results[0]["runs"], key=lambda label: known.index(label) if label in known else len(known))

    def per_seed(label: str, pick: Callable[[list[dict[str, float]]], float]) -> np.ndarray:
        return np.array([pick(r["runs"][label]["curve"]) for r in results])

    def cell(values: np.ndarray, digits: int = 0) -> str:
        return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"

    reference = {key: per_seed(labels[0], lambda c, k=key: c[0][k]) for key, _ in METRICS}
    rows, table = [], {}
    for label in labels:
        final = {key: per_seed(label, lambda c, k=key: c[-1][k]) for key, _ in METRICS}
        peak_true = per_seed(label, lambda c: max(p["true_return"] for p in c))
        x_final = np.array([r["runs"][label]["curve"][-1]["x"] - r["target_x"] for r in results])
        table[label] = {
            **{f"final_{k}": v.tolist() for k, v in final.items()},
            "peak_true_return": peak_true.tolist(),
            "final_x_minus_target": x_final.tolist(),
        }
        rows.append(
            f"| {label} | {cell(final['learned_return'])} | {cell(final['true_return'])} | {cell(peak_true)} | "
            f"{cell(final['original_return'])} | {cell(final['kl'], 2)} | {cell(x_final, 2)} |"
        )
    rm = [r["reward_model"] for r in results]
    md = "\n".join(
        [
            "# RLHF on CartPole-v1: a learned reward, with and without a KL penalty to the reference",
            "",
            "Reproduce with `python examples/rlhf_control.py"
            + (" --runs all" if any(label.startswith("reward") for label in labels) else "")
            + " --out benchmarks/results/rlhf` "
            f"({len(results)} seeds: {', '.join(str(r['seed']) for r in results)}; "
            f"{sum(len(r['runs']) for r in results)} fine-tunings of {budget.finetune_steps // 1000}k steps).",
            "",
            f"Reference: ClippedPPO, {budget.pretrain_steps // 1000}k steps (RL Zoo settings). Changed goal, hidden "
            "from the agent: keep balancing and hold the cart 0.5 right of the reference's mean position x_ref "
            "(true reward per step `1 + 2 exp(-(x - x_ref - 0.5)^2 / (2 * 0.25^2))`). Reward model `r(s)`: "
            "Bradley-Terry on "
            f"{budget.pairs} labelled pairs of 25-step segments of the reference (30% random actions), held-out "
            f"accuracy {np.mean([r['held_out_accuracy'] for r in rm]):.2f}; the cart positions it saw: "
            f"[{min(r['x_seen_min'] for r in rm):.2f}, {max(r['x_seen_max'] for r in rm):.2f}]. Fine-tuning: "
            "ClippedPPO on `env reward + r(s)` (r floored at its minimum over the reference's states and centred "
            "on them) from the reference's weights, "
            f"{budget.finetune_steps // 1000}k steps, lr 1e-3, 8 envs x 64 steps, 10 epochs, the KL penalty in the "
            "loss or in the reward, as the row says (a row without either has none).",
            "",
            f"Each number: the last evaluation ({budget.eval_episodes} sampled episodes) unless marked peak; "
            "mean ± std over seeds. Returns are undiscounted sums over an episode of at most 500 steps: "
            "learned = `sum(1 + r(s))` (what the fine-tuning maximises, penalty excluded), true = "
            "`sum(1 + bonus(x))`, original = the episode length (the balancing skill; 500 = never drops "
            "the pole). KL: mean closed-form `KL(pi || pi_ref)` over the visited states.",
            "",
            f"Before fine-tuning (the reference): learned {cell(reference['learned_return'])}, true "
            f"{cell(reference['true_return'])}, original {cell(reference['original_return'])}.",
            "",
            "| fine-tuning | learned return | true return | peak true return | original return | KL per step "
            "| cart x - target |",
            "|---|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
            "Per seed: the learned and true returns at the start -> at the peak of the true return (its step) -> "
            "at the end; the original return at the end.",
            "",
            "| seed | fine-tuning | learned return | true return | original return |",
            "|---:|---|---|---|---:|",
            *per_seed_rows(results, labels),
            "",
            "![curves](curves.png)",
            "",
            "The balancing skill against the drift from the reference: every evaluation after the start, by the "
            "KL per step at that evaluation (`drift.png` plots them one by one).",
            "",
            *drift_rows(results, labels),
            "",
            "![drift](drift.png)",
            "",
        ]
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(md)
    (out / "summary.json").write_text(json.dumps({"budget": asdict(budget), "final": table}, indent=1))
    plot(results, labels, out / "curves.png")
    plot_drift(results, labels, out / "drift.png")
    return md


DRIFT_BINS = (0.0, 0.25, 0.5, 1.0, 2.0, math.inf)


def drift_rows(results: list[dict[str, Any]], labels: list[str]) -> list[str]:
    """A markdown table: per KL bin and penalty mode, how many evaluations dropped the pole (return < 500)."""

    def mode(label: str) -> str:
        return label.split(",")[0] if label.startswith(("loss", "reward")) else "none"

    modes = list(dict.fromkeys(mode(label) for label in labels))
    bins = list(zip(DRIFT_BINS[:-1], DRIFT_BINS[1:], strict=True))
    header = "| KL per step | " + " | ".join(f"penalty: {m}" for m in modes) + " |"
    rows = [header, "|---|" + "---:|" * len(modes)]
    for low, high in bins:
        cells = []
        for m in modes:
            lengths = [
                p["original_return"]
                for r in results
                for label in labels
                if mode(label) == m
                for p in r["runs"][label]["curve"][1:]
                if low <= p["kl"] < high
            ]
            dropped = sum(length < 500 for length in lengths)
            cells.append(f"{dropped} of {len(lengths)} dropped" if lengths else "")
        rows.append(f"| {low:g} to {high:g} | " + " | ".join(cells) + " |")
    return rows


def per_seed_rows(results: list[dict[str, Any]], labels: list[str]) -> list[str]:
    """One markdown row per seed and fine-tuning: start -> peak of the true return -> end."""
    rows = []
    for result in results:
        for label in labels:
            curve = result["runs"][label]["curve"]
            peak = max(curve, key=lambda p: p["true_return"])
            learned = " -> ".join(f"{p['learned_return']:.0f}" for p in (curve[0], peak, curve[-1]))
            true = " -> ".join(f"{p['true_return']:.0f}" for p in (curve[0], peak, curve[-1]))
            rows.append(
                f"| {result['seed']} | {label} | {learned} | {true} ({peak['step'] / 1000:.0f}k) | "
                f"{curve[-1]['original_return']:.0f} |"
            )
    return rows


def plot(results: list[dict[str, Any]], labels: list[str], path: Path) -> None:
    """One panel per metric: the mean over seeds per fine-tuning, a band from the lowest to the highest seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    axes = axes.ravel()
    colours = {"beta=0": "tab:red", "beta=0.1": "tab:blue", "beta=1": "tab:green", "adaptive": "tab:purple"}
    for label in labels:
        curves = [r["runs"][label]["curve"] for r in results]
        n = min(len(c) for c in curves)
        steps = np.array([p["step"] for p in curves[0][:n]]) / 1000
        coefficient = label.split(", ")[-1]  # "beta=0.1", "adaptive (KL 1)"...
        colour = colours.get(coefficient.split(" ")[0])
        for ax, (key, _) in zip(axes, METRICS, strict=True):
            values = np.array([[p[key] for p in c[:n]] for c in curves])
            # the penalty in the reward: dashed; in the loss with a state-KL cost in the reward: dotted
            style = "--" if label.startswith("reward") else ":" if label.startswith("loss +") else "-"
            ax.plot(steps, values.mean(0), color=colour, linestyle=style, label=label)
            ax.fill_between(steps, values.min(0), values.max(0), color=colour, alpha=0.1)
    for ax, (key, title) in zip(axes, METRICS, strict=True):
        start = np.mean([r["runs"][labels[0]]["curve"][0][key] for r in results])
        ax.axhline(start, color="grey", linestyle=":", linewidth=1)  # the reference itself
        ax.set_title(title)
        ax.set_xlabel("fine-tuning steps (k)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"CartPole-v1 fine-tuned on a reward learned for 'hold the cart 0.5 further right'\n({len(results)} seeds: "
        "mean, band = min to max over seeds; dotted: the reference)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _earlier_result(out: Path | None, seed: int, budget: Budget) -> dict[str, Any]:
    """``OUT/raw/seed_N.json`` when it was written with this budget (its runs need not be trained again), else {}."""
    path = None if out is None else out / "raw" / f"seed_{seed}.json"
    if path is None or not path.exists():
        return {}
    result = json.loads(path.read_text())
    return result if result.get("budget") == asdict(budget) else {}


def plot_drift(results: list[dict[str, Any]], labels: list[str], path: Path) -> None:
    """Every evaluation of every run: its KL to the reference against its episode length (the balancing skill)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in labels:
        points = [(p["kl"], p["original_return"]) for r in results for p in r["runs"][label]["curve"][1:]]
        kl, length = np.array(points).T
        marker = "x" if label.startswith("reward") else "o"
        ax.scatter(np.maximum(kl, 1e-3), length, marker=marker, alpha=0.6, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("KL(pi || pi_ref) per step at the evaluation (nats)")
    ax.set_ylabel("original return (500 = balances)")
    ax.set_title("Does the pole drop with the drift from the reference, whatever the mode?")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a toy budget: checks that every stage runs")
    parser.add_argument("--timesteps", type=int, default=int(os.environ.get("EXAMPLE_TIMESTEPS", 0)) or None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n-jobs", type=int, default=2, help="seeds run in parallel processes")
    parser.add_argument(
        "--runs",
        choices=("loss", "reward", "all"),
        default="loss",
        help="loss: beta 0, 0.1, 1 and adaptive, the penalty in the loss; reward: the penalty in the reward "
        "(beta 0.1 with and without an alive bonus of 1 per step, beta 1, adaptive; and beta 0.1 in the loss plus "
        "the exact per-state KL as a cost in the rewards); all: both",
    )
    parser.add_argument("--out", type=Path, default=None, help="write raw results, the summary and the plot here")
    parser.add_argument("--summarise", action="store_true", help="only rewrite the summary and plot from OUT/raw")
    args = parser.parse_args()
    if args.summarise:
        results = [json.loads(path.read_text()) for path in sorted((args.out / "raw").glob("seed_*.json"))]
        budget = Budget(**json.loads((args.out / "summary.json").read_text())["budget"])
        print(summarise(results, args.out, budget))
        return
    budget = QUICK if args.quick else Budget()
    if args.timesteps:
        budget = replace(budget, finetune_steps=args.timesteps, eval_every=max(args.timesteps // 10, 512))

    runs = {"loss": RUNS, "reward": REWARD_RUNS, "all": RUNS + REWARD_RUNS}[args.runs]
    # runs already in OUT/raw (same seed, same budget) are kept, not trained again: a run list can grow
    earlier = {seed: _earlier_result(args.out, seed, budget) for seed in args.seeds}
    todo = {seed: tuple(r for r in runs if r.label not in earlier[seed].get("runs", {})) for seed in args.seeds}
    seeds = [seed for seed in args.seeds if todo[seed]]
    if args.n_jobs > 1 and len(seeds) > 1:
        with ProcessPoolExecutor(min(args.n_jobs, len(seeds))) as pool:
            fresh = list(pool.map(run_seed, seeds, [budget] * len(seeds), [todo[seed] for seed in seeds]))
    else:
        fresh = [run_seed(seed, budget, todo[seed]) for seed in seeds]
    results = []
    for seed in args.seeds:
        result = next((r for r in fresh if r["seed"] == seed), earlier[seed])
        if earlier[seed] and result is not earlier[seed]:
            result = {**result, "runs": {**earlier[seed]["runs"], **result["runs"]}}
        results.append(result)
    if args.out is not None:
        (args.out / "raw").mkdir(parents=True, exist_ok=True)
        for result in results:
            result["budget"] = asdict(budget)
            (args.out / "raw" / f"seed_{result['seed']}.json").write_text(json.dumps(result, indent=1))
        print(summarise(results, args.out, budget))
    else:
        for result in results:
            print(f"seed {result['seed']}: reward model {result['reward_model']}")


if __name__ == "__main__":
    main()
