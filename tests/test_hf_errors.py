"""Bad HF folders: each refused with a CheckpointError naming the file and the tensor."""

import json
import os
import re
import shutil

import numpy as np
import pytest

import nnjax as nj
from nnjax.models import hf
from nnjax.models.hf import pretrained
from tests import hf_tiny

pytest.importorskip("transformers", reason="transformers writes the folders")
safetensors_numpy = pytest.importorskip("safetensors.numpy")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    hf_tiny.build("llama", folder)
    return folder


def _copy(good, tmp_path, name="m"):
    dst = tmp_path / name
    shutil.copytree(good, dst)
    return dst


def _rewrite(folder, change):
    file = folder / "model.safetensors"
    tensors = safetensors_numpy.load_file(file)
    change(tensors)
    safetensors_numpy.save_file(tensors, file, metadata={"format": "pt"})


@pytest.fixture
def no_reads(monkeypatch):
    """Fail the test if any tensor is read (the checks must come first)."""

    def read(name, info):
        raise AssertionError(f"read {name} before refusing the folder")

    monkeypatch.setattr(pretrained, "read_tensor", read)


def test_folder_config_and_model_type(good, tmp_path, no_reads):
    with pytest.raises(nj.CheckpointError, match=r"'.*nowhere' is not a folder"):
        hf.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(nj.CheckpointError, match=r"config.json does not exist"):
        hf.from_pretrained(tmp_path)
    folder = _copy(good, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(
        nj.CheckpointError,
        match=r"config.json: model_type 'bert' is not supported; supported: "
        + re.escape(str(sorted(hf.FAMILIES))),
    ):
        hf.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(cfg))
    os.rename(folder / "model.safetensors", folder / "pytorch_model.bin")
    with pytest.raises(
        nj.CheckpointError, match=r"no model.safetensors .*pytorch_model.bin.*safe_serialization"
    ):
        hf.from_pretrained(folder)


BAD_TENSORS = {
    "missing": (
        lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
        r"model.safetensors: missing tensor\(s\) \['model.layers.1.mlp.up_proj.weight'\] "
        r"for a llama model with 2 layers",
    ),
    "extra": (
        lambda t: t.update({"model.layers.2.mlp.up_proj.weight": np.zeros((64, 32), np.float32)}),
        r"model.safetensors: unexpected tensor\(s\) \['model.layers.2.mlp.up_proj.weight'\]",
    ),
    "shape": (
        lambda t: t.update(
            {"model.layers.0.self_attn.k_proj.weight": np.zeros((32, 32), np.float32)}
        ),
        r"model.safetensors: tensor 'model.layers.0.self_attn.k_proj.weight' -> "
        r"blocks/0/attn/key/kernel: expected shape \(16, 32\), got \(32, 32\)",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD_TENSORS))
def test_missing_extra_and_wrong_shape_tensors(good, tmp_path, no_reads, kind):
    change, message = BAD_TENSORS[kind]
    folder = _copy(good, tmp_path)
    _rewrite(folder, change)
    with pytest.raises(nj.CheckpointError, match=message):
        hf.from_pretrained(folder)


def test_truncated_file(good, tmp_path, no_reads):
    folder = _copy(good, tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(
        nj.CheckpointError, match=r"model.safetensors: not a complete safetensors file"
    ):
        hf.from_pretrained(folder)


@pytest.mark.parametrize("where", ["../outside.safetensors", "/etc/passwd", "sub/x.safetensors"])
def test_index_entries_outside_the_folder_are_refused_before_reading(
    good, tmp_path, where, no_reads, monkeypatch
):
    folder = _copy(good, tmp_path)
    os.rename(folder / "model.safetensors", folder / "model-00001-of-00001.safetensors")
    (tmp_path / "outside.safetensors").write_bytes(
        (folder / "model-00001-of-00001.safetensors").read_bytes()
    )
    names = safetensors_numpy.load_file(folder / "model-00001-of-00001.safetensors")
    weight_map = dict.fromkeys(names, "model-00001-of-00001.safetensors")
    weight_map["model.norm.weight"] = where
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    monkeypatch.setattr(pretrained, "read_headers", lambda *a: pytest.fail("read a header"))
    with pytest.raises(
        nj.CheckpointError,
        match=rf"index.json: weight file '{where}' is not a file name inside the folder; refusing it",
    ):
        hf.from_pretrained(folder)


def _cache_layout(source, root):
    """``source``'s files as Hugging Face's cache keeps them: ``root/blobs/<sha256>`` and
    ``root/snapshots/rev/<name>`` a relative symlink to ``../../blobs/<sha256>``."""
    import hashlib

    (root / "blobs").mkdir(parents=True)
    snapshot = root / "snapshots" / "rev"
    snapshot.mkdir(parents=True)
    for name in os.listdir(source):
        data = (source / name).read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        (root / "blobs" / sha).write_bytes(data)
        os.symlink(os.path.join("..", "..", "blobs", sha), snapshot / name)
    return snapshot


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_hugging_face_cache_layout_of_symlinks_into_blobs_loads(tmp_path, shard):
    """Before: a sharded snapshot was refused ('links outside the folder'); a single
    symlinked file was followed. One rule now: files may be links, entries are names."""
    folder = tmp_path / "plain"
    hf_tiny.build("llama", folder, max_shard_size=shard)
    if shard:
        assert (folder / "model.safetensors.index.json").exists()
    snapshot = _cache_layout(folder, tmp_path / "models--tiny")
    assert all(os.path.islink(snapshot / n) for n in os.listdir(snapshot))
    config, params = hf.from_pretrained(snapshot)
    want_config, want = hf.from_pretrained(folder)
    assert config == want_config
    flat, want_flat = nj.paths.flatten(params), nj.paths.flatten(want)
    assert sorted(flat) == sorted(want_flat)
    for path, value in flat.items():
        np.testing.assert_array_equal(value, want_flat[path])


def test_index_that_does_not_match_its_files(good, tmp_path, no_reads):
    folder = _copy(good, tmp_path)
    os.rename(folder / "model.safetensors", folder / "model-00001-of-00002.safetensors")
    names = safetensors_numpy.load_file(folder / "model-00001-of-00002.safetensors")
    weight_map = dict.fromkeys(names, "model-00001-of-00002.safetensors")
    weight_map["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(
        nj.CheckpointError, match=r"lists 'model-00002-of-00002.safetensors', which does not exist"
    ):
        hf.from_pretrained(folder)
    safetensors_numpy.save_file(
        {"x": np.zeros(2, np.float32)}, folder / "model-00002-of-00002.safetensors"
    )
    with pytest.raises(
        nj.CheckpointError,
        match=r"puts tensor 'model.norm.weight' in '.*model-00002-of-00002.safetensors', which does not hold it",
    ):
        hf.from_pretrained(folder)
