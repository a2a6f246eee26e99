"""Text classification: an LSTM over word ids of padded sentences, on sentiment data.

With ``--data-path`` the script reads labelled sentences, one ``sentence<TAB>label``
per line (the UCI Sentiment Labelled Sentences layout): a file, or a folder whose
``*_labelled.txt`` files are all read. Without it, it makes sentences by code: random
filler words with a few sentiment words mixed in; the label is whether positive or
negative words are in the majority, and "not" flips the word after it, so the
order matters::

    python examples/text_classification.py                        # synthetic sentences
    python examples/text_classification.py --data-path ../shared/data/sentiment_labelled_sentences
    python examples/text_classification.py --cell gru --bidirectional --pooling mean

Sentences are split 80/20 into train and test with a fixed seed; the vocabulary
(``nj.data.fit_vocabulary``: lower-cased words) is fitted on the train split only,
with id 0 for padding and 1 for unknown words. Each batch is right-padded to
``--max-len`` and carries the true lengths, so the recurrent encoder ignores the
padding.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np
import optax

import nnjax as nj
from nnjax.models import TextClassifier, TextClassifierConfig

POSITIVE = ["good", "great", "excellent", "love", "wonderful", "best", "happy", "fine", "nice"]
NEGATIVE = ["bad", "awful", "terrible", "hate", "worst", "poor", "sad", "boring", "ugly"]
FILLER = ["the", "a", "this", "that", "it", "is", "was", "i", "we", "they", "movie", "phone"]
FILLER += ["food", "place", "service", "story", "and", "but", "very", "really", "quite", "so"]


def synthetic(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    """``n`` sentences of 4 to 23 words, labels 1 (positive) / 0 (negative); no ties."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    while len(texts) < n:
        words = list(rng.choice(FILLER, size=rng.integers(3, 18)))
        score = 0
        for _ in range(rng.integers(1, 4)):
            positive = bool(rng.integers(2))
            word = str(rng.choice(POSITIVE if positive else NEGATIVE))
            if rng.random() < 0.25:  # "not good" counts as negative
                word, positive = f"not {word}", not positive
            words.insert(int(rng.integers(len(words) + 1)), word)
            score += 1 if positive else -1
        if score != 0:
            texts.append(" ".join(words))
            labels.append(int(score > 0))
    return texts, np.array(labels, np.int32)


def read_labelled(path: str) -> tuple[list[str], np.ndarray]:
    """``sentence<TAB>0|1`` lines from a file, or from every ``*_labelled.txt`` in a folder."""
    files = (
        sorted(glob.glob(os.path.join(path, "*_labelled.txt"))) if os.path.isdir(path) else [path]
    )
    if not files:
        raise FileNotFoundError(f"no *_labelled.txt files in {path!r}")
    texts, labels = [], []
    for file in files:
        # split on "\n" only: the imdb file holds U+0085, which splitlines() breaks on
        with open(file, encoding="utf-8", newline="\n") as f:
            for line in f.read().split("\n"):
                if line.strip():
                    sentence, label = line.rsplit("\t", 1)
                    texts.append(sentence.strip())
                    labels.append(int(label))
    return texts, np.array(labels, np.int32)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-path", default=None, help="a labelled-sentences file or folder")
    parser.add_argument("--n", type=int, default=4000, help="synthetic sentences")
    parser.add_argument("--cell", choices=["lstm", "gru"], default="lstm")
    parser.add_argument("--bidirectional", action="store_true")
    parser.add_argument("--pooling", choices=["last", "mean"], default="last")
    parser.add_argument("--embed-dim", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--dropout", type=float, default=0.0, help="on the pooled features")
    parser.add_argument("--max-len", type=int, default=40, help="tokens kept per sentence")
    parser.add_argument("--min-count", type=int, default=1, help="rarer train words become unknown")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--smoke", action="store_true", help="a few steps on tiny data (CI)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.n, args.epochs, args.embed_dim, args.hidden, args.max_len = 200, 1, 8, 8, 24

    if args.data_path is None:
        texts, labels = synthetic(args.n, args.seed)
        source = "synthetic sentences"
    else:
        texts, labels = read_labelled(args.data_path)
        source = args.data_path
    if args.smoke:
        texts, labels = texts[:200], labels[:200]
    index = np.arange(len(texts))
    train_ix, test_ix = nj.data.train_test_split(index, test_fraction=0.2, seed=args.seed)
    vocab = nj.data.fit_vocabulary([texts[i] for i in train_ix], min_count=args.min_count)
    x = vocab.encode(texts, max_length=args.max_len)  # {"inputs": (N, T), "lengths": (N,)}
    train = (jax.tree.map(lambda a: a[train_ix], x), labels[train_ix])
    test = (jax.tree.map(lambda a: a[test_ix], x), labels[test_ix])
    print(
        f"{source}: {len(train_ix)} train, {len(test_ix)} test sentences, "
        f"vocabulary {vocab.size} (train split), {np.mean(labels):.0%} positive"
    )
    print(f"example: {texts[train_ix[0]]!r} -> label {labels[train_ix[0]]}")

    config = TextClassifierConfig(
        vocab_size=vocab.size,
        embed_dim=args.embed_dim,
        hidden=args.hidden,
        cell=args.cell,
        bidirectional=args.bidirectional,
        pooling=args.pooling,
        num_classes=2,
        dropout_rate=args.dropout,
    )
    model = TextClassifier(config)
    params, state = model.init(jax.random.key(args.seed), jax.tree.map(lambda a: a[:1], train[0]))
    print(f"{args.cell}: {nj.count_params(params):,} params")
    tr = nj.trainer(
        model,
        nj.losses.softmax_cross_entropy,
        optax.adam(args.lr),
        metrics=[nj.metrics.accuracy],
    )
    data = nj.data.batches(train, args.batch_size, seed=args.seed, epochs=args.epochs)
    test_data = nj.data.batches(test, 256, shuffle=False, drop_remainder=False)

    def report(step, ts, logs):
        if "val_accuracy" in logs:
            print(f"epoch {step // data.steps_per_epoch}: test accuracy {logs['val_accuracy']:.4f}")

    start = time.perf_counter()
    ts, _ = nj.fit(
        tr,
        tr.init(params, state),
        data,
        eval_data=test_data,
        eval_every=data.steps_per_epoch * max(1, args.epochs // 5),
        callbacks=[report],
        progress=not (args.smoke or args.no_progress),
    )
    seconds = time.perf_counter() - start
    result = nj.evaluate(tr, ts, test_data.at(0))
    print(f"trained {args.epochs} epochs in {seconds:.1f} s")
    print(f"test accuracy: {result['accuracy']:.4f} (loss {result['loss']:.4f})")
    return {"test_accuracy": result["accuracy"], "seconds": seconds}


if __name__ == "__main__":
    main()
