"""The GEM paper's baselines beside GEM: independent, multimodal, EWC and iCaRL learn, do what defines
them, and resume exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from harness.config.experiment import parse_experiment
from harness.engine.runner import build_split
from harness.engine.trainer import ArmTrainer, load_checkpoint
from harness.methods.nme import class_means
from tests.conftest import digits_arm, digits_experiment

METHODS = {
    "independent": {"name": "independent"},
    "multimodal": {"name": "multimodal"},
    "ewc": {"name": "ewc", "kwargs": {"strength": 3.0, "n_memories": 50}},
    "icarl": {"name": "icarl", "kwargs": {"n_memories": 60, "strength": 1.0}},
}


# iCaRL trains with plain SGD, as the paper runs it: with momentum 0.9 its distillation term destabilises
# training on these tiny tasks.
PLAIN_SGD = {"icarl": {"optimizer": {"name": "SGD", "kwargs": {"lr": 0.05}}}}


def trainer(method: dict, epoch: int = 4, **arm: object) -> ArmTrainer:
    arms = [digits_arm("a", method, epoch=epoch, **{**PLAIN_SGD.get(method["name"], {}), **arm})]
    experiment = parse_experiment(digits_experiment(arms, task_num=3), "t.yaml")
    return ArmTrainer(experiment.arm("a"), build_split(experiment), None)


@pytest.mark.parametrize("name", list(METHODS))
def test_each_method_learns_every_task(name: str) -> None:
    result = trainer(METHODS[name]).fit()
    assert result.matrices["til"][-1].mean() > 0.75, result.matrices["til"]  # 2-way tasks: chance is 0.5


def test_ewc_penalty_is_zero_on_task_0_and_positive_after() -> None:
    t = trainer(METHODS["ewc"], epoch=2)
    seen: list[float] = []
    t.on_epoch = lambda tr, task, epoch: seen.append((task, float(tr.method.penalty().detach())))
    t.fit()
    assert all(p == 0.0 for task, p in seen if task == 0)
    assert all(p > 0.0 for task, p in seen if task > 0)
    assert len(t.method.fisher) == 3 and all(float(f.sum()) > 0 for f in t.method.fisher[0][:2])


def test_icarl_predicts_by_the_mean_of_its_exemplars_only() -> None:
    t = trainer(METHODS["icarl"])
    t.fit()
    m = t.method
    assert sum(len(v) for v in m.exemplars.values()) <= 60 and set(m.exemplars) == set(range(6))
    every = torch.cat(list(m.exemplars.values()))
    with t.precision.autocast(t.device):  # as the trainer ran after_task
        expected = class_means(t.net, t.ctx.train_images[every], t.ctx.train_labels[every], 6, t.ctx.eval_transform)
        inputs = t.ctx.eval_transform(t.ctx.train_images[:50], train=False)
        nme = m.predict(inputs)["nme"]
        features = torch.nn.functional.normalize(t.net.features(inputs).float(), dim=1)
    assert torch.allclose(m.means, expected, atol=1e-6)  # the means are the exemplars' and nothing else's
    assert torch.equal(nme.argmax(1), torch.cdist(features, expected).argmin(1))  # prediction: the nearest of them


def test_independent_networks_share_no_parameter_and_keep_their_own_task() -> None:
    t = trainer(METHODS["independent"], epoch=2)
    pointers = [{p.data_ptr() for p in net.parameters()} for net in t.method.nets]
    assert all(not (a & b) for i, a in enumerate(pointers) for b in pointers[i + 1:])
    widths = [net.backbone.feat_dim for net in t.method.nets]
    assert widths == [64 // 3] * 3  # each 1/T of the arm's width
    snapshots: dict[int, list[torch.Tensor]] = {}
    t.on_epoch = lambda tr, task, epoch: snapshots.setdefault(task, [p.detach().clone() for p in tr.method.nets[0].parameters()])
    t.fit()
    final = list(t.method.nets[0].parameters())
    after_task_0 = snapshots[1]  # taken during task 1: task 0's network is not trained any more
    assert all(torch.equal(a, b) for a, b in zip(after_task_0, final, strict=True))


def test_multimodal_gives_each_task_its_own_input_layer() -> None:
    t = trainer(METHODS["multimodal"], epoch=1)
    inputs = t.method.inputs
    assert len(inputs) == 3 and len({id(layer.weight) for layer in inputs}) == 3
    shared = {id(p) for p in t.method.shared.parameters()} | {id(p) for p in t.net.head.parameters()}
    assert shared and not shared & {id(p) for layer in inputs for p in layer.parameters()}


class _Stop(Exception):
    pass


@pytest.mark.parametrize("name", list(METHODS))
def test_each_method_resumes_exactly(tmp_path: Path, name: str) -> None:
    reference = trainer(METHODS[name], epoch=3).fit()

    def stop(tr: ArmTrainer, task: int, epoch: int) -> None:
        if (task, epoch) == (1, 1):
            raise _Stop

    folder = tmp_path / "checkpoints"
    interrupted = trainer(METHODS[name], epoch=3)
    interrupted.on_epoch, interrupted.checkpoint_dir = stop, folder
    with pytest.raises(_Stop):
        interrupted.fit()
    resumed = trainer(METHODS[name], epoch=3)
    resumed.checkpoint_dir = folder
    result = resumed.fit(load_checkpoint(folder))
    for key, matrix in reference.matrices.items():
        np.testing.assert_array_equal(result.matrices[key], matrix, err_msg=key)
