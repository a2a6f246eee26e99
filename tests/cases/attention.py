import jax.numpy as jnp

import nnjax as nj
from tests.cases import Case


def _cross(x):
    """(x_q, x_kv): the first 3 positions attend to the whole sequence."""
    return x[..., :3, :], x


def _padded(x):
    """{"query": x, "mask": ...}: the last key is padding."""
    t = x.shape[-2]
    return {"query": x, "mask": jnp.broadcast_to(jnp.arange(t) < t - 1, x.shape[:-1])}


CASES = [
    Case("MultiHeadAttention", lambda: nj.MultiHeadAttention(2), (2, 5, 8)),
    Case(
        "MultiHeadAttention_causal_qkv_out",
        lambda: nj.MultiHeadAttention(3, qkv_features=12, out_features=6, causal=True),
        (2, 5, 8),
    ),
    Case(
        "MultiHeadAttention_xla",
        lambda: nj.MultiHeadAttention(2, causal=True, implementation="xla"),
        (2, 5, 8),
    ),
    Case(
        "MultiHeadAttention_cross_tuple",
        lambda: nj.serial(_cross, nj.MultiHeadAttention(2)),
        (2, 5, 8),
    ),
    Case(
        "MultiHeadAttention_padding_mask",
        lambda: nj.serial(_padded, nj.MultiHeadAttention(2, causal=True)),
        (2, 5, 8),
    ),
    Case("MultiHeadAttention_decode", lambda: nj.MultiHeadAttention(2, decode=True), (2, 5, 8)),
    Case(
        "MultiHeadAttention_dropout",
        lambda: nj.MultiHeadAttention(2, dropout_rate=0.2),
        (2, 5, 8),
        train=True,
    ),
    Case("TransformerBlock", lambda: nj.TransformerBlock(2), (2, 5, 8)),
    Case(
        "TransformerBlock_dropout",
        lambda: nj.TransformerBlock(2, dropout_rate=0.1),
        (2, 5, 8),
        train=True,
    ),
    Case("TransformerBlock_repeat", lambda: nj.repeat(nj.TransformerBlock(2), 2), (2, 5, 8)),
    Case(
        "TransformerBlock_repeat_decode",
        lambda: nj.repeat(nj.TransformerBlock(2, decode=True, mlp_features=12), 2),
        (2, 5, 8),
    ),
]
