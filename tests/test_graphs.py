"""The graph-captured step (``harness.engine.graphs``) against the plain eager step.

On a CPU the graph-ready step (tensor learning rate, fused optimizer, host bookkeeping outside ``observe``)
runs eagerly; on a CUDA machine the same tests capture and replay it. Either way it must give the plain
eager step's projected gradients and accuracy matrix, with amp off.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from harness.engine.progress import Progress
from harness.engine.trainer import ArmTrainer
from harness.gem.method import flat_gradient
from harness.methods import methods
from tests.conftest import digits_arm, digits_trainer

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
GEM = {"name": "gem", "kwargs": {"n_memories": 40}}


class Notes(Progress):
    """A silent progress that keeps the notes (the lines an arm's log would get)."""

    def __init__(self) -> None:
        super().__init__(0, enabled=False)
        self.lines: list[str] = []

    def note(self, text: str) -> None:
        self.lines.append(text)


def trainer(device: str, cuda_graph: bool, method: dict[str, Any], progress: Progress | None = None,
            **arm: Any) -> ArmTrainer:
    engine = {"device": device, "deterministic": True, "seed": 3, "cuda_graph": cuda_graph, "amp": False}
    return digits_trainer([digits_arm("a", method, engine=engine, **arm)], "a", progress)


def full_batches(t: ArmTrainer, task: int, count: int) -> list[torch.Tensor]:
    """``count`` full batches of task ``task``'s training indices, the same for every trainer."""
    g = torch.Generator().manual_seed(task)
    train = t.split.tasks[task].train
    order = train[torch.randperm(len(train), generator=g)].to(t.device)
    bs = t.arm.batch_size
    return [order[(i * bs) % (len(order) - bs):][:bs] for i in range(count)]


def begin(t: ArmTrainer, task: int) -> None:
    t.step.reset()
    t.method.before_task(task)
    t._build_optimizer(task)


def run_steps(t: ArmTrainer, batches: list[torch.Tensor]) -> None:
    for index in batches:
        t.method.count_step(len(index))
        t.step(index)


@pytest.mark.parametrize("device", DEVICES)
def test_graph_ready_gem_step_gives_the_eager_projected_gradient(device: str) -> None:
    plain, fast = trainer(device, False, GEM), trainer(device, True, GEM)
    assert not plain.graph_ready and fast.graph_ready
    fast.net.load_state_dict(plain.net.state_dict())
    for t in (plain, fast):
        begin(t, 0)
        run_steps(t, full_batches(t, 0, 8))
        t.method.after_task(0)
        begin(t, 1)
    for index in full_batches(plain, 1, 8):
        for t in (plain, fast):
            run_steps(t, [index])
        # After observe, .grad holds what the optimizer used: g̃ where a constraint was violated, else g.
        torch.testing.assert_close(flat_gradient(fast.method.params), flat_gradient(plain.method.params),
                                   rtol=1e-4, atol=1e-5)
    for p, q in zip(fast.net.parameters(), plain.net.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    assert float(plain.method.projections) > 0, "no step violated a constraint: the comparison proved nothing"
    assert float(fast.method.projections) == float(plain.method.projections)
    if device == "cuda":
        assert fast.step.mode == "graph" and fast.step.captures == 2 and fast.step.replays > 0


@pytest.mark.parametrize("device", DEVICES)
def test_short_run_gives_the_eager_accuracy_matrix(device: str) -> None:
    results = {}
    for graphs in (False, True):
        t = trainer(device, graphs, GEM, epoch=2)
        results[graphs] = t.fit()
    # On a CPU the two paths run the same arithmetic; on CUDA the fused update rounds differently from the
    # foreach one, which may move a borderline test image or two.
    atol = 1e-9 if device == "cpu" else 0.03
    for name, matrix in results[False].matrices.items():
        np.testing.assert_allclose(results[True].matrices[name], matrix, atol=atol, err_msg=name)


def snapshot(obj: Any, depth: int = 0) -> Any:
    """What a CUDA-graph replay could not reproduce: Python values, and which tensor (storage) an attribute
    names. Tensor *contents* are left out: a replay updates those."""
    if isinstance(obj, torch.Tensor):
        return ("tensor", id(obj), obj.data_ptr(), tuple(obj.shape))
    if isinstance(obj, (int, float, str, bool, type(None))):
        return obj
    if isinstance(obj, (list, tuple)):
        return [snapshot(v, depth) for v in obj]
    if isinstance(obj, dict):
        return {k: snapshot(v, depth) for k, v in obj.items()}
    if isinstance(obj, nn.Module):
        return {n: snapshot(v) for n, v in [*obj.named_parameters(), *obj.named_buffers()]} | {
            f"{n}.grad": snapshot(p.grad) for n, p in obj.named_parameters()}
    if hasattr(obj, "__dict__") and depth < 2:
        return {k: snapshot(v, depth + 1) for k, v in vars(obj).items() if k not in ("ctx", "options")}
    return ("object", id(obj))


# Settings that exercise more of a method than its defaults (small memories, the herding path); every other
# registered graph-safe method is checked with its defaults.
CONTRACT_SETTINGS = {
    "joint": [{"train_mask": "task"}],
    "gem": [GEM["kwargs"], {"n_memories": 40, "memory_fill": "herding", "train_mask": "seen"}],
    "agem": [{"n_memories": 40, "sample_size": 30}],
}
GRAPH_SAFE = [{"name": name, "kwargs": kwargs} for name, cls in methods().items() if cls.graph_safe
              for kwargs in CONTRACT_SETTINGS.get(name, [{}])]


def test_every_registered_method_is_checked_or_runs_eagerly() -> None:
    assert {m["name"] for m in GRAPH_SAFE} >= {"finetune", "joint", "gem", "agem"}
    assert not methods()["pycil_gem"].graph_safe  # opt-in: a method that does not declare it is never captured


@pytest.mark.parametrize("method", GRAPH_SAFE, ids=lambda m: f"{m['name']}-{len(m['kwargs'])}")
def test_observe_only_updates_device_tensors_in_place(method: dict[str, Any]) -> None:
    """The contract a replay relies on, for every method that declares ``graph_safe``: after
    ``count_step``, ``observe`` changes no Python state and rebinds no tensor; it only writes into the
    tensors it already holds."""
    t = trainer("cpu", True, method)
    begin(t, 0)
    run_steps(t, full_batches(t, 0, 6))
    t.method.after_task(0)
    begin(t, 1)
    batches = full_batches(t, 1, 3)
    run_steps(t, batches[:2])  # creates what is created once (momentum buffers)
    index = batches[2]
    t.method.count_step(len(index))
    before = snapshot({"method": t.method, "optimizer": t.optimizer.state_dict()})
    weights = [p.detach().clone() for p in t.method.net.parameters()]
    t.step(index)
    assert snapshot({"method": t.method, "optimizer": t.optimizer.state_dict()}) == before
    assert any(not torch.equal(w, p) for w, p in zip(weights, t.method.net.parameters(), strict=True))


def test_cuda_graph_without_cuda_logs_one_line_and_trains_eagerly() -> None:
    notes = Notes()
    t = trainer("cpu", True, GEM, progress=notes)
    assert notes.lines == ["cuda_graph: steps run eagerly: no CUDA device (cpu)"]
    assert t.step.mode == "eager: no CUDA device (cpu)"
    t.fit()
    assert t.step.replays == 0 and isinstance(t.optimizer.param_groups[0]["lr"], torch.Tensor)


def test_a_method_that_needs_the_host_runs_eagerly_with_its_reason() -> None:
    notes = Notes()
    t = trainer("cpu", True, {"name": "pycil_gem", "kwargs": {"memory_size": 40}}, progress=notes)
    assert not t.graph_ready
    assert len(notes.lines) == 1 and "no CUDA device" in notes.lines[0]
    if torch.cuda.is_available():
        notes = Notes()
        t = trainer("cuda", True, {"name": "pycil_gem", "kwargs": {"memory_size": 40}}, progress=notes)
        assert notes.lines == ["cuda_graph: steps run eagerly: the PyCIL-style step checks the constraints and "
                               "solves the QP on the host, as PyCIL does"]


def test_schedule_moves_the_tensor_learning_rate_in_place() -> None:
    t = trainer("cpu", True, GEM, epoch=3, optimizer={"name": "SGD", "kwargs": {"lr": 0.1, "momentum": 0.9}},
                lr_scheduler={"name": "StepLR", "kwargs": {"step_size": 1, "gamma": 0.5}})
    begin(t, 0)
    lr = t.optimizer.param_groups[0]["lr"]
    for expected in (0.05, 0.025):
        t.scheduler.step()
        assert t.optimizer.param_groups[0]["lr"] is lr  # the tensor a captured step reads
        assert float(lr) == pytest.approx(expected)
