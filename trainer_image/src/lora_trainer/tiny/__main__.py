"""CLI: `python -m lora_trainer.tiny --out DIR [--seed 0] [--force]`.

Exit codes: 0 built or reused, 1 runtime error, 2 usage.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .build import ENV_OUT_DIR, build_tiny_assets, default_out_dir


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lora_trainer.tiny",
        description="Generate the tiny chat model, its tokenizer and the fine-tuning data.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output directory (default: ${ENV_OUT_DIR} or /tmp/lora-operator/tiny)",
    )
    parser.add_argument("--seed", type=int, default=0, help="generation seed (default: 0)")
    parser.add_argument(
        "--force", action="store_true", help="regenerate even if a complete build exists"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir: Path = args.out if args.out is not None else default_out_dir()
    started = time.perf_counter()
    try:
        assets = build_tiny_assets(out_dir, seed=args.seed, force=args.force)
    except (OSError, RuntimeError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - started
    if assets.reused:
        print(f"cached: {out_dir} already holds a complete build for seed {args.seed}")
    else:
        print(f"built {out_dir} (seed {args.seed}) in {elapsed:.1f} s")
    print(f"model: {assets.model_dir}\ntrain: {assets.train_path}\neval:  {assets.eval_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
