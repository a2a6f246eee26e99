"""The layer catalogue: one module per family, each built only on nnjax.core."""

from nnjax.layers.attention import *
from nnjax.layers.conv import *
from nnjax.layers.dense import *
from nnjax.layers.dropout import *
from nnjax.layers.embed import *
from nnjax.layers.moe import *
from nnjax.layers.norm import *
from nnjax.layers.pool import *
from nnjax.layers.recurrent import *
from nnjax.layers.reshape import *
from nnjax.layers.transformer import *
