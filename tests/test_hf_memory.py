"""Host memory of from_pretrained: the params plus about one tensor, not the checkpoint twice.

What is measured is what the claim is about: the peak of the host buffers Python and
NumPy allocate while loading (``tracemalloc``, which NumPy reports its array data to).
The loaded params themselves live in device buffers, which it does not count. Unlike
a process's RSS, this figure does not move with the machine's load.
"""

import tracemalloc

import jax
import numpy as np
import pytest

pytest.importorskip("transformers", reason="transformers writes the checkpoint")


def test_host_buffers_hold_about_one_tensor(tmp_path):
    import torch
    import transformers
    from safetensors import safe_open

    from nnjax.models import hf

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=8000,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    hf.from_pretrained(tmp_path)  # warm-up: first compiles and caches are not the load's
    tracemalloc.start()
    try:
        _, params = hf.from_pretrained(tmp_path)
        jax.block_until_ready(params)
        held = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    with safe_open(str(tmp_path / "model.safetensors"), "numpy") as f:
        sizes = [int(np.prod(f.get_slice(k).get_shape())) * 4 for k in f.keys()]  # noqa: SIM118
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    mb = 2**20
    print(f"params {total / mb:.1f} MB, largest {max(sizes) / mb:.1f} MB, held {held / mb:.1f} MB")
    assert total == sum(sizes) and total > 5 * max(sizes)  # many tensors, so "one" is telling
    assert held <= 2 * max(sizes) + 2 * mb  # a tensor's bytes and one converted copy
