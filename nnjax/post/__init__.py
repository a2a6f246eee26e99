"""Post-training: preference optimisation (DPO, IPO, hinge, SimPO, ORPO) and GRPO.

Built on the trainer, fine-tuning and the models (floor 4). What a user calls:

Log-probabilities:
    sequence_logprobs (summed and mean per sequence or packed example), token_logprobs,
    SequenceLogprobs.
Losses (pure functions of log-probabilities, returning the loss and TRL's metrics):
    dpo_loss, ipo_loss, hinge_loss, simpo_loss, orpo_loss; the table PREFERENCE_LOSSES
    of PreferenceLoss entries.
Preference training:
    preference_trainer (nj.trainer with a preference loss and a reference: adapters off,
    a params tree, or precomputed), preference_model, preference_loss, precompute_reference.
GRPO:
    grpo_trainer (-> GRPOFunctions: init, step, rollout, generate, trainer), grpo_loss,
    group_advantages, encode_prompts, completion_mask.
"""

from nnjax.post.grpo import *
from nnjax.post.logprobs import *
from nnjax.post.losses import *
from nnjax.post.trainer import *
