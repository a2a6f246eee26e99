"""Tiny random transformers models of each family, saved as a model folder (no hub)."""

import numpy as np

from tests import hf_reference

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gpt2", *hf_reference.NEW_FAMILIES)
VOCAB = hf_reference.TINY["vocab_size"]
SEQ = 12  # longer than Mistral's window below


def _gpt2(**overrides):
    import torch
    import transformers

    kw = dict(vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=32, n_positions=64)
    kw.update(bos_token_id=1, eos_token_id=2)
    config = transformers.GPT2Config(**{**kw, **overrides})
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # norms and biases away from their init, as hf_reference does
        for name, p in model.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def build(family, folder=None, *, dtype=None, max_shard_size=None, **overrides):
    """A random ``*ForCausalLM`` (eval mode, float32; ``hf_reference.hf_model`` for the
    Llama-style families), saved to ``folder`` when given (in ``dtype``)."""
    import torch
    import transformers

    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "gpt2":
        model = _gpt2(**overrides)
    else:
        extra = {"rope_theta": 500.0} if family == "llama" else {}
        model = hf_reference.hf_model(family, **{**ids, **extra, **overrides})
    if folder is not None:
        kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
        (model.to(dtype) if dtype is not None else model).save_pretrained(folder, **kw)
        if dtype is not None:  # the float32 model of the rounded weights (fresh rotary buffers)
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval()


def ids(shape, seed=0):
    return np.random.default_rng(seed).integers(3, VOCAB, size=shape).astype(np.int32)


def logits(model, token_ids):
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(token_ids)).long()).logits.float().numpy()
