"""RLHF in miniature: a character-level language model pretrained on fables, fine-tuned with ClippedPPO and KL.

    python examples/rlhf_text.py                      # about 6 min on one busy CPU core
    python examples/rlhf_text.py --quick              # seconds: every stage at a toy budget
    python examples/rlhf_text.py --timesteps 30000    # or EXAMPLE_TIMESTEPS=30000 (fine-tuning steps per beta)

The seed's language-model setting (section 7), small enough for a CPU:

* **The policy** reads the last 8 characters (``MultiDiscrete``, one-hot encoded by SB3) and picks the next
  one (``Discrete(29)``: a-z, space, comma, full stop). An episode writes 32 characters after a prompt taken
  from the corpus.
* **Pretraining** by maximum likelihood on ``examples/data/fables.txt`` (Aesop retold, 6 KB): the ClippedPPO
  policy's own ``get_distribution(obs).log_prob(next_char)``, minimised with its own optimizer.
* **The reward model** scores a whole continuation, at its last step: a logistic "is this positive?"
  classifier on the counts of words from a positive and a negative list (0.12 neutral, 0.5 with one positive
  word, 0.88 with two).
* **Fine-tuning**: ClippedPPO from the pretrained weights, ``ref_policy`` = the pretrained model, the KL
  penalty in the reward (``ref_kl_mode="reward"``, as in InstructGPT), gamma = 1.

Without the penalty the policy finds the reward model's blind spot: it repeats one positive word ("warm warm
warm ..."), which the classifier scores 1.0 and which reads as nonsense, 60 nats from the pretrained model.
At beta = 0.02 it still drifts towards repetition; at beta = 0.05 the continuations stay fable-like and use
ten times as many positive words as before, at a few nats. The script prints samples, the reward and the KL
per continuation before, during and after each fine-tuning, and a table at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import DummyVecEnv

from sb3_ppo_ext import ClippedPPO

CORPUS = Path(__file__).resolve().parent / "data" / "fables.txt"
VOCAB = "abcdefghijklmnopqrstuvwxyz .,"
CONTEXT, LENGTH = 8, 32
POSITIVE = frozenset(
    "good glad happy kind kindness joy love fine warm bright sweet gentle free friend peace rich well "
    "thanked help helps laughed wins".split()
)
NEGATIVE = frozenset("bad sad angry cold dark hungry fear hate sour fool liar lost tired poor thirst".split())


def load_corpus(path: Path = CORPUS) -> np.ndarray:
    """The corpus as indices into ``VOCAB``: lower case, other characters dropped, whitespace collapsed."""
    text = re.sub(r"\s+", " ", path.read_text().lower())
    return np.array([VOCAB.index(c) for c in text if c in VOCAB], dtype=np.int64)


def decode(ids: Any) -> str:
    """Indices back to text."""
    return "".join(VOCAB[int(i)] for i in ids)


def word_counts(text: str) -> tuple[int, int]:
    """Whole words of ``text`` in the positive and in the negative list."""
    words = re.findall(r"[a-z]+", text)
    return sum(w in POSITIVE for w in words), sum(w in NEGATIVE for w in words)


def sentiment(text: str) -> float:
    """The reward model: a logistic "is this positive?" classifier on word counts, in (0, 1).

    0.12 for a neutral continuation, 0.5 with one positive word, 0.88 with two: like a real classifier's
    probability it saturates, so repeating a positive word ten times earns little more than twice.
    """
    positive, negative = word_counts(text)
    return float(1.0 / (1.0 + np.exp(-2.0 * (positive - negative - 1))))


class TextEnv(gym.Env):
    """Write ``LENGTH`` characters after a corpus prompt; the reward model's score arrives at the last one."""

    def __init__(self, corpus: np.ndarray) -> None:
        self.corpus = corpus
        self.observation_space = spaces.MultiDiscrete([len(VOCAB)] * CONTEXT)
        self.action_space = spaces.Discrete(len(VOCAB))
        # prompts start after a space, so a continuation begins mid-sentence but never mid-word
        space = VOCAB.index(" ")
        self.starts = np.flatnonzero(corpus[: -CONTEXT - 1] == space) + 1
        self.context: np.ndarray = np.zeros(CONTEXT, dtype=np.int64)
        self.written: list[int] = []

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        start = int(self.np_random.choice(self.starts))
        self.context = self.corpus[start : start + CONTEXT].copy()
        self.written = []
        return self.context.copy(), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        self.written.append(int(action))
        self.context = np.append(self.context[1:], int(action))
        done = len(self.written) == LENGTH
        # the end of the continuation is the end of the episode (terminated, not truncated: nothing follows)
        reward = sentiment(decode(self.written)) if done else 0.0
        return self.context.copy(), reward, done, False, {}


def make_model(env: DummyVecEnv, seed: int, **kwargs: Any) -> ClippedPPO:
    """The policy both stages share: an MLP over the one-hot context."""
    return ClippedPPO("MlpPolicy", env, policy_kwargs={"net_arch": [256, 256]}, seed=seed, **kwargs)


def pretrain(model: ClippedPPO, corpus: np.ndarray, epochs: int, batch_size: int = 256) -> list[float]:
    """Maximum likelihood of the next character, through the policy's own distribution and optimizer."""
    windows = np.lib.stride_tricks.sliding_window_view(corpus, CONTEXT + 1)
    obs, targets = th.as_tensor(windows[:, :CONTEXT].copy()), th.as_tensor(windows[:, CONTEXT].copy())
    policy = model.policy
    policy.set_training_mode(True)
    generator = th.Generator().manual_seed(0)
    history = []
    for _ in range(epochs):
        order, total = th.randperm(len(obs), generator=generator), 0.0
        for start in range(0, len(obs), batch_size):
            batch = order[start : start + batch_size]
            loss = -policy.get_distribution(obs[batch]).log_prob(targets[batch]).mean()
            policy.optimizer.zero_grad()
            loss.backward()
            policy.optimizer.step()
            total += float(loss.detach()) * len(batch)
        history.append(total / len(obs))
    policy.set_training_mode(False)
    return history


@th.no_grad()
def sample(
    model: ClippedPPO, reference: ClippedPPO, corpus: np.ndarray, n: int, seed: int
) -> tuple[list[str], list[str], dict[str, float]]:
    """``n`` continuations of corpus prompts; their mean score and KL to the reference (nats per continuation)."""
    env = TextEnv(corpus)
    rng = np.random.default_rng(seed)
    context = th.as_tensor(np.stack([corpus[s : s + CONTEXT] for s in rng.choice(env.starts, n)]))
    prompts = [decode(c) for c in context]
    th.manual_seed(seed)
    written, kl = [], th.zeros(n)
    for _ in range(LENGTH):
        pi = model.policy.get_distribution(context).distribution
        pi_ref = reference.policy.get_distribution(context).distribution
        kl += th.distributions.kl_divergence(pi, pi_ref)
        action = pi.sample()
        written.append(action)
        context = th.cat([context[:, 1:], action[:, None]], dim=1)
    texts = [decode(chars) for chars in th.stack(written, dim=1)]
    scores = [sentiment(t) for t in texts]
    words = [w for t in texts for w in re.findall(r"[a-z]+", t)]
    stats = {
        "reward": float(np.mean(scores)),
        "positive_words": float(np.mean([word_counts(t)[0] for t in texts])),
        "kl": float(kl.mean()),
        "distinct_words": len(set(words)) / max(len(words), 1),
    }
    return prompts, texts, stats


class Curve(BaseCallback):
    """Every ``every`` env steps: the mean reward-model score and KL of fresh samples."""

    def __init__(self, measure: Any, every: int) -> None:
        super().__init__()
        self.measure, self.every, self.next = measure, every, every

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        if self.num_timesteps >= self.next:
            self.next += self.every
            stats = self.measure()
            print(
                f"  {self.num_timesteps:7d} steps: reward {stats['reward']:.2f}  KL {stats['kl']:6.2f} nats  "
                f"positive words {stats['positive_words']:.2f}  beta {self.model.ref_kl_coef:.3g}",
                flush=True,
            )


def show(title: str, prompts: list[str], texts: list[str], stats: dict[str, float], n_show: int) -> None:
    """Print a few samples and the summary numbers."""
    print(
        f"\n{title}: reward {stats['reward']:.2f} per continuation, KL to the pretrained model {stats['kl']:.2f} nats, "
        f"positive words {stats['positive_words']:.2f}, distinct words {stats['distinct_words']:.2f}"
    )
    for prompt, text in list(zip(prompts, texts, strict=True))[:n_show]:
        print(f"  [{prompt}]{text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a toy budget: checks that every stage runs")
    parser.add_argument("--timesteps", type=int, default=int(os.environ.get("EXAMPLE_TIMESTEPS", 0)) or None)
    parser.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.02, 0.05])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    th.set_num_threads(1)
    timesteps = args.timesteps or (2048 if args.quick else 60_000)
    epochs = 2 if args.quick else 40
    n_samples = 16 if args.quick else 256

    corpus = load_corpus()
    env = DummyVecEnv([lambda: TextEnv(corpus) for _ in range(16)])
    env.seed(args.seed)
    started = time.perf_counter()
    pretrained = make_model(env, args.seed, learning_rate=1e-3)
    losses = pretrain(pretrained, corpus, epochs)
    print(
        f"pretrained on {len(corpus)} characters, {epochs} epochs: {losses[0]:.2f} -> {losses[-1]:.2f} nats per "
        f"character ({time.perf_counter() - started:.0f} s)"
    )
    show("pretrained", *sample(pretrained, pretrained, corpus, n_samples, seed=1), n_show=4)

    table = {"pretrained": sample(pretrained, pretrained, corpus, n_samples, seed=1)[2]}
    for beta in args.betas:
        print(f"\nfine-tuning with beta = {beta}, {timesteps} steps ({timesteps // LENGTH} continuations)")
        started = time.perf_counter()
        model = make_model(
            env,
            args.seed,
            n_steps=64,
            batch_size=256,
            n_epochs=4,
            learning_rate=3e-4,
            gamma=1.0,
            ref_policy=pretrained,
            ref_kl_coef=beta,
        )
        model.policy.load_state_dict(pretrained.policy.state_dict())

        def measure(model: ClippedPPO = model) -> dict[str, float]:
            return sample(model, pretrained, corpus, n_samples, seed=2)[2]

        model.learn(timesteps, callback=Curve(measure, max(timesteps // 6, 1024)))
        prompts, texts, stats = sample(model, pretrained, corpus, n_samples, seed=1)
        show(f"after fine-tuning, beta = {beta} ({time.perf_counter() - started:.0f} s)", prompts, texts, stats, 4)
        table[f"beta = {beta}"] = stats

    print(f"\n{'':>12} | reward | KL (nats) | positive words | distinct words   ({n_samples} continuations)")
    for name, stats in table.items():
        print(
            f"{name:>12} | {stats['reward']:6.2f} | {stats['kl']:9.2f} | {stats['positive_words']:14.2f} | "
            f"{stats['distinct_words']:14.2f}"
        )


if __name__ == "__main__":
    main()
