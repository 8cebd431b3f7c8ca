#!/usr/bin/env bash
# The GPU checks of docs/PERFORMANCE.md and docs/REPRODUCTION.md, in one command on a CUDA machine.
#
#   bash benchmarks/gpu_checks.sh STAGE...      results go to $OUT (default: ./gpu_results)
#
# Stages, in the order given:
#   tests     the graph-vs-eager equivalence tests and the QP/GEM tests, on CUDA (captures real graphs)
#   bench     benchmarks/gem_speed.py at t = 4, M = 256 and 2000 (harness graph / eager, PyCIL-style)
#   fullrun   benchmarks/gem_full_run.py: 5 x 20 classes, 80 epochs per task, M = 256, exact GEM
#   task0     task 0 of experiments/gem_vs_pycil.yaml, every arm, PyCIL's 200 epochs (needs $DATA_ROOT,
#             the CIFAR-100 image folders); runs are written with tracking.uri none to $OUT/harness_runs
#   paper     experiments/gem_paper_cifar100.yaml, the paper's protocol (needs $DATA_ROOT)
# Needs torch with CUDA, pandas, pyyaml, pytest, scikit-learn and quadprog; not mlflow or optuna.
set -u -o pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0

run() {  # run NAME CMD...: tee the output to $OUT/NAME.log and remember a failure
    echo "== $1 $(date +%T)"
    local name=$1
    shift
    "$@" 2>&1 | tee "$OUT/$name.log" || status=1
}

needs_data() {
    if [ ! -d "${DATA_ROOT:-}/train" ]; then
        echo "$1: set DATA_ROOT to the CIFAR-100 image folders (train/ and test/)" >&2
        exit 2
    fi
}

for stage in "$@"; do
    case $stage in
        tests) run tests "$PY" -m pytest -q -p no:cacheprovider tests/test_graphs.py tests/test_qp.py tests/test_gem.py ;;
        bench) run bench "$PY" benchmarks/gem_speed.py --device cuda --t 4 --M 256 2000 --steps 30 --json ;;
        fullrun) run fullrun "$PY" benchmarks/gem_full_run.py --device cuda --json ;;
        task0)
            needs_data task0
            run task0 "$PY" -m harness.run experiments/gem_vs_pycil.yaml --variant task0 --tracking-uri none \
                "split.data_root=$DATA_ROOT" --quiet
            ;;
        paper)
            needs_data paper
            run paper "$PY" -m harness.run experiments/gem_paper_cifar100.yaml --tracking-uri none \
                "split.data_root=$DATA_ROOT" --quiet
            ;;
        *) echo "unknown stage '$stage' (tests, bench, fullrun, task0, paper)" >&2; exit 2 ;;
    esac
done
if [ -d harness_runs ]; then cp -r harness_runs "$OUT/"; fi
exit $status
