"""``python -m harness.tune EXPERIMENT.yaml [key.path=value ...] [--n-trials N] [--storage URL] [--study NAME]``

Searches the experiment's ``search:`` block with Optuna. Every trial is an MLflow run under the study's
parent run; the best recipe is re-run on the test split once per engine seed. Several processes given the
same ``--storage`` and study name share one study (Optuna's distributed mode). The same command, run again
(in a later session, on another machine with a clone of the record), continues the study: interrupted
trials from their checkpoints, then new trials up to ``search.n_trials``, then the re-runs.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

from harness.config.experiment import load_experiment
from harness.errors import Interrupted, UserError
from harness.tracking import make_tracker
from harness.tune.resume import STALE_AFTER
from harness.tune.study import prepare_study, run_study


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--n-trials", type=int, help="trials to run in this process (default: as many as the study "
                        "lacks of search.n_trials finished ones)")
    parser.add_argument("--timeout", type=float, help="seconds after which no new trial starts")
    parser.add_argument("--storage", default="journal:mlruns/optuna.journal",
                        help="Optuna storage: journal:PATH (a file; the default keeps studies beside the MLflow "
                             "record in mlruns/) or an RDB URL (sqlite:///..., postgresql://...)")
    parser.add_argument("--study", help="study name (resumes it if it exists; default: search.study or the file name)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI, or 'none' for a local folder")
    parser.add_argument("--variant", help="apply the named entry of the file's variants: block")
    parser.add_argument("--no-rerun", action="store_true", help="skip re-running the best recipe on the test split")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or per-trial lines")
    parser.add_argument("--stale-after", type=float, default=STALE_AFTER, metavar="SECONDS",
                        help="a RUNNING trial of another host with no heartbeat (one per epoch) for this long is "
                             "taken for interrupted and continued (default: %(default)s; on this host a trial whose "
                             "process is gone is continued at once)")
    parser.add_argument("--force", action="store_true", help="go on although the experiment file or overrides "
                        "changed the recipe the study's trials trained (the study records the change)")
    parser.add_argument("--no-continue", action="store_true", help=argparse.SUPPRESS)  # workers: the parent queued them
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
            remaining = prepare_study(args.experiment, args.overrides, tracker, storage=args.storage,
                                      study_name=args.study, variant=args.variant, stale_after=args.stale_after,
                                      force=args.force)
            run_workers(args, args.n_trials if args.n_trials is not None else remaining)
            n_trials = 0  # the workers ran them; this process only writes the study's summary and re-runs the best
        outcome = run_study(args.experiment, args.overrides, tracker, storage=args.storage, study_name=args.study,
                            n_trials=n_trials, timeout=args.timeout, variant=args.variant,
                            rerun_best=not args.no_rerun, progress=not args.quiet,
                            continue_interrupted=not args.no_continue and args.workers == 1,
                            stale_after=args.stale_after, force=args.force)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (Interrupted, KeyboardInterrupt) as exc:
        again = "python -m harness.tune " + shlex.join(argv if argv is not None else sys.argv[1:])
        print(f"interrupted: {exc or 'stopped'}; its checkpoint is kept, continue with: {again}", file=sys.stderr)
        return 130
    tests = ", ".join(f"{v:.4f}" for v in outcome.test_values) or "not re-run"
    print(f"study {outcome.study.study_name}: {len(outcome.study.trials)} trials, best validation "
          f"{outcome.best_value:.4f} with {outcome.best_params}; on the test split: {outcome.test_value:.4f} "
          f"(seeds: {tests})")
    print(outcome.top.to_string(index=False))
    print(f"MLflow parent run {outcome.parent_run_id}; live dashboard: optuna-dashboard {args.storage}")
    return 0


def run_workers(args: argparse.Namespace, total: int) -> None:
    """``args.workers`` processes of this command, each running its share of ``total`` trials on the shared
    study (the continuations of interrupted trials, queued before, go first)."""
    shares = [total // args.workers + (1 if i < total % args.workers else 0) for i in range(args.workers)]
    gpus = torch_gpu_count()
    base = [sys.executable, "-m", "harness.tune", args.experiment, *args.overrides, "--storage", args.storage,
            "--no-rerun", "--quiet", "--no-continue"]
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
