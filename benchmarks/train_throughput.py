"""Training throughput on this machine, side by side in one process: the ceiling and the harness.

    python benchmarks/train_throughput.py [--json] [--data-root ../shared/data/cifar100] [--steps 20]
                                          [--no-compile] [--only plain,trainer,gem_step]
                                          [--modes fp32,bf16+cl]

Rows (ResNet-32, batch 128, SGD 0.1 m 0.9 wd 5e-4), each in every mode of ``--modes``: ``fp32``
(contiguous), ``fp32+cl`` (fp32, channels-last) and ``bf16+cl`` (bf16 autocast + channels-last). The default
is ``fp32,bf16+cl`` on a CPU that computes bf16 natively and ``fp32,fp32+cl`` on one that does not (where
bf16 is emulated and slower than fp32):
- ``plain``: the ceiling, a plain PyTorch loop (zero_grad, forward, cross-entropy, backward, step) on one
  fixed random batch;
- ``plain_compiled``: the same loop with ``torch.compile`` on the network, with the seconds the first step
  took (compilation) and the projected 80-epoch task 0 including them;
- ``trainer:gem`` / ``trainer:pycil_gem``: the harness trainer's steady task-0 epoch (the second of two)
  on real CIFAR-100 (``gem_vs_pycil.yaml``'s task 0: 20 classes, 10,000 images, crop + flip + brightness),
  everything an epoch does included: gathering and augmenting batches, GEM's bookkeeping, the per-epoch
  log line and checks;
- ``trainer_compiled:gem``: the same with ``engine.compile=true``. Its first epoch and the evaluation after
  it compile (the ragged last batch and evaluation mode compile again), so its 80-epoch projection is the
  whole two-epoch task (compilation and evaluation included) plus 78 steady epochs;
- ``gem_step:harness`` / ``gem_step:pycil_style``: one GEM step at t = 4 past tasks, M = 256 memories
  each (``benchmarks/gem_speed.py``).

``--json`` prints ``{device, torch, cpu_bf16, threads, rows: [{impl, mode, img_per_s, ...}]}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gem_speed import CLASSES_PER_TASK, harness_step, pycil_step, synthetic_split, time_step
from harness.config.experiment import load_experiment
from harness.engine.precision import Precision, native_bf16
from harness.engine.runner import build_split
from harness.engine.trainer import ArmTrainer
from harness.models import build_network

ROOT = Path(__file__).resolve().parents[1]
MODES = {"fp32": Precision(amp=False, channels_last=False), "fp32+cl": Precision(amp=False, channels_last=True),
         "bf16+cl": Precision(amp=True, channels_last=True)}
BATCH = 128
TASK0_STEPS = 80 * 79  # 80 epochs of 10,000 images at batch 128 (the user's seed recipe)


def plain_loop(precision: Precision, steps: int, compiled: bool) -> dict[str, float]:
    """The ceiling: the same step with nothing around it. Returns img/s and, compiled, the first step's s."""
    torch.manual_seed(0)
    net = build_network("resnet32", {}, (3, 32, 32), 20)
    x, y = torch.randn(BATCH, 3, 32, 32), torch.randint(0, 20, (BATCH,))
    if precision.channels_last:
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    forward = torch.compile(net) if compiled else net
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

    def step() -> None:
        optimizer.zero_grad()
        with precision.autocast(torch.device("cpu")):
            loss = torch.nn.functional.cross_entropy(forward(x), y)
        loss.backward()
        optimizer.step()

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    ms = time_step(step, steps, 2, torch.device("cpu"))
    row = {"img_per_s": round(BATCH * 1000 / ms, 1), "ms_per_step": round(ms, 1)}
    if compiled:
        row["compile_s"] = round(first, 1)
        row["task0_80_epochs_s"] = round(first + TASK0_STEPS * ms / 1000, 0)
    else:
        row["task0_80_epochs_s"] = round(TASK0_STEPS * ms / 1000, 0)
    return row


def trainer_epoch(arm_name: str, mode: str, data_root: str, compiled: bool = False) -> dict[str, float]:
    """Seconds of the trainer's second task-0 epoch (the first includes one-off allocations and, compiled,
    the compilation). Compiled, the 80-epoch projection is the whole two-epoch task plus 78 steady epochs."""
    overrides = ["split.task_num=1", f"split.data_root={data_root}", "arms.*.init_epoch=2",
                 f"engine.amp={str(MODES[mode].amp).lower()}", f"engine.channels_last={str(MODES[mode].channels_last).lower()}",
                 f"engine.compile={str(compiled).lower()}"]
    experiment = load_experiment(ROOT / "experiments" / "gem_vs_pycil.yaml", overrides)
    split = build_split(experiment)
    marks: list[float] = []
    trainer = ArmTrainer(experiment.arm(arm_name), split, None, on_epoch=lambda *_: marks.append(time.perf_counter()))
    start = time.perf_counter()
    trainer.fit()
    task_s = time.perf_counter() - start
    seconds = marks[1] - marks[0]
    images = len(split.tasks[0].train)
    row = {"img_per_s": round(images / seconds, 1), "epoch_s": round(seconds, 2)}
    if compiled:
        return {**row, "task_s": round(task_s, 1), "task0_80_epochs_s": round(task_s + 78 * seconds, 0)}
    return {**row, "task0_80_epochs_s": round(80 * seconds, 0)}


def gem_step(impl: str, mode: str, steps: int) -> dict[str, float]:
    t, M = 4, 256
    split = synthetic_split(t + 1, CLASSES_PER_TASK, -(-max(M, BATCH) // CLASSES_PER_TASK), 1)
    torch.manual_seed(0)
    args = (split, "resnet32", t, M, BATCH, torch.device("cpu"), MODES[mode])
    step = harness_step(*args, False) if impl == "harness" else pycil_step(*args)
    ms = time_step(step, steps, 2, torch.device("cpu"))
    return {"img_per_s": round(BATCH * 1000 / ms, 1), "ms_per_step": round(ms, 1), "t": t, "M": M}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "cifar100"))
    parser.add_argument("--steps", type=int, default=20, help="timed steps per plain-loop row")
    parser.add_argument("--gem-steps", type=int, default=4, help="timed steps per GEM-step row")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    parser.add_argument("--only", default="plain,trainer,gem_step", help="which groups of rows to run")
    parser.add_argument("--modes", help=f"comma-separated, of {', '.join(MODES)} (default: fp32 and the fastest "
                                        "mode this CPU offers)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    groups = set(args.only.split(","))
    bf16 = native_bf16(torch.device("cpu"))
    modes = (args.modes or ("fp32,bf16+cl" if bf16 else "fp32,fp32+cl")).split(",")
    if unknown := [m for m in modes if m not in MODES]:
        parser.error(f"--modes: unknown mode {unknown[0]!r} (known: {', '.join(MODES)})")
    rows = []
    for mode in modes:
        if "plain" in groups:
            rows.append({"impl": "plain", "mode": mode, **plain_loop(MODES[mode], args.steps, compiled=False)})
            if not args.no_compile:
                rows.append({"impl": "plain_compiled", "mode": mode, **plain_loop(MODES[mode], args.steps, compiled=True)})
        if "trainer" in groups:
            for arm in ("gem", "pycil_gem"):
                rows.append({"impl": f"trainer:{arm}", "mode": mode, **trainer_epoch(arm, mode, args.data_root)})
            if not args.no_compile:
                rows.append({"impl": "trainer_compiled:gem", "mode": mode,
                             **trainer_epoch("gem", mode, args.data_root, compiled=True)})
        if "gem_step" in groups:
            for impl in ("harness", "pycil_style"):
                rows.append({"impl": f"gem_step:{impl}", "mode": mode, **gem_step(impl, mode, args.gem_steps)})
    for row in rows:  # each row against the plain loop in the same mode
        ceiling = next((r["img_per_s"] for r in rows if r["impl"] == "plain" and r["mode"] == row["mode"]), None)
        if ceiling and not row["impl"].startswith("gem_step"):
            row["of_ceiling"] = round(row["img_per_s"] / ceiling, 3)
    report = {"device": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)", "torch": torch.__version__,
              "cpu_bf16": bf16, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "threads": torch.get_num_threads(), "rows": rows}
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"device: {report['device']}; torch {report['torch']}; native bf16: {report['cpu_bf16']}")
    print(f"{'impl':<22} {'mode':<8} {'img/s':>8} {'of ceiling':>10} {'80-epoch task 0 s':>18} {'compile s':>9}")
    for row in rows:
        print(f"{row['impl']:<22} {row['mode']:<8} {row['img_per_s']:>8.1f} {row.get('of_ceiling', ''):>10} "
              f"{row.get('task0_80_epochs_s', ''):>18} {row.get('compile_s', ''):>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
