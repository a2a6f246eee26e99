import jax.numpy as jnp
import numpy as np
import pytest

import nnjax as nj
from nnjax.core import paths


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("head/**", "head/kernel", True),
        ("head/**", "head", True),  # ** matches zero segments
        ("head/**", "header/kernel", False),
        ("**", "a/b/c", True),
        ("**/bias", "bias", True),
        ("**/bias", "blocks/3/attn/out/bias", True),
        ("**/attn/*/kernel", "blocks/3/attn/query/kernel", True),
        ("**/attn/*/kernel", "blocks/3/attn/kernel", False),
        ("blocks/*/attn/**", "blocks/11/attn/value/bias", True),
        ("blocks/*/attn/**", "blocks/11/mlp/fc/bias", False),
        ("dense_*/kernel", "dense_12/kernel", True),
        ("dense_*/kernel", "dense_1/sub/kernel", False),
        ("blocks/1[01]/**", "blocks/10/x", True),
        ("a/**/b", "a/b", True),
        ("a/**/b", "a/x/y/b", True),
    ],
)
def test_glob_match(pattern, path, expected):
    assert paths.glob_match(pattern, path) is expected


def test_flatten_unflatten_round_trip():
    tree = {"a": {"b": jnp.ones(2), "c": {"d": jnp.zeros(3)}}, "e": jnp.ones(1)}
    flat = paths.flatten(tree)
    assert list(flat) == ["a/b", "a/c/d", "e"]
    back = paths.unflatten(flat)
    assert back.keys() == tree.keys() and back["a"]["c"]["d"].shape == (3,)


def test_match_errors_with_near_paths():
    tree = {"head": {"kernel": np.zeros((2, 2)), "bias": np.zeros(2)}}
    assert paths.match(tree, "head/*") == ["head/kernel", "head/bias"]
    with pytest.raises(
        nj.GlobError, match=r"'haed/\*\*' matches no parameter path; near paths: \['head/"
    ):
        paths.match(tree, ["head/bias", "haed/**"])


def test_counts_and_bytes():
    tree = {"a": jnp.zeros((3, 4)), "b": {"c": jnp.zeros(5, jnp.bfloat16)}}
    assert paths.count_params(tree) == 17
    assert paths.param_bytes(tree) == 12 * 4 + 5 * 2
