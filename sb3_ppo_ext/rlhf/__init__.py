"""RLHF: KL regularisation to a frozen reference policy, and rewards learned from preferences.

``reference`` (the frozen reference, beta's controllers), ``penalty`` (the extensions that put
``beta * KL(pi || pi_ref)`` in the reward, :class:`~sb3_ppo_ext.rlhf.penalty.RewardKLPenalty`, or in the loss,
:class:`~sb3_ppo_ext.rlhf.penalty.LossKLPenalty`), ``preferences`` (reward models fitted on segment
preferences, the reward wrapper, the refit callback).
"""
