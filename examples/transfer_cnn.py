"""Transfer learning: a CNN pretrained on digits 0-4 learns digits 5-9 with a frozen backbone.

1. Pretrain a small CNN on digits 0-4 of scikit-learn's 8x8 digits (no
   download): a convolutional ``backbone`` (two 3x3 convs, a max-pool, 512
   features) and a classifier ``head`` (Dense 128, ReLU, Dense 5).
2. Replace the head by a new, freshly initialised one for digits 5-9
   (``nj.finetune.replace_head``) and train only the head: the fine-tuning mask
   ``nj.finetune.head_only(params)`` (``head/**``) goes to
   ``nj.trainer(trainable=...)``, so the backbone has no gradient and no
   optimizer state, and comes out bit for bit.
3. Train the same CNN from scratch on the same few labelled 5-9 images for the
   same number of steps, and compare the test accuracies::

    python examples/transfer_cnn.py                 # 10 labelled images per class
    python examples/transfer_cnn.py --shots 50 --steps 500
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

FEATURES = 4 * 4 * 32  # the backbone's output on 8x8 images


def head(num_classes: int) -> nj.Layer:
    """``(B, 512) -> (B, num_classes)``: Dense 128, ReLU, Dense; params ``dense_0``, ``dense_1``."""
    return nj.serial(nj.Dense(128), jax.nn.relu, nj.Dense(num_classes))


def cnn(num_classes: int) -> nj.Layer:
    """``(B, 8, 8, 1) -> (B, num_classes)``: params ``backbone/conv_{0,1}``, ``head/dense_{0,1}``."""
    relu = jax.nn.relu
    backbone = nj.serial(
        nj.Conv(32, (3, 3)),
        relu,
        nj.Conv(32, (3, 3)),
        relu,
        nj.MaxPool((2, 2)),  # (B, 4, 4, 32)
        nj.Flatten(),  # (B, 512)
    )
    return nj.serial(backbone=backbone, head=head(num_classes))


def split(shots: int, seed: int):
    """``(source train, source test), (target train, target test)``; target labels 5-9 -> 0-4."""
    x, y = nj.data.load_digits()
    old, new = y < 5, y >= 5
    source = nj.data.train_test_split((x[old], y[old]), test_fraction=0.2, seed=seed)
    xn, yn = x[new], y[new] - 5
    order = np.random.default_rng(seed).permutation(len(yn))
    xn, yn = xn[order], yn[order]
    few = np.concatenate([np.flatnonzero(yn == c)[:shots] for c in range(5)])
    rest = np.setdiff1d(np.arange(len(yn)), few)
    return source, ((xn[few], yn[few]), (xn[rest], yn[rest]))


def train(model, params, data, steps, lr, *, trainable=None, seed=0, progress=True):
    """``steps`` Adam steps on ``data`` (endless shuffled batches); returns the trainer and state."""
    tr = nj.trainer(
        model,
        nj.losses.softmax_cross_entropy,
        optax.adam(lr),
        trainable=trainable,
        metrics=[nj.metrics.accuracy],
    )
    batches = nj.data.batches(data, min(32, len(data[1])), seed=seed, epochs=None)
    ts, _ = nj.fit(tr, tr.init(params), batches, steps=steps, progress=progress)
    return tr, ts


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shots", type=int, default=10, help="labelled 5-9 images per class")
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=200, help="fine-tuning steps (each run)")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (all runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--smoke", action="store_true", help="a few steps (CI)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.pretrain_steps, args.steps = 10, 10
    progress = not (args.smoke or args.no_progress)
    key_pre, key_head, key_scratch = jax.random.split(jax.random.key(args.seed), 3)
    (src_train, src_test), (tgt_train, tgt_test) = split(args.shots, args.seed)
    x_spec = jax.ShapeDtypeStruct((1, 8, 8, 1), np.float32)

    # 1. pretrain on digits 0-4
    print(f"pretraining on digits 0-4: {len(src_train[1])} images, {args.pretrain_steps} steps")
    source = cnn(5)
    params, _ = source.init(key_pre, x_spec)
    tr, ts = train(source, params, src_train, args.pretrain_steps, args.lr, progress=progress)
    acc = tr.evaluate(ts, src_test)["accuracy"]
    print(f"digits 0-4 test accuracy: {acc:.4f}")
    pretrained = ts.params

    # 2. a new head for digits 5-9, the backbone frozen
    target = cnn(5)
    features = jax.ShapeDtypeStruct((1, FEATURES), np.float32)  # the head's input
    params = nj.finetune.replace_head(pretrained, key_head, head(5), features)
    mask = nj.finetune.head_only(params)  # == nj.finetune.mask(params, include="head/**")
    n_train, n_all = nj.finetune.trainable_count(params, mask), nj.count_params(params)
    print(
        f"transfer to digits 5-9: {len(tgt_train[1])} labelled images ({args.shots} per class), "
        f"{len(tgt_test[1])} test; {args.steps} steps each"
    )
    start = time.perf_counter()
    tr, ts = train(
        target,
        params,
        tgt_train,
        args.steps,
        args.lr,
        trainable=mask,
        seed=args.seed,
        progress=progress,
    )
    frozen_seconds = time.perf_counter() - start
    frozen_acc = float(tr.evaluate(ts, tgt_test)["accuracy"])
    same = jax.tree.all(jax.tree.map(np.array_equal, ts.params["backbone"], pretrained["backbone"]))
    print(f"backbone unchanged bit for bit: {same}")

    # 3. the same CNN from scratch, same data and steps
    scratch, _ = target.init(key_scratch, x_spec)
    start = time.perf_counter()
    tr, ts = train(
        target, scratch, tgt_train, args.steps, args.lr, seed=args.seed, progress=progress
    )
    scratch_seconds = time.perf_counter() - start
    scratch_acc = float(tr.evaluate(ts, tgt_test)["accuracy"])

    print(f"{'':34}{'trainable':>11}{'seconds':>9}{'test acc':>10}")
    print(
        f"{'frozen backbone + new head':34}{n_train:>11,}{frozen_seconds:>9.1f}{frozen_acc:>10.4f}"
    )
    print(f"{'from scratch':34}{n_all:>11,}{scratch_seconds:>9.1f}{scratch_acc:>10.4f}")
    print(f"frozen backbone accuracy: {frozen_acc:.4f}, from scratch: {scratch_acc:.4f}")
    return {"frozen_accuracy": frozen_acc, "scratch_accuracy": scratch_acc}


if __name__ == "__main__":
    main()
