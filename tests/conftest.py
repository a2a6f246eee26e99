import os
import pathlib

import jax
import pytest

# Tests compare against float64 NumPy/PyTorch references in float32; keep XLA
# from silently picking lower-precision matmuls and keep runs repeatable.
jax.config.update("jax_default_matmul_precision", "highest")

# The tests check nnjax's numbers, not XLA's optimizer: compiling without most XLA
# optimizations took the suite from 14:00 to 9:30 on 2 cores (the same 1102 passed),
# as compile time dominates tiny models. Users, the demo and benchmarks/ run fully
# optimized; JAX_DISABLE_MOST_OPTIMIZATIONS=0 runs the tests that way too. The
# environment variable carries the choice into the subprocesses some tests start.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
jax.config.update(
    "jax_disable_most_optimizations",
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"].lower() not in ("0", "false"),
)

# Implicit rank promotion (a (3,) added to a (2, 3) by accident) is an error in every
# test, as in equinox's tests: every broadcast in nnjax is written out
# (jax.lax.broadcast_to_rank for a bias). The environment variable carries the same
# rule into the subprocesses some tests start (the CLI, multi-process sharding).
os.environ["JAX_NUMPY_RANK_PROMOTION"] = "raise"
jax.config.update("jax_numpy_rank_promotion", "raise")


DATA = pathlib.Path(
    os.environ.get("NNJAX_DATA", pathlib.Path(__file__).resolve().parents[2] / "shared" / "data")
)


@pytest.fixture
def data_dir() -> pathlib.Path:
    """``../shared/data`` (or ``$NNJAX_DATA``); the test skips where it is absent."""
    if not DATA.is_dir():
        pytest.skip(f"shared datasets not found at {DATA} (set NNJAX_DATA)")
    return DATA


@pytest.fixture
def torch():
    """PyTorch on the CPU as the reference implementation; skips where torch is absent."""
    torch = pytest.importorskip("torch", reason="torch is the reference for layer numbers")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float32)
    return torch
