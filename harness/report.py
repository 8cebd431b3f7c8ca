"""``python -m harness.report``: docs/REPRODUCTION.md from the committed MLflow record (``mlruns/``).

One row per experiment, arm and recipe: the published or target number next to the measured ones as
mean ± std over the row's seeds (each seed is its own run; runs of the same recipe made by separate
commands share a row), with wall seconds, device, precision, commits and run ids. Comparisons that the
targets name ("within 1 point of the PyCIL-style arm") give the difference of means with a 95% Welch t
interval. Experiments never run say "not run".

The record only grows: a row whose runs are not in the store being read (a fresh clone with an empty
local store, another machine's runs) is kept as it stands, and so is any section the report does not
write. The report says which rows it kept, updated and added.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from scipy import stats

from harness.errors import UserError
from harness.tracking import MlflowTracker, RunInfo, file_store_path, make_tracker

# task0_ablation's arms: PyCIL's task-0 recipe with one factor changed towards the user's seed recipe.
ABLATION = {"pycil_recipe": "PyCIL's task-0 recipe (200 epochs, m 0.9, wd 5e-4, [60,120,170], crop+flip+brightness)",
            "momentum_0.95": "momentum 0.95", "wd_2e-4": "weight decay 2e-4", "steplr30_80ep": "80 epochs, StepLR(30)",
            "warmup_3": "3 warmup epochs", "no_brightness": "no brightness jitter",
            "seed_recipe": "every factor: the user's seed recipe", "seed_recipe_no_augment": "the seed recipe, no augmentation"}
# ... and the 80-epoch seed recipe with one factor changed towards PyCIL's (80 epochs per arm, not 200).
ABLATION_FROM_SEED = {"seed_momentum_0.9": "seed recipe, momentum 0.9", "seed_wd_5e-4": "seed recipe, weight decay 5e-4",
                      "seed_multistep": "seed recipe, MultiStepLR [24,48,68] (PyCIL's shape in 80 epochs)",
                      "seed_no_warmup": "seed recipe, no warmup", "seed_brightness": "seed recipe, brightness jitter",
                      "seed_he_normal": "seed recipe, He-normal initialisation (PyCIL's and LibContinual's)"}


@dataclass(frozen=True)
class Target:
    experiment: str
    arm: str
    published: str
    paper_protocol: bool = False


TARGETS = [
    Target("gem_vs_pycil", "pycil_gem", "task-0 ~0.81 (PyCIL's GEM, as the user measured it)"),
    Target("gem_vs_pycil", "gem", "task-0 within 1 point of pycil_gem (same recipe)"),
    Target("gem_vs_pycil", "gem_seen", "no published number (class-incremental training)"),
    Target("gem_vs_pycil_b0inc10", "pycil_gem", "PyCIL's default split (10 + 10 x 10); task-0 of 10 classes"),
    Target("gem_vs_pycil_b0inc10", "gem", "task-0 within 1 point of pycil_gem (same recipe)"),
    Target("seed_recipe", "seed_recipe", "task-0 0.63-0.69 (the user's LibContinual runs)"),
    Target("seed_recipe", "pycil_gem", "task-0 ~0.81"),
    *(Target("task0_ablation", arm, text) for arm, text in {**ABLATION, **ABLATION_FROM_SEED}.items()),
    Target("gem_paper_cifar100", "gem", "ACC 0.654 (paper); 0.669 / BWT 0.015 / FWT -0.008 (original code rerun)", True),
    Target("gem_paper_cifar100", "finetune", "paper's single: figure only", True),
    Target("gem_paper_cifar100", "independent", "figure only", True),
    Target("gem_paper_cifar100", "ewc", "figure only", True),
    Target("gem_paper_cifar100", "icarl", "figure only", True),
    Target("gem_paper_mnist_permutations", "gem", "ACC 0.83 (paper); 0.821 (original code, identical data)", True),
    Target("gem_paper_mnist_permutations", "finetune", "paper's single: figure only; 0.574 (original code)", True),
    Target("gem_paper_mnist_permutations", "independent", "figure only", True),
    Target("gem_paper_mnist_permutations", "multimodal", "figure only", True),
    Target("gem_paper_mnist_permutations", "ewc", "figure only", True),
    Target("gem_paper_mnist_rotations", "gem", "ACC 0.86 (paper, approx.)", True),
    Target("gem_paper_mnist_rotations", "finetune", "paper's single: figure only", True),
    Target("gem_paper_mnist_rotations", "independent", "figure only", True),
    Target("gem_paper_mnist_rotations", "multimodal", "figure only", True),
    Target("gem_paper_mnist_rotations", "ewc", "figure only", True),
]
PAPER_PROTOCOLS = ["gem_paper_mnist_permutations", "gem_paper_mnist_rotations", "gem_paper_cifar100"]
PAPER_METHODS = {"finetune": "single", "independent": "independent", "multimodal": "multimodal", "ewc": "EWC",
                 "icarl": "iCaRL", "gem": "GEM"}


@dataclass(frozen=True)
class Comparison:
    """``a`` minus ``b`` on ``metric``, rows of one experiment picked by arm and (optionally) precision."""

    experiment: str
    a: tuple[str, str | None]
    b: tuple[str, str | None]
    metric: str
    target: str


COMPARISONS = [
    Comparison("gem_vs_pycil", ("gem", None), ("pycil_gem", None), "task0_acc", "|Δ| ≤ 0.01"),
    Comparison("gem_vs_pycil_b0inc10", ("gem", None), ("pycil_gem", None), "task0_acc", "|Δ| ≤ 0.01"),
    *(Comparison("task0_ablation", (arm, None), ("pycil_recipe", None), "task0_acc", "the factor's cost")
      for arm in ABLATION if arm != "pycil_recipe"),
    *(Comparison("task0_ablation", (arm, None), ("seed_recipe", None), "task0_acc", "the factor's gain")
      for arm in ABLATION_FROM_SEED),
    Comparison("seed_recipe", ("seed_recipe", "bf16-autocast"), ("seed_recipe", "fp32"), "task0_acc",
               "|Δ| ≤ 0.01 (bf16 agrees with fp32)"),
    Comparison("seed_recipe", ("seed_recipe", "bf16-autocast, compiled"), ("seed_recipe", "bf16-autocast"),
               "task0_acc", "|Δ| ≤ 0.01 (compiled agrees with eager)"),
    Comparison("seed_recipe", ("seed_recipe", "bf16-autocast, compiled"), ("seed_recipe", "bf16-autocast"),
               "wall_seconds", "< 0 (compiled is faster over the whole task)"),
]
STUDIES = ["tune_task0", "tune_memory_strength"]
# Parameters that do not change what an arm computes, or name this machine: runs that differ only in them
# (and in the engine seed) are seeds of one recipe and share a row.
NOT_RECIPE = ("engine.seed", "engine.checkpoint_every", "engine.eval_batch_size", "engine.workers", "engine.device",
              "engine.amp", "engine.channels_last", "split.data_root", "name")
PAPER = "## Paper comparison"
RUNS = "## Runs"
COMPARE = "## Comparisons"
SEARCHES = "## Searches"
PLOTS = "## Plots"
IN_PROGRESS = "## In progress"
PROGRESS_HEADER = ["| experiment | arm | seed | run | trained so far | device; precision; CPU | continue with |",
                   "|---|---|---|---|---|---|---|"]
RUNS_HEADER = ["| experiment | arm | published / target | measured: mean ± std over seeds | wall s (mean) | "
               "device; precision; size | seeds | commits | runs |", "|---|---|---|---|---|---|---|---|---|"]
COMPARE_HEADER = ["| experiment | comparison | metric | difference of means | 95% interval (Welch t) | "
                  "a − b per shared seed; 95% paired t interval | target | runs |", "|---|---|---|---|---|---|---|---|"]
SEARCH_HEADER = ["| study | best validation | best recipe on test | best parameters | trials | wall s | commit |",
                 "|---|---|---|---|---|---|---|"]
INTRO = ["# Reproduction record", "",
         "Generated by `python -m harness.report` from the MLflow record committed in `mlruns/`. Every number was",
         "measured by the runs its row names; a row gives mean ± std (sample std, n seeds) over runs of one recipe",
         "that differ only in the engine seed. The split (class order and images per task) is fixed by",
         "`split.seed` and is the same for every seed. Rows whose runs are not in the store that generated this",
         "file are kept as they were. Experiments without a run say \"not run\"."]


@dataclass
class Row:
    """One recipe of one arm: its seed runs and the parent (experiment) run of the first."""

    target: Target
    parent: RunInfo
    runs: list[RunInfo] = field(default_factory=list)

    def values(self, metric: str) -> np.ndarray:
        return np.array([r.metrics[metric] for r in self.runs if metric in r.metrics], dtype=float)

    def by_seed(self, metric: str) -> dict[str, float]:
        """``metric`` of each run that logged it, keyed by the run's engine seed."""
        return {_seed(r): r.metrics[metric] for r in self.runs if metric in r.metrics}

    @property
    def precision(self) -> str:
        """How the row's runs computed: ``fp32`` or ``bf16-autocast``, with ``, compiled`` for a compiled
        backbone."""
        run = self.runs[0]
        compiled = run.tags.get("compiled", run.params.get("engine.compile", "false")).lower() == "true"
        return run.tags.get("precision", "fp32") + (", compiled" if compiled else "")

    @property
    def device(self) -> str:
        return self.runs[0].tags.get("device", "?")

    @property
    def run_ids(self) -> str:
        return ", ".join(f"`{r.run_id[:8]}`" for r in self.runs)


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def mean_std(values: np.ndarray, digits: int = 3) -> str:
    if len(values) == 0:
        return "-"
    if len(values) == 1:
        return _fmt(float(values[0]), digits)
    return f"{_fmt(float(values.mean()), digits)} ± {_fmt(float(values.std(ddof=1)), digits)}"


def _t_interval(test: Callable, a: np.ndarray, b: np.ndarray, level: float, **kwargs: object) -> tuple[float, float]:
    with warnings.catch_warnings():  # values without spread make scipy warn about precision loss
        warnings.simplefilter("ignore", RuntimeWarning)
        ci = test(a, b, **kwargs).confidence_interval(level)
    return float(ci.low), float(ci.high)


def welch_interval(a: np.ndarray, b: np.ndarray, level: float = 0.95) -> tuple[float, float] | None:
    """The ``level`` confidence interval of mean(a) - mean(b) from Welch's t test (None below 2 per side)."""
    if len(a) < 2 or len(b) < 2:
        return None
    return _t_interval(stats.ttest_ind, a, b, level, equal_var=False)


def paired_interval(a: np.ndarray, b: np.ndarray, level: float = 0.95) -> tuple[float, float] | None:
    """The ``level`` confidence interval of the mean of a[i] - b[i] from the paired t test (None below 2 pairs).

    Equal differences give the interval [d, d]: no spread between the pairs."""
    if len(a) < 2:
        return None
    return _t_interval(stats.ttest_rel, a, b, level)


def _seed(run: RunInfo) -> str:
    return run.tags.get("seed", run.params.get("engine.seed", "?"))


def shared_seeds(a: Row, b: Row, metric: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The engine seeds both rows ran, and each row's ``metric`` for them in that order. One seed gives two
    arms the same initial weights and batch order wherever their recipes agree, so these pair."""
    values_a, values_b = a.by_seed(metric), b.by_seed(metric)
    seeds = [s for s in values_a if s in values_b]
    return seeds, np.array([values_a[s] for s in seeds]), np.array([values_b[s] for s in seeds])


def recipe_key(info: RunInfo) -> str:
    """What makes runs seeds of one recipe: every parameter but NOT_RECIPE, plus device and precision.

    A parameter logged as ``None`` counts as absent: a key the config gained later (``split.max_per_class``)
    defaults to null, which is what the runs recorded before it did, so it does not split their row. Whether
    the backbone was compiled counts as the run computed it (tag ``compiled``; before that tag, the
    ``engine.compile`` true/false it was given), not as the setting that chose it (``auto``)."""
    params = dict(info.params)
    compiled = info.tags.get("compiled", params.get("engine.compile"))
    if compiled is not None:
        params["engine.compile"] = compiled.lower()
    params = sorted((k, v) for k, v in params.items() if not k.startswith(NOT_RECIPE) and v != "None")
    text = repr((params, info.tags.get("device"), info.tags.get("precision", "fp32"), info.tags.get("memory_format")))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _label(parent: RunInfo, row: Row) -> str:
    """Device, precision, whether the run was a reduced variant, and command-line overrides."""
    variant = parent.tags.get("variant") or ""
    device = row.device
    size = {"": "full size", "task0": "task 0 only, full recipe (variant task0)"}.get(variant, f"reduced (variant {variant})")
    label = f"{'CPU' if device == 'cpu' else device}; {row.precision}; {size}"
    if parent.status != "FINISHED":
        label += f"; experiment {parent.status.lower()} (--resume {parent.run_id[:8]}…)"
    overrides = [o for o in yaml.safe_load(parent.tags.get("overrides") or "[]") if not o.startswith("seeds=")]
    return f"{label}; overrides {', '.join(overrides)}" if overrides else label


def _measured(row: Row) -> str:
    m = row.values
    if row.target.paper_protocol:
        return (f"TIL ACC {mean_std(m('til_acc'))} / BWT {mean_std(m('til_bwt'))} / FWT {mean_std(m('til_fwt'))}; "
                f"CIL ACC {mean_std(m('cil_acc'))}")
    if row.parent.tags.get("variant") == "task0":
        return f"task-0 {mean_std(m('task0_acc'))}; NME {mean_std(m('nme_cil_acc'))}"
    return (f"task-0 {mean_std(m('task0_acc'))}; CIL final {mean_std(m('cil_acc'))} / avg-inc "
            f"{mean_std(m('cil_avg_incremental'))}; TIL final {mean_std(m('til_acc'))}; NME {mean_std(m('nme_cil_acc'))}")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def run_line(row: Row) -> str:
    seeds = ", ".join(_seed(r) for r in row.runs)
    commits = ", ".join(dict.fromkeys(r.tags.get("git_commit", "?") for r in row.runs))
    wall = row.values("wall_seconds")
    cells = [row.target.experiment, row.target.arm, row.target.published, f"{_measured(row)} (n={len(row.runs)})",
             _fmt(float(wall.mean()), 0) if len(wall) else "-", _label(row.parent, row), seeds, commits, row.run_ids]
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _bracket(interval: tuple[float, float]) -> str:
    return f"[{interval[0]:+.3f}, {interval[1]:+.3f}]"


def comparison_line(comparison: Comparison, a: Row, b: Row) -> str:
    va, vb = a.values(comparison.metric), b.values(comparison.metric)
    diff = float(va.mean() - vb.mean())
    interval = welch_interval(va, vb)
    if interval is None:
        shown = f"n/a (n = {len(va)} and {len(vb)}; needs ≥ 2 each)"
    elif not all(map(math.isfinite, interval)):
        shown = "n/a (no spread on either side)"
    else:
        shown = _bracket(interval)
    name = f"{a.target.arm} ({a.precision}) − {b.target.arm} ({b.precision})"
    cells = [comparison.experiment, name, comparison.metric, f"{diff:+.3f}", shown,
             paired_cell(*shared_seeds(a, b, comparison.metric)), comparison.target, f"{a.run_ids} vs {b.run_ids}"]
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def paired_cell(seeds: list[str], a: np.ndarray, b: np.ndarray) -> str:
    """Each shared seed's a − b, then the paired interval of their mean."""
    if not seeds:
        return "no shared seed"
    each = ", ".join(f"{seed}: {d:+.3f}" for seed, d in zip(seeds, a - b, strict=True))
    interval = paired_interval(a, b)
    if interval is None:
        return f"{each}; n/a (one shared seed; needs ≥ 2)"
    return f"{each}; {_bracket(interval)}"


def collect_rows(tracker: MlflowTracker) -> tuple[list[Row], dict[str, RunInfo], list[str], set[str]]:
    """Every target's rows from the store (finished arm runs grouped by recipe), the parents involved, the
    lines of the runs still in progress, and the (short) ids of every arm run the store holds."""
    rows: list[Row] = []
    parents: dict[str, RunInfo] = {}
    # Read each experiment's parents and each parent's children once, not once per target arm.
    experiments = {t.experiment: sorted(tracker.runs_of_kind(t.experiment, "experiment", finished_only=False,
                                                             limit=1000), key=lambda p: p.run_id)
                   for t in TARGETS}
    children = {p.run_id: sorted(tracker.children(p.run_id), key=lambda c: (c.tags.get("seed", ""), c.run_id))
                for found in experiments.values() for p in found}
    for target in TARGETS:
        groups: dict[str, Row] = {}
        # An arm that finished is a measurement even when a later arm of its experiment was interrupted.
        for parent in experiments[target.experiment]:
            for child in children[parent.run_id]:
                if child.status != "FINISHED" or child.tags.get("arm") != target.arm:
                    continue
                row = groups.setdefault(recipe_key(child), Row(target, parent))
                row.runs.append(child)
                parents[parent.run_id] = parent
        rows += sorted(groups.values(), key=lambda r: (_label(r.parent, r), r.runs[0].run_id))
    unfinished = [progress_line(tracker, parent, child) for found in experiments.values() for parent in found
                  if parent.status != "FINISHED" for child in children[parent.run_id] if child.status != "FINISHED"]
    held = {c.run_id[:8] for found in children.values() for c in found}
    return rows, parents, unfinished, held


def progress_line(tracker: MlflowTracker, parent: RunInfo, child: RunInfo) -> str:
    """An arm's run that has not finished: how far it came and the command that continues it."""
    params = child.params
    total = int(params.get("init_epoch", 0)) + int(params.get("epoch", 0)) * (int(params.get("split.task_num", 1)) - 1)
    trained = len(tracker.metric_history(child.run_id, "epoch_train_loss"))
    how = f"{child.tags.get('device', '?')}; {child.tags.get('precision', '?')}; {child.tags.get('cpu_capability', '-')}"
    cells = [parent.experiment, child.tags.get("arm", child.name), child.tags.get("seed", "?"), f"`{child.run_id[:8]}`",
             f"{trained} of {total} epochs", how, f"`python -m harness.run --resume {parent.run_id}`"]
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def study_progress_lines(tracker: MlflowTracker) -> tuple[list[str], set[str]]:
    """Studies that have not finished: how many trials have (complete or pruned), and the command that
    carries them on (the same command that started them); and the (short) ids of every study the store holds."""
    lines, held = [], set()
    for name in STUDIES:
        for study in tracker.runs_of_kind(name, "study", finished_only=False):
            held.add(study.run_id[:8])
            if study.status == "FINISHED" and study.tags.get("state", "COMPLETE") == "COMPLETE":
                continue
            trials = sorted((c for c in tracker.children(study.run_id) if c.tags.get("kind") == "trial"),
                            key=lambda c: int(c.tags.get("trial", 0)))
            done = sum(c.tags.get("state") in ("COMPLETE", "PRUNED") for c in trials)
            last = trials[-1].tags if trials else {}
            how = f"{last.get('device', '?')}; {last.get('precision', '?')}; {last.get('cpu_capability', '-')}"
            cells = [study.tags.get("study", name), study.params.get("search.arm", "?"), "-", f"`{study.run_id[:8]}`",
                     f"{done} of {study.tags.get('n_trials', '?')} trials", how,
                     f"`python -m harness.tune experiments/{name}.yaml`"]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines, held


def comparison_lines(rows: list[Row]) -> list[str]:
    lines = []
    for comparison in COMPARISONS:
        def pick(arm: str, precision: str | None, c: Comparison = comparison) -> list[Row]:
            return [r for r in rows if r.target.experiment == c.experiment and r.target.arm == arm
                    and (precision is None or r.precision == precision)]

        for a in pick(*comparison.a):
            for b in pick(*comparison.b):
                same_size = a.parent.tags.get("variant") == b.parent.tags.get("variant")
                if a is not b and same_size and a.device == b.device:
                    lines.append(comparison_line(comparison, a, b))
    return lines


def paper_lines(rows: list[Row]) -> list[str]:
    """Method x protocol: task-incremental ACC, mean ± std over seeds, of the full-size row with the most
    seeds (the paper reports ACC with task descriptors), and the rows' runs."""
    lines = ["| method | " + " | ".join(p.removeprefix("gem_paper_") for p in PAPER_PROTOCOLS) + " |",
             "|---|" + "---|" * len(PAPER_PROTOCOLS)]
    for arm, label in PAPER_METHODS.items():
        cells = []
        for protocol in PAPER_PROTOCOLS:
            found = [r for r in rows if r.target.experiment == protocol and r.target.arm == arm
                     and not r.parent.tags.get("variant")]
            best = max(found, key=lambda r: len(r.runs), default=None)
            cells.append("not run" if best is None else
                         f"{mean_std(best.values('til_acc'))} (n={len(best.runs)}; {best.run_ids})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _test_score(metrics: dict[str, float]) -> str:
    """The best recipe's test score: mean ± std over its re-runs' seeds, and how many."""
    n = int(metrics.get("best_test_n", 1))
    spread = f" ± {_fmt(metrics['best_test_std'])}" if n > 1 and "best_test_std" in metrics else ""
    return f"{_fmt(metrics.get('best_test_value'))}{spread} (n={n})" if "best_test_value" in metrics else "-"


def search_lines(tracker: MlflowTracker) -> list[str]:
    lines = []
    for name in STUDIES:
        for study in sorted(tracker.runs_of_kind(name, "study"), key=lambda s: s.run_id):
            if study.tags.get("state", "COMPLETE") != "COMPLETE":
                continue  # carried on by a later call: the progress section counts its trials
            best = {k.removeprefix("best."): v for k, v in sorted(study.tags.items()) if k.startswith("best.")}
            lines.append(f"| {study.tags.get('study')} (`{study.run_id[:8]}`) | {_fmt(study.metrics.get('best_value'))} | "
                         f"{_test_score(study.metrics)} | {_cell(str(best))} | "
                         f"{int(study.metrics.get('n_trials', 0))} | {_fmt(study.metrics.get('wall_seconds'), 0)} | "
                         f"{study.tags.get('git_commit', '?')} |")
    return lines


# -- the record as it stands ---------------------------------------------------------------------------
RUN_ID = re.compile(r"`([0-9a-f]{8})`")


def parse_sections(text: str) -> dict[str, list[str]]:
    """``## `` sections of the record (the part before the first one under ``""``)."""
    sections: dict[str, list[str]] = {"": []}
    current = ""
    for line in text.splitlines():
        if line.startswith("## "):
            current = line
            sections[current] = []
        else:
            sections[current].append(line)
    return sections


def table_rows(lines: Iterable[str]) -> list[str]:
    return [line for line in lines if line.startswith("| ") and not line.startswith(("| experiment |", "| study |"))]


def plot_blocks(lines: list[str]) -> dict[str, list[str]]:
    """``### `` blocks of the plots section, keyed by the run id in their heading."""
    blocks: dict[str, list[str]] = {}
    key = None
    for line in lines:
        if line.startswith("### "):
            found = RUN_ID.search(line)
            key = found.group(1) if found else line
            blocks[key] = []
        if key is not None:
            blocks[key].append(line)
    return blocks


def merge(generated: list[str], existing: list[str], known: set[str]) -> tuple[list[str], list[str]]:
    """Generated rows plus every existing measured row none of whose runs the store knows (kept as it
    stands); returns (rows, kept)."""
    kept = [line for line in existing if "| not run |" not in line and RUN_ID.search(line)
            and not set(RUN_ID.findall(line)) & known and line not in generated]
    return generated + kept, kept


def _order(target_rows: list[str]) -> list[str]:
    """Rows in target order, then by their text: the same rows always print in the same order."""
    index = {(t.experiment, t.arm): i for i, t in enumerate(TARGETS)}

    def key(line: str) -> tuple[int, str]:
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        return index.get((cells[0], cells[1]) if len(cells) > 1 else ("", ""), len(index)), line

    return sorted(dict.fromkeys(target_rows), key=key)


@dataclass
class Report:
    text: str
    kept: list[str]
    added: list[str]
    updated: list[str]
    figures: dict[str, tuple[str, str]]  # file name -> (parent run id, artifact)


def build_report(tracker: MlflowTracker, existing: str, figures_dir: str = "reproduction") -> Report:
    """The new record text (nothing is written here) and the plots to place next to it."""
    rows, parents, unfinished, held = collect_rows(tracker)
    known = {r.run_id[:8] for row in rows for r in row.runs} | {p[:8] for p in parents}
    sections = parse_sections(existing)
    old_runs = table_rows(sections.get(RUNS, []))
    run_lines = [run_line(r) for r in rows]
    merged, kept = merge(run_lines, old_runs, known)
    measured_targets = {tuple(c.strip() for c in line.strip("|").split(" | ")[:2]) for line in merged}
    merged += [f"| {t.experiment} | {t.arm} | {t.published} | not run | | | | | |" for t in TARGETS
               if (t.experiment, t.arm) not in measured_targets]
    compare, kept_compare = merge(comparison_lines(rows), table_rows(sections.get(COMPARE, [])), known)
    searches = search_lines(tracker)
    studies, studies_held = study_progress_lines(tracker)
    # A study's line names its parent run: the store's studies are regenerated, every other line is kept
    # (lines from before studies were named carry no run id, and are never dropped).
    old_searches = [line for line in table_rows(sections.get(SEARCHES, [])) if "| not run |" not in line]
    kept_searches = [line for line in old_searches if line not in searches and not set(RUN_ID.findall(line)) & studies_held]
    searches += kept_searches
    searches += [f"| {name} | not run | | | | | |" for name in STUDIES
                 if not any(s.startswith((f"| {name} |", f"| {name} (")) for s in searches)]

    figures: dict[str, tuple[str, str]] = {}
    blocks = {k: v for k, v in plot_blocks(sections.get(PLOTS, [])).items() if k not in known}
    # One block per experiment run behind a row: a row that gains a later run of its recipe keeps the
    # plot of the earlier one.
    behind = [(row, parents[pid]) for row in rows
              for pid in dict.fromkeys(r.tags.get("mlflow.parentRunId", row.parent.run_id) for r in row.runs)]
    for row, parent in behind:
        key = parent.run_id[:8]
        if key in blocks:
            continue
        name = f"{row.target.experiment}-{key}.png"
        figures[name] = (parent.run_id, "arms_cil.png")
        blocks[key] = [f"### {row.target.experiment} ({_label(parent, row)}, run `{key}`)", "",
                       f"![CIL accuracy after each task]({figures_dir}/{name})", ""]
        if row.target.paper_protocol:
            figure = f"{row.target.experiment}-comparison-{key}.png"
            figures[figure] = (parent.run_id, "comparison.png")
            blocks[key] += [f"![ACC / BWT / FWT per method and the first task's accuracy]({figures_dir}/{figure})", ""]
    # A run in progress elsewhere (the store read here does not hold it) keeps its line until a store that
    # holds the run is read: then the line is regenerated, or dropped once the run has finished.
    unfinished += studies
    unfinished += [line for line in table_rows(sections.get(IN_PROGRESS, []))
                   if RUN_ID.search(line) and not set(RUN_ID.findall(line)) & (held | studies_held)]
    unfinished = sorted(dict.fromkeys(unfinished))
    paper = paper_lines(rows)
    old_paper = [line for line in table_rows(sections.get(PAPER, [])) if not line.startswith("| method |")]
    if not any(RUN_ID.search(line) for line in paper) and any(RUN_ID.search(line) for line in old_paper):
        paper = [*paper[:2], *old_paper]  # the store knows none of the comparison's runs: keep the record's

    lines = [*INTRO, "", PAPER, "",
             "The GEM paper's comparison: task-incremental ACC (the paper's metric, with task descriptors) per",
             "method and protocol, mean ± std over seeds, each method at the original run script's settings;",
             "BWT and FWT are in the runs table and the figures below.", "",
             *paper, "", RUNS, "", *RUNS_HEADER, *_order(merged), "", COMPARE, "",
             "Difference of the means of two rows with its 95% Welch t interval (scipy.stats.ttest_ind,",
             "equal_var=False), which needs at least two seeds on each side. Then the difference for each engine",
             "seed both rows ran, and the 95% paired t interval of its mean (scipy.stats.ttest_rel), which needs",
             "two shared seeds: one seed gives both arms the same initial weights and batch order wherever their",
             "recipes agree, so the seed's own spread drops out of the paired difference.", "",
             *COMPARE_HEADER, *(sorted(dict.fromkeys(compare)) or ["| - | no comparable rows yet | | | | | | |"]), "",
             SEARCHES, "", *SEARCH_HEADER, *searches, "", IN_PROGRESS, "",
             "Arm runs whose experiment has not finished, with the epochs they have trained so far, and studies",
             "that have not finished, with their finished trials (not results: their rows above say \"not run\" until",
             "they finish). A later session continues each from the checkpoint its run carries in the record.", "",
             *PROGRESS_HEADER, *(unfinished or ["| - | none | | | | | |"]), ""]
    for title, body in sections.items():  # sections the report does not write are kept as they are
        if title not in ("", PAPER, RUNS, COMPARE, SEARCHES, IN_PROGRESS, PLOTS):
            lines += [title, *body]
            if body and body[-1] != "":
                lines.append("")
    lines += [PLOTS, ""]
    for key in sorted(blocks, key=lambda k: (blocks[k][0], k)):
        block = blocks[key]
        lines += block if block[-1] == "" else [*block, ""]
    text = "\n".join(lines).rstrip("\n") + "\n"
    old_ids = [set(RUN_ID.findall(line)) for line in old_runs]
    changed = [line for line in run_lines if line not in old_runs]
    updated = [line for line in changed if any(set(RUN_ID.findall(line)) & ids for ids in old_ids)]
    added = [line for line in changed if line not in updated]
    return Report(text, kept + kept_compare + kept_searches, added, updated, figures)


def check_record(store: Path) -> None:
    """Name the file of a corrupt or partial file-store record before MLflow trips over it."""
    for meta in sorted(store.glob("*/meta.yaml")) + sorted(store.glob("*/*/meta.yaml")):
        try:
            data = yaml.safe_load(meta.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise UserError(f"{meta}: unreadable record file ({str(exc).splitlines()[0]})") from None
        required = ("experiment_id", "name") if meta.parent.parent == store else ("run_id", "experiment_id", "status")
        if not isinstance(data, dict) or any(k not in data for k in required):
            raise UserError(f"{meta}: incomplete record file (needs {', '.join(required)})")
    for metric in sorted(store.glob("*/*/metrics/**/*")):
        if metric.is_file():
            for line in metric.read_text().splitlines():
                parts = line.split()
                try:
                    [float(p) for p in parts[:3]]
                except ValueError:
                    parts = []
                if len(parts) != 3:
                    raise UserError(f"{metric}: corrupt metric line {line[:60]!r} (want 'timestamp value step')")


def write_report(report: Report, tracker: MlflowTracker, output: Path) -> None:
    """Download the plots into a temporary folder first, then write: a failure leaves the record untouched."""
    folder = output.parent / "reproduction"
    with tempfile.TemporaryDirectory() as tmp:
        ready = {}
        for name, (parent, artifact) in report.figures.items():
            try:
                ready[name] = Path(tracker.client.download_artifacts(parent, artifact, tmp))
            except Exception:  # an experiment whose plot artifact is missing still gets its table row
                continue
            target = Path(tmp) / name
            ready[name].rename(target)
            ready[name] = target
        folder.mkdir(parents=True, exist_ok=True)
        for name, path in ready.items():
            shutil.copyfile(path, folder / name)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report.text)


def summary_lines(report: Report) -> list[str]:
    lines = [f"added {len(report.added)} row(s) from the store, updated {len(report.updated)} (new runs of their recipe):"]
    lines += [f"  {line[:160]}" for line in report.updated]
    lines += [f"kept {len(report.kept)} row(s) from the record (their runs are not in this store):"]
    lines += [f"  {line[:160]}" for line in report.kept]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", help="MLflow store to read (default: the record, ./mlruns)")
    parser.add_argument("--out", default="docs/REPRODUCTION.md", help="where to write (default: the record itself)")
    args = parser.parse_args(argv)
    try:
        tracker = make_tracker(args.tracking_uri, None)
        if not isinstance(tracker, MlflowTracker):
            raise UserError("the report reads an MLflow store; --tracking-uri none has nothing to read")
        store = file_store_path(tracker.uri)
        if store is not None and store.is_dir():
            check_record(store)
        output = Path(args.out)
        existing = output.read_text() if output.is_file() else ""
        try:
            report = build_report(tracker, existing)
        except Exception as exc:  # MLflow's own errors on a damaged store
            raise UserError(f"{tracker.uri}: the record cannot be read ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200]})") from None
        write_report(report, tracker, output)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print("\n".join([f"wrote {args.out}", *summary_lines(report)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
