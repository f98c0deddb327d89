"""Recurrent (LSTM) policies: the policies, how a minibatch becomes sequences, their buffers, their rollout layer.

``policies`` (``MlpLstmPolicy`` and the like, sb3-contrib's ``RecurrentPPO`` API), ``sequences`` (``LSTMStates``,
``Sequences``), ``buffers`` (``RecurrentGAERolloutBuffer``), ``rollout``
(:class:`~sb3_ppo_ext.recurrent.rollout.RecurrentStates`, the rollout extension that carries each env's LSTM states
between steps).
"""
