"""Hugging Face interop: checkpoints in and out of transformers' formats."""

from nnjax.models.hf.gpt2 import *
