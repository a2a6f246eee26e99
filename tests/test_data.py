"""nj.data: batch iterators against NumPy bookkeeping, readers against the shared datasets' README."""

import gzip
import shutil

import jax
import numpy as np
import pytest

import nnjax as nj
import nnjax.data as nd

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _toy(n=23):
    x = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    y = np.arange(n, dtype=np.int32)
    return x, y


# ------------------------------------------------------------------------ batches


def test_every_example_once_per_epoch_and_rows_stay_paired():
    x, y = _toy(24)
    it = nd.batches((x, y), 6, seed=3, epochs=2)
    assert len(it) == 8
    seen = [[], []]
    for i, (xb, yb) in enumerate(it):
        assert xb.shape == (6, 3) and yb.shape == (6,)
        np.testing.assert_array_equal(xb, x[yb])  # x and y rows shuffled together
        seen[i // 4].extend(yb.tolist())
    assert it.position == 8
    assert sorted(seen[0]) == list(range(24)) and sorted(seen[1]) == list(range(24))
    assert seen[0] != seen[1]  # a fresh permutation each epoch
    assert seen[0] != list(range(24))


def test_remainder_dropped_or_kept():
    x, y = _toy(23)
    dropped = list(nd.batches((x, y), 5, shuffle=False))
    assert [len(b[1]) for b in dropped] == [5, 5, 5, 5]
    np.testing.assert_array_equal(np.concatenate([b[1] for b in dropped]), np.arange(20))
    kept = list(nd.batches((x, y), 5, shuffle=True, drop_remainder=False, seed=1))
    assert [len(b[1]) for b in kept] == [5, 5, 5, 5, 3]
    assert sorted(np.concatenate([b[1] for b in kept]).tolist()) == list(range(23))


def test_seed_determinism_and_different_seeds_differ():
    x, y = _toy(40)
    a = [b[1] for b in nd.batches((x, y), 8, seed=7, epochs=2)]
    b = [b[1] for b in nd.batches((x, y), 8, seed=7, epochs=2)]
    c = [b[1] for b in nd.batches((x, y), 8, seed=8, epochs=2)]
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    assert any(not np.array_equal(u, v) for u, v in zip(a, c, strict=True))
    # the order is the permutation NumPy draws from (seed, epoch)
    np.testing.assert_array_equal(
        np.concatenate(a[:5]), np.random.default_rng((7, 0)).permutation(40)
    )


@pytest.mark.parametrize("k", [0, 3, 5, 7, 11])
def test_resume_with_start_equals_tail_of_full_pass(k):
    x, y = _toy(30)
    full = list(nd.batches((x, y), 4, seed=2, epochs=3, drop_remainder=False))
    tail = list(nd.batches((x, y), 4, seed=2, epochs=3, drop_remainder=False, start=k))
    assert len(tail) == len(full) - k
    for (xa, ya), (xb, yb) in zip(full[k:], tail, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    # at(position) on a half-consumed iterator resumes at the same batch
    it = nd.batches((x, y), 4, seed=2, epochs=3, drop_remainder=False)
    for _ in range(k):
        next(it)
    np.testing.assert_array_equal(next(it.at(it.position))[1], full[k][1])


def test_dict_pytree_and_endless():
    x, y = _toy(10)
    it = nd.batches({"x": x, "y": y}, 5, epochs=None, shuffle=False)
    got = [next(it)["y"] for _ in range(5)]
    np.testing.assert_array_equal(got[4], np.arange(5))  # epoch 2 starts again
    assert it.epoch == 2
    with pytest.raises(TypeError, match="endless"):
        len(it)


def test_different_lengths_raise_before_work():
    x, y = _toy(10)
    with pytest.raises(nj.DataError, match=r"same leading length, got lengths \[10, 9\]"):
        nd.batches((x, y[:9]), 2)
    with pytest.raises(nj.DataError, match="expected batch_size <= 10"):
        nd.batches((x, y), 11)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda x, y: nd.batches((x, y), 4.0),
            r"^batch_size: expected an int >= 1, got 4.0 \(float\)",
        ),
        (lambda x, y: nd.batches((x, y), 0), r"^batch_size: expected an int >= 1, got 0"),
        (lambda x, y: nd.batches((x, y), 2, epochs=1.5), r"^epochs: expected an int >= 0"),
        (lambda x, y: nd.batches((x, y), 2, start=-1), r"^start: expected an int >= 0, got -1"),
        (lambda x, y: nd.batches((x, y), 2).at(2.0), r"^position: expected an int >= 0"),
        (lambda x, y: nd.lm_batches(y, 4, 0), r"^batch_size: expected an int >= 1, got 0"),
        (lambda x, y: nd.lm_batches(y, 4.0, 2), r"^block_size: expected an int >= 1"),
        (lambda x, y: nd.lm_batches(y, 4, 2, steps=-1), r"^steps: expected an int >= 0"),
        (lambda x, y: nd.stack_batches([], 0), r"^k: expected an int >= 1, got 0"),
        (lambda x, y: nd.prefetch_to_device([], 2.5), r"^size: expected an int >= 1, got 2.5"),
    ],
)
def test_bad_sizes_name_the_argument_before_any_work(call, match):
    x, y = _toy(10)
    with pytest.raises(nj.ArgumentError, match=match) as err:
        call(x, y)
    assert isinstance(err.value, ValueError) and isinstance(err.value, TypeError)


def test_no_examples_is_a_data_error():
    with pytest.raises(
        nj.DataError, match="expected at least one example, got arrays with leading length 0"
    ):
        nd.batches((np.zeros((0, 3)), np.zeros(0)), 1, drop_remainder=False)


def test_stack_batches_and_prefetch():
    x, y = _toy(24)
    plain = list(nd.batches((x, y), 4, shuffle=False))
    stacked = list(nd.stack_batches(nd.batches((x, y), 4, shuffle=False), 4))
    assert len(stacked) == 1  # 6 batches: one group of 4, remainder dropped
    assert stacked[0][0].shape == (4, 4, 3)
    np.testing.assert_array_equal(stacked[0][1], np.stack([b[1] for b in plain[:4]]))
    on_device = list(nd.prefetch_to_device(iter(plain), size=2))
    assert len(on_device) == 6
    for a, b in zip(plain, on_device, strict=True):
        assert isinstance(b[0], jax.Array)
        np.testing.assert_array_equal(a[0], np.asarray(b[0]))


def test_train_test_split():
    x, y = _toy(50)
    (xtr, ytr), (xte, yte) = nd.train_test_split((x, y), 0.2, seed=0)
    assert len(yte) == 10 and len(ytr) == 40
    assert sorted(np.concatenate([ytr, yte]).tolist()) == list(range(50))
    np.testing.assert_array_equal(xte, x[yte])
    np.testing.assert_array_equal(xtr, x[ytr])
    (_, ytr2), _ = nd.train_test_split((x, y), 0.2, seed=0)
    np.testing.assert_array_equal(ytr, ytr2)


def test_lm_batches_are_shifted_windows_and_resumable():
    ids = np.arange(1000, dtype=np.int32) * 7 % 1000
    it = nd.lm_batches(ids, 16, 4, seed=5, steps=6)
    got = list(it)
    assert len(got) == 6 and it.position == 6
    for x, y in got:
        assert x.shape == (4, 16) and y.shape == (4, 16)
        for row_x, row_y in zip(x, y, strict=True):
            start = int(np.flatnonzero(ids == row_x[0])[0])
            np.testing.assert_array_equal(row_x, ids[start : start + 16])
            np.testing.assert_array_equal(row_y, ids[start + 1 : start + 17])
    resumed = list(nd.lm_batches(ids, 16, 4, seed=5, start=4, steps=6))
    assert len(resumed) == 2
    np.testing.assert_array_equal(resumed[0][0], got[4][0])


# ------------------------------------------------------------------------ readers


def test_mnist_shapes_dtypes_and_class_counts(data_dir):
    x, y = nd.load_mnist(data_dir / "mnist", "train")
    assert x.shape == (60000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (60000,) and y.dtype == np.uint8
    assert np.bincount(y).tolist() == TRAIN_COUNTS
    # README: pixel mean of the train set / 255
    np.testing.assert_allclose(x.mean() / 255, 0.1306604762738429, rtol=1e-9)
    xt, yt = nd.load_mnist(data_dir / "mnist", "test")
    assert xt.shape == (10000, 28, 28) and xt.dtype == np.uint8
    assert np.bincount(yt).tolist() == TEST_COUNTS


def test_idx_raw_and_gzip_agree(data_dir, tmp_path):
    for name in ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]:
        with gzip.open(data_dir / "mnist" / f"{name}.gz", "rb") as src:
            (tmp_path / name).write_bytes(src.read())
    x_raw, y_raw = nd.load_mnist(tmp_path, "test")
    x_gz, y_gz = nd.load_mnist(data_dir / "mnist", "test")
    np.testing.assert_array_equal(x_raw, x_gz)
    np.testing.assert_array_equal(y_raw, y_gz)
    # the header, parsed independently
    raw = (tmp_path / "t10k-images-idx3-ubyte").read_bytes()
    assert int.from_bytes(raw[:4], "big") == 2051
    np.testing.assert_array_equal(x_raw[0].ravel(), np.frombuffer(raw[16 : 16 + 784], np.uint8))


def test_corrupt_idx_files_raise(data_dir, tmp_path):
    raw = gzip.decompress((data_dir / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (tmp_path / "truncated").write_bytes(raw[:-10])
    with pytest.raises(nj.DataError, match=r"expected 10008 bytes .* got 9998"):
        nd.load_idx(tmp_path / "truncated")
    (tmp_path / "magic").write_bytes(b"\x12\x34" + raw[2:])
    with pytest.raises(nj.DataError, match=r"expected an IDX file .* got magic 12340801"):
        nd.load_idx(tmp_path / "magic")
    gz = (data_dir / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes()
    (tmp_path / "cut.gz").write_bytes(gz[: len(gz) // 2])
    with pytest.raises(nj.DataError, match="corrupt or truncated gzip"):
        nd.load_idx(tmp_path / "cut.gz")
    shutil.copy(data_dir / "mnist" / "t10k-labels-idx1-ubyte.gz", tmp_path / "ok.gz")
    assert nd.load_idx(tmp_path / "ok.gz").shape == (10000,)


def test_tinyshakespeare_char(data_dir):
    path = data_dir / "tinyshakespeare" / "input.txt"
    text = nd.load_text(path)
    assert len(text.vocab) == 65
    assert text.train.shape == (1003854,) and text.val.shape == (111540,)
    # nanoGPT's prepare.py, written out independently
    raw = path.read_text(encoding="utf-8")
    chars = sorted(set(raw))
    assert text.vocab == chars
    stoi = {c: i for i, c in enumerate(chars)}
    np.testing.assert_array_equal(text.val[:500], [stoi[c] for c in raw[1003854 : 1003854 + 500]])
    s = raw[:2000]
    assert text.decode(text.encode(s)) == s
    with pytest.raises(nj.DataError, match="'%' is not in the vocabulary"):
        text.encode("3%")


def test_text_that_is_not_utf8_names_the_file_and_the_encoding_option(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    with pytest.raises(
        nj.DataError, match=r"latin.txt: not valid utf-8 text \(byte 3: .*encoding='latin-1'"
    ):
        nd.load_text(path)
    text = nd.load_text(path, encoding="latin-1", val_fraction=0.0)
    assert text.decode(text.train) == "caf\u00e9 cr\u00e8me"


def test_text_byte_level(tmp_path):
    path = tmp_path / "t.txt"
    s = "héllo wörld\n" * 10
    path.write_text(s, encoding="utf-8")
    text = nd.load_text(path, level="byte", val_fraction=0.25)
    assert len(text.vocab) == 256
    n = len(s.encode("utf-8"))
    assert len(text.train) == int(0.75 * n) and len(text.train) + len(text.val) == n
    assert text.decode(text.encode(s)) == s
    np.testing.assert_array_equal(text.encode("é"), [0xC3, 0xA9])


def test_load_digits():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits

    x, y = nd.load_digits()
    assert x.shape == (1797, 8, 8, 1) and x.dtype == np.float32
    assert x.min() == 0.0 and x.max() == 1.0
    ref = load_digits()
    np.testing.assert_array_equal(x[..., 0] * 16, ref.images)
    assert np.bincount(y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_load_digits_without_sklearn(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("sklearn"):
            raise ImportError("No module named 'sklearn'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        nd.load_digits()


def test_reader_arguments_are_named_and_checked_before_reading(tmp_path):
    missing = tmp_path / "not-there.txt"  # a check after reading would be a FileNotFoundError
    with pytest.raises(nj.ArgumentError, match=r"level: expected 'char' or 'byte', got 'word'"):
        nd.load_text(missing, level="word")
    with pytest.raises(nj.ArgumentError, match=r"val_fraction: expected 0 <= val_fraction < 1"):
        nd.load_text(missing, val_fraction=1.0)
    with pytest.raises(nj.ArgumentError, match=r"split: expected 'train' or 'test', got 'val'"):
        nd.load_mnist(tmp_path, "val")
