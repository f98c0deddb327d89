"""Implementation choices SB3's PPO lacks, each a switch that is off by default (SB3's behaviour kept).

``recompute_advantages`` (GAE again with the current critic before every epoch after the first; Andrychowicz
et al. 2021, Tianshou's ``recompute_adv``), ``reward_scaling`` (rewards divided by a running standard deviation
of the discounted return, inside the algorithm; Engstrom et al. 2020).
"""
