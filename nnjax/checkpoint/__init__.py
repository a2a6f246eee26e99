"""Floor 3, checkpoints: atomic, streamed safetensors checkpoints of a train state or params.

``import nnjax as nj``; ``nj.checkpoint.save(run_dir, ts, step=...)``,
``nj.checkpoint.restore(nj.checkpoint.latest(run_dir), ts)``. One module per
concern: ``arrayfile`` (a safetensors file a tensor at a time), ``metadata``
(``metadata.json``, sealed by a checksum), ``saving``, ``restoring``, ``listing``
(complete steps, pruning, leftovers), ``lock`` (one writer per folder),
``params`` (params alone as one file).
"""

from nnjax.checkpoint.state import *
