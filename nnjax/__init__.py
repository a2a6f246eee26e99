"""nnjax: a functional neural-network library for JAX.

``import nnjax as nj``. Layers are ``Layer(init, apply, name)`` pairs of pure
functions over parameter dicts; see ``DESIGN.md`` for the contracts.
"""

from nnjax import paths
from nnjax.core import *  # noqa: F403
from nnjax.errors import *  # noqa: F403
from nnjax.inspect import *  # noqa: F403
from nnjax.layers import *  # noqa: F403

__version__ = "0.1.0"
