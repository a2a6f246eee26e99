"""Hugging Face interop: model folders, tokenizers and PEFT adapters in and out of transformers' formats."""

from nnjax.models.hf.configs import *
from nnjax.models.hf.families import *
from nnjax.models.hf.gpt2 import *
from nnjax.models.hf.peft_adapters import *
from nnjax.models.hf.pretrained import *
from nnjax.models.hf.tokenizer import *
from nnjax.models.hf.torch_state import *
