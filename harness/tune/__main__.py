"""``python -m harness.tune EXPERIMENT.yaml [key.path=value ...] [--n-trials N] [--storage URL] [--study NAME]``

Searches the experiment's ``search:`` block with Optuna. Every trial is an MLflow run under the study's
parent run; the best recipe is re-run once on the test split. Several processes given the same
``--storage`` and study name share one study (Optuna's distributed mode).
"""

from __future__ import annotations

import argparse
import sys

from harness.config.experiment import load_experiment
from harness.errors import UserError
from harness.tracking import make_tracker
from harness.tune.study import run_study


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--n-trials", type=int, help="trials to run in this process (default: search.n_trials)")
    parser.add_argument("--timeout", type=float, help="seconds after which no new trial starts")
    parser.add_argument("--storage", default="journal:mlruns/optuna.journal",
                        help="Optuna storage: journal:PATH (a file; the default keeps studies beside the MLflow "
                             "record in mlruns/) or an RDB URL (sqlite:///..., postgresql://...)")
    parser.add_argument("--study", help="study name (resumes it if it exists; default: search.study or the file name)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI, or 'none' for a local folder")
    parser.add_argument("--variant", help="apply the named entry of the file's variants: block")
    parser.add_argument("--no-rerun", action="store_true", help="skip re-running the best recipe on the test split")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or per-trial lines")
    args = parser.parse_intermixed_args(argv)
    try:
        experiment = load_experiment(args.experiment, args.overrides, args.variant)
        tracker = make_tracker(args.tracking_uri or experiment.tracking.uri,
                               experiment.tracking.experiment or experiment.name, experiment.tracking.local_dir)
        outcome = run_study(args.experiment, args.overrides, tracker, storage=args.storage, study_name=args.study,
                            n_trials=args.n_trials, timeout=args.timeout, variant=args.variant,
                            rerun_best=not args.no_rerun, progress=not args.quiet)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"study {outcome.study.study_name}: {len(outcome.study.trials)} trials, best validation "
          f"{outcome.best_value:.4f} with {outcome.best_params}; on the test split: {outcome.test_value:.4f}")
    print(outcome.top.to_string(index=False))
    print(f"MLflow parent run {outcome.parent_run_id}; live dashboard: optuna-dashboard {args.storage}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
