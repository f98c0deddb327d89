"""Optional stabilisers of the update, each an extension of :mod:`sb3_ppo_ext.extensions`.

``value_normalization`` (value targets normalised by running statistics; PopArt), ``adaptive_lr`` (the
KL-adaptive learning rate), ``rpo`` (RPO's noise on the Gaussian mean). Dual clip is a loss option
(:func:`sb3_ppo_ext.losses.clipped_surrogate_loss`).
"""
