"""Floor 3, data: batch iterators (seeded, resumable), dataset readers, instruction and token data.

``import nnjax as nj``; ``nj.data.batches((x, y), 64, seed=0)``.
"""

from nnjax.data.corpus import *
from nnjax.data.instruct import *
from nnjax.data.iterators import *
from nnjax.data.preference import *
from nnjax.data.readers import *
from nnjax.data.records import *
from nnjax.data.tokens import *
from nnjax.data.vocab import *
from nnjax.data.vocabulary import *
