"""The PyCIL-style reference arm: exemplar budget, once-augmented memory, host quadprog projection."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from baselines.pycil_gem import quadprog_projection
from harness.gem import project_gradient
from tests.conftest import digits_arm, digits_trainer


def spy(method: object, hook: str, snapshot: Callable[[Any], Any]) -> list[Any]:
    """Wrap ``method.<hook>(task)``: after every call, ``snapshot(method)`` is appended to the returned list."""
    taken: list[Any] = []
    original = getattr(method, hook)

    def wrapped(task: int) -> None:
        original(task)
        taken.append(snapshot(method))

    setattr(method, hook, wrapped)
    return taken


def test_exemplar_budget_is_split_over_seen_classes_and_old_classes_keep_a_prefix() -> None:
    trainer = digits_trainer([digits_arm("p", {"name": "pycil_gem", "kwargs": {"memory_size": 60}}, epoch=1)], "p",
                             task_num=3)
    method = trainer.method
    history = spy(method, "after_task", lambda m: {c: v.clone() for c, v in m.exemplars.items()})
    result = trainer.fit()
    assert [sorted(len(v) for v in h.values()) for h in history] == [[30, 30], [15] * 4, [10] * 6]
    for c in (0, 1):  # old classes shrink by keeping their best-herded exemplars
        assert torch.equal(history[1][c], history[0][c][:15])
        assert torch.equal(history[2][c], history[0][c][:10])
    labels = trainer.ctx.train_labels
    for c, index in history[-1].items():
        assert (labels[index] == c).all()
    assert result.summary["nme_cil_acc"] > 0


def test_memory_is_augmented_once_per_task() -> None:
    trainer = digits_trainer([digits_arm("p", {"name": "pycil_gem", "kwargs": {"memory_size": 40}}, epoch=2,
                                         augment={"crop": 2, "flip": True})], "p", task_num=2)
    method = trainer.method
    snapshots = spy(method, "before_task", lambda m: ([x.clone() for x, _ in m.memory],
                                                      {c: v.clone() for c, v in m.exemplars.items()}))
    trainer.fit()
    memories, exemplars = snapshots[1]  # as task 1 began
    frozen = memories[0]
    assert torch.equal(method.memory[0][0], frozen)  # unchanged through every step of task 1
    plain = trainer.ctx.eval_transform(trainer.ctx.train_images[torch.cat([exemplars[0], exemplars[1]])], train=False)
    assert plain.shape == frozen.shape and not torch.equal(plain, frozen)  # augmented, not raw


def test_quadprog_projection_matches_the_exact_solver() -> None:
    torch.manual_seed(0)
    G = torch.randn(5, 40, dtype=torch.float64)
    g = -G.sum(0) + 0.1 * torch.randn(40, dtype=torch.float64)
    projected, retried = quadprog_projection(g, G, 0.0)
    assert not retried
    assert torch.allclose(projected, project_gradient(g, G, 0.0, 0.0), rtol=1e-6, atol=1e-9)


def test_singular_gram_is_retried_with_a_tiny_ridge() -> None:
    torch.manual_seed(1)
    G = torch.randn(3, 20, dtype=torch.float64)
    G[2] = G[0]
    g = -(G[0] + G[1])
    projected, retried = quadprog_projection(g, G, 0.0)
    assert retried and torch.isfinite(projected).all()
    assert (G @ projected).min() >= -1e-6 * float(g.norm() * G.norm(dim=1).max())


def test_the_reference_imports_no_gem_helper_from_the_harness() -> None:
    """Only shared plumbing: a bug in harness/gem or the harness's NME must not move both arms together."""
    import ast
    from pathlib import Path

    tree = ast.parse((Path(__file__).resolve().parents[1] / "baselines" / "pycil_gem.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    harness = {m for m in imported if m.startswith("harness")}
    assert harness <= {"harness.config.options", "harness.methods.base", "harness.methods.registry"}, harness


def test_the_reference_initialises_as_pycil() -> None:
    """He-normal (fan_out) convolutions; each new task's head rows Kaiming-uniform with zero bias."""
    trainer = digits_trainer([digits_arm("p", {"name": "pycil_gem", "kwargs": {"memory_size": 40}}, epoch=1,
                                         backbone={"name": "resnet32"})], "p", task_num=2)
    conv = trainer.net.backbone.layers[-1].conv2.weight
    fan_out = conv.shape[0] * conv.shape[2] * conv.shape[3]
    assert float(conv.std()) == pytest.approx((2 / fan_out) ** 0.5, rel=0.1)
    trainer.method.after_task(0)  # exemplars of task 0, which task 1 replays
    trainer.method.before_task(1)
    lo, hi = trainer.split.bounds[1]
    assert float(trainer.net.head.bias[lo:hi].abs().max()) == 0.0
    bound = (3 / trainer.net.head.in_features) ** 0.5  # kaiming_uniform for a linear layer: sqrt(3 / fan_in)
    assert 0.8 * bound < float(trainer.net.head.weight[lo:hi].abs().max()) <= bound
