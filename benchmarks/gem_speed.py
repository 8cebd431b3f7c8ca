"""Time one GEM training step, side by side, in one process on one device.

    python benchmarks/gem_speed.py [--device cpu|cuda] [--backbone resnet32] [--t 4] [--M 256] [--batch 128]
                                   [--steps 20] [--impls harness,pycil_style,avalanche] [--json]

Rows: (a) the harness's GEM step (on-device memory, sync-free exact QP, bf16 autocast on CUDA unless
--no-amp), (b) the PyCIL-style arm's step (``baselines/pycil_gem.py``: host-side check and quadprog),
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
from harness.gem.method import GEM
from harness.methods.base import Batch, Context, Method
from harness.models import build_network

CLASSES_PER_TASK = 10


def synthetic_split(t: int, M: int, batch: int, image_shape: tuple[int, int, int]) -> Split:
    """t + 1 tasks of random uint8 images, each with enough examples for M memories and a batch."""
    per_task = max(M, batch)
    n = (t + 1) * per_task
    g = torch.Generator().manual_seed(0)
    train_x = torch.randint(0, 256, (n, *image_shape), dtype=torch.uint8, generator=g)
    train_y = torch.arange(n) // per_task * CLASSES_PER_TASK + torch.arange(n) % CLASSES_PER_TASK
    dataset = ImageDataset("synthetic", train_x, train_y, train_x[:1], train_y[:1], (0.5,) * image_shape[0],
                           (0.25,) * image_shape[0])
    classes = CLASSES_PER_TASK * (t + 1)
    return make_split(dataset, list(range(classes)), list(range(0, classes + 1, CLASSES_PER_TASK)))


def context(split: Split, device: torch.device) -> Context:
    ds = split.dataset
    train = BatchTransform(AugmentOptions(crop=4, flip=True, brightness=0.25), ds.mean, ds.std, device)
    test = BatchTransform(AugmentOptions(crop=0, flip=False), ds.mean, ds.std, device)
    return Context(split, ds.train_x.to(device), split.train_y.to(device), train, test, device)


def method_step(method: Method, ctx: Context, t: int, batch: int, amp: bool) -> Callable[[], None]:
    index = ctx.split.tasks[t].train[:batch].to(ctx.device)
    optimizer = torch.optim.SGD(method.net.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        images = ctx.train_images[index]
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=amp):
            method.observe(Batch(images, ctx.train_transform(images, train=True), ctx.train_labels[index]), optimizer)

    return step


def harness_step(split: Split, backbone: str, t: int, M: int, batch: int, device: torch.device, amp: bool
                 ) -> Callable[[], None]:
    ctx = context(split, device)
    net = build_network(backbone, {}, split.dataset.image_shape, split.num_classes).to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    gem = GEM(net, GEM.Options(n_memories=M, memory_strength=0.5, eps=1e-3, train_mask="task", memory_fill="random"),
              ctx)
    for k in range(t):
        index = split.tasks[k].train[:M].to(device)
        gem.memory.fill(k, ctx.train_images[index], ctx.train_labels[index])
    gem.before_task(t)
    return method_step(gem, ctx, t, batch, amp)


def pycil_step(split: Split, backbone: str, t: int, M: int, batch: int, device: torch.device) -> Callable[[], None]:
    ctx = context(split, device)
    net = build_network(backbone, {}, split.dataset.image_shape, split.num_classes).to(device)
    method = PyCILGEM(net, PyCILGEM.Options(memory_size=M * t), ctx)
    per_class = M // CLASSES_PER_TASK
    for c in range(CLASSES_PER_TASK * t):  # M exemplars for every past task
        method.exemplars[c] = torch.nonzero(ctx.train_labels == c).flatten()[:per_class]
    method.before_task(t)
    return method_step(method, ctx, t, batch, amp=False)


def avalanche_step(split: Split, backbone: str, t: int, M: int, batch: int, device: torch.device) -> Callable[[], None]:
    from avalanche.training.plugins import GEMPlugin

    ctx = context(split, device)
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
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--impls", default="harness,pycil_style,avalanche")
    parser.add_argument("--no-amp", action="store_true", help="fp32 for the harness step on CUDA too")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    amp = device.type == "cuda" and not args.no_amp
    builders = {"harness": lambda *a: harness_step(*a, amp), "pycil_style": pycil_step, "avalanche": avalanche_step}
    rows, notes = [], []
    for t in args.t:
        for M in args.M:
            split = synthetic_split(t, M, args.batch, (3, 32, 32))
            for impl in args.impls.split(","):
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
        print(json.dumps({"device": name, "torch": torch.__version__, "rows": rows}))
        return 0
    print(f"device: {name}; torch {torch.__version__}; amp (harness): {amp}")
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
