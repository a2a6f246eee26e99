"""Host memory of from_pretrained: the params plus about one tensor, not the checkpoint twice.

What is measured is what the claim is about: the host buffers Python and NumPy allocate
while loading (``tracemalloc``, which NumPy reports its array data to), their peak
beyond what is still held at the end. A quantized load on a CPU writes its stacked
params into host buffers that XLA then takes without a copy, so what it holds at the
end is about the params; other loads write device buffers, which tracemalloc does not
count. Unlike a process's RSS, these figures do not move with the machine's load.
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
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    with safe_open(str(tmp_path / "model.safetensors"), "numpy") as f:
        sizes = [int(np.prod(f.get_slice(k).get_shape())) * 4 for k in f.keys()]  # noqa: SIM118
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    mb = 2**20
    figures = dict(params=total, largest=max(sizes), kept=kept, peak=peak)
    print(", ".join(f"{name} {value / mb:.1f} MB" for name, value in figures.items()))
    assert total == sum(sizes) and total > 5 * max(sizes)  # many tensors, so "one" is telling
    assert kept <= total + mb  # at most the params themselves (on a CPU), no copy of them
    assert peak - kept <= 2 * max(sizes) + 2 * mb  # a tensor's bytes and one converted copy


def test_quantize_while_loading_never_holds_the_float_table(tmp_path):
    """``from_pretrained(quantize=...)`` with an int8 table reads it a chunk of rows at a
    time: host buffers beyond the quantized params peak near the largest *other* tensor,
    far below the table's 8 MB in float."""
    import torch
    import transformers
    from safetensors import safe_open

    import nnjax as nj
    from nnjax.models import hf

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=8000,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    spec = nj.finetune.Quantization("blocks/**/kernel", bits=4, embeddings="tok_embed/embedding")
    hf.from_pretrained(tmp_path, quantize=spec)  # warm-up: compilations are not the load's
    tracemalloc.start()
    try:
        _, params = hf.from_pretrained(tmp_path, quantize=spec)
        jax.block_until_ready(params)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    held = peak - kept  # beyond the (quantized) params, which a CPU keeps in host buffers
    with safe_open(str(tmp_path / "model.safetensors"), "numpy") as f:
        sizes = {k: int(np.prod(f.get_slice(k).get_shape())) * 4 for k in f.keys()}  # noqa: SIM118
    table = sizes.pop("model.embed_tokens.weight")
    mb = 2**20
    print(
        f"table {table / mb:.1f} MB, largest other {max(sizes.values()) / mb:.1f} MB, held {held / mb:.1f} MB"
    )
    assert table == 8000 * 256 * 4 and max(sizes.values()) == 256 * 1024 * 4
    # a kernel read, its float32 copy, its codes; never the table (7.8 MB) in float
    assert held <= 3 * max(sizes.values()) + mb and held < table / 2
    assert kept <= nj.param_bytes(params) + mb
    assert params["tok_embed"]["embedding"].dtype == np.int8
