"""Floor 3, checkpoints: atomic safetensors checkpoints of a train state or params.

``import nnjax as nj``; ``nj.checkpoint.save(run_dir, ts, step=...)``,
``nj.checkpoint.restore(nj.checkpoint.latest(run_dir), ts)``.
"""

from nnjax.checkpoint.state import *
