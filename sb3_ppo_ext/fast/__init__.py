"""Accelerators: the same arithmetic as the plain code path, in fewer operations.

* :mod:`sb3_ppo_ext.fast.kernel`: closed-form PPO gradients for plain MLP actor-critics (above
  :mod:`sb3_ppo_ext.policies`, whose networks it reads; the oneDNN matrix products it shares with the policies
  live below both, in :mod:`sb3_ppo_ext.matmul`).

Nothing here defines a loss or a distribution: formulas live in :mod:`sb3_ppo_ext.losses` and
:mod:`sb3_ppo_ext.distributions`.
"""
