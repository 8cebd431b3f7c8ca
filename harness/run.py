"""Command line of ``python -m harness.run``: parsed before torch is imported, so ``--help`` is instant."""

from __future__ import annotations

import argparse
import json
import sys

from harness.config.options import parse_seeds
from harness.errors import Interrupted, UserError

DESCRIPTION = ("Train every arm of an experiment on the same class-incremental split, side by side; each arm "
               "and engine seed is its own MLflow run under one parent run.")
EPILOG = """examples:
  python -m harness.run experiments/quickstart.yaml
  python -m harness.run experiments/gem_vs_pycil.yaml --variant task0 --seeds 0,1 arms.*.init_epoch=100
  python -m harness.run --resume PARENT_RUN_ID
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m harness.run", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", nargs="?", help="experiment YAML file")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides (arms addressed by name)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI, or 'none' for a local folder")
    parser.add_argument("--variant", help="apply the named entry of the file's variants: block (e.g. quick)")
    parser.add_argument("--seeds", help="engine seeds, comma-separated (0,1,2): every arm runs once per seed")
    parser.add_argument("--arms", help="run only these arms of the file, comma-separated")
    parser.add_argument("--smoke", action="store_true", help="every arm end to end on a small subset in about a "
                        "minute (5 training images per class, 1 epoch, at most 3 tasks), recorded "
                        "under <cache>/smoke-mlruns unless --tracking-uri is given")
    parser.add_argument("--dry-run", action="store_true", help="validate, print the resolved experiment and plan")
    parser.add_argument("--resume", metavar="PARENT_RUN_ID", help="continue an interrupted experiment")
    parser.add_argument("--force", action="store_true", help="resume even if the experiment file changed")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_intermixed_args(argv)
    if args.resume is None and args.experiment is None:
        parser.error("an experiment file (or --resume PARENT_RUN_ID) is required")
    if args.resume is not None and (args.experiment or args.overrides or args.seeds or args.arms or args.smoke):
        parser.error("--resume takes the experiment file, overrides, seeds and arms recorded in the parent run")
    return args


def seeds_override(text: str | None) -> list[str]:
    """``--seeds 0,1,2`` as the override ``seeds=[0, 1, 2]`` (so a resume re-applies it like any override)."""
    if text is None:
        return []
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"--seeds {text!r}: must be comma-separated integers, e.g. 0,1,2") from None
    parse_seeds(seeds, "--seeds", None)
    return [f"seeds={json.dumps(seeds)}"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        args.overrides = [*args.overrides, *seeds_override(args.seeds)]
        from harness.engine.session import resume, start  # torch and MLflow load only now

        return resume(args) if args.resume else start(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (Interrupted, KeyboardInterrupt) as exc:
        print(f"interrupted: {exc or 'stopped'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
