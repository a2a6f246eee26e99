"""Peak host memory of from_pretrained: the params plus about one tensor, not the checkpoint twice."""

import json
import subprocess
import sys

import pytest

pytest.importorskip("transformers", reason="transformers writes the checkpoint")

BUILD = """
import sys, torch, transformers
torch.manual_seed(0)
c = transformers.LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=2048,
    num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4)
transformers.LlamaForCausalLM(c).save_pretrained(sys.argv[1])
"""

MEASURE = """
import json, sys
import numpy as np
import jax
from nnjax.models import hf
from safetensors import safe_open
def peak():  # VmHWM, not ru_maxrss: that one carries the parent's peak across fork + exec
    with open("/proc/self/status") as f:
        return int(f.read().split("VmHWM:")[1].split()[0]) * 1024
hf.from_pretrained(sys.argv[2])  # warm-up: imports and first compiles on a tiny folder
before = peak()
config, params = hf.from_pretrained(sys.argv[1])
jax.block_until_ready(params)
after = peak()
with safe_open(sys.argv[1] + "/model.safetensors", "numpy") as f:
    largest = max(np.prod(f.get_slice(k).get_shape()) * 4 for k in f.keys())
total = sum(x.nbytes for x in jax.tree.leaves(params))
print(json.dumps({"before": before, "after": after, "params": int(total), "largest": int(largest)}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_memory_is_params_plus_one_tensor(tmp_path):
    from tests import hf_tiny

    big, tiny = tmp_path / "big", tmp_path / "tiny"
    subprocess.run([sys.executable, "-c", BUILD, str(big)], check=True, timeout=600)  # ~260 MB
    hf_tiny.build("llama", tiny)
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(big), str(tiny)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
        env={
            "JAX_PLATFORMS": "cpu",
            "PATH": "",
            "PYTHONPATH": str(__import__("pathlib").Path(__file__).parents[1]),
        },
    )
    m = json.loads(out.stdout.strip().splitlines()[-1])
    grown = m["after"] - m["before"]
    mb = 2**20
    print(
        f"params {m['params'] / mb:.0f} MB, largest tensor {m['largest'] / mb:.0f} MB, peak grew {grown / mb:.0f} MB"
    )
    assert m["params"] > 200 * mb  # a checkpoint of a few hundred MB
    assert grown <= m["params"] + m["largest"] + 48 * mb
