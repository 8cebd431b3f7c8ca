"""Time one GEM training step, side by side, in one process on one device.

    python benchmarks/gem_speed.py [--device cpu|cuda] [--backbone resnet32] [--t 4] [--M 256] [--batch 128]
                                   [--steps 20] [--impls harness,harness_eager,pycil_style,avalanche] [--json]

Rows: (a) the harness's GEM step as the trainer runs it (on-device memory, sync-free exact QP, bf16 autocast
and the whole step replayed from a CUDA graph on CUDA unless --no-amp / --no-graph; ``harness_eager``: the
same step without the graph), (b) the PyCIL-style arm's step (``baselines/pycil_gem.py``: host-side check and quadprog),
(c) Avalanche's ``GEMPlugin`` (``pip install -e ".[bench]"``; skipped with a note when absent), all with
the same network, the same random images (timings need no real pixels), the same number of past tasks t
and memories per task M. Each step includes the batch's augmentation, every memory pass, the projection
and the optimizer step; the first ``--warmup`` steps are not timed.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from baselines.pycil_gem import PyCILGEM
from harness.data.augment import AugmentOptions, BatchTransform
from harness.data.datasets import ImageDataset
from harness.data.split import Split, make_split
from harness.engine.graphs import GraphedStep
from harness.engine.optim import build_optimizer
from harness.engine.precision import Precision, choose_precision, native_bf16
from harness.gem.method import GEM
from harness.methods.base import Batch, Context, Method, StepResult
from harness.models import build_network

CLASSES_PER_TASK = 10


def synthetic_split(tasks: int, classes_per_task: int, train_per_class: int, test_per_class: int,
                    image_shape: tuple[int, int, int] = (3, 32, 32)) -> Split:
    """``tasks`` tasks of ``classes_per_task`` classes each, of random uint8 images (timings need no real
    pixels): ``train_per_class`` training and ``test_per_class`` test images per class."""
    g = torch.Generator().manual_seed(0)
    classes = tasks * classes_per_task

    def images(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randint(0, 256, (classes * per_class, *image_shape), dtype=torch.uint8, generator=g)
        return x, torch.arange(classes).repeat_interleave(per_class)

    (train_x, train_y), (test_x, test_y) = images(train_per_class), images(test_per_class)
    channels = image_shape[0]
    dataset = ImageDataset("synthetic", train_x, train_y, test_x, test_y, (0.5,) * channels, (0.25,) * channels)
    return make_split(dataset, list(range(classes)), list(range(0, classes + 1, classes_per_task)))


def context(split: Split, device: torch.device, channels_last: bool) -> Context:
    ds = split.dataset
    train = BatchTransform(AugmentOptions(crop=4, flip=True, brightness=0.25), ds.mean, ds.std, device,
                           channels_last=channels_last)
    test = BatchTransform(AugmentOptions(crop=0, flip=False), ds.mean, ds.std, device, channels_last=channels_last)
    return Context(split, ds.train_x.to(device), split.train_y.to(device), train, test, device)


def network(split: Split, backbone: str, device: torch.device, precision: Precision) -> torch.nn.Module:
    net = build_network(backbone, {}, split.dataset.image_shape, split.num_classes).to(device)
    return net.to(memory_format=torch.channels_last) if precision.channels_last else net


def method_step(method: Method, ctx: Context, t: int, batch: int, precision: Precision,
                graphs: bool) -> Callable[[], None]:
    """A step as the trainer runs it: host bookkeeping, then the step eagerly or replayed from its graph."""
    index = ctx.split.tasks[t].train[:batch].to(ctx.device)
    optimizer = build_optimizer("SGD", {"lr": 0.01, "momentum": 0.9}, method.net.parameters(), graph_ready=graphs,
                                device=ctx.device)

    def observe(idx: torch.Tensor) -> StepResult:
        images = ctx.train_images[idx]
        with precision.autocast(ctx.device, cache_enabled=not graphs):
            return method.observe(Batch(images, ctx.train_transform(images, train=True), ctx.train_labels[idx]),
                                  optimizer)

    runner = GraphedStep(observe, batch, ctx.device, enabled=graphs, blocker=None if method.graph_safe else method.graph_blocker,
                         note=lambda line: print(line, file=sys.stderr))

    def step() -> None:
        method.count_step(batch)
        runner(index)

    return step


def harness_step(split: Split, backbone: str, t: int, M: int, batch: int, device: torch.device, precision: Precision,
                 graphs: bool) -> Callable[[], None]:
    ctx = context(split, device, precision.channels_last)
    net = network(split, backbone, device, precision)
    gem = GEM(net, GEM.Options(n_memories=M, memory_strength=0.5, eps=1e-3, train_mask="task", memory_fill="random"),
              ctx)
    for k in range(t):
        index = split.tasks[k].train[:M].to(device)
        gem.memory.fill(k, ctx.train_images[index], ctx.train_labels[index])
    gem.before_task(t)
    return method_step(gem, ctx, t, batch, precision, graphs)


def pycil_step(split: Split, backbone: str, t: int, M: int, batch: int, device: torch.device,
               precision: Precision) -> Callable[[], None]:
    ctx = context(split, device, precision.channels_last)
    net = network(split, backbone, device, precision)
    method = PyCILGEM(net, PyCILGEM.Options(memory_size=M * t), ctx)
    per_class = M // CLASSES_PER_TASK
    for c in range(CLASSES_PER_TASK * t):  # M exemplars for every past task
        method.exemplars[c] = torch.nonzero(ctx.train_labels == c).flatten()[:per_class]
    method.before_task(t)
    return method_step(method, ctx, t, batch, precision, graphs=False)


def avalanche_step(split: Split, backbone: str, t: int, M: int, batch: int, device: torch.device,
                   precision: Precision) -> Callable[[], None]:
    """Avalanche's plugin as it is written: fp32, contiguous (it has no precision switch of its own)."""
    from avalanche.training.plugins import GEMPlugin

    del precision
    ctx = context(split, device, channels_last=False)
    net = build_network(backbone, {}, split.dataset.image_shape, split.num_classes).to(device)
    plugin = GEMPlugin(patterns_per_experience=M, memory_strength=0.5)
    for k in range(t):
        index = split.tasks[k].train[:M].to(device)
        plugin.memory_x[k] = ctx.eval_transform(ctx.train_images[index], train=False)
        plugin.memory_y[k] = ctx.train_labels[index]
        plugin.memory_tid[k] = torch.zeros(len(index), dtype=torch.long)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    # The attributes GEMPlugin reads from an Avalanche strategy.
    strategy = SimpleNamespace(model=net, optimizer=optimizer, device=device, clock=SimpleNamespace(train_exp_counter=t),
                               _criterion=torch.nn.functional.cross_entropy)
    index = split.tasks[t].train[:batch].to(device)

    def step() -> None:
        plugin.before_training_iteration(strategy)
        optimizer.zero_grad()
        images = ctx.train_images[index]
        torch.nn.functional.cross_entropy(net(ctx.train_transform(images, train=True)), ctx.train_labels[index]).backward()
        plugin.after_backward(strategy)
        optimizer.step()

    return step


def time_step(step: Callable[[], None], steps: int, warmup: int, device: torch.device) -> float:
    """Milliseconds per step, averaged over ``steps`` after ``warmup`` untimed steps."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1000 / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default="resnet32")
    parser.add_argument("--t", type=int, nargs="+", default=[4], help="past tasks (several values: one row each)")
    parser.add_argument("--M", type=int, nargs="+", default=[256], help="memories per task")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps (the graph is captured at the 4th)")
    parser.add_argument("--impls", default=None, help="default: harness,harness_eager,pycil_style,avalanche on CUDA, "
                        "harness,pycil_style,avalanche elsewhere")
    parser.add_argument("--no-amp", action="store_true", help="fp32, contiguous memory (default: the engine's auto "
                        "choice, bf16 + channels-last on CUDA and on CPUs with native bf16)")
    parser.add_argument("--no-graph", action="store_true", help="no CUDA graph for the harness row")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    mode = False if args.no_amp else "auto"
    precision = choose_precision(mode, mode, device.type, native_bf16(device), convolutional=args.backbone != "mlp")
    builders = {"harness": lambda *a: harness_step(*a, precision, cuda and not args.no_graph),
                "harness_eager": lambda *a: harness_step(*a, precision, False),
                "pycil_style": lambda *a: pycil_step(*a, precision),
                "avalanche": lambda *a: avalanche_step(*a, precision)}
    impls = args.impls or ("harness,harness_eager,pycil_style,avalanche" if cuda else "harness,pycil_style,avalanche")
    unknown = sorted(set(impls.split(",")) - set(builders))
    if unknown:
        parser.error(f"--impls: unknown {', '.join(unknown)} (choose from {', '.join(builders)})")
    rows, notes = [], []
    for t in args.t:
        for M in args.M:
            # t past tasks and the current one, each with enough images for M memories and a batch
            split = synthetic_split(t + 1, CLASSES_PER_TASK, -(-max(M, args.batch) // CLASSES_PER_TASK), 1)
            for impl in impls.split(","):
                torch.manual_seed(0)
                try:
                    step = builders[impl](split, args.backbone, t, M, args.batch, device)
                except ImportError as exc:
                    notes.append(f"{impl}: skipped ({exc.name} not installed; pip install -e '.[bench]')")
                    continue
                ms = time_step(step, args.steps, args.warmup, device)
                rows.append({"impl": impl, "backbone": args.backbone, "t": t, "M": M, "batch": args.batch,
                             "ms_per_step": round(ms, 3)})
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or 'x86_64'}, " \
        f"{torch.get_num_threads()} threads)"
    if args.json:
        print(json.dumps({"device": name, "torch": torch.__version__, **precision.tags, "rows": rows}))
        return 0
    print(f"device: {name}; torch {torch.__version__}; {precision.tags['precision']}, {precision.tags['memory_format']}; "
          f"CUDA graph (harness): {cuda and not args.no_graph}")
    print(f"{'impl':<12} {'backbone':<10} {'t':>3} {'M':>5} {'batch':>5} {'ms/step':>9} {'images/s':>9} {'vs harness':>10}")
    for row in rows:
        base = next(r["ms_per_step"] for r in rows if r["impl"] == "harness" and r["t"] == row["t"] and r["M"] == row["M"]) \
            if any(r["impl"] == "harness" for r in rows) else row["ms_per_step"]
        print(f"{row['impl']:<12} {row['backbone']:<10} {row['t']:>3} {row['M']:>5} {row['batch']:>5} "
              f"{row['ms_per_step']:>9.1f} {row['batch'] * 1000 / row['ms_per_step']:>9.0f} "
              f"{row['ms_per_step'] / base:>9.2f}x")
    for note in notes:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
