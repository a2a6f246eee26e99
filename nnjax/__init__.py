"""nnjax: a functional neural-network library for JAX.

``import nnjax as nj``. Layers are ``Layer(init, apply, name)`` pairs of pure
functions over parameter dicts; see ``docs/design.md`` for the contracts.
"""

from nnjax import checkpoint, data, finetune, models, sharding
from nnjax.core import *
from nnjax.core import paths
from nnjax.layers import *
from nnjax.training import losses, metrics
from nnjax.training.evaluate import *
from nnjax.training.fit import *
from nnjax.training.trainer import *

__version__ = "0.1.0"
