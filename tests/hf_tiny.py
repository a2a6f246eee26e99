"""Tiny random transformers models of each family, saved as a model folder (no hub)."""

import numpy as np

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gpt2")
VOCAB = 96
SEQ = 12  # longer than Mistral's window below


def config(family, **overrides):
    """A tiny transformers config: GQA (4 query heads, 2 kv heads), 2 layers, width 32."""
    import transformers

    if family == "gpt2":
        kw = dict(n_layer=2, n_head=4, n_embd=32, n_positions=64, bos_token_id=1, eos_token_id=2)
        return transformers.GPT2Config(
            vocab_size=VOCAB, initializer_range=0.2, **{**kw, **overrides}
        )
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    extra = {"mistral": dict(sliding_window=4), "llama": dict(rope_theta=500.0)}.get(family, {})
    cls = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "mistral": transformers.MistralConfig,
        "gemma": transformers.GemmaConfig,
    }[family]
    return cls(**{**kw, **extra, **overrides})


def build(family, folder=None, *, seed=0, dtype=None, max_shard_size=None, **overrides):
    """A random ``*ForCausalLM`` (eval mode, float32), saved to ``folder`` when given.

    Norm scales are randomised too (transformers inits them to 1 or 0), so a wrong
    ``1 + w`` or a swapped norm shows in the logits.
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config(family, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    if folder is not None:
        saved = model.to(dtype) if dtype is not None else model
        kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
        saved.save_pretrained(folder, **kw)
        model = model.float()
    return model


def ids(shape, seed=0):
    return np.random.default_rng(seed).integers(3, VOCAB, size=shape).astype(np.int32)


def logits(model, token_ids):
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(token_ids)).long()).logits.float().numpy()
