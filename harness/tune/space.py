"""The ``search:`` block of an experiment file: which arm, the space, the objective, sampler and pruner."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from harness.config.options import build_options, opt, reject_unknown
from harness.errors import ConfigError

# Short names for the knobs users tune most; any dotted path inside the arm works too.
ALIASES = {
    "lr": "optimizer.kwargs.lr",
    "momentum": "optimizer.kwargs.momentum",
    "weight_decay": "optimizer.kwargs.weight_decay",
    "memory_strength": "method.kwargs.memory_strength",
    "scheduler": "lr_scheduler",
}
DISTRIBUTIONS = ("uniform", "log_uniform", "int", "choice")
TASK0_OBJECTIVES = ("task0_acc",)
PRUNERS = ("median", "hyperband", "none")


@dataclass
class SearchOptions:
    arm: str = ""
    study: str | None = None
    objective: str = "task0_acc"
    direction: Literal["maximize", "minimize"] = "maximize"
    n_trials: int = opt(20, lo=1)
    timeout: float | None = None
    val_fraction: float = opt(0.1, lo=0.0, below=1.0)
    sampler: dict = field(default_factory=lambda: {"name": "TPE", "seed": 0})
    pruner: dict = field(default_factory=lambda: {"name": "median", "n_startup_trials": 3, "n_warmup_steps": 2})
    space: dict = field(default_factory=dict)


@dataclass
class Dimension:
    """One searched knob: its name in Optuna, the arm key path it sets, and its distribution."""

    name: str
    path: str
    kind: str
    args: list[Any]

    def suggest(self, trial: Any) -> Any:
        if self.kind == "uniform":
            return trial.suggest_float(self.name, *self.args)
        if self.kind == "log_uniform":
            return trial.suggest_float(self.name, *self.args, log=True)
        if self.kind == "int":
            return trial.suggest_int(self.name, *self.args)
        # Optuna's categorical values must be primitives: mappings (a whole scheduler block) go as JSON.
        return self.decode(trial.suggest_categorical(
            self.name, [json.dumps(a) if isinstance(a, (dict, list)) else a for a in self.args]))

    def decode(self, stored: Any) -> Any:
        """The recipe value for what Optuna stored (JSON text for structured choices)."""
        if self.kind == "choice" and isinstance(stored, str) and stored[:1] in "{[":
            return json.loads(stored)
        return stored


def parse_search(raw: Any, arms: list[str], source: str) -> tuple[SearchOptions, list[Dimension]]:
    if raw is None:
        raise ConfigError("the experiment has no search: block to tune", key="search", source=source)
    options = build_options(SearchOptions, raw, key="search", source=source)
    if options.arm not in arms:
        raise ConfigError(f"must name one of the arms ({', '.join(arms)})", key="search.arm", source=source)
    if not options.space:
        raise ConfigError("is empty: name at least one knob to search", key="search.space", source=source)
    reject_unknown(options.sampler, ("name", "seed"), key="search.sampler", source=source)
    if options.sampler.get("name", "TPE") not in ("TPE", "Random"):
        raise ConfigError("name must be TPE or Random", key="search.sampler.name", source=source)
    reject_unknown(options.pruner, ("name", "n_startup_trials", "n_warmup_steps", "min_resource", "reduction_factor"),
                   key="search.pruner", source=source)
    if options.pruner.get("name", "median") not in PRUNERS:
        raise ConfigError(f"name must be one of {', '.join(PRUNERS)}", key="search.pruner.name", source=source)
    dims = []
    for name, spec in options.space.items():
        key = f"search.space.{name}"
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(f"must be one of {{{', '.join(DISTRIBUTIONS)}: ...}}", key=key, source=source)
        (kind, args), = spec.items()
        reject_unknown({kind: args}, DISTRIBUTIONS, key=key, source=source)
        if not isinstance(args, list) or (kind != "choice" and len(args) != 2) or not args:
            raise ConfigError(f"{kind} takes {'a list of choices' if kind == 'choice' else '[low, high]'}", key=key,
                              source=source)
        if kind != "choice" and not args[0] < args[1]:
            raise ConfigError(f"low {args[0]} must be below high {args[1]}", key=key, source=source)
        if kind == "log_uniform" and args[0] <= 0:
            raise ConfigError("log_uniform needs a positive low bound", key=key, source=source)
        dims.append(Dimension(name, ALIASES.get(name, name), kind, list(args)))
    return options, dims
