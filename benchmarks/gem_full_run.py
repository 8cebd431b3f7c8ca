"""Wall-clock of a whole GEM run through the trainer, evaluation included, on CIFAR-100-shaped data.

    python benchmarks/gem_full_run.py [--device cuda] [--tasks 5] [--classes-per-task 20] [--epochs 80]
                                      [--M 256] [--no-graph] [--no-amp] [--json]

Exact GEM (ring memory of M per task, γ = 0.5, ε = 1e-3, task masks) on ResNet-32, batch 128, SGD 0.1 with
momentum 0.9, crop + flip + brightness, ``--epochs`` per task, 500 training and 100 test images per class
of random pixels (the same shapes and step counts as CIFAR-100; timings need no real pixels). Prints the
total seconds and whether the step ran from a CUDA graph.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gem_speed import synthetic_split
from harness.config.experiment import ArmRecipe, parse_experiment
from harness.engine.trainer import ArmTrainer


def gem_arm(device: str, epochs: int, M: int, graphs: bool, amp: bool | str) -> ArmRecipe:
    recipe = {"name": "gem", "method": {"name": "gem", "kwargs": {"n_memories": M, "memory_strength": 0.5,
                                                                  "eps": 1e-3, "train_mask": "task"}},
              "backbone": {"name": "resnet32"}, "epoch": epochs, "batch_size": 128,
              "optimizer": {"name": "SGD", "kwargs": {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}},
              "augment": {"crop": 4, "flip": True, "brightness": 0.24705882}}
    # The recipe is parsed as any experiment file's arm; the split it runs on is built below.
    experiment = parse_experiment({"name": "full-run", "split": {"dataset": "digits", "init_cls_num": 2,
                                                                "inc_cls_num": 2, "task_num": 5},
                                   "engine": {"device": device, "cuda_graph": graphs, "amp": amp},
                                   "arms": [recipe]}, "gem_full_run.py")
    return experiment.arm("gem")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--classes-per-task", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=80)
    parser.add_argument("--M", type=int, default=256, help="memories per task")
    parser.add_argument("--no-graph", action="store_true")
    parser.add_argument("--no-amp", action="store_true", help="fp32 (default: the engine's auto precision)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    arm = gem_arm(args.device, args.epochs, args.M, cuda and not args.no_graph, False if args.no_amp else "auto")
    split = synthetic_split(args.tasks, args.classes_per_task, 500, 100)
    trainer = ArmTrainer(arm, split, None)
    start = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - start
    name = torch.cuda.get_device_name() if cuda else "cpu"
    report = {"device": name, "torch": torch.__version__, "tasks": args.tasks, "epochs": args.epochs, "M": args.M,
              "step": trainer.step.mode, "graph_replays": trainer.step.replays, "wall_seconds": round(seconds, 1),
              "trained_seconds": round(result.summary["wall_seconds"], 1), "cil_acc": round(result.summary["cil_acc"], 4)}
    print(json.dumps(report) if args.json else "\n".join(f"{k}: {v}" for k, v in report.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
