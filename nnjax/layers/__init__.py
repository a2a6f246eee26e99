"""The layer catalogue: one module per family, each built only on nnjax.core."""

from nnjax.layers.attention import *  # noqa: F403
from nnjax.layers.conv import *  # noqa: F403
from nnjax.layers.dense import *  # noqa: F403
from nnjax.layers.dropout import *  # noqa: F403
from nnjax.layers.embed import *  # noqa: F403
from nnjax.layers.norm import *  # noqa: F403
from nnjax.layers.pool import *  # noqa: F403
from nnjax.layers.recurrent import *  # noqa: F403
from nnjax.layers.reshape import *  # noqa: F403
