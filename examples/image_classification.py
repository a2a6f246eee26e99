"""Image classification: LeNet-5 (or a small ResNet, or an MLP) on MNIST, Fashion-MNIST or digits.

With ``--data-dir`` the script reads the four standard IDX files of MNIST or
Fashion-MNIST (``train-images-idx3-ubyte[.gz]``, ``t10k-...``) from that folder;
without it, it uses scikit-learn's bundled 8x8 digits (no download), split 80/20::

    python examples/image_classification.py                                  # digits, LeNet-5
    python examples/image_classification.py --data-dir ../shared/data/mnist  # MNIST, 2 epochs
    python examples/image_classification.py --data-dir ../shared/data/mnist --epochs 10
    python examples/image_classification.py --model resnet --data-dir ../shared/data/mnist

It prints the test accuracy after each epoch and at the end. LeCun et al. (1998)
report 99.05% for LeNet-5 on the MNIST test set.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np
import optax

import nnjax as nj
from nnjax.models import MLP, LeNet5, LeNet5Config, MLPConfig, ResNet, ResNetConfig


def load(data_dir: str | None, seed: int):
    """``((x_train, y_train), (x_test, y_test), name)``: float32 ``(N, H, W, 1)`` in [0, 1], int32 labels."""
    if data_dir is None:
        x, y = nj.data.load_digits()  # (1797, 8, 8, 1) in [0, 1]
        train, test = nj.data.train_test_split((x, y), test_fraction=0.2, seed=seed)
        return train, test, "scikit-learn digits 8x8"

    def prepare(split):
        images, labels = nj.data.load_mnist(data_dir, split)  # uint8 (N, 28, 28), (N,)
        return (images[..., None] / np.float32(255)).astype(np.float32), labels.astype(np.int32)

    return prepare("train"), prepare("test"), f"IDX files in {data_dir}"


def build(name: str, image_size: int, num_classes: int) -> nj.Layer:
    if name == "lenet":
        padding = "VALID" if image_size >= 28 else "SAME"  # 8x8 digits are too small for VALID
        return LeNet5(LeNet5Config(num_classes=num_classes, second_padding=padding))
    if name == "resnet":
        return ResNet(
            ResNetConfig(widths=(16, 32, 64), blocks_per_stage=2, num_classes=num_classes)
        )
    return MLP(MLPConfig(hidden=(256, 128), num_outputs=num_classes))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None, help="folder of MNIST/Fashion-MNIST IDX files")
    parser.add_argument("--model", choices=["lenet", "resnet", "mlp"], default="lenet")
    parser.add_argument("--epochs", type=int, default=None, help="default: 40 digits, 2 MNIST")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="default: 32 digits, 128 MNIST"
    )
    parser.add_argument(
        "--lr", type=float, default=3e-3, help="peak Adam learning rate (cosine decay)"
    )
    parser.add_argument(
        "--train-limit", type=int, default=None, help="use the first N training images"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--smoke", action="store_true", help="a few steps on few images (CI)")
    args = parser.parse_args(argv)

    (x_train, y_train), (x_test, y_test), source = load(args.data_dir, args.seed)
    digits = args.data_dir is None
    epochs = args.epochs or (40 if digits else 2)
    batch_size = args.batch_size or (32 if digits else 128)
    if args.smoke:
        args.train_limit, epochs, batch_size = 256, 1, 32
        x_test, y_test = x_test[:200], y_test[:200]
    if args.train_limit:
        x_train, y_train = x_train[: args.train_limit], y_train[: args.train_limit]
    num_classes = 10
    print(f"{source}: {len(y_train)} train, {len(y_test)} test images of {x_train.shape[1:]}")

    model = build(args.model, x_train.shape[1], num_classes)
    params, state = model.init(jax.random.key(args.seed), x_train[:1])
    print(f"{args.model}: {nj.count_params(params):,} params")
    data = nj.data.batches((x_train, y_train), batch_size, seed=args.seed, epochs=epochs)
    schedule = optax.cosine_decay_schedule(args.lr, epochs * data.steps_per_epoch)
    tr = nj.trainer(
        model, nj.losses.softmax_cross_entropy, optax.adam(schedule), metrics=[nj.metrics.accuracy]
    )
    test_data = nj.data.batches(
        (x_test, y_test), 1000, shuffle=False, drop_remainder=False, epochs=1
    )

    def report(step, ts, logs):
        if "val_accuracy" in logs:
            epoch = step // data.steps_per_epoch
            print(f"epoch {epoch}: test accuracy {logs['val_accuracy']:.4f}", flush=True)

    start = time.perf_counter()
    ts, _ = nj.fit(
        tr,
        tr.init(params, state),
        data,
        eval_data=test_data,
        eval_every=data.steps_per_epoch * max(1, epochs // 5),
        callbacks=[report],
        progress=not (args.smoke or args.no_progress),
    )
    seconds = time.perf_counter() - start
    test = nj.evaluate(tr, ts, test_data.at(0))
    print(f"trained {epochs} epochs in {seconds:.1f} s")
    print(f"test accuracy: {test['accuracy']:.4f} (loss {test['loss']:.4f})")
    return {"test_accuracy": test["accuracy"], "seconds": seconds}


if __name__ == "__main__":
    main()
