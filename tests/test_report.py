import jax
import numpy as np
import pytest

import nnjax as nj
from nnjax.core import report


def test_param_bytes_against_numpy_nbytes_on_any_pytree():
    tree = {"a": {"w": np.zeros((3, 5), np.float32)}, "b": np.zeros(7, np.float16)}
    state = (tree, [np.zeros((2, 2), np.int8)], None, 3.0)
    want = 3 * 5 * 4 + 7 * 2 + 4
    assert report.param_bytes(state) == want
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    assert report.param_bytes(shapes) == sum(x.nbytes for x in jax.tree.leaves(tree))
    assert nj.paths.param_bytes is report.param_bytes is nj.param_bytes


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1,023 B"),
        (1024, "1.0 KiB"),
        (3 * 2**20 + 2**19, "3.5 MiB"),
        (5 * 2**40, "5,120.0 GiB"),
    ],
)
def test_human_bytes(n, text):
    assert report.human_bytes(n) == text


def test_table_aligns_columns_and_sets_off_the_footer():
    text = report.table(
        ("k", "count"), [("alpha", "1"), ("b", "200")], align="lr", footer=[("total", "201")]
    )
    assert text.splitlines() == [
        "k      count",
        "-----  -----",
        "alpha      1",
        "b        200",
        "-----  -----",
        "total    201",
    ]
    assert report.table(None, [("a", "x"), ("long", "")]) == "a     x\nlong"
    with pytest.raises(ValueError, match="expected 2 cells in every row"):
        report.table(("a", "b"), [("only one",)])


def test_shorten():
    assert report.shorten(["a", "b"]) == "a, b"
    assert report.shorten([str(i) for i in range(12)], limit=10).endswith("8, 9, ... (2 more)")
