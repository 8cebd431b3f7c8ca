"""Experiment files: what every arm shares (``split``, ``tracking``, ``engine``) and each arm's recipe.

An arm is written inline or names a LibContinual-style method file (``config: path.yaml``) whose keys keep
their LibContinual meaning; inline keys are deep-merged over the file's. Everything is validated before
anything trains, and each problem is one ``ConfigError`` naming the file and the dotted key.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from harness.config.loader import apply_overrides, deep_merge, load_with_includes, read_yaml
from harness.config.options import build_options, check_call_kwargs, did_you_mean, opt, parse_seeds, reject_unknown
from harness.data.augment import NO_AUGMENT, AugmentOptions
from harness.data.datasets import DATASETS, list_class_folders
from harness.data.split import task_offsets
from harness.engine.optim import OPTIMIZERS, SCHEDULERS
from harness.engine.precision import Switch, check_compiler
from harness.errors import ConfigError, UserError
from harness.methods import method_class, methods
from harness.models import BACKBONES, INITS, LIBCONTINUAL_BACKBONE_KEYS, NETWORK_KEYS, build_backbone

TOP_KEYS = ("name", "description", "split", "seeds", "arms", "tracking", "engine", "search", "variants")
SPLIT_KEYS = ("dataset", "data_root", "class_order", "init_cls_num", "inc_cls_num", "task_num", "seed", "val_fraction",
              "max_per_class",
              "protocol", "samples_per_task")
PROTOCOLS = ("class_incremental", "permutations", "rotations")
ARM_KEYS = ("name", "config", "method", "backbone", "epoch", "init_epoch", "batch_size", "optimizer",
            "init_optimizer", "lr_scheduler", "init_lr_scheduler", "warmup", "augment", "engine")
# LibContinual keys an arm file may carry. Split keys must agree with ``split:``; ``workers``, ``seed`` and
# ``deterministic`` go to the engine; the rest are recorded as parameters and have no effect here.
LIBCONTINUAL_SPLIT_KEYS = ("init_cls_num", "inc_cls_num", "task_num", "data_root")
LIBCONTINUAL_RECORDED = ("val_per_epoch", "image_size", "pin_memory", "device_ids", "n_gpu", "save_path")
LIBCONTINUAL_KEYS = (*LIBCONTINUAL_SPLIT_KEYS, *LIBCONTINUAL_RECORDED, "buffer", "classifier", "workers", "seed",
                     "deterministic", "includes")
REPLAY_BUFFER_SENTENCE = (
    "GEM's episodic memory is not a rehearsal buffer: its examples only constrain the gradient and never "
    "enter training batches, so set the memory with classifier/method n_memories (per task) and leave "
    "buffer.kwargs.buffer_size at 0")


@dataclass
class EngineOptions:
    """Where and how arms run. ``cuda_graph`` (the whole step captured and replayed, ``harness.engine.graphs``):
    null = on for CUDA. ``amp`` (bf16 autocast) and ``channels_last``: ``auto`` = on for CUDA and for CPUs that
    compute bf16 natively (``harness.engine.precision``). ``compile``: ``torch.compile`` the backbone; ``auto`` =
    on for the bf16 + channels-last CPU path only (``choose_compile``).
    ``workers`` is accepted for LibContinual files and recorded: batches come from device-resident tensors."""

    device: str = "auto"
    deterministic: bool = False
    seed: int = 0
    workers: int = opt(0, lo=0)
    cuda_graph: bool | None = None
    amp: Switch = "auto"
    channels_last: Switch = "auto"
    compile: Switch = "auto"
    checkpoint_every: int = opt(1, lo=0)
    eval_batch_size: int = opt(1000, lo=1)


@dataclass
class SplitSpec:
    dataset: str
    data_root: Path | None
    class_order: str | list[int]
    init_cls_num: int
    inc_cls_num: int
    task_num: int
    seed: int
    val_fraction: float
    protocol: str = "class_incremental"
    samples_per_task: int | None = None
    max_per_class: int | None = None

    @property
    def offsets(self) -> list[int]:
        return task_offsets(self.init_cls_num, self.inc_cls_num, self.task_num)


@dataclass
class TrackingSpec:
    uri: str | None = None
    experiment: str | None = None
    local_dir: str = "harness_runs"


@dataclass
class Block:
    """A ``{name, kwargs}`` block (optimizer, scheduler, method, backbone) after validation."""

    name: str
    kwargs: dict[str, Any]
    options: Any = None


@dataclass
class ArmRecipe:
    name: str
    source: str
    method: Block
    backbone: Block
    epoch: int
    init_epoch: int
    batch_size: int
    optimizer: Block
    init_optimizer: Block
    lr_scheduler: Block
    init_lr_scheduler: Block
    warmup: int
    augment: AugmentOptions
    engine: EngineOptions
    recorded: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved recipe (logged as parameters and as a YAML artifact)."""
        def block(b: Block) -> dict[str, Any]:
            return {"name": b.name, "kwargs": b.kwargs}

        return {
            "name": self.name, "method": block(self.method), "backbone": block(self.backbone),
            "epoch": self.epoch, "init_epoch": self.init_epoch, "batch_size": self.batch_size,
            "optimizer": block(self.optimizer), "init_optimizer": block(self.init_optimizer),
            "lr_scheduler": block(self.lr_scheduler), "init_lr_scheduler": block(self.init_lr_scheduler),
            "warmup": self.warmup, "augment": dataclasses.asdict(self.augment),
            "engine": dataclasses.asdict(self.engine), **({"libcontinual": self.recorded} if self.recorded else {}),
        }


@dataclass
class Experiment:
    """``seeds``: engine seeds every arm runs with, one run per arm and seed (None: each arm's
    ``engine.seed``). The split (class order, which images each task gets) stays fixed by ``split.seed``."""

    name: str
    source: str
    split: SplitSpec
    arms: list[ArmRecipe]
    tracking: TrackingSpec
    engine: EngineOptions
    search: dict[str, Any] | None
    raw: dict[str, Any]
    seeds: list[int] | None = None

    def arm(self, name: str) -> ArmRecipe:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise ConfigError(f"no arm named {name!r}{did_you_mean(name, [a.name for a in self.arms])}", source=self.source)

    def seeded_arms(self) -> list[ArmRecipe]:
        """Every (arm, seed) to train, arm by arm: the arm's recipe with ``engine.seed`` set to the seed."""
        return [dataclasses.replace(arm, engine=dataclasses.replace(arm.engine, seed=seed))
                for arm in self.arms for seed in (self.seeds or [arm.engine.seed])]


def _require(raw: dict[str, Any], key: str, types: tuple[type, ...], where: str, source: str) -> Any:
    if key not in raw:
        raise ConfigError("is required", key=f"{where}.{key}" if where else key, source=source)
    return _typed(raw[key], types, f"{where}.{key}" if where else key, source)


def _typed(value: Any, types: tuple[type, ...], key: str, source: str) -> Any:
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        names = " or ".join(t.__name__ for t in types)
        raise ConfigError(f"must be {names}, not {type(value).__name__} {value!r}", key=key, source=source)
    return value


def _positive_int(raw: dict[str, Any], key: str, where: str, source: str, default: int | None = None,
                  minimum: int = 1) -> int:
    full = f"{where}.{key}" if where else key
    if key not in raw or raw[key] is None:
        if default is None:
            raise ConfigError("is required", key=full, source=source)
        return default
    value = _typed(raw[key], (int,), full, source)
    if value < minimum:
        raise ConfigError(f"must be >= {minimum}, not {value}", key=full, source=source)
    return value


def _parse_split(raw: Any, source: str) -> SplitSpec:
    if not isinstance(raw, dict):
        raise ConfigError("is required and must be a mapping", key="split", source=source)
    reject_unknown(raw, SPLIT_KEYS, key="split", source=source)
    dataset = _require(raw, "dataset", (str,), "split", source)
    if dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}{did_you_mean(dataset, DATASETS)}; known: {', '.join(DATASETS)}",
                          key="split.dataset", source=source)
    info = DATASETS[dataset]
    protocol = raw.get("protocol", "class_incremental")
    if protocol not in PROTOCOLS:
        raise ConfigError(f"must be one of {', '.join(PROTOCOLS)}, not {protocol!r}{did_you_mean(str(protocol), PROTOCOLS)}",
                          key="split.protocol", source=source)
    domain = protocol != "class_incremental"
    samples = raw.get("samples_per_task")
    if samples is not None:
        if not domain:
            raise ConfigError("only applies to the permutations and rotations protocols", key="split.samples_per_task",
                              source=source)
        samples = _positive_int(raw, "samples_per_task", "split", source)
    # Domain-incremental tasks all have every class: no new classes arrive after the first task.
    init = _positive_int(raw, "init_cls_num", "split", source, default=info.num_classes if domain else None)
    inc = _positive_int(raw, "inc_cls_num", "split", source, default=0 if domain else init, minimum=0 if domain else 1)
    if domain and (init != info.num_classes or inc != 0):
        raise ConfigError(f"the {protocol} protocol gives every task all {info.num_classes} classes: init_cls_num "
                          f"{info.num_classes}, inc_cls_num 0", key="split.inc_cls_num", source=source)
    tasks = _positive_int(raw, "task_num", "split", source,
                          default=20 if domain else 1 + max(0, (info.num_classes - init) // inc))
    needed = init + inc * (tasks - 1)
    if needed > info.num_classes:
        raise ConfigError(f"init_cls_num {init} + inc_cls_num {inc} x (task_num {tasks} - 1) = {needed} classes, "
                          f"but {dataset} has {info.num_classes}", key="split.task_num", source=source)
    order = raw.get("class_order", "label")
    if isinstance(order, list):
        if not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < info.num_classes for c in order) \
                or len(set(order)) != len(order):
            raise ConfigError(f"must be distinct class indices in 0..{info.num_classes - 1}", key="split.class_order",
                              source=source)
        if len(order) < needed:
            raise ConfigError(f"lists {len(order)} classes, the tasks need {needed}", key="split.class_order", source=source)
    elif not (isinstance(order, str) and (order == "label" or re.fullmatch(r"seed:\d+", order))):
        raise ConfigError(f"must be 'label', 'seed:N' or a list of class indices, not {order!r}",
                          key="split.class_order", source=source)
    data_root = raw.get("data_root")
    if data_root is not None:
        data_root = Path(str(_typed(data_root, (str,), "split.data_root", source))).expanduser()
    if info.needs_root:
        if data_root is None:
            raise ConfigError(f"is required for dataset {dataset!r}", key="split.data_root", source=source)
        if not data_root.is_dir():
            raise ConfigError(f"folder {str(data_root)!r} does not exist", key="split.data_root", source=source)
        folders = list_class_folders(data_root)
        if folders and len(folders) != info.num_classes:
            raise ConfigError(f"{data_root / 'train'} has {len(folders)} class folders, {dataset} has {info.num_classes}",
                              key="split.data_root", source=source)
    seed = raw.get("seed", 1993)
    _typed(seed, (int,), "split.seed", source)
    val_fraction = raw.get("val_fraction", 0.0)
    _typed(val_fraction, (int, float), "split.val_fraction", source)
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"must be in [0, 1), not {val_fraction}", key="split.val_fraction", source=source)
    cap = raw.get("max_per_class")
    if cap is not None:
        cap = _positive_int(raw, "max_per_class", "split", source)
    return SplitSpec(dataset, data_root, order, init, inc, tasks, seed, float(val_fraction), protocol, samples, cap)


def _block(raw: Any, key: str, source: str, known: dict[str, Any], kind: str) -> tuple[str, dict[str, Any]]:
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        raise ConfigError("must be a mapping with name and kwargs", key=key, source=source)
    reject_unknown(raw, ("name", "kwargs"), key=key, source=source)
    name = _require(raw, "name", (str,), key, source)
    if name not in known:
        raise ConfigError(f"unknown {kind} {name!r}{did_you_mean(name, known)}; known: {', '.join(known)}",
                          key=f"{key}.name", source=source)
    kwargs = raw.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ConfigError("must be a mapping or null", key=f"{key}.kwargs", source=source)
    return name, kwargs


def _optimizer(raw: Any, key: str, source: str) -> Block:
    name, kwargs = _block(raw, key, source, OPTIMIZERS, "optimizer")
    check_call_kwargs(OPTIMIZERS[name], kwargs, key=f"{key}.kwargs", source=source)
    try:  # the optimizer's own checks (negative lr, betas out of range, ...) on a throw-away parameter
        OPTIMIZERS[name]([torch.zeros(1, requires_grad=True)], **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc), key=f"{key}.kwargs", source=source) from None
    return Block(name, kwargs)


def _scheduler(raw: Any, key: str, source: str) -> Block:
    name, kwargs = _block(raw, key, source, SCHEDULERS, "lr_scheduler")
    schedule = build_options(SCHEDULERS[name], kwargs, key=f"{key}.kwargs", source=source)
    return Block(name, dataclasses.asdict(schedule), schedule)


def _init_block(base: Block, raw: Any, key: str, source: str, parse: Any) -> Block:
    """``init_*`` blocks override the task-0 optimizer/schedule; same name means kwargs deep-merge."""
    if raw is None:
        return base
    if isinstance(raw, dict) and raw.get("name", base.name) == base.name:
        raw = {"name": base.name, "kwargs": deep_merge(base.kwargs, raw.get("kwargs") or {})}
    return parse(raw, key, source)


def _method_from_classifier(merged: dict[str, Any], split: SplitSpec, source: str) -> dict[str, Any]:
    """Map LibContinual's ``classifier: {name: GEM, kwargs: {num_class, feat_dim, n_memories, n_task,
    memory_strength}}`` to ``method``; num_class and n_task are checked here, feat_dim once the backbone is
    built."""
    clf = merged["classifier"]
    if isinstance(clf, dict) and "import" in clf:  # the researcher's own class, run unchanged
        reject_unknown(clf, ("name", "import", "kwargs", "steps_itself"), key="classifier", source=source)
        kwargs = dict(clf.get("kwargs") or {})
        name = None
    else:
        classifiers = {cls.libcontinual_name: name for name, cls in methods().items() if cls.libcontinual_name}
        name, kwargs = _block(clf, "classifier", source, classifiers, "LibContinual classifier")
        kwargs = dict(kwargs)
    num_class = kwargs.pop("num_class", None)
    if num_class is not None and num_class != split.offsets[-1]:
        raise ConfigError(f"is {num_class} but the split has {split.offsets[-1]} classes",
                          key="classifier.kwargs.num_class", source=source)
    n_task = kwargs.get("n_task")
    if n_task is not None and n_task != split.task_num:
        raise ConfigError(f"is {n_task} but split.task_num is {split.task_num}", key="classifier.kwargs.n_task",
                          source=source)
    kwargs.pop("feat_dim", None)
    if name is None:  # an imported class gets feat_dim and num_class as its constructor's arguments
        return {"import": clf["import"], "kwargs": kwargs, "steps_itself": clf.get("steps_itself", False)}
    kwargs.pop("n_task", None)
    return {"name": classifiers[name], "kwargs": kwargs}


def _import_block(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """``{import: path.py:Class, kwargs, steps_itself}`` as the ``import`` method's block, the path resolved
    next to the file that names it (then the working directory), the class imported and checked now."""
    from harness.methods.imported import load_class, split_target

    reject_unknown(raw, ("import", "kwargs", "steps_itself"), key="method", source=source)
    target = _typed(raw["import"], (str,), "method.import", source)
    try:
        path, name = split_target(target)
    except UserError as exc:
        raise ConfigError(str(exc), key="method.import", source=source) from None
    for candidate in (Path(source).parent / path, path):
        if candidate.is_file():
            path = candidate.resolve()
            break
    else:
        raise ConfigError(f"{path}: no such file (looked next to {source} and in the working directory)",
                          key="method.import", source=source)
    load_class(f"{path}:{name}")
    return {"name": "import", "kwargs": {"target": f"{path}:{name}", "kwargs": dict(raw.get("kwargs") or {}),
                                         "steps_itself": raw.get("steps_itself", False)}}


def _check_libcontinual_split(merged: dict[str, Any], split: SplitSpec, source: str) -> None:
    expected = {"init_cls_num": split.init_cls_num, "inc_cls_num": split.inc_cls_num, "task_num": split.task_num}
    for key, want in expected.items():
        if merged.get(key) is not None and merged[key] != want:
            raise ConfigError(f"is {merged[key]} but split.{key} is {want}; arms must share the split", key=key,
                              source=source)
    root = merged.get("data_root")
    if root is not None and split.data_root is not None and Path(str(root)).expanduser().resolve() != split.data_root.resolve():
        raise ConfigError(f"is {root!r} but split.data_root is {str(split.data_root)!r}", key="data_root", source=source)
    if merged.get("seed") is not None and merged["seed"] != split.seed:
        raise ConfigError(f"is {merged['seed']} but split.seed is {split.seed}", key="seed", source=source)


def _resolve_arm_file(path_text: str, experiment_dir: Path, key: str, source: str) -> Path:
    for candidate in (experiment_dir / path_text, Path(path_text)):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"method file {path_text!r} not found (looked next to the experiment file and in the working "
                      "directory)", key=key, source=source)


def _parse_arm(raw: Any, index: int, split: SplitSpec, engine: dict[str, Any], experiment_source: str) -> ArmRecipe:
    where = f"arms[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError("must be a mapping", key=where, source=experiment_source)
    name = _require(raw, "name", (str,), where, experiment_source)
    source = experiment_source
    merged = {k: v for k, v in raw.items() if k != "config"}
    if raw.get("config") is not None:
        path = _resolve_arm_file(str(raw["config"]), Path(experiment_source).parent, f"{where}.config", experiment_source)
        source = str(path)
        merged = deep_merge(load_with_includes(path), merged)
    reject_unknown(merged, (*ARM_KEYS, *LIBCONTINUAL_KEYS), key="", source=source)
    _check_libcontinual_split(merged, split, source)
    if merged.get("classifier") is not None:
        if merged.get("method") is not None:
            raise ConfigError("give either method or classifier (the LibContinual form), not both", key="classifier",
                              source=source)
        merged["method"] = _method_from_classifier(merged, split, source)
    if merged.get("method") is None:
        raise ConfigError("is required (or a LibContinual classifier block)", key="method", source=source)
    if isinstance(merged["method"], dict) and "import" in merged["method"]:
        merged["method"] = _import_block(merged["method"], source)

    method_name, method_kwargs = _block(merged["method"], "method", source, methods(), "method")
    cls = method_class(method_name)
    if split.protocol not in cls.protocols:
        raise ConfigError(f"{method_name} supports the {', '.join(cls.protocols)} protocol(s), not {split.protocol}",
                          key="method.name", source=source)
    options = build_options(cls.Options, method_kwargs, key="method.kwargs", source=source)
    buffer = merged.get("buffer") or {}
    buffer_size = (buffer.get("kwargs") or {}).get("buffer_size", 0) if isinstance(buffer, dict) else 0
    if buffer_size and not cls.uses_buffer:
        reason = REPLAY_BUFFER_SENTENCE if cls.episodic_memory else f"method {method_name} uses no rehearsal buffer"
        raise ConfigError(f"is {buffer_size}: {reason}", key="buffer.kwargs.buffer_size", source=source)

    if merged.get("backbone") is None:
        raise ConfigError("is required", key="backbone", source=source)
    backbone_name, backbone_kwargs = _block(merged["backbone"], "backbone", source, BACKBONES, "backbone")
    check_call_kwargs(BACKBONES[backbone_name], backbone_kwargs, key="backbone.kwargs", source=source,
                      skip=("in_channels", "image_size"), extra=(*LIBCONTINUAL_BACKBONE_KEYS, *NETWORK_KEYS))
    if backbone_kwargs.get("init", "default") not in INITS:
        raise ConfigError(f"must be one of {', '.join(INITS)}, not {backbone_kwargs['init']!r}",
                          key="backbone.kwargs.init", source=source)
    if backbone_kwargs.get("num_classes") not in (None, split.offsets[-1]):
        raise ConfigError(f"is {backbone_kwargs['num_classes']} but the split has {split.offsets[-1]} classes",
                          key="backbone.kwargs.num_classes", source=source)
    image_shape = DATASETS[split.dataset].image_shape
    try:
        feat_dim = build_backbone(backbone_name, backbone_kwargs, image_shape).feat_dim
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"cannot build {backbone_name}: {exc}", key="backbone.kwargs", source=source) from None
    want_dim = ((merged.get("classifier") or {}).get("kwargs") or {}).get("feat_dim")
    if want_dim is not None and want_dim != feat_dim:
        raise ConfigError(f"is {want_dim} but backbone {backbone_name} gives {feat_dim}-d features",
                          key="classifier.kwargs.feat_dim", source=source)
    if merged.get("image_size") is not None and merged["image_size"] != image_shape[1]:
        raise ConfigError(f"is {merged['image_size']} but {split.dataset} images are {image_shape[1]} pixels",
                          key="image_size", source=source)

    epoch = _positive_int(merged, "epoch", "", source)
    optimizer = _optimizer(merged.get("optimizer", {"name": "SGD", "kwargs": {"lr": 0.1}}), "optimizer", source)
    schedule = _scheduler(merged.get("lr_scheduler", "Constant"), "lr_scheduler", source)
    augment_raw = merged.get("augment", True)
    if isinstance(augment_raw, bool):
        augment = AugmentOptions() if augment_raw else NO_AUGMENT
    else:
        augment = build_options(AugmentOptions, augment_raw, key="augment", source=source)
    arm_engine = {k: merged[k] for k in ("workers", "deterministic") if merged.get(k) is not None}
    engine_raw = deep_merge(deep_merge(engine, arm_engine), _typed(merged.get("engine") or {}, (dict,), "engine", source))
    engine_options = build_options(EngineOptions, engine_raw, key="engine", source=source)
    if engine_options.compile is True:
        check_compiler("engine.compile", source)
    return ArmRecipe(
        name=name, source=source,
        method=Block(method_name, dataclasses.asdict(options), options),
        backbone=Block(backbone_name, backbone_kwargs),
        epoch=epoch, init_epoch=_positive_int(merged, "init_epoch", "", source, default=epoch),
        batch_size=_positive_int(merged, "batch_size", "", source, default=128),
        optimizer=optimizer,
        init_optimizer=_init_block(optimizer, merged.get("init_optimizer"), "init_optimizer", source, _optimizer),
        lr_scheduler=schedule,
        init_lr_scheduler=_init_block(schedule, merged.get("init_lr_scheduler"), "init_lr_scheduler", source, _scheduler),
        warmup=_positive_int(merged, "warmup", "", source, default=0, minimum=0),
        augment=augment,
        engine=engine_options,
        recorded={k: merged[k] for k in LIBCONTINUAL_RECORDED if merged.get(k) is not None},
    )


def apply_variant(raw: dict[str, Any], variant: str | None, source: str) -> list[str]:
    """Override strings of the named ``variants:`` entry (e.g. ``quick`` for CPU smoke runs)."""
    if variant is None:
        return []
    variants = raw.get("variants") or {}
    if variant not in variants:
        raise ConfigError(f"no variant {variant!r}{did_you_mean(variant, variants)}; defined: {', '.join(variants) or 'none'}",
                          key="variants", source=source)
    overrides = variants[variant]
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError("must be a list of key.path=value strings", key=f"variants.{variant}", source=source)
    return overrides


def parse_experiment(raw: dict[str, Any], source: str) -> Experiment:
    """Validate a loaded experiment mapping (overrides already applied)."""
    reject_unknown(raw, TOP_KEYS, key="", source=source)
    split = _parse_split(raw.get("split"), source)
    engine = raw.get("engine") or {}
    _typed(engine, (dict,), "engine", source)
    build_options(EngineOptions, engine, key="engine", source=source)
    arms_raw = raw.get("arms")
    if not isinstance(arms_raw, list) or not arms_raw:
        raise ConfigError("must list at least one arm", key="arms", source=source)
    arms = [_parse_arm(a, i, split, engine, source) for i, a in enumerate(arms_raw)]
    seen: set[str] = set()
    for i, arm in enumerate(arms):
        if arm.name in seen:
            raise ConfigError(f"duplicate arm name {arm.name!r}", key=f"arms[{i}].name", source=source)
        seen.add(arm.name)
    name = raw.get("name") or Path(source).stem
    tracking = build_options(TrackingSpec, raw.get("tracking"), key="tracking", source=source)
    search = raw.get("search")
    if search is not None:
        _typed(search, (dict,), "search", source)
    return Experiment(str(name), source, split, arms, tracking, build_options(EngineOptions, engine, key="engine",
                      source=source), search, raw, parse_seeds(raw.get("seeds"), "seeds", source))


def load_experiment(path: str | Path, overrides: list[str] | None = None, variant: str | None = None) -> Experiment:
    """Read, override and validate an experiment file. A problem that only a command-line override brings
    in is reported against that override, not the file."""
    path = Path(path)
    raw = read_yaml(path)
    base = apply_overrides(raw, apply_variant(raw, variant, str(path)))
    overrides = overrides or []
    try:
        return parse_experiment(copy.deepcopy(apply_overrides(base, overrides)), str(path))
    except ConfigError as exc:
        raise _blame_override(base, overrides, str(path)) or exc from None


def _blame_override(base: dict[str, Any], overrides: list[str], source: str) -> ConfigError | None:
    """The first override after which a valid file stops validating, as an error naming that override."""
    if not overrides:
        return None
    try:
        parse_experiment(copy.deepcopy(base), source)
    except ConfigError:
        return None  # the file itself is wrong
    for n, text in enumerate(overrides, start=1):
        try:
            parse_experiment(copy.deepcopy(apply_overrides(base, overrides[:n])), source)
        except ConfigError as exc:
            key = f"{exc.key}: " if exc.key and exc.key not in text else ""
            return ConfigError(f"{key}{exc.message}", source=f"override {text}")
    return None
