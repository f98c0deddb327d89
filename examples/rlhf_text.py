"""RLHF in miniature, for real, on a CPU: SFT on English text, a reward model learned from preferences, PPO + KL.

    python examples/rlhf_text.py         # one seed: SFT, preferences, reward model, 5 fine-tunings of 120k tokens
    python examples/rlhf_text.py --full  # 3 seeds -> benchmarks/results/rlhf_text/ (JSON, plot, summary)
    python examples/rlhf_text.py --quick # seconds: every stage at a toy budget (tests/test_examples.py)
    python examples/rlhf_text.py --timesteps 30000   # or EXAMPLE_TIMESTEPS=30000 (fine-tuning steps per beta)

The seed's section-7 loop (Ouyang et al. 2022; Gao et al. 2022's over-optimisation), small enough for a CPU:

* **Corpus and tokens**: the prose of the Python documentation that ships with CPython (``pydoc_data.topics``,
  indented code and grammar blocks left out; about 41k tokens). Tokens are lower-case **words** and the
  punctuation marks "." and ",": the 1999 most frequent ones plus ``<unk>`` for the rest (1% of the text).
* **The policy** reads the last 4 tokens (a ``Box`` of token ids, embedded by :class:`TokenEmbedding`) and
  picks the next token (``Discrete(2000)``). An episode writes 16 tokens after a 4-token prompt cut from the
  corpus (:class:`TextVecEnv`, all envs stepped at once).
* **SFT**: ``ClippedPPO("MlpPolicy", env, policy_kwargs=...)``'s own policy fitted by cross-entropy to the
  corpus's next tokens (:func:`supervised_finetune`); 10% of the corpus is held out to report its nats per token.
* **The gold score** (:func:`gold_score`, hidden; it stands for the people who label): a reader who wants the
  documentation to talk about errors and exceptions, in English. ``+1`` per distinct topic word
  (:data:`TOPIC`: exception, raise, try, except, traceback...), ``-1`` per adjacent token pair that never
  occurs in the corpus (where a reader stumbles), ``-1`` per repeated word (function words and punctuation
  excepted: :data:`FUNCTION_WORDS`). It labels preferences and evaluates; nothing else sees it.
* **Preferences**: two SFT continuations of the same prompt, labelled by a Boltzmann-rational labeller on the
  gold score (``SyntheticPreferenceCollector.label``, temperature 0.5: a gap of 1 is labelled right 88% of
  the time). 20% of the pairs are held out.
* **The reward model**: ``sb3_ppo_ext.rlhf.preferences.RewardModel`` on (the 2 tokens before, the token),
  summed over the continuation, fitted with ``fit`` (Bradley-Terry). Shifted and scaled so that the SFT
  continuations score mean 0 and standard deviation 1: the proxy reward, paid per token.
* **Fine-tuning**: ClippedPPO from the SFT weights, ``ref_policy`` = the SFT model, the penalty in the reward
  (``ref_kl_mode="reward"``, as in InstructGPT), gamma = 1, for beta = 0, 0.05, 0.2, 1 and the adaptive
  controller. Every evaluation samples continuations of fixed prompts and records the gold score, the proxy
  score and the exact KL to the SFT model summed over the continuation (nats per continuation).

The default run (one seed, one thread) took 5 min 40 s of wall-clock on one core of a 2-core VM (measured at
commit 39ad2f9); in the committed sweep each seed took 18.5 minutes, 3 seeds in parallel on 2 cores beside two
other trainings.
``--seeds 1`` runs another seed; ``--full --seeds 0`` one seed of the sweep (a process per seed runs the sweep
in parallel; the last one to finish writes the summary of all; ``--summarise`` rewrites it from ``raw/``).

``--out DIR`` (``--full`` sets benchmarks/results/rlhf_text) writes ``raw/seed_*.json``, ``summary.json``,
``summary.md`` (with samples at each stage) and ``curves.png`` (gold and proxy against KL, per beta).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.vec_env import VecEnv
from torch import nn

from sb3_ppo_ext import ClippedPPO
from sb3_ppo_ext.rlhf.preferences import (
    PreferenceDataset,
    RewardModel,
    Segment,
    SyntheticPreferenceCollector,
    evaluate,
    fit,
)

CONTEXT = 4  # tokens the policy reads
RM_CONTEXT = 2  # tokens the reward model reads before the token it scores
LENGTH = 16  # tokens per continuation (one episode)
VOCAB_SIZE = 2000
UNK = "<unk>"
# function words and punctuation, whose repetition the gold score forgives (any other word repeated costs 1)
FUNCTION_WORDS = frozenset(
    ". , the a an is are be been was in of to and or for if that as by it its s with not this "
    "can may when from on at which than then no".split()
)
TOPIC = frozenset(
    "error errors exception exceptions raise raised raises raising try except finally traceback handler handlers "
    "handle handled caught fail fails failed".split()
)
RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "rlhf_text"


# ── corpus, tokens and the gold score ───────────────────────────────────────────────────────────────────────


@dataclass
class Corpus:
    """The tokenised corpus, its vocabulary, and what the gold score knows about it."""

    tokens: np.ndarray  # int64 token ids, the whole prose in order
    vocab: list[str]
    attested: np.ndarray  # [V, V] booleans: the pair (a, b) occurs somewhere in the corpus
    common: np.ndarray  # [V] booleans: a function word, punctuation or <unk>: repeats are forgiven
    topic: np.ndarray  # [V] booleans: a topic word

    @property
    def split(self) -> int:
        """Tokens before this index train the SFT policy; the rest are held out."""
        return int(len(self.tokens) * 0.9)


def prose(text: str) -> str:
    """The prose of one documentation topic: indented blocks (code, grammar) and heading underlines left out."""
    lines = [
        line
        for line in text.splitlines()
        if line.strip() and not line.startswith(" ") and not re.fullmatch(r"[*=\-~^]+", line.strip())
    ]
    return " ".join(lines)


def load_corpus(vocab_size: int = VOCAB_SIZE) -> Corpus:
    """CPython's documentation topics as word tokens (nothing downloaded: ``pydoc_data`` ships with Python)."""
    from pydoc_data.topics import topics

    words = re.findall(r"[a-z]+|[.,]", " ".join(prose(topics[key]) for key in sorted(topics)).lower())
    counts = Counter(words)
    vocab = [word for word, _ in counts.most_common(vocab_size - 1)] + [UNK]
    index = {word: i for i, word in enumerate(vocab)}
    tokens = np.array([index.get(word, vocab_size - 1) for word in words], dtype=np.int64)
    attested = np.zeros((vocab_size, vocab_size), dtype=bool)
    attested[tokens[:-1], tokens[1:]] = True
    common = np.array([word in FUNCTION_WORDS or word == UNK for word in vocab])
    topic = np.array([word in TOPIC for word in vocab])
    return Corpus(tokens, vocab, attested, common, topic)


def decode(ids: Any, vocab: list[str]) -> str:
    """Token ids back to text, punctuation attached to the word before."""
    return re.sub(r" ([.,])", r"\1", " ".join(vocab[int(i)] for i in ids))


def gold_components(prompt_last: np.ndarray, written: np.ndarray, corpus: Corpus) -> dict[str, np.ndarray]:
    """The gold score's parts for ``written`` ``[n, L]``, continuations of prompts ending in ``prompt_last``."""
    sequence = np.concatenate([prompt_last[:, None], written], axis=1)
    odd_pairs = (~corpus.attested[sequence[:, :-1], sequence[:, 1:]]).sum(axis=1)
    topic, repeats = np.zeros(len(written)), np.zeros(len(written))
    for i, row in enumerate(written):
        seen = set(row.tolist())
        topic[i] = sum(corpus.topic[t] for t in seen)
        content = row[~corpus.common[row]]
        repeats[i] = len(content) - len(set(content.tolist()))
    return {"topic": topic, "odd_pairs": odd_pairs.astype(float), "repeats": repeats}


def gold_score(prompt_last: np.ndarray, written: np.ndarray, corpus: Corpus) -> np.ndarray:
    """The hidden reader: +1 per distinct topic word, -1 per pair never seen in the corpus, -1 per repeated word."""
    parts = gold_components(prompt_last, written, corpus)
    return parts["topic"] - parts["odd_pairs"] - parts["repeats"]


# ── the policy and the environment ──────────────────────────────────────────────────────────────────────────


class TokenEmbedding(BaseFeaturesExtractor):
    """Token ids ``[B, CONTEXT]`` (a float Box, as SB3 hands them over) -> their embeddings side by side."""

    def __init__(self, observation_space: spaces.Box, vocab_size: int = VOCAB_SIZE, dim: int = 32) -> None:
        super().__init__(observation_space, features_dim=int(observation_space.shape[0]) * dim)
        self.embed = nn.Embedding(vocab_size, dim)

    def forward(self, observations: th.Tensor) -> th.Tensor:
        return self.embed(observations.long()).flatten(1)


def observation_space(vocab_size: int) -> spaces.Box:
    """The policy's observation: the last ``CONTEXT`` token ids (a Box, so that SB3 does not one-hot them)."""
    return spaces.Box(0, vocab_size - 1, shape=(CONTEXT,), dtype=np.float32)


class TextVecEnv(VecEnv):
    """``num_envs`` continuations written at once, ``LENGTH`` tokens each after a corpus prompt.

    The reward of a step is ``reward_fn(the RM_CONTEXT tokens before, the token)`` (the proxy reward, per token);
    all envs end their episode together (terminated: nothing follows) and restart on new prompts.
    """

    def __init__(
        self,
        corpus: Corpus,
        num_envs: int,
        reward_fn: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
        seed: int = 0,
    ) -> None:
        self.render_mode = None
        super().__init__(num_envs, observation_space(len(corpus.vocab)), spaces.Discrete(len(corpus.vocab)))
        self.corpus = corpus
        self.reward_fn = reward_fn
        self.rng = np.random.default_rng(seed)
        self.text = np.zeros((num_envs, CONTEXT + LENGTH), dtype=np.int64)  # prompt, then what was written
        self.t = 0
        self._actions = np.zeros(num_envs, dtype=np.int64)

    def _new_prompts(self) -> None:
        starts = self.rng.integers(0, self.corpus.split - CONTEXT, size=self.num_envs)
        self.text[:] = 0
        self.text[:, :CONTEXT] = self.corpus.tokens[starts[:, None] + np.arange(CONTEXT)]
        self.t = 0

    def _obs(self) -> np.ndarray:
        return self.text[:, self.t : self.t + CONTEXT].astype(np.float32)

    def reset(self) -> np.ndarray:
        if self._seeds[0] is not None:
            self.rng = np.random.default_rng(self._seeds[0])
        self._reset_seeds()
        self._new_prompts()
        return self._obs()

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions, dtype=np.int64).reshape(self.num_envs)

    def step_wait(self) -> Any:
        window = self.text[:, self.t + CONTEXT - RM_CONTEXT : self.t + CONTEXT]
        rewards = np.zeros(self.num_envs, dtype=np.float32)
        if self.reward_fn is not None:
            rewards = self.reward_fn(window, self._actions).astype(np.float32)
        self.text[:, self.t + CONTEXT] = self._actions
        self.t += 1
        if self.t < LENGTH:
            return self._obs(), rewards, np.zeros(self.num_envs, dtype=bool), [{} for _ in range(self.num_envs)]
        last = self._obs()
        infos = [{"terminal_observation": last[i], "TimeLimit.truncated": False} for i in range(self.num_envs)]
        self._new_prompts()
        return self._obs(), rewards, np.ones(self.num_envs, dtype=bool), infos

    def close(self) -> None:
        pass

    def get_attr(self, attr_name: str, indices: Any = None) -> list[Any]:
        return [getattr(self, attr_name)] * len(self._get_indices(indices))

    def set_attr(self, attr_name: str, value: Any, indices: Any = None) -> None:
        setattr(self, attr_name, value)

    def env_method(self, method_name: str, *args: Any, indices: Any = None, **kwargs: Any) -> list[Any]:
        return [getattr(self, method_name)(*args, **kwargs)] * len(self._get_indices(indices))

    def env_is_wrapped(self, wrapper_class: type, indices: Any = None) -> list[bool]:
        return [False] * len(self._get_indices(indices))


def make_model(env: VecEnv, seed: int, **kwargs: Any) -> ClippedPPO:
    """The policy every stage shares: token embeddings, one hidden layer, a softmax over the vocabulary.

    The critic has its own embeddings, so that PPO's value loss does not move the policy's.
    """
    policy_kwargs = {
        "features_extractor_class": TokenEmbedding,
        "features_extractor_kwargs": {"vocab_size": env.action_space.n},
        "share_features_extractor": False,
        "net_arch": {"pi": [256], "vf": [128]},
    }
    return ClippedPPO("MlpPolicy", env, policy_kwargs=policy_kwargs, seed=seed, **kwargs)


# ── stage 1: supervised fine-tuning ─────────────────────────────────────────────────────────────────────────


def next_token_windows(tokens: np.ndarray) -> tuple[th.Tensor, th.Tensor]:
    """Every ``CONTEXT``-token window of ``tokens`` and the token after it."""
    windows = np.lib.stride_tricks.sliding_window_view(tokens, CONTEXT + 1)
    return th.as_tensor(windows[:, :CONTEXT].copy(), dtype=th.float32), th.as_tensor(windows[:, CONTEXT].copy())


@th.no_grad()
def nats_per_token(model: ClippedPPO, tokens: np.ndarray) -> float:
    """Mean negative log-likelihood of each token of ``tokens`` given the ``CONTEXT`` before it."""
    obs, targets = next_token_windows(tokens)
    return float(-model.policy.get_distribution(obs).log_prob(targets).mean())


def supervised_finetune(
    model: ClippedPPO, corpus: Corpus, epochs: int, seed: int, batch_size: int = 256, lr: float = 2e-3
) -> list[dict[str, float]]:
    """Cross-entropy on the corpus's next tokens, through the policy's own distribution (SFT)."""
    obs, targets = next_token_windows(corpus.tokens[: corpus.split])
    policy = model.policy
    optimizer = th.optim.Adam(policy.parameters(), lr=lr)
    generator = th.Generator().manual_seed(seed)
    history = []
    for epoch in range(epochs):
        policy.set_training_mode(True)
        order, total = th.randperm(len(obs), generator=generator), 0.0
        for start in range(0, len(obs), batch_size):
            batch = order[start : start + batch_size]
            loss = -policy.get_distribution(obs[batch]).log_prob(targets[batch]).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
        policy.set_training_mode(False)
        history.append(
            {
                "epoch": epoch + 1,
                "train": total / len(obs),
                "held_out": nats_per_token(model, corpus.tokens[corpus.split :]),
            }
        )
    return history


# ── sampling and measuring ──────────────────────────────────────────────────────────────────────────────────


def eval_prompts(corpus: Corpus, n: int, seed: int) -> np.ndarray:
    """``n`` prompts from the held-out tenth of the corpus."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(corpus.split, len(corpus.tokens) - CONTEXT, size=n)
    return corpus.tokens[starts[:, None] + np.arange(CONTEXT)]


@th.no_grad()
def generate(
    model: ClippedPPO, prompts: np.ndarray, seed: int, reference: ClippedPPO | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Sample a continuation of each prompt; the exact ``KL(pi || pi_ref)`` summed over its states (nats)."""
    generator = th.Generator().manual_seed(seed)
    text = th.as_tensor(prompts, dtype=th.int64)
    kl = th.zeros(len(prompts))
    for _ in range(LENGTH):
        obs = text[:, -CONTEXT:].float()
        pi = model.policy.get_distribution(obs).distribution
        if reference is not None:
            kl += th.distributions.kl_divergence(pi, reference.policy.get_distribution(obs).distribution)
        token = th.multinomial(pi.probs, 1, generator=generator)
        text = th.cat([text, token], dim=1)
    return text[:, CONTEXT:].numpy(), kl.numpy()


def rm_inputs(prompts: np.ndarray, written: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The reward model's observations ``[n, L, RM_CONTEXT]`` (the tokens before each written one) and actions."""
    text = np.concatenate([prompts, written], axis=1)
    windows = np.lib.stride_tricks.sliding_window_view(text, RM_CONTEXT, axis=1)
    return windows[:, CONTEXT - RM_CONTEXT : CONTEXT - RM_CONTEXT + LENGTH].copy(), written


class ProxyReward:
    """The reward model, shifted and scaled: SFT continuations score mean 0, standard deviation 1 (per continuation)."""

    def __init__(self, model: RewardModel, shift: float = 0.0, scale: float = 1.0) -> None:
        self.model, self.shift, self.scale = model, shift, scale

    @th.no_grad()
    def per_token(self, window: np.ndarray, token: np.ndarray) -> np.ndarray:
        """The reward of writing ``token`` after ``window``: what the env pays per step."""
        raw = self.model(th.as_tensor(window), th.as_tensor(token)).numpy()
        return (raw - self.shift / LENGTH) / self.scale

    @th.no_grad()
    def score(self, prompts: np.ndarray, written: np.ndarray) -> np.ndarray:
        """The proxy score of whole continuations."""
        obs, actions = rm_inputs(prompts, written)
        return (self.model.segment_return(th.as_tensor(obs), th.as_tensor(actions)).numpy() - self.shift) / self.scale

    def calibrate(self, prompts: np.ndarray, written: np.ndarray) -> None:
        """Shift and scale to mean 0 and std 1 on these (SFT) continuations."""
        self.shift, self.scale = 0.0, 1.0
        raw = self.score(prompts, written)
        self.shift, self.scale = float(raw.mean()), float(raw.std() + 1e-8)


def measure(
    model: ClippedPPO, reference: ClippedPPO, proxy: ProxyReward, corpus: Corpus, prompts: np.ndarray, seed: int
) -> tuple[dict[str, float], np.ndarray]:
    """Gold, proxy and KL (per continuation) of fresh samples; and the samples."""
    written, kl = generate(model, prompts, seed, reference)
    parts = gold_components(prompts[:, -1], written, corpus)
    words = written[written < VOCAB_SIZE - 1]
    stats = {
        "gold": float(np.mean(parts["topic"] - parts["odd_pairs"] - parts["repeats"])),
        "proxy": float(proxy.score(prompts, written).mean()),
        "kl": float(kl.mean()),
        **{key: float(value.mean()) for key, value in parts.items()},
        "distinct": len(set(words.tolist())) / max(len(words), 1),
    }
    return stats, written


# ── stage 2: preferences and the reward model ───────────────────────────────────────────────────────────────


def learn_reward(
    sft: ClippedPPO, corpus: Corpus, n_pairs: int, epochs: int, seed: int, temperature: float = 0.5
) -> tuple[ProxyReward, dict[str, Any]]:
    """Label pairs of SFT continuations of the same prompt with the gold score; fit the reward model on 80%."""
    vocab_size = len(corpus.vocab)
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, corpus.split - CONTEXT, size=n_pairs)
    prompts = corpus.tokens[starts[:, None] + np.arange(CONTEXT)]
    first, _ = generate(sft, prompts, seed=seed + 1)
    second, _ = generate(sft, prompts, seed=seed + 2)
    gold = {0: gold_score(prompts[:, -1], first, corpus), 1: gold_score(prompts[:, -1], second, corpus)}
    # the labeller scores a segment by its gold score, kept beside it as its "env reward"
    collector = SyntheticPreferenceCollector(
        LENGTH, lambda segment: float(segment.env_rewards[0]), temperature=temperature, seed=seed
    )
    n_train = int(0.8 * n_pairs)
    train, held_out = PreferenceDataset(), PreferenceDataset()
    noiseless = []
    for i in range(n_pairs):
        segments = []
        for which, written in ((0, first), (1, second)):
            obs, actions = rm_inputs(prompts[i : i + 1], written[i : i + 1])
            segments.append(Segment(obs[0], actions[0], np.full(LENGTH, gold[which][i])))
        (train if i < n_train else held_out).add_pair(*segments, collector.label(*segments))
        noiseless.append(np.sign(gold[0][i] - gold[1][i]))
    model = RewardModel(spaces.MultiDiscrete([vocab_size] * RM_CONTEXT), spaces.Discrete(vocab_size), net_arch=(64,))
    th.manual_seed(seed)
    losses = fit(model, train, epochs=epochs, batch_size=64, lr=1e-3, weight_decay=1e-4, seed=seed)
    model.eval()
    proxy = ProxyReward(model)
    proxy.calibrate(prompts, np.concatenate([first, second])[:n_pairs])
    # accuracy against the gold score itself, without the labeller's noise, on the held-out pairs with a gap
    scores = proxy.score(prompts[n_train:], first[n_train:]) - proxy.score(prompts[n_train:], second[n_train:])
    sign = np.array(noiseless[n_train:])
    decided = sign != 0
    stats = {
        "pairs": n_pairs,
        "train_pairs": n_train,
        "temperature": temperature,
        "final_loss": losses[-1] if losses else float("nan"),
        "train_accuracy": evaluate(model, train)["accuracy"],
        "held_out_accuracy": evaluate(model, held_out)["accuracy"],
        "held_out_accuracy_noiseless": float(np.mean(np.sign(scores[decided]) == sign[decided])),
        "held_out_ties": float(np.mean(~decided)),
        "proxy_gold_correlation": float(
            np.corrcoef(
                np.concatenate([proxy.score(prompts, first), proxy.score(prompts, second)]),
                np.concatenate([gold[0], gold[1]]),
            )[0, 1]
        ),
    }
    return proxy, stats


# ── stage 3: PPO fine-tuning with the KL penalty ────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Budget:
    """How much of everything a run does."""

    sft_epochs: int = 3  # the held-out loss is lowest after 2 to 3 epochs; later ones memorise the corpus
    pairs: int = 3000
    rm_epochs: int = 4
    timesteps: int = 120_000
    n_eval: int = 256
    evals: int = 12
    n_envs: int = 64
    n_show: int = 4
    betas: tuple[float | str, ...] = (0.0, 0.05, 0.2, 1.0, "adaptive")
    kl_target: float = 0.25  # adaptive: nats per token (4 per continuation)
    learning_rate: float = 3e-4


QUICK = Budget(sft_epochs=1, pairs=200, rm_epochs=2, timesteps=2048, n_eval=32, evals=1, n_envs=32)


def label(beta: float | str) -> str:
    """How a fine-tuning is named in the output."""
    return f"beta = {beta}"


class Curve(BaseCallback):
    """Every ``every`` env steps (at a rollout's end): gold, proxy and KL of fresh samples, printed and logged."""

    def __init__(self, measure_fn: Callable[[], dict[str, float]], every: int) -> None:
        super().__init__()
        self.measure_fn, self.every, self.next = measure_fn, every, every
        self.points: list[dict[str, float]] = []

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        if self.num_timesteps >= self.next:
            self.next += self.every
            self.record(self.num_timesteps)

    def record(self, step: int) -> None:
        stats = {"step": step, "beta": float(self.model.ref_kl_coef or 0.0), **self.measure_fn()}
        self.points.append(stats)
        if getattr(self.model, "_logger", None) is not None:  # set up by learn(): absent at step 0
            for key in ("gold", "proxy", "kl"):
                self.logger.record(f"rlhf_text/{key}", stats[key])
        print(
            f"  {step:7d} steps: gold {stats['gold']:6.2f}  proxy {stats['proxy']:6.2f}  KL {stats['kl']:6.2f} nats  "
            f"topic words {stats['topic']:.2f}  beta {stats['beta']:.3g}",
            flush=True,
        )


def finetune(
    sft: ClippedPPO, proxy: ProxyReward, corpus: Corpus, beta: float | str, seed: int, budget: Budget
) -> tuple[ClippedPPO, list[dict[str, float]]]:
    """ClippedPPO from the SFT weights on the proxy reward, ``ref_policy`` = the SFT model."""
    env = TextVecEnv(corpus, budget.n_envs, proxy.per_token, seed=seed)
    env.seed(seed)
    adaptive = beta == "adaptive"
    model = make_model(
        env,
        seed,
        n_steps=2 * LENGTH,
        batch_size=512,
        n_epochs=4,
        learning_rate=budget.learning_rate,
        gamma=1.0,
        gae_lambda=0.95,
        ent_coef=0.0,
        ref_policy=sft,
        ref_kl_coef=beta,
        ref_kl_mode="reward",
        ref_kl_target=budget.kl_target if adaptive else None,
    )
    model.policy.load_state_dict(sft.policy.state_dict())
    prompts = eval_prompts(corpus, budget.n_eval, seed=seed + 1000)
    curve = Curve(lambda: measure(model, sft, proxy, corpus, prompts, seed + 2000)[0], budget.timesteps // budget.evals)
    curve.init_callback(model)
    curve.record(0)
    model.learn(budget.timesteps, callback=curve)
    return model, curve.points


# ── the whole loop for one seed ─────────────────────────────────────────────────────────────────────────────


def samples(prompts: np.ndarray, written: np.ndarray, vocab: list[str], n: int) -> list[dict[str, str]]:
    """The first ``n`` prompt/continuation pairs as text."""
    return [
        {"prompt": decode(p, vocab), "text": decode(w, vocab)} for p, w in zip(prompts[:n], written[:n], strict=True)
    ]


def show(title: str, stats: dict[str, float], shown: list[dict[str, str]]) -> None:
    """Print the summary numbers and a few samples."""
    print(
        f"\n{title}: gold {stats['gold']:.2f}, proxy {stats['proxy']:.2f} per continuation, "
        f"KL to the pretrained model {stats['kl']:.2f} nats, topic words {stats['topic']:.2f}, "
        f"odd pairs {stats['odd_pairs']:.2f}, repeats {stats['repeats']:.2f}, distinct words {stats['distinct']:.2f}"
    )
    for sample in shown:
        print(f"  [{sample['prompt']}] {sample['text']}")


def run_seed(seed: int, budget: Budget, corpus: Corpus | None = None) -> dict[str, Any]:
    """SFT, preferences, reward model and every fine-tuning of ``budget.betas`` for one seed."""
    corpus = corpus or load_corpus()
    th.manual_seed(seed)
    started = time.perf_counter()
    sft = make_model(TextVecEnv(corpus, 1), seed)
    uniform, before = math.log(len(corpus.vocab)), nats_per_token(sft, corpus.tokens[corpus.split :])
    history = supervised_finetune(sft, corpus, budget.sft_epochs, seed)
    sft_seconds = time.perf_counter() - started
    print(
        f"pretrained on {corpus.split} tokens ({len(corpus.vocab)} words), {budget.sft_epochs} epochs of SFT: held-out "
        f"{before:.2f} -> {history[-1]['held_out']:.2f} nats per token (uniform {uniform:.2f}; {sft_seconds:.0f} s)",
        flush=True,
    )
    started = time.perf_counter()
    proxy, rm_stats = learn_reward(sft, corpus, budget.pairs, budget.rm_epochs, seed)
    rm_stats["seconds"] = time.perf_counter() - started
    print(
        f"reward model on {rm_stats['train_pairs']} labelled pairs: "
        f"held-out accuracy {rm_stats['held_out_accuracy']:.3f} "
        f"against the noisy labels, {rm_stats['held_out_accuracy_noiseless']:.3f} against the gold score "
        f"(train {rm_stats['train_accuracy']:.3f}; proxy-gold correlation {rm_stats['proxy_gold_correlation']:.2f}; "
        f"{rm_stats['seconds']:.0f} s)",
        flush=True,
    )
    prompts = eval_prompts(corpus, budget.n_eval, seed=seed + 1000)
    sft_stats, written = measure(sft, sft, proxy, corpus, prompts, seed=seed + 3000)
    result: dict[str, Any] = {
        "seed": seed,
        "budget": asdict(budget),
        "sft": {
            "history": history,
            "uniform_nats": uniform,
            "untrained_nats": before,
            "seconds": sft_seconds,
            "stats": sft_stats,
            "samples": samples(prompts, written, corpus.vocab, budget.n_show),
        },
        "reward_model": rm_stats,
        "runs": {},
    }
    show("pretrained (SFT)", sft_stats, result["sft"]["samples"])
    for beta in budget.betas:
        print(
            f"\nfine-tuning with {label(beta)}, {budget.timesteps} steps ({budget.timesteps // LENGTH} continuations)"
        )
        started = time.perf_counter()
        model, curve = finetune(sft, proxy, corpus, beta, seed, budget)
        final, written = measure(model, sft, proxy, corpus, prompts, seed=seed + 3000)
        run = {
            "beta": beta,
            "curve": curve,
            "final": final,
            "seconds": time.perf_counter() - started,
            "samples": samples(prompts, written, corpus.vocab, budget.n_show),
        }
        result["runs"][label(beta)] = run
        show(f"after fine-tuning, {label(beta)} ({run['seconds']:.0f} s)", final, run["samples"])
    print(f"\n{'':>18} |  gold | proxy | KL (nats) | topic | odd pairs | repeats   ({budget.n_eval} continuations)")
    rows = {"pretrained": sft_stats, **{name: run["final"] for name, run in result["runs"].items()}}
    for name, stats in rows.items():
        print(
            f"{name:>18} | {stats['gold']:5.2f} | {stats['proxy']:5.2f} | {stats['kl']:9.2f} | {stats['topic']:5.2f} | "
            f"{stats['odd_pairs']:9.2f} | {stats['repeats']:7.2f}"
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a toy budget: checks that every stage runs")
    parser.add_argument("--full", action="store_true", help="3 seeds, results to benchmarks/results/rlhf_text")
    parser.add_argument("--timesteps", type=int, default=int(os.environ.get("EXAMPLE_TIMESTEPS", 0)) or None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--out", type=Path, default=None, help="write raw results, the summary and the plot here")
    parser.add_argument("--summarise", action="store_true", help="only rewrite the summary and plot from OUT/raw")
    args = parser.parse_args()
    th.set_num_threads(1)
    budget = QUICK if args.quick else Budget()
    if args.timesteps:
        budget = replace(budget, timesteps=args.timesteps)
    seeds = args.seeds or ([0, 1, 2] if args.full else [0])
    out = args.out or (RESULTS if args.full else None)
    if not args.summarise:
        corpus = load_corpus()
        for seed in seeds:
            result = run_seed(seed, budget, corpus)
            if out is not None:
                (out / "raw").mkdir(parents=True, exist_ok=True)
                (out / "raw" / f"seed_{seed}.json").write_text(json.dumps(result, indent=1))
    if out is not None:
        from rlhf_text_report import report  # noqa: PLC0415 - matplotlib only where results are written

        report(out)


if __name__ == "__main__":
    main()
