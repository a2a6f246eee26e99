import atexit
import os
import pathlib
import shutil
import tempfile

# Compiled programs are shared through JAX's persistent compilation cache between the
# processes of one run (pytest-xdist's workers inherit the controller's environment,
# and so do the subprocesses tests start) and between calls that build the same
# program anew (each run of an example's main()): a repeated recipe run in one process
# went from 14.5 to 5.1 s. A fresh, empty directory per run, removed at the end, so
# nothing carries over from one run to the next. Set before jax is imported: jax
# reads these variables when it starts.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="nnjax-tests-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax
import pytest

if os.environ["JAX_COMPILATION_CACHE_DIR"]:  # where a plugin imported jax first
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update(
        "jax_persistent_cache_min_compile_time_secs",
        float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
    )

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


@pytest.fixture(autouse=True)
def _optimized_compiles(request, monkeypatch):
    """``@pytest.mark.optimized``: this test compiles with XLA's optimizations (also in
    the subprocesses it starts), for the few tests whose run time, not compile time,
    dominates (long training loops of convolutions: 40 s unoptimized against 5 s)."""
    if request.node.get_closest_marker("optimized") is None:
        yield
        return
    before = os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"].lower() not in ("0", "false")
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "0")
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)


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
