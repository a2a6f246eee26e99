"""nnjax: a functional neural-network library for JAX.

``import nnjax as nj``. Layers are ``Layer(init, apply, name)`` pairs of pure
functions over parameter dicts; see ``DESIGN.md`` for the contracts.
"""

from nnjax import checkpoint, data, finetune, losses, metrics, models, paths, sharding
from nnjax.core import *
from nnjax.errors import *
from nnjax.fit import *
from nnjax.inspect import *
from nnjax.layers import *
from nnjax.train import *

__version__ = "0.1.0"
