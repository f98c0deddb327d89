"""RLHF: KL regularisation to a frozen reference policy, and rewards learned from preferences.

``reference`` (the frozen reference, beta's controllers, :class:`~sb3_ppo_ext.rlhf.reference.AdaptiveKLCoef`,
:class:`~sb3_ppo_ext.rlhf.reference.Reference`), ``observations`` (what the reference reads under
``VecNormalize``), ``penalty`` (the extensions that put ``beta * KL(pi || pi_ref)`` in the reward,
:class:`~sb3_ppo_ext.rlhf.penalty.RewardKLPenalty`, or in the loss, :class:`~sb3_ppo_ext.rlhf.penalty.LossKLPenalty`),
``preferences`` (reward models fitted on segment
preferences, the reward wrapper, the refit callback).
"""

from sb3_ppo_ext.rlhf.reference import AdaptiveKLCoef, Reference

__all__ = ["AdaptiveKLCoef", "Reference"]
