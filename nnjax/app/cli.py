"""The ``nnjax`` command line: ``nnjax demo``."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

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
