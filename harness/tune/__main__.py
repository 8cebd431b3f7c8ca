"""``python -m harness.tune EXPERIMENT.yaml [key.path=value ...] [--n-trials N] [--storage URL] [--study NAME]``

Searches the experiment's ``search:`` block with Optuna. Every trial is an MLflow run under the study's
parent run; the best recipe is re-run once on the test split. Several processes given the same
``--storage`` and study name share one study (Optuna's distributed mode).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from harness.config.experiment import load_experiment
from harness.errors import UserError
from harness.tracking import make_tracker
from harness.tune.study import prepare_study, run_study


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
    parser.add_argument("--workers", type=int, default=1, help="worker processes sharing the study (one per GPU via "
                        "CUDA_VISIBLE_DEVICES when there are GPUs); the trials are split between them")
    args = parser.parse_intermixed_args(argv)
    try:
        if args.workers < 1:
            raise UserError(f"--workers {args.workers}: must be at least 1")
        experiment = load_experiment(args.experiment, args.overrides, args.variant)
        tracker = make_tracker(args.tracking_uri or experiment.tracking.uri,
                               experiment.tracking.experiment or experiment.name, experiment.tracking.local_dir)
        n_trials = args.n_trials
        if args.workers > 1:
            prepare_study(args.experiment, args.overrides, tracker, storage=args.storage, study_name=args.study,
                          variant=args.variant)
            run_workers(args, experiment.search or {})
            n_trials = 0  # the workers ran them; this process only writes the study's summary and re-runs the best
        outcome = run_study(args.experiment, args.overrides, tracker, storage=args.storage, study_name=args.study,
                            n_trials=n_trials, timeout=args.timeout, variant=args.variant,
                            rerun_best=not args.no_rerun, progress=not args.quiet)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"study {outcome.study.study_name}: {len(outcome.study.trials)} trials, best validation "
          f"{outcome.best_value:.4f} with {outcome.best_params}; on the test split: {outcome.test_value:.4f}")
    print(outcome.top.to_string(index=False))
    print(f"MLflow parent run {outcome.parent_run_id}; live dashboard: optuna-dashboard {args.storage}")
    return 0


def run_workers(args: argparse.Namespace, search: dict) -> None:
    """``args.workers`` processes of this command, each running its share of the trials on the shared study."""
    total = args.n_trials or int(search.get("n_trials", 20))
    shares = [total // args.workers + (1 if i < total % args.workers else 0) for i in range(args.workers)]
    gpus = torch_gpu_count()
    base = [sys.executable, "-m", "harness.tune", args.experiment, *args.overrides, "--storage", args.storage,
            "--no-rerun", "--quiet"]
    for flag, value in (("--study", args.study), ("--tracking-uri", args.tracking_uri), ("--variant", args.variant),
                        ("--timeout", args.timeout)):
        if value is not None:
            base += [flag, str(value)]
    procs = []
    for i, share in enumerate(shares):
        if share == 0:
            continue
        env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": str(i % gpus)} if gpus else {})}
        procs.append(subprocess.Popen([*base, "--n-trials", str(share)], env=env))
    failed = [p.args for p in procs if p.wait() != 0]
    if failed:
        raise UserError(f"{len(failed)} of {len(procs)} tuning workers failed (their output is above)")


def torch_gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


if __name__ == "__main__":
    sys.exit(main())
