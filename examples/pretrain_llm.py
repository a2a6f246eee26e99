"""Pretrain (or continue pretraining) a decoder language model on a token folder.

    python examples/pretrain_llm.py                                  # Tiny Shakespeare, bytes, minutes on a CPU
    python examples/pretrain_llm.py --preset nanogpt-char            # nanoGPT's shakespeare_char recipe
    python examples/pretrain_llm.py --data tokens/ --family qwen3 --hidden-size 512 --layers 8
    python examples/pretrain_llm.py --config my_config.json --data tokens/ --out runs/a
    python examples/pretrain_llm.py --smoke                          # tiny and quick (the CI run)

The recipe, step by step:

1. data: ``--data`` is a folder written by ``nnjax tokenize`` (``train.bin``,
   ``val.bin``, ``meta.json``), or a text file, tokenized into ``OUT/tokens`` with
   ``--tokenizer`` (``bytes``, ``chars``, or a folder with ``tokenizer.json``);
   default: Tiny Shakespeare beside the repository (a made-up text where absent);
2. model: a ``CausalLMConfig`` from ``--config`` (a JSON file of its fields) or a
   family (``--family llama``, ``gpt2``, ``qwen2``, ...; the shapes of that family's
   blocks) at the sizes of ``--preset`` and the size flags;
3. training: ``nj.fit`` over random windows of ``train.bin`` (resumable exactly), AdamW
   with linear warmup and cosine decay, gradient clipping, ``--accumulate`` micro-batches,
   bfloat16 compute (float32 master weights) where the devices multiply it fast (GPUs,
   TPUs, CPUs with AMX or AVX-512 BF16; ``--dtype`` chooses), ``--remat``, ``--unroll``
   blocks per iteration of the scan over blocks, an optional mesh
   (``--mesh data=2,model=2 --parallel tp``: data, FSDP or tensor parallel by
   ``nj.sharding``'s rules); on a CPU without ``--mesh``, one XLA device per core and
   the batch split over them (data parallel: XLA:CPU keeps one core and a half busy
   with one small computation; ``--mesh none`` runs on one device); a small model's
   data parallelism on a CPU runs as ``trainer(replicas=)`` (one flat all-reduce of
   the gradients a step); the train step and the evaluation compile from shapes alone
   on other threads while the text is tokenized and the params initialized;
4. every log line: the loss, tokens/s and model FLOPs utilisation (MFU: ``6N + 12LHQT``
   FLOPs per token, see ``nnjax.training.throughput``, over the device's peak; on a CPU
   the assumed peak is printed; ``--peak-tflops`` sets yours); every ``--eval-every``
   steps the validation loss and perplexity; ``OUT/logs/metrics.jsonl`` (and TensorBoard
   with ``--tensorboard``) as ``fit`` writes them, tokens/s and MFU in
   ``OUT/logs/throughput.jsonl``;
5. checkpoints in ``OUT/checkpoints`` every ``--checkpoint-every`` steps: run the same
   command again and it resumes where it stopped, with the losses of an uninterrupted
   run;
6. export: ``OUT/hf``, a Hugging Face folder (weights, config, tokenizer) that
   ``transformers.AutoModelForCausalLM`` and ``python -m nnjax.eval`` load.

On Linux the script starts itself again once with glibc's malloc in 2 MB pages
(``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``: XLA:CPU's per-step buffers then take few page
faults); ``NNJAX_NO_REEXEC=1`` stops that.

Several processes (hosts): start the same command on each, with ``--distributed``
(``jax.distributed.initialize()``: the coordinator address, process count and id come
from the environment on Cloud TPU and SLURM, else set ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``) and a mesh over every device (``--mesh
data=-1``); each process draws the same global batch and puts its own rows on its
devices (``nj.sharding.local_batch_slice`` + ``shard_batch``). Checkpoints and the
export are written by all processes together (``nj.checkpoint`` saves sharded states).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import shutil
import sys
import time
from typing import Any

HUGE_PAGES = "glibc.malloc.hugetlb=1"
if __name__ == "__main__" and sys.platform == "linux" and "NNJAX_NO_REEXEC" not in os.environ:
    # XLA:CPU allocates each step's large buffers afresh: with glibc's malloc in 2 MB
    # transparent huge pages a 124M step takes ~560 MB fewer page faults (docs/benchmarks.md).
    # The tunable is read at process start, so the script starts again once with it.
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" not in tunables:
        os.environ["GLIBC_TUNABLES"] = f"{tunables}:{HUGE_PAGES}" if tunables else HUGE_PAGES
        os.environ["NNJAX_NO_REEXEC"] = "1"
        os.execv(sys.executable, sys.orig_argv)  # the same interpreter flags and arguments

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import optax

import nnjax as nj
from nnjax.training import throughput
from nnjax.training.ahead import compile_beside

DEFAULT_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare/input.txt"

MODEL_KEYS = ("family", "hidden_size", "layers", "heads", "kv_heads", "mlp_hidden", "vocab_size")
PRESETS: dict[str, dict[str, Any]] = {
    # a few minutes on a 2-core CPU: Tiny Shakespeare as bytes, a 0.9M-param Llama
    "small": dict(
        family="llama", hidden_size=128, layers=4, heads=4, kv_heads=2, mlp_hidden=384,
        seq_len=128, batch_size=16, steps=600, lr=2e-3, min_lr=2e-4, warmup=50,
        eval_every=100, eval_batches=10, log_every=50, checkpoint_every=200, tokenizer="bytes",
    ),
    # nanoGPT's README CPU recipe for config/train_shakespeare_char.py (benchmarks/nanogpt_torch.py)
    "nanogpt-char": dict(
        family="gpt2", hidden_size=128, layers=4, heads=4, kv_heads=None, mlp_hidden=512,
        seq_len=64, batch_size=12, steps=2000, lr=1e-3, min_lr=1e-4, warmup=100, beta2=0.99,
        eval_every=250, eval_batches=4, final_eval_batches=40, eval_batch_size=60, log_every=250,
        checkpoint_every=1000, steps_per_call=25, unroll=4, tokenizer="chars",
    ),
    # GPT-2 small's sizes (width 768, 12 layers and heads, vocabulary 50,304 tied) in
    # Llama blocks: 124M params; for throughput
    "llama-124m": dict(
        family="llama", hidden_size=768, layers=12, heads=12, kv_heads=12, mlp_hidden=2048,
        vocab_size=50304, tie=True, seq_len=512, batch_size=4, steps=6, lr=6e-4, min_lr=6e-5,
        warmup=2, eval_every=0, eval_batches=2, log_every=2, checkpoint_every=0,
        tokenizer="bytes",
    ),
    # CI: seconds
    "smoke": dict(
        family="llama", hidden_size=32, layers=2, heads=4, kv_heads=2, mlp_hidden=64,
        seq_len=32, batch_size=4, steps=12, lr=3e-3, min_lr=3e-4, warmup=2, eval_every=6,
        eval_batches=2, log_every=3, checkpoint_every=6, tokenizer="bytes",
    ),
}  # fmt: skip
DEFAULTS = dict(
    kv_heads=None, vocab_size=None, tie=None, beta1=0.9, beta2=0.95, weight_decay=0.1, clip=1.0,
    accumulate=1, steps_per_call=1, unroll=None, final_eval_batches=None, eval_batch_size=None,
    dtype="auto", seed=1337,
)  # fmt: skip


# --- data ----------------------------------------------------------------------------


def made_text(n: int = 4000, seed: int = 0) -> str:
    """A play-like text made by code (where Tiny Shakespeare is absent)."""
    rng = np.random.default_rng(seed)
    who = ["KING", "QUEEN", "FOOL", "DUKE"]
    words = [
        "the",
        "king",
        "my",
        "lord",
        "night",
        "crown",
        "heart",
        "sea",
        "doth",
        "weep",
        "shall",
        "betray",
        "love",
        "fear",
    ]
    lines = [f"{rng.choice(who)}:\n" + " ".join(rng.choice(words, 8)) + ".\n" for _ in range(n)]
    return "\n".join(lines)


def data_source(args: argparse.Namespace) -> tuple[str, str | None, int]:
    """``(token folder or text file, tokenizer folder or None, vocabulary size)``.

    Nothing is tokenized yet (:func:`prepare_data` does that): the vocabulary is all the
    model needs, so the train step can compile while the text is tokenized.
    """
    data = args.data
    if data is not None and os.path.isdir(data):
        meta = nj.data.read_token_meta(data)
        tok = meta["tokenizer"] if os.path.isdir(str(meta["tokenizer"])) else None
        return data, tok, int(meta["vocab_size"])
    if data is None:
        data = str(DEFAULT_DATA)
        if not os.path.isfile(data):
            data = os.path.join(args.out, "made.txt")
            print(f"{DEFAULT_DATA} not found: a text made by code instead ({data})")
            pathlib.Path(data).write_text(made_text(800 if args.smoke else 4000))
    tok_dir = args.tokenizer
    if tok_dir in ("bytes", "chars"):
        made = os.path.join(args.out, "tokenizer")
        if tok_dir == "bytes":
            nj.data.byte_tokenizer(made)
        else:
            nj.data.char_tokenizer(pathlib.Path(data).read_text(encoding="utf-8"), made)
        tok_dir = made
    return data, tok_dir, nj.models.hf.load_tokenizer(tok_dir).vocab_size


def prepare_data(args: argparse.Namespace, data: str, tok_dir: str | None) -> tuple[str, dict]:
    """``(token folder, its meta.json)``; a text file is tokenized into ``OUT/tokens``."""
    if os.path.isdir(data):
        return data, nj.data.read_token_meta(data)
    folder = os.path.join(args.out, "tokens")
    if not os.path.isfile(os.path.join(folder, "meta.json")):  # a second run reuses them
        nj.data.tokenize_corpus(data, tok_dir, folder, eot_id="auto", progress=False)
    meta = nj.data.read_token_meta(folder)
    print(
        f"data: {data}: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens "
        f"({args.tokenizer} tokenizer, vocabulary {meta['vocab_size']})"
    )
    return folder, meta


class Mapped:
    """A resumable batch iterator with ``fn`` applied to each batch (``.at``/``.position`` kept)."""

    def __init__(self, it: Any, fn: Any):
        self.it, self.fn = it, fn
        self.steps = getattr(it, "steps", None)

    @property
    def position(self) -> int:
        return self.it.position

    def at(self, position: int) -> Mapped:
        return Mapped(self.it.at(position), self.fn)

    def __iter__(self) -> Mapped:
        return self

    def __next__(self) -> Any:
        return self.fn(next(self.it))


class EvalTimer:
    """``eval_data`` for ``fit`` that counts the seconds spent evaluating (left out of tokens/s)."""

    def __init__(self, batches: Any):
        self.batches, self.seconds = batches, 0.0

    def __call__(self):
        start = time.perf_counter()
        yield from self.batches.at(0)
        self.seconds += time.perf_counter() - start


# --- model and optimizer ---------------------------------------------------------------


def model_config(args: argparse.Namespace, vocab: int) -> nj.models.CausalLMConfig:
    """The config: ``--config`` JSON fields, or the family's shapes at the given sizes."""
    if args.config:
        with open(args.config) as f:
            fields = json.load(f)
        fields.setdefault("vocab_size", vocab)
        config = nj.models.CausalLMConfig(**fields)
    else:
        v = args.vocab_size or vocab
        if args.family == "gpt2":
            hf = dict(n_embd=args.hidden_size, n_layer=args.layers, n_head=args.heads)
            hf.update(n_inner=args.mlp_hidden, n_positions=args.seq_len, activation_function="gelu")
        else:
            hf = dict(hidden_size=args.hidden_size, num_hidden_layers=args.layers)
            hf.update(num_attention_heads=args.heads, num_key_value_heads=args.kv_heads)
            hf.update(intermediate_size=args.mlp_hidden, max_position_embeddings=args.seq_len)
            hf.update(tie_word_embeddings=bool(args.tie))
        config = nj.models.hf.config_from_hf({"model_type": args.family, "vocab_size": v, **hf})
    if config.vocab_size < vocab:
        raise SystemExit(f"the model's vocab_size {config.vocab_size} < the tokenizer's {vocab}")
    config = dataclasses.replace(config, remat=args.remat)
    return config if args.unroll is None else dataclasses.replace(config, scan_unroll=args.unroll)


def decay_mask(params: Any) -> Any:
    """Weight decay on kernels and embedding tables, not on norms and biases (nanoGPT's groups)."""
    return nj.models.weight_decay_mask(params)


def optimizer(params: Any, args: argparse.Namespace) -> optax.GradientTransformation:
    """Clip, then AdamW; the lr warms up linearly and decays by a cosine to ``--min-lr``."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=args.lr / (args.warmup + 1),
        peak_value=args.lr,
        warmup_steps=args.warmup,
        decay_steps=max(args.steps, args.warmup + 1),
        end_value=args.min_lr,
    )
    return optax.chain(
        optax.clip_by_global_norm(args.clip),
        optax.adamw(
            schedule, b1=args.beta1, b2=args.beta2, weight_decay=args.weight_decay,
            mask=decay_mask(params),
        ),
    )  # fmt: skip


def compute_dtype(name: str) -> Any:
    """``auto``: bfloat16 where the devices multiply it fast, else float32 (``None``)."""
    if name == "auto":
        return throughput.training_dtype()
    return {"float32": None, "bfloat16": jnp.bfloat16}[name]


# --- parallelism -----------------------------------------------------------------------


def parse_mesh(text: str | None) -> dict[str, int] | None:
    if not text or text == "none":
        return None
    return {k: int(v) for k, v in (part.split("=") for part in text.split(","))}


def host_devices(args: argparse.Namespace) -> None:
    """Without ``--mesh``, one XLA:CPU device per core, the batch split over them.

    XLA:CPU runs one computation on a core and a half at small sizes (a chain of small
    ops; ``docs/benchmarks.md``); a device per core, each with its share of the batch,
    keeps both cores busy and gives the same update (data parallel: the gradients are
    averaged over the devices). It has to be set before JAX starts its backends: where
    they run already (``main`` called in a process that used JAX), or another backend
    is the default, the run stays on one device. ``--mesh none`` asks for one device.
    """
    forced = "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
    if args.mesh is not None or args.distributed or forced:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    n = max(d for d in range(1, (cores or 1) + 1) if args.batch_size % d == 0)
    try:
        if n > 1:
            jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # the backends are up: use the devices there are
        return
    if n > 1 and jax.default_backend() == "cpu" and len(jax.devices()) == n:
        args.mesh = f"data={n}"


def placement(args: argparse.Namespace, config: Any) -> tuple[Any, Any]:
    """``(mesh, rules)`` for ``--mesh`` / ``--parallel``, or ``(None, None)``."""
    axes = parse_mesh(args.mesh)
    if axes is None:
        return None, None
    mesh = nj.sharding.mesh(axes)
    if args.parallel == "fsdp":
        return mesh, nj.sharding.fsdp_rules()
    if args.parallel == "tp":
        gated = config.mlp == "gated"
        kw = dict(column=nj.sharding.GATED_COLUMN, row=nj.sharding.GATED_ROW) if gated else {}
        return mesh, nj.sharding.tensor_parallel_rules(kv_heads=config.num_kv_heads, **kw)
    return mesh, nj.sharding.data_parallel_rules()


REPLICAS_BELOW = 10_000_000
"""Params below which data parallelism over host devices runs as replicas."""


def replicas(args: argparse.Namespace, mesh: Any, n_params: int) -> int:
    """Data parallel over host devices, a small model: one replica per device.

    XLA:CPU's in-process all-reduce meets the other devices once per buffer: a step
    that sums each gradient on its own pays ~50 meetings, one over replicas
    (``trainer(replicas=)``). Where the gradients are large the flat copy costs more
    than the meetings (``docs/benchmarks.md``: the char model's step gains, a 124M
    model's does not).
    """
    if mesh is None or args.parallel != "dp" or jax.devices()[0].platform != "cpu":
        return 1
    if n_params >= REPLICAS_BELOW:
        return 1
    return int(mesh.shape["data"]) if "data" in mesh.shape else 1


def batch_fn(mesh: Any, batch_size: int) -> Any:
    """Token windows as int32; on a mesh, this process's rows put on the ``data`` axis."""

    def to_int32(batch):
        return tuple(np.asarray(a, np.int32) for a in batch)

    if mesh is None:
        return to_int32
    rows = nj.sharding.local_batch_slice(mesh, batch_size)
    return lambda batch: nj.sharding.shard_batch(tuple(a[rows] for a in to_int32(batch)), mesh)


# --- the run ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", help="a token folder (nnjax tokenize) or a text file")
    p.add_argument("--tokenizer", help="for a text file: bytes, chars or a tokenizer folder")
    p.add_argument("--out", default="runs/pretrain", help="checkpoints, logs, tokens, hf/")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, a few steps (--preset smoke)")
    p.add_argument("--config", help="a JSON file of CausalLMConfig fields (instead of --family)")
    p.add_argument("--family", help="llama, gpt2, qwen2, qwen3, mistral, gemma, ...")
    ints = ["hidden-size", "layers", "heads", "kv-heads", "mlp-hidden", "vocab-size", "seq-len"]
    ints += ["batch-size", "steps", "warmup", "accumulate", "steps-per-call", "unroll"]
    ints += ["eval-every"]
    ints += ["eval-batches", "final-eval-batches", "eval-batch-size", "log-every"]
    ints += ["checkpoint-every", "seed"]
    for name in ints:
        p.add_argument(f"--{name}", type=int, help="overrides the preset")
    for name in ["lr", "min-lr", "beta1", "beta2", "weight-decay", "clip", "peak-tflops"]:
        p.add_argument(f"--{name}", type=float, help="overrides the preset")
    p.add_argument("--stop-after", type=int, help="stop at this step (the schedule keeps --steps)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), help="compute dtype")
    p.add_argument("--remat", action="store_true", help="recompute activations in the backward")
    p.add_argument(
        "--mesh",
        help="mesh axes, e.g. data=2,model=2 (data=-1: every device); none: one device; "
        "default: on a CPU, data parallel over its cores",
    )
    p.add_argument("--parallel", choices=("dp", "fsdp", "tp"), default="dp")
    p.add_argument("--distributed", action="store_true", help="jax.distributed.initialize()")
    p.add_argument("--tensorboard", action="store_true", help="TensorBoard files in OUT/logs")
    p.add_argument("--no-export", action="store_true", help="skip the Hugging Face export")
    args = p.parse_args(argv)
    preset = {**DEFAULTS, **PRESETS["smoke" if args.smoke else args.preset]}
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.final_eval_batches is None:
        args.final_eval_batches = args.eval_batches
    if args.eval_batch_size is None:
        args.eval_batch_size = args.batch_size
    k = args.steps_per_call
    for name in ("steps", "stop_after", "eval_every", "log_every", "checkpoint_every"):
        if (getattr(args, name) or 0) % k:
            p.error(f"--{name.replace('_', '-')} must be a multiple of --steps-per-call ({k})")
    return args


def final_loss(tr: Any, ts: Any, batches: Any) -> float:
    """The mean loss over ``batches`` (equal sizes): one fetch from the device at the end."""
    return nj.evaluate(tr, ts, batches)["loss"]


def export(out: str, config: Any, params: Any, tok_dir: str | None) -> str:
    """``OUT/hf``: the model as a Hugging Face folder, with the tokenizer's files."""
    folder = os.path.join(out, "hf")
    nj.models.hf.save_pretrained(folder, config, jax.device_get(params))
    if tok_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if os.path.isfile(os.path.join(tok_dir, name)):
                shutil.copy(os.path.join(tok_dir, name), folder)
    return folder


def compile_ahead(tr: Any, params: Any, args: argparse.Namespace, mesh: Any, rules: Any):
    """The train step (and the evaluation) compiled on other threads from shapes alone.

    XLA compiles a program on one core: these compile while the text is tokenized and
    the params initialized, and ``fit``'s first calls find them compiled. The arguments
    are described as ``fit`` passes them: the train state placed by ``rules``, the
    batches' rows on the ``data`` axis (``steps_per_call`` stacked ahead of them).
    """

    def described(shape, sharding):
        return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding)

    ts = jax.eval_shape(tr.init, params)
    lead = (args.steps_per_call,) if args.steps_per_call > 1 else ()
    rows = stacked_rows = None
    if mesh is not None:
        placed = nj.sharding.train_state_shardings(ts, mesh, rules)
        ts = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s, weak_type=a.weak_type),
            ts,
            placed,
        )
        rows = nj.sharding.batch_sharding(mesh)
        stacked_rows = nj.sharding.batch_sharding(mesh, dim=len(lead))
    window = described((*lead, args.batch_size, args.seq_len), stacked_rows)
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    threads = [compile_beside(tr.step, ts, (window, window), rng)]
    if args.eval_every or args.final_eval_batches:
        plain = described((args.eval_batch_size, args.seq_len), rows)
        threads.append(compile_beside(tr.evaluate, ts, (plain, plain)))
    return threads


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.distributed:
        jax.distributed.initialize()
    host_devices(args)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    data, tok_dir, vocab = data_source(args)
    config = model_config(args, vocab)
    model = nj.models.CausalLM(config)
    example = jnp.zeros((1, args.seq_len), jnp.int32)
    shapes, _ = jax.eval_shape(model.init, jax.random.key(args.seed), example)
    n_params = nj.count_params(shapes)
    mesh, rules = placement(args, config)
    dtype = compute_dtype(args.dtype)
    n_replicas = replicas(args, mesh, n_params)
    tr = nj.trainer(
        model,
        nj.losses.softmax_cross_entropy,
        optimizer(shapes, args),
        steps_per_call=args.steps_per_call,
        accumulate=args.accumulate,
        compute_dtype=dtype,
        replicas=n_replicas,
    )
    compiling = compile_ahead(tr, shapes, args, mesh, rules)
    folder, meta = prepare_data(args, data, tok_dir)
    if meta["vocab_size"] != vocab:
        raise SystemExit(f"{folder}: vocabulary {meta['vocab_size']}, its tokenizer's {vocab}")
    phases = {"data": time.perf_counter() - start}
    # Compiled without XLA's backend optimizations: the init runs once, and its random
    # draws compiled 2.4x faster so (values within 1e-8 of the optimized program's).
    init = jax.jit(model.init, compiler_options={"xla_backend_optimization_level": 0})
    params, _ = init(jax.random.key(args.seed), example)
    ts = tr.init(params)
    del params
    if mesh is not None:
        ts = nj.sharding.shard_train_state(ts, mesh, rules)
    fn, eval_fn = batch_fn(mesh, args.batch_size), batch_fn(mesh, args.eval_batch_size)
    for thread in compiling:
        thread.join()
    phases["model init"] = time.perf_counter() - start - sum(phases.values())
    windows = dict(dtype=meta["dtype"])
    train = nj.data.token_batches(
        os.path.join(folder, "train.bin"), args.seq_len, args.batch_size, args.seed, **windows
    )
    val_path = os.path.join(folder, "val.bin")
    val = EvalTimer(
        Mapped(
            nj.data.token_batches(
                val_path, args.seq_len, args.eval_batch_size, 1, steps=args.eval_batches, **windows
            ),
            eval_fn,
        )
    )
    tokens_per_step = args.batch_size * args.seq_len
    per_token = throughput.flops_per_token(config, args.seq_len)
    peak = throughput.device_peak(args.peak_tflops)
    devices = jax.devices()
    print(
        f"model: {config.family} blocks, {config.num_layers} layers, width {config.hidden_size}, "
        f"{config.num_heads} heads ({config.num_kv_heads or config.num_heads} kv), context "
        f"{args.seq_len}: {n_params / 1e6:.2f}M params; compute "
        f"{jnp.dtype(dtype or jnp.float32).name}{', remat' if config.remat else ''}; "
        f"{len(devices)} {devices[0].platform} device(s)"
        + (f", mesh {dict(mesh.shape)} ({args.parallel})" if mesh is not None else "")
        + (f", {n_replicas} replicas" if n_replicas > 1 else "")
        + ("; malloc in huge pages" if HUGE_PAGES in os.environ.get("GLIBC_TUNABLES", "") else "")
    )
    print(
        f"steps: {args.steps} of {args.batch_size} x {args.seq_len} tokens "
        f"({args.accumulate} micro-batch(es)); {per_token * tokens_per_step / 1e9:.3f} GFLOP "
        f"per step (6N + 12LHQT); {peak.source}"
    )
    logs = os.path.join(args.out, "logs")
    os.makedirs(logs, exist_ok=True)
    report = throughput.throughput_callback(
        per_token * tokens_per_step,
        tokens_per_step,
        peak,
        log_file=os.path.join(logs, "throughput.jsonl"),
        excluded=lambda: val.seconds,
    )
    ckpt = os.path.join(args.out, "checkpoints") if args.checkpoint_every else None
    saved = nj.checkpoint.all_steps(ckpt) if ckpt and os.path.isdir(ckpt) else []
    report.start(saved[-1][0] if saved else 0)  # fit resumes at the newest checkpoint
    ts, history = nj.fit(
        tr,
        ts,
        Mapped(train, fn),
        steps=args.stop_after or args.steps,
        eval_data=val if args.eval_every else None,
        eval_every=args.eval_every or None,
        callbacks=[report],
        checkpoint_dir=ckpt,
        checkpoint_every=args.checkpoint_every or None,
        async_checkpoint=True,  # written while training goes on: out of the tokens/s window
        rng=jax.random.key(args.seed),
        log_every=args.log_every,
        progress=False,
        log_dir=logs,
        tensorboard=args.tensorboard,
    )
    phases["training"] = time.perf_counter() - start - sum(phases.values())
    final_batches = Mapped(
        nj.data.token_batches(
            val_path,
            args.seq_len,
            args.eval_batch_size,
            10**6,
            steps=args.final_eval_batches,
            **windows,
        ),
        eval_fn,
    )
    val_loss = final_loss(tr, ts, final_batches)
    print(
        f"final val loss {val_loss:.4f} (perplexity {math.exp(val_loss):.2f}, mean over "
        f"{args.final_eval_batches} batches of {args.eval_batch_size} x {args.seq_len})"
    )
    phases["final evaluation"] = time.perf_counter() - start - sum(phases.values())
    hf_dir = None
    done = (args.stop_after or args.steps) >= args.steps
    if done and not args.no_export and jax.process_index() == 0:
        hf_dir = export(args.out, config, ts.params, tok_dir)
        print(f"exported a Hugging Face folder: {hf_dir}")
    wall = time.perf_counter() - start
    phases["export"] = wall - sum(phases.values())
    print(
        f"wall time {wall:.1f} s: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items())
        + f" (the training's evaluations {val.seconds:.1f} s)"
    )
    return {
        "history": history,
        "val_loss": val_loss,
        "wall_s": wall,
        "phases": phases,
        "config": config,
        "params": ts.params,
        "reports": report.records,
        "flops_per_step": per_token * tokens_per_step,
        "hf_dir": hf_dir,
    }


if __name__ == "__main__":
    main()
