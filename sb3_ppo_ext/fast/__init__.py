"""Accelerators: the same arithmetic as the plain code path, in fewer operations.

* :mod:`sb3_ppo_ext.fast.kernel`: closed-form PPO gradients for plain MLP actor-critics (above
  :mod:`sb3_ppo_ext.policies`, whose networks it reads; the oneDNN matrix products it shares with the policies
  live below both, in :mod:`sb3_ppo_ext.matmul`).
* :mod:`sb3_ppo_ext.fast.acting`: the kernel's acting on a rollout step's few rows in NumPy.
* :mod:`sb3_ppo_ext.fast.stacked`: the actor's and critic's layers of one shape run as a batch of two.

Nothing here defines a loss: formulas live in :mod:`sb3_ppo_ext.losses` and :mod:`sb3_ppo_ext.distributions`.
The one exception is sampling and ``log pi(a)`` of the Categorical and diagonal-Gaussian heads, written again in
NumPy in ``acting.py`` for speed and tested against the heads (``tests/test_fast_acting.py``).
"""
