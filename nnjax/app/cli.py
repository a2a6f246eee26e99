"""The ``nnjax`` command line: ``nnjax demo``, ``nnjax tokenize``."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnjax", description="nnjax command line")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="what fine-tuning buys: a pretrained CNN (and language model) against "
        "training from scratch, offline, in a few minutes on a CPU",
        description="Offline demo. Images: a CNN pretrained on clean 8x8 digits "
        "(scikit-learn's) meets faint, noisy scans from a few labelled examples, five ways: "
        "from scratch, the pretrained model as it is, full fine-tuning, head only, and LoRA "
        "+ head; accuracy as mean ± std over seeds at several label counts, trainable "
        "parameters, optimizer-state and saved-file bytes, compile and step time. Text "
        "(when nj.models.CausalLM is present): a byte-level language model pretrained on "
        "Python's own source files, fine-tuned on Python's documentation fully and with LoRA (and "
        "LoRA on an 8-bit base when nj.finetune.quantize is present); perplexity before "
        "and after. Writes the tables, checkpoints and plots to --out.",
    )
    demo.add_argument(
        "--out", default="nnjax-demo", help="output folder (checkpoints, tables, plots)"
    )
    demo.add_argument("--quick", action="store_true", help="fewer steps, seeds and label counts")
    demo.add_argument("--pretrain-steps", type=int, help="CNN pretraining steps")
    demo.add_argument("--finetune-steps", type=int, help="steps of each fine-tuning run")
    demo.add_argument("--seeds", type=int, help="runs per method and label count")
    demo.add_argument("--seed", type=int, default=0, help="seed of the data split and models")
    demo.add_argument("--no-text", action="store_true", help="skip the language-model part")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    _tokenize_parser(sub)
    return parser


def _tokenize_parser(sub: Any) -> None:
    tok = sub.add_parser(
        "tokenize",
        help="a corpus to a token folder (train.bin, val.bin, meta.json), as nanoGPT's prepare.py",
        description="Tokenize text files (one document each), a field of JSONL / JSON / Parquet "
        "/ Arrow records, or a datasets folder (Dataset.save_to_disk) into OUT/train.bin and "
        "OUT/val.bin (uint16 or uint32 token ids, the end-of-text id between documents) and "
        "OUT/meta.json. Interrupted, the same command resumes where it stopped.",
    )
    tok.add_argument("sources", nargs="+", help="files or dataset folders, in order")
    tok.add_argument(
        "--tokenizer",
        required=True,
        help="a folder with tokenizer.json (a model folder), or 'bytes' (UTF-8 bytes)",
    )
    tok.add_argument("--out", required=True, help="the output folder")
    tok.add_argument("--field", default="text", help="the text field of records (default text)")
    tok.add_argument(
        "--val-fraction", type=float, default=0.1, help="the last fraction of tokens for val.bin"
    )
    tok.add_argument(
        "--eot-id",
        default="auto",
        help="id between documents: 'auto' (the tokenizer's end-of-sequence), 'none', or an int",
    )
    tok.add_argument("--batch-documents", type=int, default=256, help="documents per batch")
    tok.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    tok.add_argument("--no-progress", action="store_true", help="no progress bar")


def _tokenize(args: argparse.Namespace) -> int:
    from nnjax.data.corpus import tokenize_corpus

    word = args.eot_id.lower()
    eot: int | str | None = None if word == "none" else "auto" if word == "auto" else None
    if word not in ("none", "auto"):
        if not word.isdigit():
            raise SystemExit(f"--eot-id: expected 'auto', 'none' or an int, got {args.eot_id!r}")
        eot = int(word)
    start = time.perf_counter()
    meta = tokenize_corpus(
        args.sources,
        args.tokenizer,
        args.out,
        field=args.field,
        val_fraction=args.val_fraction,
        eot_id=eot,
        batch_documents=args.batch_documents,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    seconds = time.perf_counter() - start
    print(
        f"{args.out}: {meta['documents']:,} documents, {meta['train_tokens']:,} train + "
        f"{meta['val_tokens']:,} val tokens ({meta['dtype']}, vocabulary {meta['vocab_size']:,}) "
        f"in {seconds:.1f} s ({meta['tokens'] / max(seconds, 1e-9):,.0f} tokens/s)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "tokenize":
        return _tokenize(args)

    from nnjax.app import demo as demo_lib

    cfg = demo_lib.DemoConfig(
        out=args.out,
        seed=args.seed,
        progress=not args.no_progress,
        language_model=not args.no_text,
    )
    if args.quick:
        cfg = cfg.quick()
    given = {
        "pretrain_steps": args.pretrain_steps,
        "finetune_steps": args.finetune_steps,
        "seeds": args.seeds,
    }
    cfg = dataclasses.replace(cfg, **{k: v for k, v in given.items() if v is not None})
    start = time.perf_counter()
    demo_lib.run(cfg)
    print(f"demo finished in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
