"""KV-cache generation for :func:`~nnjax.models.CausalLM` and :func:`~nnjax.models.GPT`.

One prefill call runs the (left-padded) prompts, then a ``lax.while_loop`` feeds one
token per step until every row is done (its eos) or the tokens run out; the whole loop
is one XLA computation, compiled once per shape and static
setting. Every argument is checked before anything is traced. Each call splits the
layer stack per layer before the loop (:func:`~nnjax.unstack`), and on CPU its
products with few rows read the stored weights (float32, bfloat16 or int8) through
nnjax's own kernel (:mod:`nnjax.kernels.small_matmul`): both are for the speed of
reading every weight once per token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.core  # for type checkers: jax's __init__ loads jax.core only under a private name
import jax.numpy as jnp
import numpy as np

from nnjax.core.checks import check_ids, check_int, check_number, shape_str
from nnjax.core.combinators import unstack
from nnjax.core.errors import ArgumentError
from nnjax.kernels import small_matmul
from nnjax.layers.adapters import ADAPTERS
from nnjax.models.causal_lm import CausalLM
from nnjax.models.causal_lm_config import CausalLMConfig
from nnjax.models.gpt import GPTConfig, causal_lm_config
from nnjax.models.sampling import sample

__all__ = ["generate", "make_generate"]


class _Static(NamedTuple):
    """What a compiled generation depends on beyond the shapes (a jit static argument)."""

    config: CausalLMConfig
    max_new_tokens: int
    greedy: bool
    top_k: int | None
    use_top_p: bool
    use_min_p: bool
    eos: tuple[int, ...]
    pad: int


def _left_padding(lengths: jax.Array, t0: int) -> tuple[jax.Array, jax.Array]:
    """``(positions, segment_ids)`` ``(B, T0)`` of right-aligned prompts of ``lengths``."""
    start = (t0 - lengths)[:, None]
    index = jnp.arange(t0)[None, :]
    return jnp.maximum(index - start, 0).astype(jnp.int32), (index >= start).astype(jnp.int32)


def _generate(params, prompt, lengths, rng, temperature, top_p, min_p, *, s: _Static):
    """``(B, T0)`` -> ``(B, T0 + N)``: prefill, then a loop over the new tokens."""
    b, t0 = prompt.shape
    n = s.max_new_tokens
    config, params = _for_platform(s.config, params, b)
    model = CausalLM(config, decode=True)
    spec = jax.ShapeDtypeStruct((b, t0 + n - 1), jnp.int32)
    _, state_spec = jax.eval_shape(model.init, jax.random.key(0), spec)
    state = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), state_spec)
    params, state = _unstacked(params, state)
    keys = None if s.greedy else jax.random.split(rng, n)

    def draw(logits, key):
        return sample(
            logits,
            key,
            greedy=s.greedy,
            temperature=temperature,
            top_k=s.top_k,
            top_p=top_p if s.use_top_p else None,
            min_p=min_p if s.use_min_p else None,
        )

    eos = jnp.asarray(s.eos if s.eos else (-1,), jnp.int32)

    positions, segments = _left_padding(lengths, t0)
    x = {"ids": prompt, "positions": positions, "segment_ids": segments}
    logits, state = model.apply(params, state, x)  # (B, T0, V)
    first = draw(logits[:, -1], None if keys is None else keys[0])
    done = jnp.isin(first, eos)

    def step(carry):
        i, state, token, position, done, rest = carry
        x = {
            "ids": token[:, None],
            "positions": position[:, None],
            "segment_ids": jnp.ones_like(token)[:, None],
        }
        logits, state = model.apply(params, state, x)  # (B, 1, V)
        token = jnp.where(done, s.pad, draw(logits[:, -1], None if keys is None else keys[i + 1]))
        rest = jax.lax.dynamic_update_index_in_dim(rest, token.astype(jnp.int32), i, axis=1)
        return i + 1, state, token, position + 1, done | jnp.isin(token, eos), rest

    def going(carry):  # stops once every row is done: the rest stays padding, as they'd be
        i, *_, done, _ = carry
        return (i < n - 1) & ~jnp.all(done)

    rest = jnp.full((b, n - 1), s.pad, jnp.int32)
    if n > 1:
        carry = (jnp.int32(0), state, first, lengths.astype(jnp.int32), done, rest)
        rest = jax.lax.while_loop(going, step, carry)[-1]
    return jnp.concatenate([prompt, first[:, None], rest], axis=1)


_generate_jit = jax.jit(_generate, static_argnames="s")


def _half(dtype: Any) -> bool:
    return dtype is not None and jnp.dtype(dtype) in (
        jnp.dtype(jnp.bfloat16),
        jnp.dtype(jnp.float16),
    )


def _for_platform(config: CausalLMConfig, params: Any, rows: int) -> tuple[CausalLMConfig, Any]:
    """On CPU a model in 16-bit floats decodes in float32. Its kernels and token tables stay
    16-bit where nnjax's kernel reads them (:mod:`nnjax.kernels.small_matmul`: up to its
    ``ROWS`` rows, no weight-form adapter beside them); other 16-bit weights are upcast once
    per call, since XLA:CPU's product reads bfloat16 weights about 8x slower than float32
    ones (docs/benchmarks.md). Other platforms decode in the model's own dtypes."""
    if jax.default_backend() != "cpu":
        return config, params
    if not (_half(config.dtype) or any(_half(a.dtype) for a in jax.tree.leaves(params))):
        return config, params
    keep = rows <= small_matmul.ROWS and small_matmul.available()
    return dataclasses.replace(config, dtype=jnp.float32), _upcast(params, keep)


_WEIGHT_FORM = frozenset(n for k in ADAPTERS.values() if k.output is None for n in k.leaves)


def _read_natively(key: str, value: Any) -> bool:
    return key in ("kernel", "embedding") and getattr(value, "dtype", None) == jnp.bfloat16


def _upcast(tree: Any, keep_read_natively: bool) -> Any:
    """``tree`` with its 16-bit float leaves in float32, but for the kernels and tables that
    the native product reads (``keep_read_natively``)."""
    if isinstance(tree, dict):
        native = keep_read_natively and not _WEIGHT_FORM.intersection(tree)
        return {
            k: v if native and _read_natively(k, v) else _upcast(v, keep_read_natively)
            for k, v in tree.items()
        }
    if isinstance(tree, (list, tuple)):
        return type(tree)(_upcast(v, keep_read_natively) for v in tree)
    if not hasattr(tree, "dtype"):
        return tree
    return tree.astype(jnp.float32) if _half(tree.dtype) else tree


def _unstacked(params: Any, state: Any) -> tuple[Any, Any]:
    """The layer stack's params and KV cache split per layer (:func:`~nnjax.unstack`),
    once per call, outside the token loop: a scanned stack's weights are copied out of it
    before every matrix-vector product (see docs/benchmarks.md). Params whose stack is
    split already (``params["blocks"] = nj.unstack(params["blocks"])``, done once by the
    caller) are not copied again."""
    params = {**params, "blocks": unstack(params["blocks"])}
    return params, {**state, "blocks": unstack(state["blocks"])}


def _config(config: Any) -> CausalLMConfig:
    if isinstance(config, GPTConfig):
        return causal_lm_config(config)
    if not isinstance(config, CausalLMConfig):
        raise ArgumentError(
            f"config: expected a CausalLMConfig or GPTConfig, got {type(config).__name__}"
        )
    return config


def _check_prompt(prompt_ids: Any, prompt_lengths: Any, vocab: int) -> tuple[Any, Any]:
    dtype = getattr(prompt_ids, "dtype", None)
    dtype = np.asarray(prompt_ids).dtype if dtype is None else dtype
    if np.ndim(prompt_ids) != 2 or not jnp.issubdtype(dtype, jnp.integer):
        raise ArgumentError(
            f"prompt_ids: expected integer ids of shape (B, T), got shape "
            f"{shape_str(np.shape(prompt_ids))} and dtype {dtype}"
        )
    b, t0 = np.shape(prompt_ids)
    if t0 < 1 or b < 1:
        raise ArgumentError(f"prompt_ids: expected a non-empty (B, T), got {shape_str((b, t0))}")
    if not isinstance(prompt_ids, jax.core.Tracer):
        ids = np.asarray(prompt_ids)
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab:
            raise ArgumentError(
                f"prompt_ids: expected ids in [0, {vocab}) (vocab_size), got min {lo}, max {hi}"
            )
    if prompt_lengths is None:
        return jnp.asarray(prompt_ids, jnp.int32), jnp.full((b,), t0, jnp.int32)
    if tuple(np.shape(prompt_lengths)) != (b,):
        raise ArgumentError(
            f"prompt_lengths: expected shape ({b},) (one per prompt row), got "
            f"{shape_str(np.shape(prompt_lengths))}"
        )
    if not isinstance(prompt_lengths, jax.core.Tracer):
        lengths = np.asarray(prompt_lengths)
        if not np.issubdtype(lengths.dtype, np.integer) or lengths.min() < 1 or lengths.max() > t0:
            raise ArgumentError(
                f"prompt_lengths: expected ints in [1, {t0}] (the prompts are left-padded to "
                f"T == {t0}), got {lengths.tolist()}"
            )
    return jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(prompt_lengths, jnp.int32)


def _lengths_from_mask(prompt_ids: Any, attention_mask: Any, prompt_lengths: Any) -> Any:
    """``prompt_lengths`` from a transformers-style ``attention_mask`` (1 = token), checked to
    be left padding: zeros, then ones to the last column."""
    if prompt_lengths is not None:
        raise ArgumentError(
            "attention_mask and prompt_lengths: pass one of them (both say where the prompts start)"
        )
    if tuple(np.shape(attention_mask)) != tuple(np.shape(prompt_ids)):
        raise ArgumentError(
            f"attention_mask: expected the shape of prompt_ids, {shape_str(np.shape(prompt_ids))}, "
            f"got {shape_str(np.shape(attention_mask))}"
        )
    if isinstance(attention_mask, jax.core.Tracer):
        return jnp.sum(jnp.asarray(attention_mask, jnp.int32), axis=-1)
    mask = np.asarray(attention_mask)
    if not np.isin(mask, (0, 1)).all():
        raise ArgumentError("attention_mask: expected 0 (padding) and 1 (token) only")
    lengths = mask.sum(-1).astype(np.int32)
    t0 = mask.shape[-1]
    left = np.arange(t0)[None, :] >= (t0 - lengths)[:, None]
    bad = np.flatnonzero((left != mask.astype(bool)).any(-1))
    if bad.size:
        raise ArgumentError(
            f"attention_mask: rows {bad.tolist()} are not left-padded (zeros, then ones to the "
            "end): generate continues each row after its last column, so pad prompts on the "
            "left (tokenizer.pad(rows, side='left'); in transformers, padding_side='left')"
        )
    return lengths


def _refuse_unmarked_padding(prompt_ids: Any, pad: int | None, eos: tuple[int, ...]) -> None:
    """Rows starting with the pad id look left-padded: say so rather than read the padding
    as prompt (a pad id that is also an eos id may open a prompt, as GPT-2's does)."""
    if pad is None or pad in eos or isinstance(prompt_ids, jax.core.Tracer):
        return
    rows = np.flatnonzero(np.asarray(prompt_ids)[:, 0] == pad)
    if rows.size:
        raise ArgumentError(
            f"prompt_ids: rows {rows.tolist()} start with pad_token_id {pad}, as left-padded "
            "prompts do; pass attention_mask (1 = token, as transformers takes it) or "
            "prompt_lengths so that the padding is not read as prompt (generate does not guess)"
        )


def _unbounded(c: CausalLMConfig) -> bool:
    """A layer of config ``c`` works past ``max_position``: no positions, a sliding window
    over rotary ones, or rotary scaling that extrapolates (``dynamic``)."""
    dynamic = c.position == "rope" and dict(c.rope_scaling or {}).get("rope_type") == "dynamic"
    windowed = c.position == "rope" and c.sliding_window is not None
    return c.position == "none" or dynamic or windowed


def _check_length(c: CausalLMConfig, t0: int, n: int) -> None:
    """The longest position must fit the model, unless every layer (every kind of a
    mixed stack) works past it (:func:`_unbounded`)."""
    kinds = {c.kind_config(k) for k in dict.fromkeys(c.kinds())}
    if t0 + n - 1 <= c.max_position or all(_unbounded(k) for k in kinds):
        return
    kind = "learned position table" if c.position == "learned" else "trained context"
    raise ArgumentError(
        f"generate: expected prompt length + max_new_tokens - 1 <= max_position == "
        f"{c.max_position} (the {kind}), got {t0} + {n} - 1 == {t0 + n - 1}; keep only the "
        f"last {max(c.max_position - n + 1, 1)} prompt tokens, or generate in chunks that "
        "re-feed the last tokens as the next prompt"
    )


def _check_sampling(temperature, top_k, top_p, min_p, rng) -> bool:
    """Checked sampling options; True when greedy."""
    temperature = check_number(temperature, "temperature", 0)
    top_k = None if top_k is None else check_int(top_k, "top_k")
    if top_p is not None:
        check_number(top_p, "top_p", 0, 1, open_low=True)
    if min_p is not None:
        check_number(min_p, "min_p", 0, 1)
    greedy = temperature == 0 or top_k == 1
    if not greedy and rng is None:
        raise ArgumentError(
            "rng: generate samples when temperature > 0 and top_k != 1: pass rng=jax.random.key(...)"
        )
    if rng is not None and not _is_key(rng):
        raise ArgumentError(
            f"rng: expected a PRNG key (jax.random.key(...)), got {type(rng).__name__} {rng!r}"
        )
    return greedy


def _explicit_pad(config: Any, pad_token_id: int | None) -> int | None:
    """The pad id given or the config's; not the fallback ``_static`` fills in."""
    return pad_token_id if pad_token_id is not None else _config(config).pad_token_id


def _is_key(rng: Any) -> bool:
    """A typed key, or a raw ``uint32 (2,)`` one (``jax.random.PRNGKey``)."""
    dtype = getattr(rng, "dtype", None)
    if dtype is None:
        return False
    if jnp.issubdtype(dtype, jax.dtypes.prng_key):
        return True
    return dtype == jnp.uint32 and np.shape(rng)[-1:] == (2,)


def _static(
    config, max_new_tokens, temperature, top_k, top_p, min_p, eos_token_id, pad_token_id, rng
):
    c = _config(config)
    n = check_int(max_new_tokens, "max_new_tokens")
    greedy = _check_sampling(temperature, top_k, top_p, min_p, rng)
    eos_value = c.eos_token_id if eos_token_id is None else eos_token_id
    eos = () if eos_value is None else check_ids(eos_value, "eos_token_id", c.vocab_size)
    pad_value = pad_token_id if pad_token_id is not None else c.pad_token_id
    pad = check_ids(
        pad_value if pad_value is not None else (eos[0] if eos else 0), "pad_token_id", c.vocab_size
    )[0]
    return _Static(
        c,
        n,
        greedy,
        None if greedy or top_k is None else int(top_k),
        not greedy and top_p is not None,
        not greedy and min_p is not None,
        eos,
        pad,
    )


def generate(
    config: CausalLMConfig | GPTConfig,
    params: Any,
    prompt_ids: Any,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    prompt_lengths: Any = None,
    attention_mask: Any = None,
    rng: jax.Array | None = None,
) -> jax.Array:
    """Continue ``prompt_ids`` by ``max_new_tokens`` tokens with the KV cache.

    The prompts run in one call (prefill), then a ``lax.while_loop`` feeds one token at a
    time, and stops once every row has emitted an eos id (the rest is padding, as it would
    be had the loop gone on).
    Each new token is the argmax (``temperature=0`` or ``top_k=1``: greedy, no ``rng``
    needed) or a draw from ``softmax(logits / temperature)`` restricted by ``top_k``,
    ``top_p`` and ``min_p`` (see :func:`~nnjax.models.filter_logits`).

    Prompts of different lengths are left-padded to one width ``T0``, with
    ``prompt_lengths[b]`` real tokens at the end of row ``b``: each row then gets its
    own positions ``0 .. len - 1`` and its padding is never attended, so a row's tokens
    are those it would get alone. Say where the padding is with ``attention_mask``
    (``(B, T0)``, 1 for tokens, as transformers takes it and ``tokenizer.pad(rows,
    side="left")`` makes it) or ``prompt_lengths``; without either, a row that starts
    with the pad id is an error, not a guess (unless the pad id is also an eos id). A row that emits an ``eos_token_id`` is finished: its
    later tokens are ``pad_token_id``.

    Compiled once per prompt shape and static setting (config, ``max_new_tokens``,
    ``top_k``, which filters are on, the eos/pad ids); the prompts' contents,
    ``temperature``, ``top_p``, ``min_p`` and ``rng`` do not recompile.

    Args:
        config: the model's :class:`~nnjax.models.CausalLMConfig` or :class:`GPTConfig`.
        params: the model's params (adapters beside the kernels are used; int8 or NF4
            kernels from :func:`~nnjax.finetune.quantize` are dequantized in each product).
            Each call copies the layer stack into one buffer per layer for speed; to copy
            it once for many calls (and keep one copy in memory), pass
            ``{**params, "blocks": nj.unstack(params["blocks"])}``. On CPU, bfloat16
            kernels are read as stored by nnjax's kernel (batches up to 16); other
            16-bit weights are read as float32 (an upcast copy for the call).
        prompt_ids: int ``(B, T0)``, ids in ``[0, vocab_size)``, left-padded.
        max_new_tokens: ``N >= 1``; ``T0 + N - 1 <= max_position`` unless the model
            attends a sliding window (Mistral: each token sees the last ``sliding_window``
            positions whatever its own; the cache still holds every position, so memory
            grows with ``T0 + N``) or its rotary scaling is ``dynamic`` (which extrapolates).
        temperature: ``>= 0``, finite.
        top_k: sample among the ``top_k`` most likely tokens; ``None``: all.
        top_p: nucleus sampling mass in ``(0, 1]``; ``None``: off.
        min_p: drop tokens below ``min_p`` times the top probability, ``[0, 1]``; ``None``: off.
        eos_token_id: an id or ids that end a row; default ``config.eos_token_id``
            (GPT: none).
        pad_token_id: what finished rows emit; default ``config.pad_token_id``, else the
            first eos id, else 0.
        prompt_lengths: int ``(B,)`` real tokens per row (``1 .. T0``); ``None``: all ``T0``.
        attention_mask: int or bool ``(B, T0)``, 1 for a token, 0 for padding, left-padded
            (zeros then ones); instead of ``prompt_lengths``.
        rng: a PRNG key, needed unless greedy.

    Returns:
        int32 ``(B, T0 + N)``: the prompts followed by the new tokens.

    Raises:
        ArgumentError: before any work, for ids outside the vocabulary, a NaN or infinite
            temperature, ``top_p`` outside ``(0, 1]``, ``min_p`` outside ``[0, 1]``, bad
            lengths, sampling without ``rng``, a sequence longer than the model allows.

    Example:
        >>> cfg = nj.models.CausalLMConfig(vocab_size=50, hidden_size=16, num_heads=2, mlp_hidden=32)
        >>> params, _ = nj.models.CausalLM(cfg).init(key, jnp.zeros((1, 8), jnp.int32))
        >>> prompts = jnp.array([[0, 0, 5, 7], [1, 2, 3, 4]])  # row 0: 2 tokens, left-padded
        >>> out = nj.models.generate(cfg, params, prompts, 6, prompt_lengths=jnp.array([2, 4]),
        ...                          top_p=0.9, min_p=0.05, rng=jax.random.key(0))
        >>> out.shape
        (2, 10)
    """
    s = _static(
        config, max_new_tokens, temperature, top_k, top_p, min_p, eos_token_id, pad_token_id, rng
    )
    if attention_mask is not None:
        prompt_lengths = _lengths_from_mask(prompt_ids, attention_mask, prompt_lengths)
    elif prompt_lengths is None:
        _refuse_unmarked_padding(prompt_ids, _explicit_pad(config, pad_token_id), s.eos)
    prompt, lengths = _check_prompt(prompt_ids, prompt_lengths, s.config.vocab_size)
    _check_length(s.config, prompt.shape[1], s.max_new_tokens)
    return _generate_jit(
        params,
        prompt,
        lengths,
        rng,
        jnp.asarray(1.0 if s.greedy else temperature, jnp.float32),
        jnp.asarray(1.0 if top_p is None else top_p, jnp.float32),
        jnp.asarray(0.0 if min_p is None else min_p, jnp.float32),
        s=s,
    )


def make_generate(
    config: CausalLMConfig | GPTConfig,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> Callable[..., jax.Array]:
    """A jitted ``fn(params, prompt_ids, rng=None, prompt_lengths=None, attention_mask=None)``,
    see :func:`generate`.

    Its own compile cache: one compilation per prompt shape, whatever the contents.
    The settings are checked here, once; under ``jit`` the prompt's ids cannot be checked.
    """
    key = jax.random.key(0)  # a stand-in: the settings alone decide greediness here
    s = _static(
        config, max_new_tokens, temperature, top_k, top_p, min_p, eos_token_id, pad_token_id, key
    )
    scalars = (
        jnp.asarray(1.0 if s.greedy else temperature, jnp.float32),
        jnp.asarray(1.0 if top_p is None else top_p, jnp.float32),
        jnp.asarray(0.0 if min_p is None else min_p, jnp.float32),
    )

    @jax.jit
    def fn(
        params: Any,
        prompt_ids: Any,
        rng: jax.Array | None = None,
        prompt_lengths: Any = None,
        attention_mask: Any = None,
    ) -> jax.Array:
        if not s.greedy and rng is None:
            raise ArgumentError("rng: this generate function samples: pass rng=jax.random.key(...)")
        if rng is not None and not _is_key(rng):
            raise ArgumentError(f"rng: expected a PRNG key (jax.random.key(...)), got {rng!r}")
        if attention_mask is not None:  # traced: its left padding cannot be checked here
            prompt_lengths = _lengths_from_mask(prompt_ids, attention_mask, prompt_lengths)
        prompt, lengths = _check_prompt(prompt_ids, prompt_lengths, s.config.vocab_size)
        _check_length(s.config, prompt.shape[1], s.max_new_tokens)
        return _generate(params, prompt, lengths, rng, *scalars, s=s)

    return fn
