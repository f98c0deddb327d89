"""examples/rlhf_text.py's pipeline at a tiny budget: each stage does what the example claims (about 30 s)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch as th

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("rlhf_text_example", EXAMPLES / "rlhf_text.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def corpus(example):
    return example.load_corpus()


@pytest.fixture(scope="module")
def sft(example, corpus):
    threads = th.get_num_threads()
    th.set_num_threads(1)
    th.manual_seed(0)
    model = example.make_model(example.TextVecEnv(corpus, 1), seed=0)
    history = example.supervised_finetune(model, corpus, epochs=2, seed=0)
    th.set_num_threads(threads)
    return model, history


def test_corpus_is_english_prose_from_cpython(example, corpus):
    assert len(corpus.tokens) > 30_000
    assert len(corpus.vocab) == example.VOCAB_SIZE
    assert (corpus.tokens == len(corpus.vocab) - 1).mean() < 0.02  # <unk> is rare
    assert corpus.vocab[:3] == ["the", ".", ","] or "the" in corpus.vocab[:5]


def test_gold_score_counts_topic_words_odd_pairs_and_repeats(example, corpus):
    ids = {word: i for i, word in enumerate(corpus.vocab)}
    the = ids["the"]

    def gold(words):
        written = np.array([[ids[w] for w in words]])
        return example.gold_components(np.array([the]), written, corpus)

    # copied from the corpus: every pair attested
    start = int(np.flatnonzero(corpus.tokens[:-17] == the)[0])
    real = corpus.tokens[start : start + 17]
    parts = example.gold_components(real[:1], real[None, 1:], corpus)
    assert parts["odd_pairs"][0] == 0
    # "exception" three times: one topic word, two repeats, and "exception exception" is never written
    parts = gold(["exception", "exception", "exception"])
    assert parts["topic"][0] == 1 and parts["repeats"][0] == 2 and parts["odd_pairs"][0] >= 2


def test_sft_policy_beats_uniform_and_unigram_on_held_out_text(example, corpus, sft):
    _, history = sft
    held_out = corpus.tokens[corpus.split :]
    counts = np.bincount(corpus.tokens[: corpus.split], minlength=len(corpus.vocab)) + 1
    unigram = float(-np.log(counts[held_out] / counts.sum()).mean())
    nats = history[-1]["held_out"]
    assert nats < math.log(len(corpus.vocab)) - 1.5
    assert nats < unigram - 0.2  # it uses the context, not just word frequencies


def test_reward_model_learns_the_gold_order_and_beta_zero_raises_the_proxy(example, corpus, sft):
    model, _ = sft
    th.set_num_threads(1)
    proxy, stats = example.learn_reward(model, corpus, n_pairs=600, epochs=3, seed=0, temperature=0.5)
    assert stats["held_out_accuracy_noiseless"] > 0.6
    assert stats["held_out_accuracy"] > 0.58
    budget = example.Budget(timesteps=8192, evals=1, n_eval=128, n_envs=64, betas=(0.0,))
    _, curve = example.finetune(model, proxy, corpus, 0.0, seed=0, budget=budget)
    assert curve[0]["step"] == 0 and curve[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert abs(curve[0]["proxy"]) < 0.3  # calibrated: SFT continuations score about 0
    assert curve[-1]["step"] >= 8192
    assert curve[-1]["proxy"] > curve[0]["proxy"] + 0.2
    assert curve[-1]["kl"] > 0.05
