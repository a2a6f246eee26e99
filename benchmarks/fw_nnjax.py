"""nnjax: models composed from ``nj`` layers, trained by ``nnjax.training.trainer.trainer``.

The per-step variant calls ``trainer(...).step`` once per optimizer step; the
fused variant builds the trainer with ``steps_per_call=k`` and feeds batches
stacked ``(k, B, ...)``, so one call runs ``k`` steps in a ``lax.scan``. The
GPT stacks its blocks with ``nj.repeat`` (one scanned block; ``stack="unrolled"``
gives a ``serial`` of separate blocks instead).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from benchmarks.workloads import (
    LEARNING_RATE,
    LN_EPSILON,
    Bench,
    Config,
    UnavailableError,
    carry_bench,
    make_batch,
    make_batches,
)

try:  # nnjax is written alongside this suite: a missing piece is a skip, not a crash
    import nnjax as nj
    import nnjax.sharding  # makes nj.sharding available
    from nnjax.training.losses import softmax_cross_entropy
    from nnjax.training.trainer import trainer

    _MISSING = None
except ImportError as err:  # pragma: no cover - depends on the checkout
    _MISSING = str(err)

__all__ = ["build", "model", "gpt"]


def _require(*names: str) -> None:
    if _MISSING is not None:
        raise UnavailableError(f"nnjax incomplete: {_MISSING}")
    missing = [n for n in names if not hasattr(nj, n)]
    if missing:
        raise UnavailableError(f"nnjax has no {', '.join(missing)} yet")


def gpt(cfg: Config, *, stack: str = "repeat", layers: int | None = None) -> Any:
    """The GPT as an nnjax layer: ``(B, T) int -> (B, T, vocab)``.

    ``stack``: ``"repeat"`` (blocks stacked under ``blocks/stacked``, one ``lax.scan``)
    or ``"unrolled"`` (``blocks/block_0 ... block_{n-1}``).
    """
    _require("Embedding", "LearnedPositionalEmbedding", "TransformerBlock", "repeat", "LayerNorm")
    n = cfg.layers if layers is None else layers
    block = lambda: nj.TransformerBlock(cfg.heads, causal=True, epsilon=LN_EPSILON)
    if stack == "repeat":
        blocks = nj.repeat(block(), n)
    elif stack == "unrolled":
        blocks = nj.serial(*[block() for _ in range(n)])
    else:
        raise ValueError(f"stack must be 'repeat' or 'unrolled', got {stack!r}")
    normal = jax.nn.initializers.normal(0.02)
    return nj.serial(
        embed=nj.Embedding(cfg.vocab, cfg.width, embedding_init=normal),
        pos=nj.LearnedPositionalEmbedding(cfg.context),
        blocks=blocks,
        ln_f=nj.LayerNorm(epsilon=LN_EPSILON),
        head=nj.Dense(cfg.vocab),
    )


def model(workload: str, cfg: Config, *, stack: str = "repeat") -> Any:
    """The workload's model as an nnjax layer (images channels-last); ``stack``: see :func:`gpt`."""
    relu = jax.nn.relu
    if workload == "tiny-mlp":
        _require("Dense", "serial")
        body = []
        for width in cfg.features[1:-1]:
            body += [nj.Dense(width), relu]
        return nj.serial(*body, nj.Dense(cfg.features[-1]))
    if workload == "lenet-cnn":
        _require("Conv", "AvgPool", "Flatten", "Dense", "serial")
        return nj.serial(
            nj.Conv(6, (5, 5), padding="SAME"),
            relu,
            nj.AvgPool((2, 2)),
            nj.Conv(16, (5, 5), padding="VALID"),
            relu,
            nj.AvgPool((2, 2)),
            nj.Flatten(),
            nj.Dense(120),
            relu,
            nj.Dense(84),
            relu,
            nj.Dense(cfg.classes),
        )
    return gpt(cfg, stack=stack)


def build(
    workload: str,
    cfg: Config,
    *,
    fused: int = 0,
    stack: str = "repeat",
    onednn: bool = False,
    data_parallel: bool = False,
) -> Bench:
    """``onednn``: the train step compiled with ``nj.ONEDNN_DOTS`` (matmuls through oneDNN).

    ``data_parallel``: the batch split over every device of the default backend
    (``nj.sharding`` data-parallel rules; params replicated, gradients averaged by
    XLA), e.g. the CPU devices of ``jax_num_cpu_devices``.
    """
    devices = jax.devices()
    if data_parallel and len(devices) < 2:
        raise UnavailableError("one device; on CPU run with --cpu-devices 2 or more")
    net = model(workload, cfg, stack=stack)
    x, y = make_batch(workload, cfg)
    params, state = jax.jit(net.init)(jax.random.key(0), jnp.asarray(x))
    tr = trainer(
        net,
        softmax_cross_entropy,
        optax.adam(LEARNING_RATE),
        steps_per_call=max(fused, 1),
        compiler_options=nj.ONEDNN_DOTS if onednn else None,
    )
    if fused:
        x, y = make_batches(workload, cfg, fused)
    batch = (jnp.asarray(x), jnp.asarray(y))
    ts = tr.init(params, state)
    note = ""
    if data_parallel:
        mesh = nj.sharding.mesh({"data": -1})
        ts = nj.sharding.shard_train_state(ts, mesh, nj.sharding.data_parallel_rules())
        batch = nj.sharding.shard_batch(batch, mesh, dim=1 if fused else 0)
        note = f"batch split over {len(devices)} {devices[0].platform} devices (data parallel)"
    step = tr.step

    def call(ts):
        ts, metrics = step(ts, batch)
        return ts, metrics["loss"]

    n_params = int(sum(a.size for a in jax.tree.leaves(params)))
    return carry_bench(call, ts, n_params, max(fused, 1), note)
