"""nj.fit(..., async_checkpoint=True): checkpoints written in the background equal blocking ones.

The reference is the same run with blocking checkpoints, and an uninterrupted
run for the resume: losses and every saved array bit for bit.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import nnjax as nj
import nnjax.data as nd
from nnjax.training.fit import fit
from nnjax.training.losses import softmax_cross_entropy
from nnjax.training.trainer import trainer

MODEL = nj.serial(nj.Dense(16), jax.nn.relu, nj.Dropout(0.25), nj.Dense(3))


def _setup():
    tr = trainer(MODEL, softmax_cross_entropy, optax.adam(1e-2))
    params, state = MODEL.init(jax.random.key(0), jnp.zeros((1, 5)))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 5)).astype(np.float32)
    y = (x @ rng.normal(size=(5, 3))).argmax(-1).astype(np.int32)
    return tr, (params, state), (x, y)


def _same(a, b):
    return all(
        np.asarray(u).tobytes() == np.asarray(v).tobytes()
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _untimed(extra):
    """The checkpoint's extra without the epoch records' wall-clock seconds (they differ per run)."""
    epochs = extra["fit"]["history"].get("epoch", [])
    history = {**extra["fit"]["history"], "epoch": [{**e, "seconds": None} for e in epochs]}
    return {**extra, "fit": {**extra["fit"], "history": history}}


def test_async_checkpoints_equal_blocking_ones_and_resume_exactly(tmp_path):
    tr, init, xy = _setup()
    run = dict(steps=18, log_every=3, checkpoint_every=4, keep=None, progress=False)
    data = lambda: nd.batches(xy, 8, seed=1, epochs=3)
    ts_b, hist_b = fit(tr, tr.init(*init), data(), checkpoint_dir=tmp_path / "b", **run)
    ts_a, hist_a = fit(
        tr, tr.init(*init), data(), checkpoint_dir=tmp_path / "a", async_checkpoint=True, **run
    )
    assert hist_a["loss"] == hist_b["loss"] and _same(ts_a, ts_b)
    steps = [s for s, _ in nj.checkpoint.all_steps(tmp_path / "a")]
    assert steps == [s for s, _ in nj.checkpoint.all_steps(tmp_path / "b")] == [4, 8, 12, 16, 18]
    for (_, a), (_, b) in zip(
        nj.checkpoint.all_steps(tmp_path / "a"),
        nj.checkpoint.all_steps(tmp_path / "b"),
        strict=True,
    ):
        got_a, extra_a = nj.checkpoint.restore(a, ts_b)
        got_b, extra_b = nj.checkpoint.restore(b, ts_b)
        assert _same(got_a, got_b) and _untimed(extra_a) == _untimed(extra_b)
    # Stopped at step 8 with async checkpoints, then resumed: the uninterrupted losses.
    stop_at_8 = lambda step, ts, logs: step >= 8
    part_dir = tmp_path / "part"
    _, part = fit(
        tr, tr.init(*init), data(), checkpoint_dir=part_dir, async_checkpoint=True,
        callbacks=[stop_at_8], **run,
    )  # fmt: skip
    assert len(part["loss"]) == 9  # log points every 3 steps: the stop comes at 9
    _, resumed = fit(
        tr, tr.init(*init), data(), checkpoint_dir=part_dir, async_checkpoint=True, **run
    )
    assert resumed["loss"] == hist_b["loss"]
