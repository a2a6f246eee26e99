"""``nnjax demo``: what fine-tuning buys, measured.

Offline and CPU-sized. **Images**: a small CNN is pretrained on clean images of
half of scikit-learn's bundled 8x8 digits. The new task is the other half as a
worse scanner would give them (faint: contrast 0.6, and noisy: Gaussian noise of
standard deviation 0.2), from a few labelled examples per class. Five ways to
meet it: train from scratch (the reference), use the pretrained model as it is,
fine-tune all of it, fine-tune its head only, or LoRA on its Dense plus the head.
Each is run over several seeds (the labelled examples, the adapters' init and
the batch order change with the seed) at several label counts; the table gives
test accuracy as mean ± standard deviation over seeds, trainable parameters,
optimizer-state and saved-file bytes, compile time and step time (measured after
compilation, the methods timed in turn). **Text** (:mod:`nnjax.app.demo_lm`, when
``nj.models.CausalLM`` is available): a byte-level language model pretrained on
Python's own source files, then fine-tuned on Python's documentation fully and with LoRA
(and with LoRA on an 8-bit base when ``nj.finetune.quantize`` is available);
perplexity on held-out documentation before and after.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from tqdm.auto import tqdm

import nnjax as nj
from nnjax import finetune
from nnjax.app.demo_common import COST_HEADER, cost_cells, pyplot, saved_bytes
from nnjax.core.report import param_bytes, table

__all__ = ["DemoConfig", "run", "cnn", "format_table", "noisy_scan"]


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo; ``quick()`` is the CI smoke run.

    Attributes:
        shots: labelled examples per class of the new task, one point of the plot each.
        seeds: runs per method and label count (mean ± std over them).
        scratch_learning_rate: from scratch learns best at a higher rate than the
            pretrained methods (both measured on this task; each gets its better one).
        language_model: also run the text story (needs ``nj.models.CausalLM``).
    """

    out: str = "nnjax-demo"
    pretrain_steps: int = 300
    finetune_steps: int = 60
    shots: tuple[int, ...] = (1, 3, 10)
    seeds: int = 5
    batch_size: int = 32
    lora_rank: int = 4
    learning_rate: float = 1e-3
    finetune_learning_rate: float = 1e-3
    scratch_learning_rate: float = 3e-3
    timing_steps: int = 20
    seed: int = 0
    progress: bool = True
    language_model: bool = True
    quick_lm: bool = False

    def quick(self) -> DemoConfig:
        return dataclasses.replace(
            self,
            pretrain_steps=150,
            finetune_steps=40,
            shots=(1, 10),
            seeds=3,
            timing_steps=5,
            quick_lm=True,
        )


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


def noisy_scan(
    x: np.ndarray, seed: int = 0, contrast: float = 0.6, noise: float = 0.2
) -> np.ndarray:
    """Images as a worse scanner gives them: ``clip(contrast * x + N(0, noise**2), 0, 1)``."""
    rng = np.random.default_rng(seed)
    return np.clip(contrast * x + rng.normal(0, noise, x.shape), 0, 1).astype(np.float32)


def _split_digits(seed: int):
    """Half the digits, clean, for pretraining (train/test); the other half, scanned
    badly, as a pool to draw labelled examples from and a test set."""
    x, y = nj.data.load_digits()
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order], y[order]
    half = len(y) // 2
    pre = nj.data.train_test_split((x[:half], y[:half]), 0.2, seed=seed)
    new = (noisy_scan(x[half:], seed), y[half:])
    pool, test = nj.data.train_test_split(new, 0.5, seed=seed)
    return pre, pool, test


def _labelled(pool, shots: int, seed: int):
    """``shots`` examples per class of the pool, drawn by ``seed``."""
    x, y = pool
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    pick = np.concatenate(
        [rng.choice(np.flatnonzero(y == c), shots, replace=False) for c in classes]
    )
    return x[pick], y[pick]


def _sampled_batches(data, steps: int, cfg: DemoConfig, seed: int):
    """``steps`` batches of ``batch_size`` examples drawn with replacement.

    Drawing with replacement keeps one batch shape at every label count, so each
    method compiles once.
    """
    x, y = data
    idx = np.random.default_rng(seed).integers(0, len(y), (steps, cfg.batch_size))
    return [(x[i], y[i]) for i in idx]


class Method(NamedTuple):
    """One way to meet the new task: its trainer, its start params per seed, its mask."""

    name: str
    tr: nj.TrainerFunctions
    make: Callable[[jax.Array], Any]
    mask: Any
    train: bool = True


def _methods(pretrained: Any, cfg: DemoConfig) -> list[Method]:
    model = cnn(10)
    x_spec = jax.ShapeDtypeStruct((1, 8, 8, 1), np.float32)
    lora_target = ["backbone/dense_0/kernel"]

    def lora(key):
        return finetune.add_lora(pretrained, key, lora_target, rank=cfg.lora_rank)[0]

    lora_probe = lora(jax.random.key(0))
    specs = [
        ("from scratch", lambda key: model.init(key, x_spec)[0], None, cfg.scratch_learning_rate),
        ("pretrained, not fine-tuned", lambda key: pretrained, None, 0.0),
        ("full fine-tune", lambda key: pretrained, None, cfg.finetune_learning_rate),
        (
            "head only",
            lambda key: pretrained,
            finetune.head_only(pretrained),
            cfg.finetune_learning_rate,
        ),
        (
            f"LoRA r={cfg.lora_rank} + head",
            lora,
            finetune.union(finetune.adapter_mask(lora_probe), finetune.head_only(lora_probe)),
            cfg.finetune_learning_rate,
        ),
    ]
    return [
        Method(
            name,
            nj.trainer(
                model, _loss, optax.adam(lr), trainable=mask, metrics=(nj.metrics.accuracy,)
            ),
            make,
            mask,
            lr > 0,
        )
        for name, make, mask, lr in specs
    ]


def _pretrain(cfg: DemoConfig, data, print_fn) -> Any:
    source = cnn(10)
    x_spec = jax.ShapeDtypeStruct((1, 8, 8, 1), np.float32)
    params, state = source.init(jax.random.key(cfg.seed), x_spec)
    opt = optax.adam(cfg.learning_rate)
    tr = nj.trainer(source, _loss, opt, metrics=(nj.metrics.accuracy,))
    ts = tr.init(params, state)
    bar = tqdm(
        total=cfg.pretrain_steps, desc="pretrain CNN on clean digits", disable=not cfg.progress
    )
    for i, batch in enumerate(_sampled_batches(data[0], cfg.pretrain_steps, cfg, cfg.seed)):
        ts, _ = tr.step(ts, batch, jax.random.key(i))
        bar.update(1)
    bar.close()
    acc = float(tr.evaluate(ts, data[1])["accuracy"])
    print_fn(f"      pretrained test accuracy on clean digits: {acc:.3f}")
    return ts.params


def _fit_once(m: Method, data, cfg: DemoConfig, seed: int, bar) -> tuple[Any, float, float]:
    """Fine-tune one seed; ``(ts, seconds of the first step, seconds of the others)``."""
    ts = m.tr.init(m.make(jax.random.key(seed)))
    if not m.train:
        return ts, 0.0, 0.0
    first = rest = 0.0
    for i, batch in enumerate(_sampled_batches(data, cfg.finetune_steps, cfg, seed)):
        t0 = time.perf_counter()
        ts, metrics = m.tr.step(ts, batch, jax.random.key(1000 * seed + i))
        jax.block_until_ready(metrics)
        if i == 0:
            first = time.perf_counter() - t0
        else:
            rest += time.perf_counter() - t0
        bar.update(1)
    return ts, first, rest


def _step_ms(
    methods: list[Method], states: dict[str, Any], batch, cfg: DemoConfig
) -> dict[str, float]:
    """Fastest ms per step, compiled already, the methods timed in turn.

    Taking turns keeps a busy moment of the machine from falling on one method
    alone, and the fastest of ``timing_steps`` is the step's own cost (other work
    on the machine only ever adds time): with the median, two identical models
    differed by 1.7x on a shared 2-core machine.
    """
    times: dict[str, list[float]] = {m.name: [] for m in methods if m.train}
    for _ in range(cfg.timing_steps):
        for m in methods:
            if m.train:
                t0 = time.perf_counter()
                states[m.name], metrics = m.tr.step(states[m.name], batch, jax.random.key(0))
                jax.block_until_ready(metrics)
                times[m.name].append((time.perf_counter() - t0) * 1e3)
    return {name: min(t) for name, t in times.items()}


def _run_method(m: Method, pool, test, cfg: DemoConfig, index: int) -> tuple[dict, Any]:
    runs = len(cfg.shots) * cfg.seeds * cfg.finetune_steps if m.train else 0
    bar = tqdm(total=runs, desc=f"fine-tune: {m.name}", disable=not (cfg.progress and m.train))
    acc: dict[int, list[float]] = {}
    firsts, rests = [], []
    for shots in cfg.shots:
        for s in range(cfg.seeds):
            seed = cfg.seed + 1 + s
            ts, first, rest = _fit_once(m, _labelled(pool, shots, seed), cfg, seed, bar)
            acc.setdefault(10 * shots, []).append(float(m.tr.evaluate(ts, test)["accuracy"]))
            firsts.append(first)
            rests.append(rest)
    bar.close()
    mask = m.mask if m.mask is not None else finetune.mask(ts.params)
    out = os.path.join(cfg.out, f"finetune_{index}.safetensors")
    row = {
        "method": m.name,
        "trainable": finetune.trainable_count(ts.params, mask) if m.train else 0,
        "opt_state_bytes": param_bytes(ts.opt_state) if m.train else 0,
        "checkpoint_bytes": saved_bytes(ts.params, m.mask, out) if m.train else 0,
        "compile_s": firsts[0],
        "train_s": statistics.median(rests),
        "accuracy": acc,
    }
    return row, ts


def run(cfg: DemoConfig = DemoConfig(), print_fn: Callable[[str], Any] = print) -> list[dict]:
    """Run the demo; returns the image table's rows (also printed and saved under ``cfg.out``).

    Each row: ``method``, ``trainable`` (parameters), ``opt_state_bytes``,
    ``checkpoint_bytes`` (what saving the result writes: every param, or only the
    trained ones), ``compile_s`` (first step), ``step_ms`` (fastest after
    compilation), ``train_s`` (median seconds of one fine-tuning run, compilation
    excluded), and ``accuracy``: ``{labelled examples: [test accuracy per seed]}``.
    """
    os.makedirs(cfg.out, exist_ok=True)
    pre, pool, test = _split_digits(cfg.seed)
    stories = 2 if cfg.language_model and _lm_available() else 1
    print_fn(f"[1/{stories}] images: pretrain a CNN on {len(pre[0][1])} clean 8x8 digits")
    pretrained = _pretrain(cfg, pre, print_fn)
    nj.checkpoint.save_params(os.path.join(cfg.out, "pretrained.safetensors"), pretrained)
    labels = ", ".join(str(10 * s) for s in cfg.shots)
    print_fn(
        f"      new task: faint, noisy scans of other digits, from {labels} labelled images "
        f"({cfg.seeds} seeds each); tested on {len(test[1])} more"
    )
    methods = _methods(pretrained, cfg)
    rows, last = [], {}
    for k, m in enumerate(methods):
        row, last[m.name] = _run_method(m, pool, test, cfg, k)
        rows.append(row)
    batch = _sampled_batches(_labelled(pool, cfg.shots[-1], 0), 1, cfg, 0)[0]
    step_ms = _step_ms(methods, last, batch, cfg)
    for r in rows:
        r["step_ms"] = step_ms.get(r["method"], 0.0)
    text = format_table(rows)
    print_fn(text)
    with open(os.path.join(cfg.out, "results.md"), "w") as f:
        f.write("```\n" + text + "\n```\n")
    plot = _plot(rows, os.path.join(cfg.out, "accuracy.png"))
    if stories == 2:
        from nnjax.app import demo_lm

        print_fn("[2/2] text: a byte-level language model pretrained on Python's own source")
        demo_lm.run(cfg, print_fn)
    elif cfg.language_model:
        print_fn("(the text story needs nj.models.CausalLM, which this nnjax does not have)")
    print_fn(
        f"saved checkpoints, results.md{' and accuracy.png' if plot else ''} "
        f"under {os.path.abspath(cfg.out)}"
    )
    return rows


def _lm_available() -> bool:
    return hasattr(nj.models, "CausalLM")


def _mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def format_table(rows: list[dict]) -> str:
    """The image story's table: one row per method, an accuracy column per label count."""
    labels = list(rows[0]["accuracy"])
    header = [*COST_HEADER, "compile s", "step ms", *[f"acc @ {n} labels" for n in labels]]
    body = [
        [
            *cost_cells(r, f"{r['compile_s']:.2f}", f"{r['step_ms']:.2f}"),
            *[_mean_std(r["accuracy"][n]) for n in labels],
        ]
        for r in rows
    ]
    seeds = len(rows[0]["accuracy"][labels[0]])
    note = (
        f"test accuracy on the noisy scans: mean ± std over {seeds} seeds; "
        "step ms: fastest of the timed steps, after compilation"
    )
    return table(header, body, align="lrrrrr" + "r" * len(labels)) + "\n" + note


def _plot(rows: list[dict], path: str) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in rows:
        n = list(r["accuracy"])
        mean = [np.mean(r["accuracy"][k]) for k in n]
        std = [np.std(r["accuracy"][k]) for k in n]
        ax.errorbar(n, mean, yerr=std, marker="o", capsize=3, label=r["method"])
    ax.set(
        title="noisy scans after pretraining on clean digits",
        xlabel="labelled examples of the new task",
        ylabel="test accuracy (mean ± std over seeds)",
        xscale="log",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
