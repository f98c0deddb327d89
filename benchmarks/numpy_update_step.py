"""How fast could one minibatch step's gradient be in NumPy? A measured prototype, not a code path of the package.

On the AMD EPYC (AVX512) VM of issue 32's fourth round, ClippedPPO's closed-form update (``fast/kernel.py``) spends
about two thirds of a CartPole minibatch step in ~70 small PyTorch operations (~5 us each, dispatch included),
while a NumPy ufunc on the same arrays costs 1-3 us and NumPy's bundled OpenBLAS runs these products as fast as
MKL. This script computes the same gradient as the kernel's ``loss_and_grad`` (forward of both stacked networks,
the clipped surrogate, value and entropy terms, backward into every weight and bias) for the Zoo's CartPole
settings, once with the package's kernel and once in NumPy with every intermediate in a preallocated workspace
(``out=`` everywhere: freeing and allocating 128 KB temporaries each step let glibc return the heap's top to the
OS and fault it back in, which doubled the NumPy step's time on that VM), checks that both give the same
gradients (float32 rounding), and prints both times and their ratio:

    python benchmarks/numpy_update_step.py [--repeats 3000]

Categorical head, tanh layers of one shape for actor and critic, no value clipping, no masks: the case it
measures, not a general implementation (docs/throughput.md, fourth round).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# one BLAS thread, as torch's: NumPy's OpenBLAS otherwise uses every core, and its step time swung from 300 to
# 615 us with what the other core was doing (set before NumPy loads; a no-op when imported after it)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch as th  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402  (this folder's helpers: the Zoo's CartPole settings)

from sb3_ppo_ext.backends import ClosedFormBackend  # noqa: E402
from sb3_ppo_ext.fast.cpu import cpu_model  # noqa: E402
from sb3_ppo_ext.losses import PPOBatch, PPOLoss  # noqa: E402


class NumpyStep:
    """The CartPole-shaped closed-form gradient in NumPy, on a fixed minibatch size, with its own workspace.

    :param kernel: the policy's closed-form kernel (its parameters are read as NumPy views).
    :param batch_size: the minibatch size.
    """

    def __init__(self, kernel: Any, batch_size: int) -> None:
        def array(t: th.Tensor) -> np.ndarray:
            return t.detach().numpy()

        pi, vf = kernel.pi_layers, kernel.vf_layers
        assert len(pi) == 2 and all(layer.kind == "tanh" for layer in (*pi, *vf)), "two tanh layers per network"
        self.stacked = kernel.stacked  # its [2, ...] views over the optimizer's flat parameter buffer
        self.action_w, self.action_b = (array(t) for t in kernel.action_net)
        self.value_w, self.value_b = (array(t) for t in kernel.value_net)
        hidden, inputs = pi[0].weight.shape
        n_actions = self.action_w.shape[0]
        f32 = np.float32
        b = batch_size
        self.rows = np.arange(b)
        self.h1, self.h2, self.gh, self.tmp = (np.empty((2, b, hidden), f32) for _ in range(4))
        self.logits, self.probs, self.g_logits = (np.empty((b, n_actions), f32) for _ in range(3))
        self.vec = {name: np.empty(b, f32) for name in ("v", "logp", "ratio", "g_logp", "g_v", "ent", "lse")}
        self.mask = np.empty(b, bool)
        self.mask2 = np.empty(b, bool)
        self.grads = {
            "w1": np.empty((2, hidden, inputs), f32),
            "w1t": np.empty((2, inputs, hidden), f32),
            "b1": np.empty((2, hidden), f32),
            "w2": np.empty((2, hidden, hidden), f32),
            "b2": np.empty((2, hidden), f32),
            "aw": np.empty_like(self.action_w),
            "ab": np.empty_like(self.action_b),
            "vw": np.empty_like(self.value_w),
            "vb": np.empty_like(self.value_b),
        }
        self.refresh()

    def refresh(self) -> None:
        """Read the current parameters: NumPy views of the kernel's stacked ``[2, ...]`` layer views (no copies)."""
        views = self.stacked.views()
        assert views is not None, "the parameters are not in the optimizer's flat buffer yet (train one update first)"
        (self.w1, self.b1), (self.w2, self.b2) = ((v.weight.detach().numpy(), v.bias.detach().numpy()) for v in views)

    def step(
        self,
        x: np.ndarray,
        actions: np.ndarray,
        old_logp: np.ndarray,
        adv: np.ndarray,
        returns: np.ndarray,
        clip: float,
        vf_coef: float,
        ent_coef: float,
    ) -> dict[str, np.ndarray]:
        """Every gradient of ``L = -E[min(r A, clip(r) A)] + vf_coef E[(R - V)^2] - ent_coef E[H]``.

        :return: the workspace's gradient arrays (overwritten by the next step).
        """
        h1, h2, gh, tmp, v = self.h1, self.h2, self.gh, self.tmp, self.vec
        b = x.shape[0]
        g = self.grads
        # forward: both networks as a batch of two
        np.matmul(x, self.w1.transpose(0, 2, 1), out=h1)
        h1 += self.b1  # [2, 1, out]
        np.tanh(h1, out=h1)
        np.matmul(h1, self.w2.transpose(0, 2, 1), out=h2)
        h2 += self.b2
        np.tanh(h2, out=h2)
        logits, probs, g_logits = self.logits, self.probs, self.g_logits
        np.matmul(h2[0], self.action_w.T, out=logits)
        logits += self.action_b
        np.matmul(h2[1], self.value_w[0], out=v["v"])
        v["v"] += self.value_b[0]
        # log-softmax, log pi(a|s), entropy
        logits -= logits.max(axis=1, keepdims=True)
        np.exp(logits, out=probs)
        np.log(probs.sum(axis=1, out=v["lse"]), out=v["lse"])
        logits -= v["lse"][:, None]  # now log-probabilities
        np.exp(logits, out=probs)
        v["logp"][:] = logits[self.rows, actions]
        np.multiply(probs, logits, out=g_logits)
        np.negative(g_logits.sum(axis=1, out=v["ent"]), out=v["ent"])
        # dL/dlog pi (the clipped surrogate), dL/dV, dL/dH
        np.subtract(v["logp"], old_logp, out=v["ratio"])
        np.exp(v["ratio"], out=v["ratio"])
        np.greater(adv, 0, out=self.mask)
        np.less_equal(v["ratio"], 1.0 + clip, out=self.mask2)
        active = np.where(self.mask, self.mask2, v["ratio"] >= 1.0 - clip)
        np.multiply(v["ratio"], adv, out=v["g_logp"])
        v["g_logp"] *= active
        v["g_logp"] *= -1.0 / b
        np.subtract(v["v"], returns, out=v["g_v"])
        v["g_v"] *= 2.0 * vf_coef / b
        # dL/dlogits = g_logp (onehot - p) + g_H dH/dlogits, dH/dlogits = -p (log p + H)
        np.add(logits, v["ent"][:, None], out=g_logits)
        g_logits *= probs
        g_logits *= ent_coef / b
        g_logits -= probs * v["g_logp"][:, None]
        g_logits[self.rows, actions] += v["g_logp"]
        # backward: heads, then both networks
        np.matmul(g_logits.T, h2[0], out=g["aw"])
        g_logits.sum(axis=0, out=g["ab"])
        np.matmul(v["g_v"], h2[1], out=g["vw"][0])
        g["vb"][0] = v["g_v"].sum()
        np.matmul(g_logits, self.action_w, out=gh[0])
        np.multiply.outer(v["g_v"], self.value_w[0], out=gh[1])
        np.multiply(gh, h2, out=tmp)
        tmp *= h2
        np.subtract(gh, tmp, out=gh)  # dL/dz2
        np.matmul(gh.transpose(0, 2, 1), h1, out=g["w2"])
        gh.sum(axis=1, out=g["b2"])
        np.matmul(gh, self.w2, out=tmp)  # dL/dh1
        np.multiply(tmp, h1, out=gh)
        gh *= h1
        np.subtract(tmp, gh, out=tmp)  # dL/dz1
        np.matmul(x.T, tmp, out=g["w1t"])
        g["w1"][...] = g["w1t"].transpose(0, 2, 1)
        tmp.sum(axis=1, out=g["b1"])
        return g


def _median_us(run: Any, repeats: int) -> float:
    for _ in range(min(200, repeats)):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    """Measure both steps on one real CartPole minibatch and print their times and ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3000)
    args = parser.parse_args()
    th.set_num_threads(1)
    env = throughput._make_env("cartpole", 0)
    model = throughput._model("cartpole", env, 0)
    model.learn(model.n_steps * model.n_envs * 4)  # trained a little: ratios away from 1, some clipped
    backend = ClosedFormBackend(model.policy)
    kernel = backend.kernel
    samples = next(model.rollout_buffer.get(model.batch_size))
    adv = samples.advantages
    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    batch = PPOBatch.from_minibatch(samples, adv, discrete_actions=True)
    clip, vf_coef, ent_coef = 0.2, model.vf_coef, model.ent_coef
    loss = PPOLoss(clip, None, "max", ent_coef, vf_coef)
    # perturb the parameters a little so that the ratio is not 1 everywhere (as in epochs after the first)
    with th.no_grad():
        for p in model.policy.parameters():
            p.add_(th.randn_like(p) * 0.02)
    backend.loss_and_grad(loss, batch)
    torch_grads = {name: p.grad.clone() for name, p in model.policy.named_parameters()}

    numpy_step = NumpyStep(kernel, len(adv))
    inputs = (
        batch.observations.numpy().astype(np.float32),
        batch.actions.numpy(),
        batch.old_log_prob.numpy(),
        batch.advantages.numpy(),
        batch.returns.numpy(),
    )
    grads = numpy_step.step(*inputs, clip, vf_coef, ent_coef)
    pi, vf = kernel.pi_layers, kernel.vf_layers
    pairs = [
        (pi[0].weight, grads["w1"][0]),
        (vf[0].weight, grads["w1"][1]),
        (pi[0].bias, grads["b1"][0]),
        (vf[0].bias, grads["b1"][1]),
        (pi[1].weight, grads["w2"][0]),
        (vf[1].weight, grads["w2"][1]),
        (pi[1].bias, grads["b2"][0]),
        (vf[1].bias, grads["b2"][1]),
        (kernel.action_net[0], grads["aw"]),
        (kernel.action_net[1], grads["ab"]),
        (kernel.value_net[0], grads["vw"]),
        (kernel.value_net[1], grads["vb"]),
    ]
    by_id = {id(p): name for name, p in model.policy.named_parameters()}
    worst = 0.0
    for param, got in pairs:
        expected = torch_grads[by_id[id(param)]].numpy()
        scale = float(np.abs(expected).max()) or 1.0
        worst = max(worst, float(np.abs(got - expected).max()) / scale)
    assert worst < 1e-4, f"the NumPy step's gradients differ from the kernel's (relative {worst:.2e})"

    torch_us = _median_us(lambda: backend.loss_and_grad(loss, batch), args.repeats)
    numpy_us = _median_us(lambda: numpy_step.step(*inputs, clip, vf_coef, ent_coef), args.repeats)
    refresh_us = _median_us(numpy_step.refresh, args.repeats)
    print(
        f"Machine: {cpu_model()} ({th.backends.cpu.get_cpu_capability()}), 1 thread, CartPole Zoo minibatch of "
        f"{len(adv)}"
    )
    print(f"gradients agree: largest difference {worst:.1e} of each gradient's largest entry")
    print(f"closed-form kernel (PyTorch), loss_and_grad: {torch_us:7.1f} us")
    print(f"NumPy prototype, same gradients:             {numpy_us:7.1f} us (+ {refresh_us:.1f} us weight views)")
    print(f"ratio NumPy / PyTorch:                       {(numpy_us + refresh_us) / torch_us:7.3f}")


if __name__ == "__main__":
    main()
