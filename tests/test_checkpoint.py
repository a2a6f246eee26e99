"""nj.checkpoint: bit-exact round trips, atomic saves, and refusal of every kind of corruption."""

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nnjax as nj
import nnjax.checkpoint as ckpt
from nnjax.checkpoint import arrayfile, listing, metadata
from nnjax.core.errors import CheckpointError
from nnjax.training.trainer import TrainState


def _train_state(seed=0, step=7):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    params = {
        "dense_0": {"kernel": jax.random.normal(k1, (3, 4)), "bias": jnp.zeros(4)},
        "head": {"kernel": jax.random.normal(k2, (4, 2)).astype(jnp.bfloat16)},
    }
    state = {"bn_0": {"mean": jax.random.normal(k3, (4,)), "var": jnp.ones(4)}}
    opt = optax.adam(1e-2)

    @jax.jit
    def advance(opt_state):  # non-trivial mu, nu and count
        grads = jax.tree.map(jnp.ones_like, params)
        for _ in range(step):
            _, opt_state = opt.update(grads, opt_state, params)
        return opt_state

    opt_state = advance(opt.init(params))
    return TrainState(jnp.asarray(step, jnp.int32), params, state, opt_state)


def _assert_bit_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def test_round_trip_is_bit_exact(tmp_path):
    ts = _train_state()
    extra = {"rng": [0, 42], "data": {"position": 12}, "history": {"loss": [1.5, 0.25]}}
    path = ckpt.save(tmp_path, ts, extra=extra)
    assert os.path.basename(path) == "step_000007"
    assert ckpt.latest(tmp_path) == path
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), ts)
    restored, got_extra = ckpt.restore(tmp_path, target)
    _assert_bit_equal(restored, ts)
    assert restored.params["head"]["kernel"].dtype == jnp.bfloat16
    assert isinstance(restored.opt_state[0], optax.ScaleByAdamState)
    assert int(restored.opt_state[0].count) == 7
    assert got_extra == extra
    # the metadata records every path's shape and dtype
    with open(os.path.join(path, "metadata.json")) as f:
        meta = json.load(f)
    assert meta["leaves"]["params/head/kernel"] == {"shape": [4, 2], "dtype": "bfloat16"}
    assert meta["leaves"]["opt_state/0/mu/dense_0/kernel"]["shape"] == [3, 4]


def test_independent_safetensors_reader_sees_the_same_arrays(tmp_path, torch):
    from safetensors.torch import load_file

    ts = _train_state()
    path = ckpt.save(tmp_path, ts)
    loaded = load_file(os.path.join(path, "arrays.safetensors"))
    assert loaded["params/head/kernel"].dtype == torch.bfloat16
    np.testing.assert_array_equal(
        loaded["params/head/kernel"].float().numpy(),
        np.asarray(ts.params["head"]["kernel"], np.float32),
    )
    np.testing.assert_array_equal(
        loaded["opt_state/0/nu/dense_0/kernel"].numpy(),
        np.asarray(ts.opt_state[0].nu["dense_0"]["kernel"]),
    )
    assert int(loaded["step"]) == 7


def test_typed_prng_keys_and_python_scalars_round_trip(tmp_path):
    tree = {"rng": jax.random.key(5), "raw": jax.random.PRNGKey(3), "w": jnp.arange(3.0)}
    ckpt.save(tmp_path, tree, step=1)
    restored, _ = ckpt.restore(tmp_path, tree)
    assert jnp.issubdtype(restored["rng"].dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(
        jax.random.key_data(restored["rng"]), jax.random.key_data(tree["rng"])
    )
    np.testing.assert_array_equal(
        jax.random.normal(restored["rng"], (3,)), jax.random.normal(tree["rng"], (3,))
    )
    _assert_bit_equal(restored["raw"], tree["raw"])
    # a raw uint32 key where a typed key is expected is a structure error
    wrong = {**tree, "rng": jax.random.PRNGKey(0)}
    with pytest.raises(
        CheckpointError, match=r"rng \(expected uint32 \(2,\), got uint32 \(2,\) \(key<fry>"
    ):
        ckpt.restore(tmp_path, wrong)


def test_restore_into_different_structure_names_paths(tmp_path):
    ts = _train_state()
    ckpt.save(tmp_path, ts)
    params = dict(ts.params)
    params["extra_layer"] = {"kernel": jnp.zeros((2, 2))}
    del params["dense_0"]
    params["head"] = {"kernel": jnp.zeros((4, 3), jnp.bfloat16)}
    other = ts._replace(
        params=params, state={"bn_0": {"mean": jnp.zeros(4), "var": jnp.ones(4, jnp.float16)}}
    )
    with pytest.raises(CheckpointError) as info:
        ckpt.restore(tmp_path, other)
    msg = str(info.value)
    assert "missing paths: ['params/extra_layer/kernel']" in msg
    assert "unexpected paths: ['params/dense_0/bias', 'params/dense_0/kernel']" in msg
    assert "params/head/kernel (expected bfloat16 (4, 3), got bfloat16 (4, 2))" in msg
    assert "state/bn_0/var (expected float16 (4,), got float32 (4,))" in msg
    # the optimizer state was built on the old params, so its paths stay as stored: not listed
    assert "opt_state/0/mu/dense_0/kernel" not in msg


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    ts = _train_state(step=1)
    first = ckpt.save(tmp_path, ts)

    def dies(folder, meta):
        with open(os.path.join(folder, "metadata.json"), "w") as f:
            f.write('{"format": "nnjax.checkp')  # half written
        raise OSError("disk pulled out")

    monkeypatch.setattr(metadata, "write", dies)
    monkeypatch.setattr(listing, "remove_tree", lambda path: None)  # as after a hard kill
    with pytest.raises(OSError, match="disk pulled out"):
        ckpt.save(tmp_path, _train_state(seed=1, step=2))
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".tmp-step_000002")]
    assert len(leftovers) == 1  # the half folder exists ...
    assert os.path.isfile(tmp_path / leftovers[0] / "arrays.safetensors")
    assert ckpt.latest(tmp_path) == first  # ... but is never picked
    restored, _ = ckpt.restore(tmp_path, ts)
    _assert_bit_equal(restored, ts)
    monkeypatch.undo()
    second = ckpt.save(tmp_path, _train_state(seed=1, step=2))
    assert ckpt.latest(tmp_path) == second


def test_failed_save_cleans_its_temp_folder(tmp_path, monkeypatch):
    ckpt.save(tmp_path, _train_state(step=1))

    def dies(path, tensors):
        raise OSError("no space left")

    monkeypatch.setattr(arrayfile, "write", dies)
    with pytest.raises(OSError, match="no space"):
        ckpt.save(tmp_path, _train_state(step=2))
    assert sorted(os.listdir(tmp_path)) == [".writer.lock", "step_000001"]


def test_never_overwrites(tmp_path):
    ts = _train_state(step=3)
    path = ckpt.save(tmp_path, ts)
    with pytest.raises(CheckpointError, match="step_000003 exists already"):
        ckpt.save(tmp_path, _train_state(seed=9, step=3))
    restored, _ = ckpt.restore(path, ts)
    _assert_bit_equal(restored, ts)


def test_keep_newest_n(tmp_path):
    ts = _train_state(step=0)
    for step in [1, 2, 3, 10, 4]:
        ckpt.save(tmp_path, ts, step=step, keep=3)
    assert [s for s, _ in ckpt.all_steps(tmp_path)] == [3, 4, 10]
    assert ckpt.latest(tmp_path).endswith("step_000010")
    ckpt.save(tmp_path, ts, step=11, keep=None)
    assert len(ckpt.all_steps(tmp_path)) == 4
    assert ckpt.latest(tmp_path / "nothing") is None


def _saved(tmp_path):
    ts = _train_state()
    path = ckpt.save(tmp_path, ts)
    return ts, pathlib.Path(path)


def test_truncated_array_file_is_refused(tmp_path):
    ts, path = _saved(tmp_path)
    file = path / "arrays.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 7])
    with pytest.raises(CheckpointError, match=r"expected \d+ bytes, got \d+ \(truncated"):
        ckpt.restore(path, ts)


def test_flipped_byte_is_refused(tmp_path):
    ts, path = _saved(tmp_path)
    file = path / "arrays.safetensors"
    data = bytearray(file.read_bytes())
    data[-3] ^= 0x40
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        ckpt.restore(path, ts)


def test_random_bytes_are_refused(tmp_path):
    ts, path = _saved(tmp_path)
    (path / "arrays.safetensors").write_bytes(np.random.default_rng(0).bytes(300))
    with pytest.raises(CheckpointError, match=r"expected \d+ bytes, got 300"):
        ckpt.restore(path, ts)


def test_missing_metadata_is_refused(tmp_path):
    ts, path = _saved(tmp_path)
    os.remove(os.path.join(path, "metadata.json"))
    with pytest.raises(CheckpointError, match=r"missing metadata\.json"):
        ckpt.restore(path, ts)
    assert ckpt.latest(tmp_path) is None  # an incomplete folder is not a checkpoint


def test_changed_dtype_in_metadata_is_refused(tmp_path):
    ts, path = _saved(tmp_path)
    meta_file = path / "metadata.json"
    meta = json.loads(meta_file.read_text())
    meta["leaves"]["params/dense_0/kernel"]["dtype"] = "float16"
    meta_file.write_text(json.dumps(metadata.seal(meta)))  # a consistent but wrong metadata
    with pytest.raises(
        CheckpointError,
        match=r"metadata says params/dense_0/kernel is float16 \[3, 4\], but arrays.safetensors holds float32",
    ):
        ckpt.restore(path, ts)


def test_metadata_that_is_not_json_is_refused(tmp_path):
    ts, path = _saved(tmp_path)
    (path / "metadata.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt metadata"):
        ckpt.restore(path, ts)


def test_no_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        ckpt.restore(tmp_path, {"a": jnp.zeros(2)})


def test_save_and_load_params(tmp_path):
    ts = _train_state()
    file = tmp_path / "model.safetensors"
    ckpt.save_params(file, ts.params)
    loaded = ckpt.load_params(file)
    _assert_bit_equal(loaded, ts.params)
    checked = ckpt.load_params(file, target=ts.params)
    _assert_bit_equal(checked, ts.params)
    assert safetensors.numpy.load_file(file)["dense_0/bias"].dtype == np.float32
    with pytest.raises(CheckpointError, match=r"missing paths: \['dense_0/scale'\]"):
        ckpt.load_params(
            file, target={**ts.params, "dense_0": {**ts.params["dense_0"], "scale": jnp.ones(4)}}
        )
    assert [n for n in os.listdir(tmp_path) if n.startswith(".tmp")] == []
    clash = tmp_path / "clash.safetensors"
    safetensors.numpy.save_file(
        {"a": np.zeros(2, np.float32), "a/b": np.ones(1, np.float32)}, clash
    )
    with pytest.raises(CheckpointError, match=r"keys \['a'\] also hold arrays"):
        ckpt.load_params(clash)


def test_params_file_matches_nj_paths(tmp_path):
    params, _ = nj.serial(nj.Dense(4), jax.nn.relu, nj.Dense(2)).init(
        jax.random.key(0), jnp.zeros((1, 3))
    )
    file = tmp_path / "p.safetensors"
    ckpt.save_params(file, params)
    from safetensors import safe_open

    with safe_open(file, framework="np") as f:
        assert sorted(f.keys()) == sorted(nj.paths.flatten(params))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(min_size=0, max_size=400), keep_header=st.booleans())
def test_random_bytes_never_crash(tmp_path, data, keep_header):
    folder = tmp_path / "prop"
    if not folder.exists():
        ckpt.save(
            folder, {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(2, jnp.bfloat16)}, step=0
        )
    path = ckpt.latest(folder)
    target = {"w": jnp.zeros((2, 3)), "b": jnp.zeros(2, jnp.bfloat16)}
    arrays = pathlib.Path(path) / "arrays.safetensors"
    if keep_header:  # a plausible header with a random body reaches the safetensors parser
        import struct

        header = b'{"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}}'
        data = struct.pack("<Q", len(header)) + header + data
    arrays.write_bytes(data)
    with pytest.raises(CheckpointError):
        ckpt.restore(path, target)
    # without a sha256 to check, the parser itself sees the bytes
    params_file = tmp_path / "random.safetensors"
    params_file.write_bytes(data)
    try:
        loaded = ckpt.load_params(params_file, target={"w": jnp.zeros((2, 3))})
    except CheckpointError:
        pass
    else:  # only a well-formed file with exactly that tensor loads
        assert loaded["w"].shape == (2, 3)


# ---------------------------------------------------------------- nothing stale, nothing unverified


def _rewrite_meta(path, change, seal=True):
    meta_file = pathlib.Path(path) / "metadata.json"
    meta = json.loads(meta_file.read_text())
    change(meta)
    meta_file.write_text(json.dumps(metadata.seal(meta) if seal else meta))


def test_changed_number_in_metadata_is_refused(tmp_path):
    ts = _train_state()
    path = ckpt.save(tmp_path, ts, extra={"fit": {"step": 7, "lr": 0.5}})
    _rewrite_meta(path, lambda m: m["extra"]["fit"].update(step=8), seal=False)
    with pytest.raises(
        CheckpointError, match=r"metadata.json: checksum mismatch; the metadata was"
    ):
        ckpt.restore(path, ts)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, "corrupt metadata"),  # RecursionError in json
        (
            '{"format": "nnjax.checkpoint", "version": 2, "step": ' + "[" * 5000 + "]" * 5000 + "}",
            "corrupt metadata",
        ),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"format": "nnjax.checkpoint", "version": "2"}', "unsupported format version '2'"),
    ],
)
def test_nested_or_foreign_metadata_is_a_checkpoint_error(tmp_path, text, message):
    ts, path = _saved(tmp_path)
    (path / "metadata.json").write_text(text)
    with pytest.raises(CheckpointError, match=message):
        ckpt.restore(path, ts)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda m: m["leaves"].update({"params/head/kernel": [4, 2]}),
            r"leaf 'params/head/kernel': \[4, 2\]",
        ),
        (lambda m: m.update(step="7"), r"step '7'"),
        (lambda m: m.update(extra=[1]), r"extra list"),
        (lambda m: m["leaves"]["step"].update(shape=[-1]), r"leaf step: shape \[-1\]"),
        (
            lambda m: m["files"]["arrays.safetensors"]["pieces"]["step"].update(start=[3]),
            r"piece step: start \[3\]",
        ),
        (lambda m: m["files"].update({"../x.safetensors": {}}), r"file '../x.safetensors'"),
        (
            lambda m: m["files"]["arrays.safetensors"]["pieces"].pop("params/dense_0/bias"),
            r"leaf params/dense_0/bias: pieces hold 0 of 4 elements",
        ),
        (lambda m: m["files"]["arrays.safetensors"].update(size="9"), r"file 'arrays.safetensors'"),
    ],
)
def test_sealed_metadata_with_wrong_fields_is_refused(tmp_path, change, message):
    ts, path = _saved(tmp_path)
    _rewrite_meta(path, change)  # sealed again: only the field checks can catch it
    with pytest.raises(CheckpointError, match="corrupt metadata: " + message):
        ckpt.restore(path, ts)


def test_step_folder_missing_its_array_file_is_not_a_checkpoint(tmp_path):
    ts = _train_state()
    first = ckpt.save(tmp_path, ts, step=1)
    second = ckpt.save(tmp_path, ts, step=2)
    os.remove(os.path.join(second, "arrays.safetensors"))
    assert ckpt.all_steps(tmp_path) == [(1, first)]
    assert ckpt.latest(tmp_path) == first
    with pytest.raises(CheckpointError, match=r"step_000002/arrays.safetensors"):
        ckpt.restore(second, ts)
    os.remove(os.path.join(first, "metadata.json"))
    assert ckpt.latest(tmp_path) is None


def test_next_save_removes_leftover_temp_folders(tmp_path):
    ckpt.save(tmp_path, _train_state(step=1))
    for name in (".tmp-step_000002", ".tmp-step_000009-abc123"):  # killed saves (old and new names)
        (tmp_path / name).mkdir()
        (tmp_path / name / "arrays.safetensors").write_bytes(b"half")
    ckpt.save(tmp_path, _train_state(step=3))
    assert sorted(os.listdir(tmp_path)) == [".writer.lock", "step_000001", "step_000003"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_and_folders_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = ckpt.save(tmp_path / "run", _train_state())
        ckpt.save_params(tmp_path / "p.safetensors", {"w": jnp.ones(2)})
    finally:
        os.umask(old)
    mode = lambda p: os.stat(p).st_mode & 0o777
    assert mode(path) == 0o777 & ~umask
    assert mode(tmp_path / "run") == 0o777 & ~umask
    for name in ("arrays.safetensors", "metadata.json"):
        assert mode(os.path.join(path, name)) == 0o666 & ~umask
    assert mode(tmp_path / "p.safetensors") == 0o666 & ~umask


def test_keep_never_deletes_the_checkpoint_just_written(tmp_path):
    ts = _train_state()
    for step in (5, 6, 7):
        ckpt.save(tmp_path, ts, step=step, keep=3)
    new = ckpt.save(tmp_path, ts, step=2, keep=3)  # older than all the kept ones
    assert os.path.isdir(new)
    assert [s for s, _ in ckpt.all_steps(tmp_path)] == [2, 5, 6, 7]


def test_writer_fetches_one_tensor_at_a_time(tmp_path):
    """Each array is fetched when its turn comes and dropped before the next one is fetched."""
    import weakref

    alive = []

    def fetch(i):
        assert all(r() is None for r in alive), "an earlier tensor is still held"
        a = np.full((64, 64), i, np.float32)
        alive.append(weakref.ref(a))
        return a

    tensors = [
        arrayfile.Tensor(f"t{i}", "float32", (64, 64), lambda i=i: fetch(i)) for i in range(5)
    ]
    file = str(tmp_path / "x.safetensors")
    written = arrayfile.write(file, tensors)
    assert written.size == os.path.getsize(file)
    import hashlib

    assert written.sha256 == hashlib.sha256(pathlib.Path(file).read_bytes()).hexdigest()
    loaded = safetensors.numpy.load_file(file)  # the reference reader
    assert sorted(loaded) == [f"t{i}" for i in range(5)]
    for i in range(5):
        np.testing.assert_array_equal(loaded[f"t{i}"], np.full((64, 64), i, np.float32))


# ---------------------------------------------------------------- async saves


def _bump(ts):  # a donating step: the saved state's buffers are handed back to XLA
    return jax.jit(lambda t: jax.tree.map(lambda x: x + 1, t), donate_argnums=0)(ts)


def test_async_save_writes_in_the_background_and_the_next_save_waits(tmp_path, monkeypatch):
    import threading

    ts = _train_state(step=1)
    expected = jax.tree.map(np.array, ts)
    started, gate = threading.Event(), threading.Event()
    real = arrayfile.write

    def slow(path, tensors):
        started.set()
        assert gate.wait(20)
        return real(path, tensors)

    monkeypatch.setattr(arrayfile, "write", slow)
    first = ckpt.save(tmp_path, ts, blocking=False)
    assert started.wait(20)
    assert ckpt.latest(tmp_path) is None  # still being written
    ts = _bump(ts)  # training goes on, donating the state that is being saved
    threading.Timer(0.3, gate.set).start()
    second = ckpt.save(tmp_path, ts, step=2, blocking=False)  # waits for the first
    assert ckpt.all_steps(tmp_path)[0] == (1, first)
    ckpt.wait(tmp_path)
    assert ckpt.latest(tmp_path) == second
    _assert_bit_equal(ckpt.restore(first, ts)[0], expected)
    _assert_bit_equal(ckpt.restore(second, ts)[0], jax.tree.map(lambda x: x + 1, expected))


def test_async_save_error_is_raised_once_and_keeps_previous_checkpoint(tmp_path, monkeypatch):
    ts = _train_state(step=1)
    first = ckpt.save(tmp_path, ts)

    def dies(path, tensors):
        raise OSError("disk full")

    monkeypatch.setattr(arrayfile, "write", dies)
    ckpt.save(tmp_path, ts, step=2, blocking=False)
    with pytest.raises(OSError, match="disk full"):
        ckpt.wait(tmp_path)
    ckpt.wait(tmp_path)  # raised once
    ckpt.save(tmp_path, ts, step=3, blocking=False)
    with pytest.raises(OSError, match="disk full"):  # the next save raises the last one's error
        ckpt.save(tmp_path, ts, step=4)
    assert ckpt.latest(tmp_path) == first
    assert sorted(os.listdir(tmp_path)) == [".writer.lock", "step_000001"]
    _assert_bit_equal(ckpt.restore(tmp_path, ts)[0], ts)


def test_extra_is_stored_as_json_gives_it_back(tmp_path):
    """Int keys come back as JSON gives them (strings), and the checksum still holds."""
    extra = {"table": {1: "a", 10: "b", 2: "c"}, "nan": float("inf"), "t": (1, 2)}
    path = ckpt.save(tmp_path, {"w": jnp.ones(2)}, step=0, extra=extra)
    extra["table"][3] = "changed after the save"
    _, got = ckpt.restore(path, {"w": jnp.ones(2)})
    assert got == {"table": {"1": "a", "10": "b", "2": "c"}, "nan": float("inf"), "t": [1, 2]}
    with pytest.raises(nj.ArgumentError, match="extra must be JSON-able"):
        ckpt.save(tmp_path, {"w": jnp.ones(2)}, step=1, extra={"f": object()})


def test_version_1_checkpoints_still_restore(tmp_path):
    """A checkpoint of the format before streaming, written with safetensors' own writer."""
    import hashlib

    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.ones(2, ml_dtypes.bfloat16)
    folder = tmp_path / "step_000003"
    folder.mkdir()
    safetensors.numpy.save_file({"w": w, "b": b}, folder / "arrays.safetensors")
    data = (folder / "arrays.safetensors").read_bytes()
    meta = {
        "format": "nnjax.checkpoint",
        "version": 1,
        "step": 3,
        "arrays": "arrays.safetensors",
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "leaves": {
            "w": {"shape": [2, 3], "dtype": "float32"},
            "b": {"shape": [2], "dtype": "bfloat16"},
        },
        "extra": {"epoch": 1},
    }
    (folder / "metadata.json").write_text(json.dumps(meta))
    assert ckpt.latest(tmp_path) == str(folder)
    got, extra = ckpt.restore(tmp_path, {"w": jnp.zeros((2, 3)), "b": jnp.zeros(2, jnp.bfloat16)})
    _assert_bit_equal(got, {"w": w, "b": b})
    assert extra == {"epoch": 1}


def test_tampered_key_impl_is_a_checkpoint_error(tmp_path):
    tree = {"rng": jax.random.key(5)}
    path = ckpt.save(tmp_path, tree, step=1)
    _rewrite_meta(path, lambda m: m["leaves"]["rng"].update(key_impl="no_such_prng"))
    with pytest.raises(CheckpointError, match=r"cannot rebuild a key<fry> key"):
        ckpt.restore(path, tree)
