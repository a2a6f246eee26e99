"""nj.models: param-shape snapshots, outputs against PyTorch / NumPy with copied weights, training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nnjax as nj
from nnjax.core.paths import flatten
from nnjax.models import (
    MLP,
    LeNet5,
    LeNet5Config,
    MLPConfig,
    ResNet,
    ResNetConfig,
    TextClassifier,
    TextClassifierConfig,
)

TOL = {"rtol": 1e-5, "atol": 1e-5}
KEY = jax.random.key(0)


def _shapes(tree):
    return {path: tuple(np.shape(v)) for path, v in flatten(tree).items()}


def _normal(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _random_params(model, x, seed=1):
    """Params (and state) of ``model``'s shapes, filled with normal draws scaled by ``1/sqrt(fan_in)``.

    Planned with ``jax.eval_shape``: no init compiled. Biases, scales and running
    statistics get values away from their init, so every leaf matters in a comparison.
    """
    params, state = jax.eval_shape(model.init, KEY, x)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        shape = leaf.shape
        if path.endswith("/var"):
            return jnp.asarray(rng.uniform(0.5, 1.5, shape), jnp.float32)
        fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        scale = 1.0 if path.endswith("embedding") else 1.0 / np.sqrt(fan_in)
        if path.endswith("/scale"):
            return jnp.asarray(1.0 + 0.2 * rng.normal(size=shape), jnp.float32)
        return jnp.asarray(scale * rng.normal(size=shape), jnp.float32)

    return tuple(nj.paths.map_with_path(fill, tree) for tree in (params, state))


def _train_losses(model, params, state, batch, steps, lr=1e-2):
    """The losses of ``steps`` adam steps on one fixed batch, and the final train state."""
    tr = nj.trainer(model, nj.losses.softmax_cross_entropy, optax.adam(lr))
    ts = tr.init(params, state)
    losses = []
    for i in range(steps):
        ts, m = tr.step(ts, batch, jax.random.key(i))
        losses.append(float(m["loss"]))
    return losses, ts


# ---------------------------------------------------------------------------- MLP


def test_mlp_param_shapes_and_output():
    model = MLP(MLPConfig(hidden=(32, 16), num_outputs=3))
    x = _normal((5, 4, 2))
    params, state = _random_params(model, x)
    assert _shapes(params) == {
        "backbone/dense_0/kernel": (8, 32),
        "backbone/dense_0/bias": (32,),
        "backbone/dense_1/kernel": (32, 16),
        "backbone/dense_1/bias": (16,),
        "head/kernel": (16, 3),
        "head/bias": (3,),
    }
    assert state == {}
    y, _ = model.apply(params, state, x)
    assert y.shape == (5, 3)
    # NumPy closed form with the same params
    p = jax.tree.map(np.asarray, params)
    h = x.reshape(5, 8).astype(np.float64)
    for name in ("dense_0", "dense_1"):
        h = np.maximum(h @ p["backbone"][name]["kernel"] + p["backbone"][name]["bias"], 0)
    np.testing.assert_allclose(y, h @ p["head"]["kernel"] + p["head"]["bias"], **TOL)


def test_mlp_dropout_needs_rng_and_is_identity_in_eval():
    model = MLP(MLPConfig(hidden=(16,), num_outputs=2, dropout_rate=0.5))
    x = _normal((4, 6))
    params, state = _random_params(model, x)
    ref, _ = MLP(MLPConfig(hidden=(16,), num_outputs=2)).apply(params, state, x)
    np.testing.assert_array_equal(model.apply(params, state, x)[0], ref)
    with pytest.raises(nj.LayerError, match=r"backbone/dropout_0: Dropout\(rate=0.5\).*rng"):
        model.apply(params, state, x, train=True)


def test_mlp_training_lowers_the_loss():
    model = MLP(MLPConfig(hidden=(32,), num_outputs=4))
    x = _normal((32, 10))
    y = np.random.default_rng(1).integers(0, 4, 32).astype(np.int32)
    params, state = _random_params(model, x)
    losses, _ = _train_losses(model, params, state, (x, y), 30)
    assert losses[-1] < 0.5 * losses[0], losses


# ---------------------------------------------------------------------------- LeNet-5


LENET_28 = {
    "backbone/conv_0/kernel": (5, 5, 1, 6),
    "backbone/conv_0/bias": (6,),
    "backbone/conv_1/kernel": (5, 5, 6, 16),
    "backbone/conv_1/bias": (16,),
    "backbone/dense_0/kernel": (400, 120),
    "backbone/dense_0/bias": (120,),
    "backbone/dense_1/kernel": (120, 84),
    "backbone/dense_1/bias": (84,),
    "head/kernel": (84, 10),
    "head/bias": (10,),
}


def _torch_lenet(torch, params, second_padding):
    """LeNet-5 in PyTorch (NCHW) with nnjax's weights; flattens in NHWC order as nnjax does."""
    nn = torch.nn
    p = flatten(jax.tree.map(lambda a: torch.from_numpy(np.array(a)), params))

    def conv(name, pad):
        k = p[f"backbone/{name}/kernel"]
        m = nn.Conv2d(k.shape[2], k.shape[3], 5, padding=pad)
        m.weight.data, m.bias.data = k.permute(3, 2, 0, 1).contiguous(), p[f"backbone/{name}/bias"]
        return m

    def dense(prefix):
        k = p[f"{prefix}/kernel"]
        m = nn.Linear(*k.shape)
        m.weight.data, m.bias.data = k.T.contiguous(), p[f"{prefix}/bias"]
        return m

    features = nn.Sequential(
        conv("conv_0", 2),
        nn.ReLU(),
        nn.AvgPool2d(2),
        conv("conv_1", 2 if second_padding == "SAME" else 0),
        nn.ReLU(),
        nn.AvgPool2d(2),
    )
    classifier = nn.Sequential(
        dense("backbone/dense_0"),
        nn.ReLU(),
        dense("backbone/dense_1"),
        nn.ReLU(),
        dense("head"),
    )
    return lambda x: classifier(features(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).flatten(1))


@pytest.mark.parametrize(
    ("size", "second_padding", "flat"), [(28, "VALID", 400), (8, "SAME", 64)], ids=["28x28", "8x8"]
)
def test_lenet_matches_torch(torch, size, second_padding, flat):
    model = LeNet5(LeNet5Config(num_classes=10, second_padding=second_padding))
    x = _normal((3, size, size, 1))
    params, state = _random_params(model, x)
    want = {**LENET_28, "backbone/dense_0/kernel": (flat, 120)}
    assert _shapes(params) == want
    y, _ = model.apply(params, state, x)
    assert y.shape == (3, 10)
    with torch.no_grad():
        ref = _torch_lenet(torch, params, second_padding)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, ref, **TOL)


def test_lenet_8x8_valid_is_too_small():
    # 8x8 -> pool 4x4: a VALID 5x5 conv has no room
    msg = r'expected H, W >= 10 with second_padding="VALID" .*got x.shape == \(1, 8, 8, 1\)'
    with pytest.raises(nj.LayerError, match=msg):
        LeNet5().init(KEY, jnp.zeros((1, 8, 8, 1)))
    with pytest.raises(nj.LayerError, match=r"expected x with at least 4 axes"):
        LeNet5().init(KEY, jnp.zeros((28, 28)))


@pytest.mark.parametrize(("size", "lr"), [(28, 3e-3), (8, 1e-2)])
def test_lenet_training_lowers_the_loss(size, lr):
    pad = "VALID" if size == 28 else "SAME"
    model = LeNet5(LeNet5Config(num_classes=4, second_padding=pad))
    x = _normal((16, size, size, 1))
    y = np.arange(16, dtype=np.int32) % 4
    params, state = _random_params(model, x)
    losses, _ = _train_losses(model, params, state, (x, y), 30, lr=lr)
    assert losses[-1] < 0.5 * losses[0], losses


# ---------------------------------------------------------------------------- ResNet

SMALL = ResNetConfig(widths=(4, 8), blocks_per_stage=2, num_classes=3)


def _bn(width):
    return {"scale": (width,), "bias": (width,)}


def _resnet_small_shapes(c):
    """The expected params of SMALL on ``c`` input channels, written out."""
    block = lambda cin, w: {
        "conv_0": {"kernel": (3, 3, cin, w)},
        "batchnorm_0": _bn(w),
        "conv_1": {"kernel": (3, 3, w, w)},
        "batchnorm_1": _bn(w),
    }
    tree = {
        "backbone": {
            "stem": {"conv_0": {"kernel": (3, 3, c, 4)}, "batchnorm_0": _bn(4)},
            "stage_0": {"block_0": block(4, 4), "block_1": block(4, 4)},
            "stage_1": {
                "block_0": {
                    **block(4, 8),
                    "shortcut": {"conv_0": {"kernel": (1, 1, 4, 8)}, "batchnorm_0": _bn(8)},
                },
                "block_1": block(8, 8),
            },
        },
        "head": {"kernel": (8, 3), "bias": (3,)},
    }
    return {p: s for p, s in flatten(tree).items()}


def _same_pad(n, k, s):
    out = -(-n // s)
    total = max((out - 1) * s + k - n, 0)
    return total // 2, total - total // 2


class _TorchResNet:
    """The ResNet in PyTorch with nnjax's params and state; explicit SAME padding as XLA's."""

    def __init__(self, torch, params, state, config):
        self.t, self.F, self.config = torch, torch.nn.functional, config
        self.p = flatten(jax.tree.map(lambda a: torch.from_numpy(np.array(a)), params))
        self.s = flatten(jax.tree.map(lambda a: torch.from_numpy(np.array(a)), state))
        self.momentum = 1 - config.momentum  # PyTorch's convention

    def conv(self, x, path, stride=1):
        k = self.p[f"{path}/kernel"].permute(3, 2, 0, 1)
        kh = k.shape[-1]
        lo, hi = _same_pad(x.shape[-1], kh, stride)
        return self.F.conv2d(self.F.pad(x, (lo, hi, lo, hi)), k, stride=stride)

    def bn(self, x, path, train):
        mean, var = self.s[f"{path}/mean"], self.s[f"{path}/var"]  # updated in place
        w, b = self.p[f"{path}/scale"], self.p[f"{path}/bias"]
        return self.F.batch_norm(x, mean, var, w, b, train, self.momentum, 1e-5)

    def block(self, x, path, stride, train):
        relu = self.F.relu
        h = relu(self.bn(self.conv(x, f"{path}/conv_0", stride), f"{path}/batchnorm_0", train))
        h = self.bn(self.conv(h, f"{path}/conv_1"), f"{path}/batchnorm_1", train)
        if f"{path}/shortcut/conv_0/kernel" in self.p:
            x = self.conv(x, f"{path}/shortcut/conv_0", stride)
            x = self.bn(x, f"{path}/shortcut/batchnorm_0", train)
        return relu(x + h)

    def __call__(self, x, train):
        x = self.t.from_numpy(x).permute(0, 3, 1, 2)
        x = self.F.relu(
            self.bn(self.conv(x, "backbone/stem/conv_0"), "backbone/stem/batchnorm_0", train)
        )
        for i in range(len(self.config.widths)):
            for j in range(self.config.blocks_per_stage):
                stride = 2 if i > 0 and j == 0 else 1
                x = self.block(x, f"backbone/stage_{i}/block_{j}", stride, train)
        x = x.mean(dim=(2, 3))
        return x @ self.p["head/kernel"] + self.p["head/bias"]


@pytest.mark.parametrize(("size", "c"), [(32, 3), (28, 1)], ids=["32x32x3", "28x28x1"])
def test_resnet_param_and_output_shapes(size, c):
    model = ResNet(SMALL)
    x = jax.ShapeDtypeStruct((2, size, size, c), jnp.float32)
    params, state = jax.eval_shape(model.init, KEY, x)
    assert _shapes(params) == _resnet_small_shapes(c)
    bn_paths = [p[: -len("/scale")] for p in _shapes(params) if p.endswith("/scale")]
    assert _shapes(state) == {
        f"{p}/{s}": _shapes(params)[f"{p}/scale"] for p in bn_paths for s in ("mean", "var")
    }
    assert nj.core.output_shape(model, params, state, x).shape == (2, 3)


def test_resnet_matches_torch_and_updates_batchnorm_state(torch):
    config = ResNetConfig(widths=(4, 8), blocks_per_stage=1, num_classes=3)
    model = ResNet(config)
    x = _normal((2, 32, 32, 3))
    params, state = _random_params(model, x)
    ref = _TorchResNet(torch, params, state, config)
    with torch.no_grad():
        y_train_ref = ref(x, train=True).numpy()  # updates ref's running stats
        y_eval_ref = ref(x, train=False).numpy()

    @jax.jit
    def train_then_eval(params, state, x):
        y_train, new_state = model.apply(params, state, x, train=True)
        y_eval, eval_state = model.apply(params, new_state, x, train=False)
        return y_train, new_state, y_eval, eval_state

    y_train, new_state, y_eval, eval_state = train_then_eval(params, state, x)
    assert y_train.shape == y_eval.shape == (2, 3)
    np.testing.assert_allclose(y_train, y_train_ref, **TOL)
    for path, value in flatten(new_state).items():
        np.testing.assert_allclose(value, ref.s[path].numpy(), **TOL, err_msg=path)
        assert not np.allclose(value, flatten(state)[path]), path  # the stats moved
    np.testing.assert_allclose(y_eval, y_eval_ref, rtol=1e-4, atol=1e-4)
    assert jax.tree.all(jax.tree.map(np.array_equal, eval_state, new_state))


def test_resnet_init_plans_without_flops():
    model = ResNet()  # the default, ResNet-14-ish on 32x32x3
    x = jax.ShapeDtypeStruct((128, 32, 32, 3), jnp.float32)
    params, state = jax.eval_shape(model.init, KEY, x)
    n = nj.paths.count_params(params)
    # stem 3*3*3*16 + bn 32; stage widths 16/32/64, two blocks each, two projections; head 64*10+10
    convs = 9 * (3 * 16 + 4 * 16 * 16 + 16 * 32 + 3 * 32 * 32 + 32 * 64 + 3 * 64 * 64)
    bns = 2 * (16 + 4 * 16 + 5 * 32 + 5 * 64)
    assert n == convs + bns + 16 * 32 + 32 * 64 + 650
    assert nj.core.output_shape(model, params, state, x).shape == (128, 10)


def test_resnet_rejects_an_empty_config():
    with pytest.raises(ValueError, match="widths and blocks_per_stage >= 1"):
        ResNet(ResNetConfig(widths=()))


@pytest.mark.parametrize(("size", "c"), [(32, 3), (28, 1)], ids=["32x32x3", "28x28x1"])
def test_resnet_training_lowers_the_loss_and_moves_the_statistics(size, c):
    model = ResNet(ResNetConfig(widths=(4, 8), blocks_per_stage=1, num_classes=4))
    x = _normal((8, size, size, c)) + 1.0  # a mean far from 0: the stem's statistics move
    y = np.arange(8, dtype=np.int32) % 4
    params, state = _random_params(model, x)
    losses, ts = _train_losses(model, params, state, (x, y), 30)
    assert losses[-1] < 0.5 * losses[0], losses
    assert int(ts.step) == 30
    bn = ts.state["backbone"]["stem"]["batchnorm_0"]
    # 30 momentum-0.9 updates from mean 0, var 1 towards the stem conv output's statistics
    assert float(jnp.max(jnp.abs(bn["mean"]))) > 0.1
    assert float(jnp.max(jnp.abs(bn["var"] - 1))) > 0.1


# ---------------------------------------------------------------------------- TextClassifier

V, E, H, B, T = 20, 6, 5, 4, 7
LENGTHS = np.array([7, 3, 5, 1], np.int32)


def _ids(seed=0):
    ids = np.random.default_rng(seed).integers(1, V, (B, T)).astype(np.int32)
    return np.where(np.arange(T) < LENGTHS[:, None], ids, 0)  # right-padded with 0


def _text(cell="lstm", bidirectional=False, pooling="last", **kw):
    config = TextClassifierConfig(
        vocab_size=V,
        embed_dim=E,
        hidden=H,
        cell=cell,
        bidirectional=bidirectional,
        pooling=pooling,
        num_classes=3,
        **kw,
    )
    return TextClassifier(config)


def test_text_param_shapes():
    x = {"ids": _ids(), "lengths": LENGTHS}
    params, state = jax.eval_shape(_text().init, KEY, x)
    assert state == {}
    assert _shapes(params) == {
        "embed/embedding": (V, E),
        "encoder/kernel": (E, 4 * H),
        "encoder/recurrent_kernel": (H, 4 * H),
        "encoder/bias": (4 * H,),
        "head/kernel": (H, 3),
        "head/bias": (3,),
    }
    params, _ = jax.eval_shape(_text("gru", bidirectional=True, pooling="mean").init, KEY, x)
    gru = {
        "kernel": (E, 3 * H),
        "recurrent_kernel": (H, 3 * H),
        "bias": (3 * H,),
        "recurrent_bias": (3 * H,),
    }
    assert _shapes(params) == {
        "embed/embedding": (V, E),
        **{f"encoder/{d}/{k}": s for d in ("forward", "backward") for k, s in gru.items()},
        "head/kernel": (2 * H, 3),
        "head/bias": (3,),
    }
    # init plans from shapes alone
    spec = {
        "ids": jax.ShapeDtypeStruct((B, T), jnp.int32),
        "lengths": jax.ShapeDtypeStruct((B,), jnp.int32),
    }
    planned, _ = jax.eval_shape(_text("gru", bidirectional=True, pooling="mean").init, KEY, spec)
    assert _shapes(planned) == _shapes(params)
    y = nj.core.output_shape(_text("gru", bidirectional=True), planned, {}, spec)
    assert (y.shape, y.dtype) == ((B, 3), jnp.float32)


def _torch_text(torch, params, cell, bidirectional, pooling, ids, lengths):
    """The same classifier in PyTorch: nn.Embedding, nn.LSTM/GRU over a packed batch, Linear."""
    p = jax.tree.map(lambda a: torch.from_numpy(np.array(a)), params)
    rnn_cls = torch.nn.LSTM if cell == "lstm" else torch.nn.GRU
    rnn = rnn_cls(E, H, batch_first=True, bidirectional=bidirectional)
    enc = p["encoder"]
    for suffix, d in [("", "forward"), ("_reverse", "backward")][: 1 + bidirectional]:
        q = enc[d] if bidirectional else enc
        getattr(rnn, f"weight_ih_l0{suffix}").data = q["kernel"].T.contiguous()
        getattr(rnn, f"weight_hh_l0{suffix}").data = q["recurrent_kernel"].T.contiguous()
        getattr(rnn, f"bias_ih_l0{suffix}").data = q["bias"]
        bias_hh = q["recurrent_bias"] if cell == "gru" else torch.zeros_like(q["bias"])
        getattr(rnn, f"bias_hh_l0{suffix}").data = bias_hh
    utils = torch.nn.utils.rnn
    with torch.no_grad():
        e = torch.nn.functional.embedding(torch.from_numpy(ids).long(), p["embed"]["embedding"])
        packed = utils.pack_padded_sequence(
            e, torch.from_numpy(lengths), batch_first=True, enforce_sorted=False
        )
        out, hn = rnn(packed)
        if pooling == "last":
            h = hn[0] if cell == "lstm" else hn  # (directions, B, H)
            feats = torch.cat(list(h), dim=-1)
        else:
            out, _ = utils.pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])
            feats = out.sum(1) / torch.from_numpy(lengths)[:, None]
        return (feats @ p["head"]["kernel"] + p["head"]["bias"]).numpy()


@pytest.mark.parametrize("pooling", ["last", "mean"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_text_matches_torch_on_a_padded_batch(torch, cell, bidirectional, pooling):
    model = _text(cell, bidirectional, pooling)
    ids = _ids()
    params, state = _random_params(model, {"ids": ids, "lengths": LENGTHS})
    y, _ = model.apply(params, state, {"ids": ids, "lengths": LENGTHS})
    assert y.shape == (B, 3)
    ref = _torch_text(torch, params, cell, bidirectional, pooling, ids, LENGTHS)
    np.testing.assert_allclose(y, ref, **TOL)
    # plain ids mean every sequence is T long
    full = np.full((B,), T, np.int32)
    ref_full = _torch_text(torch, params, cell, bidirectional, pooling, ids, full)
    np.testing.assert_allclose(model.apply(params, state, ids)[0], ref_full, **TOL)


def test_text_padding_does_not_change_the_output():
    model = _text("lstm", bidirectional=True, pooling="mean")
    ids = _ids()
    params, state = _random_params(model, ids)
    apply = jax.jit(model.apply)
    y, _ = apply(params, state, {"ids": ids, "lengths": LENGTHS})
    noisy = np.where(np.arange(T) < LENGTHS[:, None], ids, _ids(seed=5))
    y_noisy, _ = apply(params, state, {"ids": noisy, "lengths": LENGTHS})
    np.testing.assert_allclose(y_noisy, y, **TOL)
    # a sequence alone, unpadded
    alone, _ = apply(params, state, ids[1:2, : LENGTHS[1]])
    np.testing.assert_allclose(alone[0], y[1], **TOL)


def test_text_bad_inputs():
    model = _text()
    params, state = _random_params(model, _ids())
    with pytest.raises(
        nj.LayerError, match=r"expected x with 2 axes \(B, T\), got x.shape == \(7,\)"
    ):
        model.apply(params, state, _ids()[0])
    with pytest.raises(
        nj.LayerError, match=r"expected lengths.shape == \(4,\) .*got lengths.shape == \(3,\)"
    ):
        model.apply(params, state, {"ids": _ids(), "lengths": LENGTHS[:3]})
    with pytest.raises(nj.LayerError, match=r"unexpected input key\(s\) \['mask'\]"):
        model.apply(params, state, {"ids": _ids(), "mask": LENGTHS})
    with pytest.raises(nj.LayerError, match=r"^embed: expected integer ids"):
        model.apply(params, state, _ids().astype(np.float32))
    with pytest.raises(ValueError, match="cell must be one of"):
        _text("rnn")
    with pytest.raises(ValueError, match="pooling must be one of"):
        _text(pooling="max")


def test_text_training_lowers_the_loss_on_a_padded_batch():
    model = _text("gru", pooling="mean", dropout_rate=0.1)
    ids = _ids()
    x = {"ids": ids, "lengths": LENGTHS}
    y = np.array([0, 1, 2, 1], np.int32)
    params, state = _random_params(model, x)
    losses, _ = _train_losses(model, params, state, (x, y), 30, lr=3e-2)
    assert losses[-1] < 0.5 * losses[0], losses
