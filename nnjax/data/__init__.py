"""Floor 3, data: batch iterators (seeded, resumable) and dataset readers.

``import nnjax as nj``; ``nj.data.batches((x, y), 64, seed=0)``.
"""

from nnjax.data.batches import *
from nnjax.data.instruct import *
from nnjax.data.tokens import *
