"""The ``nnjax`` command line: ``nnjax demo``."""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nnjax", description="nnjax command line")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="pretrain a CNN on digits 0-4, fine-tune it on 5-9 three ways, print a table",
        description="Offline demo (scikit-learn's bundled digits): pretrain, then fine-tune "
        "from scratch / fully / frozen backbone / LoRA, and compare.",
    )
    demo.add_argument(
        "--out", default="nnjax-demo", help="output folder (checkpoints, plot, table)"
    )
    demo.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    demo.add_argument("--pretrain-steps", type=int)
    demo.add_argument("--finetune-steps", type=int)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    from nnjax.app import demo as demo_lib

    cfg = demo_lib.DemoConfig(out=args.out, seed=args.seed, progress=not args.no_progress)
    if args.quick:
        cfg = cfg.quick()
    if args.pretrain_steps is not None:
        cfg = demo_lib.dataclasses.replace(cfg, pretrain_steps=args.pretrain_steps)
    if args.finetune_steps is not None:
        cfg = demo_lib.dataclasses.replace(cfg, finetune_steps=args.finetune_steps)
    start = time.perf_counter()
    demo_lib.run(cfg)
    print(f"demo finished in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
