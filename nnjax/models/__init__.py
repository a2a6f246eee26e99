"""The model zoo: each model a function of a config dataclass returning a Layer."""

from nnjax.models import hf
from nnjax.models.causal_lm import *
from nnjax.models.causal_lm_config import *
from nnjax.models.generate import *
from nnjax.models.gpt import *
from nnjax.models.lenet import *
from nnjax.models.mlp import *
from nnjax.models.resnet import *
from nnjax.models.sampling import *
from nnjax.models.text import *
