"""What this machine allows: matmul GF/s and memory GB/s, for JAX and for torch.

Every figure of an LLM study is read against these: a training step cannot beat its
matmuls' FLOP rate, a decode step cannot beat reading its weights at the memory rate.
The matmul is the training step's shape (256 tokens x 768 -> 2048); bf16 is JAX's
bf16 operands with float32 accumulation (what nnjax's layers use) and torch's
bf16 matmul; memory is a sum over 256 MiB of float32.

Example:
    >>> from benchmarks.limits import jax_limits
    >>> sorted(jax_limits(steps=1, m=8, k=8, n=8, mem_mb=1))
    ['matmul bf16 GF/s', 'matmul f32 GF/s', 'memory GB/s']
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

__all__ = ["jax_limits", "torch_limits"]


def _rate(run: Callable[[], object], work: float, steps: int) -> float:
    """``work`` per second over the median of ``steps`` timed calls (after one warm-up)."""
    run()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return work / statistics.median(times)


def jax_limits(steps: int = 20, m: int = 256, k: int = 768, n: int = 2048, mem_mb: int = 256):
    """``{"matmul f32 GF/s", "matmul bf16 GF/s", "memory GB/s"}`` of jitted JAX."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (m, k))
    b = jax.random.normal(jax.random.key(1), (k, n))
    f32 = jax.jit(jnp.matmul)
    bf16 = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    big = jnp.ones((mem_mb << 18,), jnp.float32)
    total = jax.jit(jnp.sum)
    flops = 2.0 * m * k * n / 1e9
    return {
        "matmul f32 GF/s": _rate(lambda: f32(a, b).block_until_ready(), flops, steps),
        "matmul bf16 GF/s": _rate(lambda: bf16(a16, b16).block_until_ready(), flops, steps),
        "memory GB/s": _rate(lambda: total(big).block_until_ready(), big.nbytes / 1e9, steps),
    }


def torch_limits(steps: int = 20, m: int = 256, k: int = 768, n: int = 2048, mem_mb: int = 256):
    """The same three figures for torch (its own thread count)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
    a16, b16 = a.bfloat16(), b.bfloat16()
    big = torch.ones(mem_mb << 18)
    flops = 2.0 * m * k * n / 1e9
    with torch.no_grad():
        return {
            "matmul f32 GF/s": _rate(lambda: a @ b, flops, steps),
            "matmul bf16 GF/s": _rate(lambda: a16 @ b16, flops, steps),
            "memory GB/s": _rate(lambda: float(big.sum()), big.numel() * 4 / 1e9, steps),
        }
