"""The pre-norm transformer block, composed: ``residual(norm, attention)`` then ``residual(norm, mlp)``.

A block's input is the *stream*: the hidden state ``(..., T, d)``, or a dict
``{"query": h, "mask", "positions", "segment_ids"}`` whose other entries (the
attention's context, see :mod:`nnjax.layers.attention`) pass through every block
unchanged, so they flow through ``nj.repeat(block, n)``. Norms, MLPs and dropout see
only the hidden state (:func:`on_hidden`); the attention sees the whole stream.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nnjax.core.checks import check_keys, check_rank
from nnjax.core.combinators import Layer, serial
from nnjax.core.errors import ArgumentError, LayerError
from nnjax.core.layer import Initializer, as_layer, call_child
from nnjax.layers.attention import MultiHeadAttention
from nnjax.layers.base import LOW_PRECISION
from nnjax.layers.dense import Dense
from nnjax.layers.dropout import Dropout
from nnjax.layers.norm import LayerNorm

__all__ = [
    "TransformerBlock",
    "pre_norm_block",
    "MLP",
    "on_hidden",
    "scale_plus_one",
]


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}
"""MLP activations by their Hugging Face names: ``gelu_new`` is GPT-2's tanh
approximation, ``gelu`` the exact erf form (nanoGPT's ``nn.GELU()``), ``silu`` SwiGLU's."""

_STREAM_KEYS = ("mask", "positions", "segment_ids")


def _hidden(x: Any) -> Any:
    return x["query"] if isinstance(x, Mapping) else x


def _with_hidden(x: Any, h: Any) -> Any:
    return {**x, "query": h} if isinstance(x, Mapping) else h


def _check_stream(x: Any) -> None:
    if isinstance(x, Mapping):
        check_keys(x, ["query"], _STREAM_KEYS, kind="input key")
    elif isinstance(x, tuple):
        raise LayerError("TransformerBlock is self-attention: expected x or a dict, got a tuple")
    check_rank(_hidden(x), 2, "(..., T, d)")


def on_hidden(layer: Layer | Callable) -> Layer:
    """``layer`` applied to the stream's hidden state; the stream's context passes by.

    Example:
        >>> norm = nj.on_hidden(nj.RMSNorm())
        >>> x = {"query": jnp.ones((1, 3, 4)), "positions": jnp.arange(3)[None]}
        >>> params, _ = norm.init(key, x)
        >>> sorted(norm.apply(params, {}, x)[0])
        ['positions', 'query']
    """
    layer = as_layer(layer)

    def init(key, x):
        return layer.init(key, _hidden(x))

    def apply(params, state, x, *, rng=None, train=False):
        y, state = layer.apply(params, state, _hidden(x), rng=rng, train=train)
        return _with_hidden(x, y), state

    return Layer(init, apply, layer.name)


def _on_stream(layer: Layer) -> Layer:
    """``layer`` (the attention) sees the whole stream; its output becomes the hidden state."""

    def apply(params, state, x, *, rng=None, train=False):
        y, state = layer.apply(params, state, x, rng=rng, train=train)
        return _with_hidden(x, y), state

    return Layer(layer.init, apply, layer.name)


def _stream_residual(**children: Layer) -> Layer:
    """``h + serial(**children)(stream)``: core's ``residual`` on the stream's hidden state."""
    body = serial(**children)

    def apply(params, state, x, *, rng=None, train=False):
        y, state = body.apply(params, state, x, rng=rng, train=train)
        return _with_hidden(x, _hidden(x) + _hidden(y)), state

    return Layer(body.init, apply, "residual")


def scale_plus_one(norm: Layer) -> Layer:
    """A norm whose ``scale`` param is stored minus one (Gemma): it multiplies by ``1 + scale``.

    Initialise the norm with ``scale_init=jax.nn.initializers.zeros`` so a fresh one is
    the identity scale. The ``1 +`` is added in float32.
    """

    def apply(params, state, x, *, rng=None, train=False):
        check_keys(params, ["scale"], ["bias"])
        shifted = {**params, "scale": params["scale"].astype(jnp.float32) + 1.0}
        return norm.apply(shifted, state, x, rng=rng, train=train)

    return Layer(norm.init, apply, norm.name)


NORM_PLACEMENTS = ("pre", "sandwich", "post")
"""Where a block's norms sit: ``pre`` ``x + f(norm(x))`` (Llama), ``sandwich``
``x + norm'(f(norm(x)))`` (Gemma 2/3), ``post`` ``x + norm'(f(x))`` (OLMo 2)."""


def pre_norm_block(
    attn: Layer,
    mlp: Layer,
    norm: Layer,
    *,
    dropout_rate: float = 0.0,
    norms: str = "pre",
    name: str = "block",
) -> Layer:
    """``x + Dropout(attn(norm(x)))``, then ``x + Dropout(mlp(norm(x)))``: a pre-norm block.

    Two ``residual`` branches over the stream (see the module docstring); the norms
    are separate params. Any attention, MLP and norm layers compose. ``norms`` places
    them (:data:`NORM_PLACEMENTS`): ``"pre"`` as above (``ln_1``, ``ln_2``),
    ``"sandwich"`` also normalizes each branch's output (``attn_post_norm``,
    ``mlp_post_norm``; Gemma 2/3), ``"post"`` only the outputs (OLMo 2).

    Params:
        ln_1, attn, ln_2, mlp: the layers' params (``ln_*``: two copies of ``norm``);
        attn_post_norm, mlp_post_norm with ``norms="sandwich"`` or ``"post"``.

    State: ``{"attn": ...}`` (a KV cache) when the attention has state; ``{"mlp": {"aux": ...}}``
    from a mixture of experts (its auxiliary-loss statistics, :mod:`nnjax.core.aux`).

    Example:
        >>> block = nj.pre_norm_block(nj.MultiHeadAttention(4, causal=True), nj.layers.MLP(64), nj.RMSNorm())
        >>> params, _ = block.init(key, jnp.zeros((2, 8, 32)))
        >>> sorted(params), sorted(params["mlp"])
        (['attn', 'ln_1', 'ln_2', 'mlp'], ['fc', 'proj'])
    """
    if norms not in NORM_PLACEMENTS:
        raise ArgumentError(
            f"pre_norm_block: norms must be one of {NORM_PLACEMENTS}, got {norms!r}"
        )
    drop = on_hidden(Dropout(dropout_rate))

    def branch(pre: str, body: str, layer: Layer) -> tuple[tuple[str, ...], Layer]:
        children = {pre: on_hidden(norm)} if norms != "post" else {}
        children[body] = layer
        if norms != "pre":
            children[f"{body}_post_norm"] = on_hidden(norm)
        return tuple(children), _stream_residual(**children, drop=drop)

    branches = (branch("ln_1", "attn", _on_stream(attn)), branch("ln_2", "mlp", on_hidden(mlp)))
    param_keys = [k for keys, _ in branches for k in keys]

    def init(key, x):
        _check_stream(x)
        params, state = {}, {}
        for (_, branch), k in zip(branches, jax.random.split(key), strict=True):
            p, s = branch.init(k, x)  # a branch keeps the stream's shape
            params.update(p)
            state.update(s)
        return params, state

    def apply(params, state, x, *, rng=None, train=False):
        _check_stream(x)
        check_keys(params, param_keys)
        check_keys(state, [], ["attn", "mlp"], kind="state")  # mlp: a MoE's aux statistics
        rngs = [None, None] if rng is None else list(jax.random.split(rng))
        new_state = {}
        for (keys, branch), r in zip(branches, rngs, strict=True):
            p = {k: params[k] for k in keys}
            s = {k: state[k] for k in keys if k in state}
            x, s = branch.apply(p, s, x, rng=r, train=train)
            new_state.update(s)
        return x, new_state

    return Layer(init, apply, name)


def MLP(
    features: int | None = None,
    *,
    ratio: int = 4,
    gated: bool = False,
    activation: Callable[[jax.Array], jax.Array] = jax.nn.gelu,
    use_bias: bool = True,
    kernel_init: Initializer = jax.nn.initializers.lecun_normal(),
    bias_init: Initializer = jax.nn.initializers.zeros,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    name: str = "mlp",
) -> Layer:
    """The transformer's feed-forward layer, ``(..., d) -> (..., d)``.

    Plain: ``proj(activation(fc(x)))``. Gated (SwiGLU with ``jax.nn.silu``, GeGLU with
    the tanh GELU): ``down(activation(gate(x)) * up(x))``.

    Args:
        features: the hidden width; ``None``: ``ratio * d``.
        ratio: hidden width per input width when ``features`` is ``None``.
        gated: the gated form.
        activation: the nonlinearity.
        use_bias: biases in the Dense layers.
        kernel_init, bias_init, dtype, param_dtype: for every Dense.
        name: default name in a combinator.

    Params:
        fc ``(d, hidden)``, proj ``(hidden, d)``; gated: gate, up ``(d, hidden)``, down
        ``(hidden, d)`` (Dense params; adapters beside the kernels are used).

    Example:
        >>> params, _ = nj.layers.MLP(16, gated=True).init(key, jnp.zeros((2, 8)))
        >>> jax.tree.map(jnp.shape, params["down"])
        {'bias': (8,), 'kernel': (16, 8)}
    """
    dense = functools.cache(
        lambda f: Dense(
            f,
            use_bias=use_bias,
            kernel_init=kernel_init,
            bias_init=bias_init,
            dtype=dtype,
            param_dtype=param_dtype,
        )
    )
    into, out = ("gate", "up"), "down"
    if not gated:
        into, out = ("fc",), "proj"

    def widths(x):
        check_rank(x, 1, "(..., d)")
        d = np.shape(x)[-1]
        return d, features or ratio * d

    def init(key, x):
        d, hidden = widths(x)
        keys = jax.random.split(key, len(into) + 1)
        params = {
            n: call_child(n, dense(hidden).init, k, x)[0] for n, k in zip(into, keys, strict=False)
        }
        h = jax.ShapeDtypeStruct((*np.shape(x)[:-1], hidden), jnp.result_type(x))
        params[out] = call_child(out, dense(d).init, keys[-1], h)[0]
        return params, {}

    def apply(params, state, x, *, rng=None, train=False):
        d, hidden = widths(x)
        check_keys(params, [*into, out])

        def run(n, width, h):
            return call_child(n, dense(width).apply, params[n], {}, h)[0]

        h = _activate(activation, run(into[0], hidden, x), run("up", hidden, x) if gated else None)
        return run(out, d, h), state

    return Layer(init, apply, name)


def _activate(activation: Callable, gate: jax.Array, up: jax.Array | None) -> jax.Array:
    """``activation(gate)`` (times ``up`` when gated), in float32 for bfloat16/float16
    inputs and cast back: XLA:CPU runs ``erf``/``exp`` on bfloat16 about 2x slower than
    on float32 (``docs/benchmarks.md``), and the product is rounded once."""
    if jnp.result_type(gate) in LOW_PRECISION:
        h = activation(gate.astype(jnp.float32))
        h = h if up is None else h * up.astype(jnp.float32)
        return h.astype(gate.dtype)
    h = activation(gate)
    return h if up is None else h * up


def TransformerBlock(
    num_heads: int,
    *,
    mlp_ratio: int = 4,
    mlp_features: int | None = None,
    dropout_rate: float = 0.0,
    causal: bool = True,
    activation: Callable[[jax.Array], jax.Array] = jax.nn.gelu,
    epsilon: float = 1e-5,
    decode: bool = False,
    use_bias: bool = True,
    kernel_init: Initializer = jax.nn.initializers.lecun_normal(),
    bias_init: Initializer = jax.nn.initializers.zeros,
    implementation: str | None = None,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    name: str = "block",
) -> Layer:
    """A pre-LayerNorm transformer block in GPT-2's layout: :func:`pre_norm_block` of
    ``MultiHeadAttention``, a plain :func:`MLP` and ``LayerNorm``; keeps its input's shape.

    ``x = x + Dropout(Attn(LN1(x)))``, then ``x = x + Dropout(MLP(LN2(x)))`` with
    ``MLP = Dense(mlp) -> activation -> Dense(d)``. ``dropout_rate`` is used for the
    attention weights and both residual branches (as nanoGPT). For other layouts
    (RMSNorm, gated MLPs, grouped-query or rotary attention) compose
    :func:`pre_norm_block` directly, as :func:`nnjax.models.CausalLM` does.

    ``x`` is ``(..., T, d)`` or the stream dict ``{"query": x, "mask", "positions",
    "segment_ids"}`` (see the module docstring); a dict input gives the same dict back
    with ``query`` replaced by the output, so masks flow through ``nj.repeat(block, n)``.

    Args:
        num_heads: attention heads; ``d`` must be divisible by it.
        mlp_ratio: hidden width of the MLP is ``mlp_ratio * d`` ...
        mlp_features: ... unless given here.
        dropout_rate: attention-weights and residual dropout probability.
        causal: causal self-attention.
        activation: the MLP's nonlinearity (``jax.nn.gelu``: tanh approximation).
        epsilon: LayerNorm epsilon.
        decode: KV cache in the attention (see :func:`MultiHeadAttention`).
        use_bias: biases in every Dense and LayerNorm (``False``: none, as nanoGPT's ``bias=False``).
        kernel_init, bias_init: for every Dense (GPT-2: ``normal(0.02)``).
        implementation: the attention's (see :func:`MultiHeadAttention`).
        dtype, param_dtype: computation and param dtypes.
        name: default name in a combinator.

    Params:
        ln_1, ln_2: LayerNorm ``scale (d,)``, ``bias (d,)`` (if ``use_bias``).
        attn: ``query``, ``key``, ``value``, ``out`` Dense ``(d, d)``.
        mlp: ``fc`` Dense ``(d, mlp)``, ``proj`` Dense ``(mlp, d)``.

    State: ``{"attn": KV cache}`` if ``decode``, else ``{}``.

    Example:
        >>> gpt_blocks = nj.repeat(nj.TransformerBlock(4), 6)
        >>> params, state = nj.TransformerBlock(4).init(key, jnp.zeros((2, 16, 32)))
        >>> jax.tree.map(jnp.shape, params["mlp"])
        {'fc': {'bias': (128,), 'kernel': (32, 128)}, 'proj': {'bias': (32,), 'kernel': (128, 32)}}
    """
    dense_kw: dict[str, Any] = dict(
        use_bias=use_bias,
        kernel_init=kernel_init,
        bias_init=bias_init,
        dtype=dtype,
        param_dtype=param_dtype,
    )
    attn = MultiHeadAttention(
        num_heads,
        causal=causal,
        dropout_rate=dropout_rate,
        decode=decode,
        implementation=implementation,
        **dense_kw,
    )
    mlp = MLP(mlp_features, ratio=mlp_ratio, activation=activation, **dense_kw)
    norm = LayerNorm(epsilon=epsilon, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype)
    return pre_norm_block(attn, mlp, norm, dropout_rate=dropout_rate, name=name)
