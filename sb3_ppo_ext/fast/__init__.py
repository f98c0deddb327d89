"""Accelerators: the same arithmetic as the plain code path, in fewer or faster operations.

* :mod:`sb3_ppo_ext.fast.kernel`: closed-form PPO gradients for plain MLP actor-critics.
* :mod:`sb3_ppo_ext.fast.matmul`: oneDNN matrix products for large Linear layers.

Nothing here defines a loss or a distribution: formulas live in :mod:`sb3_ppo_ext.losses` and
:mod:`sb3_ppo_ext.distributions`. This package imports no sibling module at import time, so that
:mod:`sb3_ppo_ext.policies` can use :mod:`~sb3_ppo_ext.fast.matmul` without a cycle.
"""
