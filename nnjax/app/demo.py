"""``nnjax demo``: pretrain a CNN, fine-tune it three ways, and compare.

Offline and CPU-sized: scikit-learn's bundled 8x8 digits. A CNN is pretrained
on digits 0-4; then a 5-class head learns digits 5-9 from a few examples per
class, four ways: from scratch (the reference), full fine-tuning, a frozen
backbone with a new head, and LoRA on the backbone's Dense plus the new head.
Each row of the table reports trainable parameters, optimizer-state bytes,
median step time, test accuracy and final loss; the checkpoints and a plot of
the loss curves go to an output folder.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

import nnjax as nj
from nnjax import finetune

__all__ = ["DemoConfig", "run", "cnn"]


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo; ``quick()`` is the CI smoke run."""

    out: str = "nnjax-demo"
    pretrain_steps: int = 400
    finetune_steps: int = 200
    shots_per_class: int = 30
    batch_size: int = 64
    lora_rank: int = 4
    learning_rate: float = 1e-3
    finetune_learning_rate: float = 3e-3
    timing_steps: int = 30
    seed: int = 0
    progress: bool = True

    def quick(self) -> DemoConfig:
        return dataclasses.replace(self, pretrain_steps=40, finetune_steps=20, timing_steps=5)


def cnn(num_classes: int) -> nj.Layer:
    """``(B, 8, 8, 1) -> (B, num_classes)``: two 3x3 convs, a max-pool, a Dense backbone, a head."""
    relu = jax.nn.relu
    backbone = nj.serial(
        nj.Conv(32, (3, 3)),
        relu,
        nj.Conv(32, (3, 3)),
        relu,
        nj.MaxPool((2, 2)),
        nj.Flatten(),
        nj.Dense(128),
        relu,
    )
    return nj.serial(backbone=backbone, head=nj.Dense(num_classes))


def _loss(logits, labels):
    return nj.losses.softmax_cross_entropy(logits, labels)


def _tree_bytes(tree: Any) -> int:
    return int(sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree)))


def _median_step_ms(tr: nj.Trainer, ts: nj.TrainState, batch: Any, n: int) -> float:
    rng = jax.random.key(0)
    ts, _ = tr.step(ts, batch, rng)  # compiled already; one more to settle
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        ts, metrics = tr.step(ts, batch, rng)
        jax.block_until_ready(metrics)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _split_digits(cfg: DemoConfig):
    x, y = nj.data.load_digits()
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(y))
    x, y = x[order], y[order]
    old, new = y < 5, y >= 5
    pre = nj.data.train_test_split((x[old], y[old]), 0.2, seed=cfg.seed)
    xn, yn = x[new], y[new] - 5
    shots = np.concatenate([np.flatnonzero(yn == c)[: cfg.shots_per_class] for c in range(5)])
    rest = np.setdiff1d(np.arange(len(yn)), shots)
    return pre, ((xn[shots], yn[shots]), (xn[rest], yn[rest]))


def _train(tr, ts, data, steps, cfg, desc):
    batches = nj.data.batches(data, min(cfg.batch_size, len(data[1])), seed=cfg.seed, epochs=None)
    ts, history = nj.fit(
        tr, ts, batches, steps=steps, log_every=max(1, steps // 20), progress=cfg.progress
    )
    del desc
    return ts, history


def run(cfg: DemoConfig = DemoConfig(), print_fn: Callable[[str], Any] = print) -> list[dict]:
    """Run the demo; returns the table's rows (also printed and saved under ``cfg.out``)."""
    os.makedirs(cfg.out, exist_ok=True)
    key = jax.random.key(cfg.seed)
    k_pre, k_head, k_scratch, k_lora = jax.random.split(key, 4)
    (pre_train, pre_test), (ft_train, ft_test) = _split_digits(cfg)
    x_spec = jax.ShapeDtypeStruct((1, 8, 8, 1), np.float32)

    print_fn(f"[1/2] pretraining a CNN on digits 0-4 ({len(pre_train[1])} images)")
    source = cnn(5)
    params, state = source.init(k_pre, x_spec)
    tr = nj.trainer(source, _loss, optax.adam(cfg.learning_rate), metrics=(nj.metrics.accuracy,))
    ts, pre_history = _train(
        tr, tr.init(params, state), pre_train, cfg.pretrain_steps, cfg, "pretrain"
    )
    pre_acc = nj.evaluate_dataset(tr, ts, [pre_test])["accuracy"]
    pretrained = ts.params
    nj.checkpoint.save_params(os.path.join(cfg.out, "pretrained.safetensors"), pretrained)
    print_fn(f"      pretrained test accuracy on 0-4: {pre_acc:.3f}")

    # Every fine-tuning run gets the same new head for digits 5-9.
    target = cnn(5)
    new_head = finetune.replace_head(
        pretrained, k_head, nj.Dense(5), jax.ShapeDtypeStruct((1, 128), np.float32)
    )
    lora_params, lora_mask = finetune.add_lora(
        new_head, k_lora, ["backbone/dense_0/kernel"], rank=cfg.lora_rank
    )
    scratch, _ = target.init(k_scratch, x_spec)
    runs = {
        "from scratch": (scratch, None),
        "full fine-tune": (new_head, None),
        "frozen backbone + new head": (new_head, finetune.head_only(new_head)),
        f"LoRA r={cfg.lora_rank} + new head": (
            lora_params,
            finetune.union(lora_mask, finetune.head_only(lora_params)),
        ),
    }
    n_shots = len(ft_train[1])
    print_fn(
        f"[2/2] fine-tuning on digits 5-9 from {n_shots} images ({cfg.shots_per_class} per class)"
    )
    rows, histories = [], {}
    for name, (p, mask) in runs.items():
        tr = nj.trainer(
            target,
            _loss,
            optax.adam(cfg.finetune_learning_rate),
            trainable=mask,
            metrics=(nj.metrics.accuracy,),
        )
        ts = tr.init(p, {})
        opt_bytes = _tree_bytes(ts.opt_state)
        ts, history = _train(tr, ts, ft_train, cfg.finetune_steps, cfg, name)
        acc = nj.evaluate_dataset(tr, ts, [ft_test])["accuracy"]
        histories[name] = history["loss"]
        file = os.path.join(cfg.out, f"finetune_{len(rows)}.safetensors")
        if mask is None:
            nj.checkpoint.save_params(file, ts.params)
            size = os.path.getsize(file)
        else:
            size = finetune.save_adapters(file, ts.params, trainable=mask)
        step_ms = _median_step_ms(
            tr, ts, (ft_train[0][: cfg.batch_size], ft_train[1][: cfg.batch_size]), cfg.timing_steps
        )
        rows.append(
            {
                "method": name,
                "trainable": nj.count_params(p)
                if mask is None
                else finetune.trainable_count(p, mask),
                "opt_state_bytes": opt_bytes,
                "step_ms": step_ms,
                "test_accuracy": acc,
                "final_loss": float(np.mean(history["loss"][-10:])),
                "checkpoint_bytes": size,
            }
        )
    table = format_table(rows)
    print_fn(table)
    with open(os.path.join(cfg.out, "results.md"), "w") as f:
        f.write(table + "\n")
    plot = _plot(histories, pre_history["loss"], os.path.join(cfg.out, "loss_curves.png"))
    print_fn(
        f"saved checkpoints, results.md{' and loss_curves.png' if plot else ''} under {os.path.abspath(cfg.out)}"
    )
    return rows


def format_table(rows: list[dict]) -> str:
    header = (
        "method",
        "trainable params",
        "optimizer state",
        "saved file",
        "step ms",
        "test acc",
        "final loss",
    )
    body = [
        (
            r["method"],
            f"{r['trainable']:,}",
            f"{r['opt_state_bytes']:,} B",
            f"{r['checkpoint_bytes']:,} B",
            f"{r['step_ms']:.2f}",
            f"{r['test_accuracy']:.3f}",
            f"{r['final_loss']:.4f}",
        )
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]
    line = lambda cells: (
        "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"
    )
    return "\n".join(
        [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)]
    )


def _plot(histories: dict[str, list[float]], pretrain: list[float], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    ax0.plot(pretrain)
    ax0.set(title="pretraining on digits 0-4", xlabel="step", ylabel="loss", yscale="log")
    for name, losses in histories.items():
        ax1.plot(losses, label=name)
    ax1.set(title="fine-tuning on digits 5-9", xlabel="step", ylabel="loss", yscale="log")
    ax1.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
