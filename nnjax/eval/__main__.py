"""``python -m nnjax.eval --model-dir DIR --tasks a,b``: lm-evaluation-harness on an nnjax model.

Tasks are the harness's (``hellaswag``, ``wikitext``, ...; their data must be in the
local Hugging Face cache, or set ``HF_DATASETS_OFFLINE=0``) or your own task YAML files
in ``--include-path``. Prints the harness's results table; ``--output`` writes the
results as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nnjax.eval", description=__doc__)
    p.add_argument("--model-dir", required=True, help="a Hugging Face model folder")
    p.add_argument("--tasks", required=True, help="comma-separated task names")
    p.add_argument("--include-path", help="a folder of task YAML files")
    p.add_argument(
        "--only-include-path",
        action="store_true",
        help="look tasks up in --include-path only (seconds faster: the harness's "
        "bundled task files are not indexed)",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, help="longest context (default: the model's)")
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--limit", type=float, help="examples per task (or a fraction)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="the params' dtype")
    p.add_argument("--output", help="write the results here as JSON")
    return p


def main(argv: list[str] | None = None) -> Any:
    args = _parser().parse_args(argv)
    import jax.numpy as jnp
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    from nnjax.eval import harness

    # through Any: lm_eval's decorators hide the signatures from type checkers
    lm_class: Any = harness.NNJaxLM
    simple_evaluate: Any = lm_eval.simple_evaluate
    model = lm_class(
        args.model_dir,
        batch_size=args.batch_size,
        max_length=args.max_length,
        dtype=jnp.bfloat16 if args.dtype == "bfloat16" else None,
    )
    results = simple_evaluate(
        model=model,
        tasks=args.tasks.split(","),
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        task_manager=TaskManager(
            include_path=args.include_path, include_defaults=not args.only_include_path
        ),
    )
    print(make_table(results))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results["results"], f, indent=2, default=str)
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
