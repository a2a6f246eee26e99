"""Floor 3, training: the jitted trainer, the ``fit`` loop, losses and metrics.

The functions users call are re-exported at the top (``nj.trainer``, ``nj.fit``);
``nj.losses`` and ``nj.metrics`` are the modules themselves.
"""
