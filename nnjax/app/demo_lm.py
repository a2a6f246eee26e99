"""The demo's text story: a byte-level language model pretrained on Python's source, then
taught Python's documentation.

Everything comes from the running Python: the pretraining corpus is the standard
library's own ``.py`` files (written to a nanoGPT-style token file and read back
through ``nj.data.token_batches``); the new domain is the reference documentation
``help()`` shows (``pydoc_data.topics``), as ``{"prompt": "help('topic')", "response":
text}`` records packed by ``nj.data.instruct_batches`` with the loss on the text
only. One topic in five is held out. The table gives, per method, trainable
parameters, optimizer-state and saved-file bytes, step time, and perplexity per
byte on the held-out documentation (what fine-tuning buys) and on held-out source
code (what it forgets).
"""

from __future__ import annotations

import glob
import math
import os
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

__all__ = ["LMSizes", "code_corpus", "doc_records", "run"]


class LMSizes(NamedTuple):
    """The language model's sizes: the full demo's, or ``quick``'s."""

    hidden_size: int = 64
    num_layers: int = 2
    seq_len: int = 64
    batch_size: int = 16
    code_bytes: int = 600_000
    pretrain_steps: int = 400
    finetune_steps: int = 150
    eval_rows: int = 32
    lora_rank: int = 8
    learning_rate: float = 3e-3
    finetune_learning_rate: float = 1e-3


QUICK = LMSizes(code_bytes=150_000, pretrain_steps=120, finetune_steps=40)


def code_corpus(max_bytes: int) -> bytes:
    """The first ``max_bytes`` of the standard library's top-level ``.py`` files, in name order."""
    out, size = [], 0
    for path in sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py"))):
        with open(path, "rb") as f:
            data = f.read()
        out.append(data)
        size += len(data)
        if size >= max_bytes:
            break
    return b"".join(out)[:max_bytes]


def doc_records() -> tuple[list[dict], list[dict]]:
    """``help()``'s documentation topics as records: ``(train, held out)`` (one in five)."""
    from pydoc_data.topics import topics

    records = [
        {"prompt": f"help({name!r})\n", "response": text} for name, text in sorted(topics.items())
    ]
    return [r for i, r in enumerate(records) if i % 5], records[::5]


def _loss(logits, targets):
    return nj.losses.softmax_cross_entropy(logits, targets, ignore_index=nj.data.IGNORE_INDEX)


def _train(tr, ts, data, steps: int, desc: str, progress: bool) -> tuple[Any, list[float]]:
    """``steps`` steps over ``data`` with a labelled bar; ``(ts, ms of each step after the first)``."""
    times = []
    bar = tqdm(total=steps, desc=desc, disable=not progress)
    for i, batch in zip(range(steps), data, strict=False):
        t0 = time.perf_counter()
        ts, metrics = tr.step(ts, batch, jax.random.key(i))
        jax.block_until_ready(metrics)
        if i:
            times.append((time.perf_counter() - t0) * 1e3)
        bar.update(1)
        bar.set_postfix(loss=f"{float(metrics['loss']):.3f}", refresh=False)
    bar.close()
    return ts, times


def _as_packed(x: np.ndarray, y: np.ndarray) -> tuple[dict, np.ndarray]:
    """Plain windows as one-segment packed rows, so one compiled evaluation serves both."""
    rows = {
        "ids": x.astype(np.int32),
        "positions": np.broadcast_to(np.arange(x.shape[1], dtype=np.int32), x.shape),
        "segment_ids": np.ones(x.shape, np.int32),
    }
    return rows, y.astype(np.int32)


def _plain(params: Any) -> Any:
    """Float params without adapters, for the one compiled evaluation."""
    if hasattr(finetune, "dequantize"):
        params = finetune.dequantize(params)
    return finetune.merge_adapters(params)


class _Method(NamedTuple):
    name: str
    params: Any
    mask: Any


def _methods(pretrained: Any, sz: LMSizes) -> list[_Method]:
    targets = ["blocks/*/attn/*/kernel", "blocks/*/mlp/*/kernel"]
    lora, lora_mask = finetune.add_lora(pretrained, jax.random.key(1), targets, rank=sz.lora_rank)
    out = [
        _Method("full fine-tune", pretrained, None),
        _Method(f"LoRA r={sz.lora_rank}", lora, lora_mask),
    ]
    if hasattr(finetune, "quantize"):
        q = finetune.quantize(pretrained, targets, bits=8)
        q_lora, q_mask = finetune.add_lora(q, jax.random.key(1), targets, rank=sz.lora_rank)
        out.append(_Method(f"LoRA r={sz.lora_rank} on an int8 base", q_lora, q_mask))
    return out


class _Corpora(NamedTuple):
    """The story's data: the pretraining token file and the two held-out evaluations."""

    code_bin: str  # nanoGPT-style token file of the first 90% of the code
    code_train_bytes: int
    train_docs: list[dict]
    held_docs: list[dict]
    doc_eval: tuple[dict, np.ndarray]  # packed rows of held-out help() topics
    code_eval: tuple[dict, np.ndarray]  # the last 10% of the code, as packed rows


def _corpora(cfg: Any, sz: LMSizes, tok: Any) -> _Corpora:
    code = np.frombuffer(code_corpus(sz.code_bytes), np.uint8)
    split = int(0.9 * len(code))
    code_bin = os.path.join(cfg.out, "stdlib_code.bin")
    nj.data.write_tokens(code_bin, code[:split])
    train_docs, held_docs = doc_records()
    doc_eval = nj.data.load_instruct(held_docs, tok, sz.seq_len, overflow="split")
    doc_eval = jax.tree.map(lambda a: a[: sz.eval_rows], doc_eval)
    code_eval = _as_packed(*next(nj.data.lm_batches(code[split:], sz.seq_len, sz.eval_rows, 1)))
    return _Corpora(code_bin, split, train_docs, held_docs, doc_eval, code_eval)


def _row(method: str, ppl: tuple[float, float], **cost: Any) -> dict:
    """One table row; ``cost`` overrides the zero cost of the pretrained model's row."""
    zero = {"trainable": 0, "opt_state_bytes": 0, "checkpoint_bytes": 0, "step_ms": 0.0}
    return {"method": method, **zero, **cost, "doc_ppl": ppl[0], "code_ppl": ppl[1]}


def run(
    cfg: Any, print_fn: Callable[[str], Any] = print, sizes: LMSizes | None = None
) -> list[dict]:
    """The text story (``cfg`` is the demo's :class:`~nnjax.app.demo.DemoConfig`); returns its rows.

    Each row: ``method``, ``trainable``, ``opt_state_bytes``, ``checkpoint_bytes``,
    ``step_ms`` (the fastest step after compilation: other work only adds time),
    ``doc_ppl`` and ``code_ppl`` (perplexity per byte on held-out documentation and
    source code). ``sizes`` overrides the
    sizes ``cfg.quick_lm`` picks.
    """
    sz = sizes or (QUICK if cfg.quick_lm else LMSizes())
    tok = nj.data.ByteTokenizer()
    data = _corpora(cfg, sz, tok)
    lm_cfg = nj.models.CausalLMConfig(
        vocab_size=tok.vocab_size,
        hidden_size=sz.hidden_size,
        num_layers=sz.num_layers,
        num_heads=4,
        mlp_hidden=sz.hidden_size * 8 // 3,
        max_position=sz.seq_len,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = nj.models.CausalLM(lm_cfg)

    @jax.jit
    def eval_loss(params, batch):
        return _loss(model.apply(params, {}, batch[0])[0], batch[1])

    def ppl(params) -> tuple[float, float]:
        p = _plain(params)
        return math.exp(eval_loss(p, data.doc_eval)), math.exp(eval_loss(p, data.code_eval))

    params, _ = model.init(jax.random.key(cfg.seed), data.doc_eval[0])
    print_fn(
        f"      pretrain a {nj.count_params(params):,}-parameter byte-level model on "
        f"{data.code_train_bytes:,} bytes of the standard library's source"
    )
    tr = nj.trainer(model, _loss, optax.adamw(sz.learning_rate, weight_decay=0.0))
    tokens = nj.data.token_batches(data.code_bin, sz.seq_len, sz.batch_size, cfg.seed)
    ts, _ = _train(
        tr, tr.init(params), tokens, sz.pretrain_steps, "pretrain LM on code", cfg.progress
    )
    print_fn(
        f"      then teach it help()'s documentation: {len(data.train_docs)} topics "
        f"({len(data.held_docs)} held out)"
    )
    rows = [_row("pretrained, not fine-tuned", ppl(ts.params))]
    for k, m in enumerate(_methods(ts.params, sz)):
        rows.append(_finetune(model, m, data, sz, cfg, ppl, k))
    text = format_table(rows)
    print_fn(text)
    with open(os.path.join(cfg.out, "results_lm.md"), "w") as f:
        f.write("```\n" + text + "\n```\n")
    _plot(rows, os.path.join(cfg.out, "perplexity.png"))
    return rows


def _finetune(
    model: nj.Layer,
    m: _Method,
    data: _Corpora,
    sz: LMSizes,
    cfg: Any,
    ppl: Callable[[Any], tuple[float, float]],
    k: int,
) -> dict:
    """Fine-tune the pretrained model by method ``m`` on the docs; its table row."""
    opt = optax.adamw(sz.finetune_learning_rate, weight_decay=0.0)
    tr = nj.trainer(model, _loss, opt, trainable=m.mask)
    docs = nj.data.instruct_batches(
        data.train_docs,
        nj.data.ByteTokenizer(),
        sz.seq_len,
        sz.batch_size,
        overflow="split",
        seed=cfg.seed,
        epochs=None,
    )
    ts, times = _train(
        tr, tr.init(m.params), docs, sz.finetune_steps, f"fine-tune LM: {m.name}", cfg.progress
    )
    saved = saved_bytes(ts.params, m.mask, os.path.join(cfg.out, f"lm_finetune_{k}.safetensors"))
    mask = m.mask if m.mask is not None else finetune.mask(ts.params)
    return _row(
        m.name,
        ppl(ts.params),
        trainable=finetune.trainable_count(ts.params, mask),
        opt_state_bytes=param_bytes(ts.opt_state),
        checkpoint_bytes=saved,
        step_ms=min(times),
    )


def format_table(rows: list[dict]) -> str:
    """The text story's table."""
    header = [*COST_HEADER, "step ms", "docs ppl", "code ppl"]
    body = [
        [*cost_cells(r, f"{r['step_ms']:.1f}"), f"{r['doc_ppl']:.2f}", f"{r['code_ppl']:.2f}"]
        for r in rows
    ]
    note = (
        "perplexity per byte on held-out help() topics (docs) and held-out stdlib source "
        "(code); lower is better"
    )
    return table(header, body, align="lrrrrrr") + "\n" + note


def _plot(rows: list[dict], path: str) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["doc_ppl"] for r in rows], 0.4, label="held-out docs (the new domain)")
    ax.bar(x + 0.2, [r["code_ppl"] for r in rows], 0.4, label="held-out code (pretraining)")
    ax.set_xticks(x, [r["method"] for r in rows], rotation=10, fontsize=8)
    ax.set(ylabel="perplexity per byte", title="byte-level LM: pretrained on code, taught docs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
