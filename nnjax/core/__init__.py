"""Floor 1, the core: the ``Layer`` type, combinators, parameter paths, errors, checks.

Everything else in nnjax is built on this floor; it imports nothing above it.
"""

from nnjax.core.combinators import *
from nnjax.core.errors import *
from nnjax.core.layer import *
from nnjax.core.summary import *
