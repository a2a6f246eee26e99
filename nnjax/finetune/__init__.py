"""Fine-tuning: masks over parameter paths, presets, per-group optimizers, adapters, surgery.

``import nnjax as nj``; ``nj.finetune.mask(params, "head/**")``. Everything here
builds or reads a mask (True = trainable) or a params tree; the trainer takes
the mask as a plain bool pytree (``nj.trainer(..., trainable=mask)``).
"""

from nnjax.finetune.adapters import *
from nnjax.finetune.cost import *
from nnjax.finetune.groups import *
from nnjax.finetune.masks import *
from nnjax.finetune.presets import *
from nnjax.finetune.surgery import *
