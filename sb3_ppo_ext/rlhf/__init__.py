"""RLHF: KL regularisation to a frozen reference policy, and rewards learned from preferences.

``reference`` (the frozen reference, beta's controllers), ``penalty`` (:class:`ReferenceKL`, the extension that
puts ``beta * KL(pi || pi_ref)`` in the reward or the loss), ``preferences`` (reward models fitted on segment
preferences, the reward wrapper, the refit callback).
"""
