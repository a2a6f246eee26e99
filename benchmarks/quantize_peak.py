"""Peak memory of ``nj.finetune.quantize`` beyond its input and its result, per tensor.

``python -m benchmarks.quantize_peak [--quick]`` quantizes Qwen2-0.5B-sized tensors, each
in a fresh child process: one MLP kernel ``(896, 4864)`` and the 24-layer stack of them
in NF4, the token table ``(151936, 896)`` as int8 rows, and (for comparison) the one MLP
kernel by the one-shot ``nnjax.layers.quantized.quantize``. Each child builds its input,
reads its RSS, resets the peak (``/proc/self/clear_refs``), quantizes, and reports the
peak RSS growth less the result's bytes, as a multiple of the input tensor's bytes
(the issue's target for the streamed path: <= 1.2x).
"""

from __future__ import annotations

import json
import sys

from benchmarks.workloads import child_json, reset_peak_rss, rss

__all__ = ["CASES", "measure", "main"]

CASES = {
    "nf4 kernel (896, 4864)": ((896, 4864), 0, "kernel"),
    "nf4 stacked kernel (24, 896, 4864)": ((24, 896, 4864), 1, "kernel"),
    "int8 rows table (151936, 896)": ((151936, 896), 0, "embedding"),
    "one-shot nf4 kernel (896, 4864)": ((896, 4864), 0, "one-shot"),
}


def measure(case: str, quick: bool) -> dict:
    """One case in this (fresh) process."""
    import jax
    import numpy as np

    import nnjax as nj
    from nnjax.layers import quantized

    shape, depth, kind = CASES[case]
    if quick:
        shape = tuple(max(1, d // 16) for d in shape)
    w = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    # warm-up: imports and the chunks' compilations (the same chunk shapes, smaller tensors)
    small = np.ones((256, 512) if kind != "embedding" else (146, shape[-1]), np.float32)
    nj.finetune.quantize_leaf(small, "embedding" if kind == "embedding" else "kernel", 4, 64)
    before = rss()[0]
    reset_peak_rss()
    if kind == "one-shot":
        out = quantized.quantize(w, 4, depth=depth)
    else:
        out = nj.finetune.quantize_leaf(w, kind, 4, 64, depth)
    jax.block_until_ready(out)
    result = sum(int(a.nbytes) for a in out)
    beyond = rss()[1] - before - result
    return {"case": case, "input_mb": w.nbytes / 1e6, "result_mb": result / 1e6,
            "beyond_mb": beyond / 1e6, "x_input": beyond / w.nbytes}  # fmt: skip


def main(quick: bool) -> list[dict]:
    rows = []
    for case in CASES:
        argv = ["benchmarks.quantize_peak", "--child", case] + (["--quick"] if quick else [])
        rows.append(child_json(argv, f"quantize-peak {case}", 1800, {"JAX_PLATFORMS": "cpu"}))
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


if __name__ == "__main__":
    if "--child" in sys.argv:
        print(json.dumps(measure(sys.argv[sys.argv.index("--child") + 1], "--quick" in sys.argv)))
    else:
        print(json.dumps(main("--quick" in sys.argv), indent=1))
