"""nj.data token files: nanoGPT's .bin bytes, windows against direct NumPy slicing, resume."""

import numpy as np
import pytest

import nnjax as nj
import nnjax.data as nd


def test_bin_file_is_nanogpt_bytes_and_opens_as_a_memmap(tmp_path):
    ids = np.random.default_rng(0).integers(0, 50257, 1000)
    path = tmp_path / "train.bin"
    assert nd.write_tokens(path, ids) == np.uint16
    ref = tmp_path / "ref.bin"
    np.array(ids, dtype=np.uint16).tofile(ref)  # nanoGPT's prepare.py
    assert path.read_bytes() == ref.read_bytes()
    tokens = nd.open_tokens(path)
    assert isinstance(tokens, np.memmap)
    np.testing.assert_array_equal(tokens, ids)
    big = np.array([0, 65536, 2**32 - 1])
    assert nd.write_tokens(tmp_path / "big.bin", big) == np.uint32
    np.testing.assert_array_equal(nd.open_tokens(tmp_path / "big.bin", np.uint32), big)


def test_windows_are_slices_of_the_file_drawn_from_seed_and_batch_index(tmp_path):
    ids = np.random.default_rng(1).integers(0, 300, 5000)
    path = tmp_path / "train.bin"
    nd.write_tokens(path, ids)
    T, B, seed = 16, 4, 7
    it = nd.token_batches(path, T, B, seed, steps=6)
    got = list(it)
    assert len(got) == 6 and it.position == 6
    for i, (x, y) in enumerate(got):
        offsets = np.random.default_rng((seed, i)).integers(0, len(ids) - T, B)
        np.testing.assert_array_equal(x, np.stack([ids[o : o + T] for o in offsets]))
        np.testing.assert_array_equal(y, np.stack([ids[o + 1 : o + T + 1] for o in offsets]))
    for k in (0, 3, 5):
        tail = list(nd.token_batches(path, T, B, seed, steps=6).at(k))
        assert len(tail) == 6 - k
        for (xa, ya), (xb, yb) in zip(got[k:], tail, strict=True):
            np.testing.assert_array_equal(xa, xb)
            np.testing.assert_array_equal(ya, yb)


def test_bad_files_and_ids_name_the_file(tmp_path):
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x02\x03")
    with pytest.raises(nj.DataError, match=r"odd.bin: expected a non-empty multiple of 2 bytes"):
        nd.open_tokens(odd)
    with pytest.raises(nj.DataError, match="expected dtype uint16 or uint32"):
        nd.open_tokens(odd, np.int8)
    with pytest.raises(nj.DataError, match=r"x.bin: expected ids in \[0, 65535\]"):
        nd.write_tokens(tmp_path / "x.bin", [1, 70000], np.uint16)
    with pytest.raises(nj.DataError, match=r"x.bin: expected ids in \[0, 65535\]"):
        nd.write_tokens(tmp_path / "x.bin", [-1, 3])
    nd.write_tokens(tmp_path / "short.bin", np.arange(8))
    with pytest.raises(nj.DataError, match=r"short.bin: expected more than block_size == 8"):
        nd.token_batches(tmp_path / "short.bin", 8, 2)


def test_byte_tokenizer_round_trip():
    tok = nd.ByteTokenizer()
    text = "naïve café, 東京\n"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < tok.vocab_size
    assert tok.decode(ids) == text
    assert tok.decode([*ids, tok.eos_token_id, 65]) == text  # NUL ends the text
