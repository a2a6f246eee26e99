"""Generate text with a Hugging Face decoder LLM (Llama, Qwen2, Qwen3, Mistral, Gemma, GPT-2).

With a local model folder (``config.json``, ``model.safetensors`` or shards, and
``tokenizer.json``; ``pip install nnjax[llm]`` for the tokenizer), the weights are
streamed in one tensor at a time and the prompt is continued with the sampling
options::

    python examples/llm_generate.py path/to/Qwen2.5-0.5B --prompt "The capital of France is"
    python examples/llm_generate.py path/to/model --temperature 0.7 --top-p 0.9 --max-new-tokens 64
    python examples/llm_generate.py path/to/model --chat "Tell me a joke."   # the folder's chat template

Without a folder it builds a small random model of ``--family`` (offline, bytes as
tokens), so the whole path runs anywhere; its text is noise, the shapes are real::

    python examples/llm_generate.py --family gemma --save /tmp/tiny-gemma   # and write it as an HF folder
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

import nnjax as nj
from nnjax.models import hf

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gpt2")


def tiny_config(family: str, *, width: int, layers: int) -> nj.models.CausalLMConfig:
    """A small config of ``family``, made from an HF ``config.json`` dict as a real one would be."""
    if family == "gpt2":
        hf_config = {"n_embd": width, "n_layer": layers, "n_head": 4, "n_positions": 512}
    else:
        hf_config = {
            "hidden_size": width,
            "intermediate_size": 3 * width,
            "num_hidden_layers": layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": width // 4,
            "max_position_embeddings": 512,
            "sliding_window": 64 if family == "mistral" else None,
        }
    hf_config.update(model_type=family, vocab_size=256, eos_token_id=0, pad_token_id=0)
    return hf.config_from_hf(hf_config)


def load(args: argparse.Namespace):
    """``(config, params, tokenizer)`` from the folder, or a random model of ``--family``."""
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    if args.model:
        t = time.perf_counter()
        config, params = hf.from_pretrained(args.model, dtype=dtype)
        n = nj.core.paths.count_params(params)
        print(f"loaded {config.family} ({n / 1e6:.1f}M params) in {time.perf_counter() - t:.1f} s")
        if (
            not os.path.exists(os.path.join(args.model, "tokenizer.json"))
            and config.vocab_size <= 256
        ):
            print("no tokenizer.json: bytes as tokens (a folder this script saved)")
            return config, params, nj.data.ByteTokenizer()
        return config, params, hf.load_tokenizer(args.model)
    config = tiny_config(
        args.family, width=32 if args.smoke else 128, layers=2 if args.smoke else 4
    )
    model = nj.models.CausalLM(config)
    params, _ = model.init(jax.random.key(args.seed), jnp.zeros((1, 1), jnp.int32))
    params = jax.tree.map(lambda p: p.astype(dtype), params)
    print(f"random {args.family} model, {nj.core.paths.count_params(params) / 1e6:.2f}M params")
    return config, params, nj.data.ByteTokenizer()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", help="a local HF model folder (default: a random model)")
    p.add_argument("--family", choices=FAMILIES, default="llama", help="without a folder")
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument("--chat", help="a user message, rendered with the folder's chat template")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling, in (0, 1]")
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", help="also write the model as an HF folder here")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, a few tokens (for tests)")
    args = p.parse_args(argv)
    if args.smoke:
        args.max_new_tokens = min(args.max_new_tokens, 8)

    config, params, tokenizer = load(args)
    if args.chat and hasattr(tokenizer, "apply_chat_template"):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.chat}], True)
    else:
        ids = tokenizer.encode(args.chat or args.prompt)
    prompt = np.asarray([ids], np.int32)
    t = time.perf_counter()
    out = nj.models.generate(
        config,
        params,
        prompt,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        rng=jax.random.key(args.seed),
    )
    new = np.asarray(out)[0, prompt.shape[1] :]
    dt = time.perf_counter() - t
    print(f"prompt: {args.chat or args.prompt!r}")
    print(f"generated: {tokenizer.decode(new)!r}")
    print(f"{len(new)} tokens in {dt:.2f} s (compile included)")
    if args.save:
        hf.save_pretrained(args.save, config, params)
        print(f"saved an HF folder to {args.save}")


if __name__ == "__main__":
    main()
