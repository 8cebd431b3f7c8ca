"""Our GEM on real data: episodic memory, logit masks, and its effect on forgetting (digits)."""

from __future__ import annotations

import pytest
import torch

from harness.gem.memory import EpisodicMemory, herding_selection, per_class_quota
from harness.methods.base import Batch, mask_bounds, restrict_logits
from tests.conftest import digits_arm, digits_trainer


def test_ring_memory_holds_the_last_n_streamed_examples() -> None:
    trainer = digits_trainer([digits_arm("gem", {"name": "gem", "kwargs": {"n_memories": 50}})], "gem")
    gem, ctx = trainer.method, trainer.ctx
    gem.before_task(0)
    trainer._build_optimizer(0)
    stream = ctx.split.tasks[0].train[torch.randperm(len(ctx.split.tasks[0].train))]
    for start in range(0, 230, 23):  # batches that straddle the end of the ring
        index = stream[start : start + 23]
        images = ctx.train_images[index]
        gem.count_step(len(index))
        gem.observe(Batch(images, ctx.train_transform(images, train=False), ctx.train_labels[index]), trainer.optimizer)
    images, labels = gem.memory.task(0)
    last = stream[230 - 50 : 230]
    assert len(images) == 50
    # slot order is the ring's: rotate so the oldest example comes first
    order = torch.roll(torch.arange(50), -int(gem.memory.cursor[0]))
    assert torch.equal(images[order], ctx.train_images[last])
    assert torch.equal(labels[order], ctx.train_labels[last])
    assert gem.memory.count[1] == 0  # later tasks untouched


def test_ring_write_of_a_batch_larger_than_memory_keeps_its_tail() -> None:
    memory = EpisodicMemory(2, 4, (1, 2, 2), torch.device("cpu"))
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2)
    memory.write_ring(1, images, torch.arange(10))
    memory.count_written(1, 10)
    assert sorted(memory.task(1)[1].tolist()) == [6, 7, 8, 9]


@pytest.mark.parametrize("mask, expected", [("task", (4, 6)), ("seen", (0, 6)), ("none", (0, 10))])
def test_each_mask_exposes_exactly_its_logits(mask: str, expected: tuple[int, int]) -> None:
    split = digits_trainer([digits_arm("a", {"name": "finetune"})], "a").split
    assert split.offsets == [0, 2, 4, 6, 8, 10]
    assert mask_bounds(mask, 2, 2, split) == expected
    logits = torch.randn(5, 10, requires_grad=True)
    labels = torch.full((5,), 5)
    torch.nn.functional.cross_entropy(restrict_logits(logits, *expected), labels).backward()
    touched = (logits.grad.abs().sum(0) > 0).nonzero().flatten().tolist()
    assert touched == list(range(*expected))


def test_memory_gradient_of_a_past_task_only_sees_that_tasks_classes() -> None:
    trainer = digits_trainer([digits_arm("gem", {"name": "gem", "kwargs": {"n_memories": 20, "memory_fill": "random"}})],
                          "gem")
    gem = trainer.method
    gem.before_task(0)
    gem.after_task(0)  # random fill of task 0's memory
    gem.before_task(2)
    gem.memory_gradient(0)
    head_grad = trainer.net.head.weight.grad.abs().sum(1)
    assert (head_grad[:2] > 0).all() and (head_grad[2:] == 0).all()


def test_herding_picks_examples_that_track_the_class_mean() -> None:
    torch.manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(200, 16), dim=1)
    chosen = herding_selection(feats, 20)
    assert len(set(chosen.tolist())) == 20
    herded = (feats[chosen].mean(0) - feats.mean(0)).norm()
    random = torch.stack([(feats[torch.randperm(200)[:20]].mean(0) - feats.mean(0)).norm() for _ in range(50)])
    assert herded < random.quantile(0.05)
    assert per_class_quota(10, 3) == [4, 3, 3]


def test_gem_keeps_task_incremental_accuracy_where_finetune_forgets() -> None:
    arms = [digits_arm("finetune", {"name": "finetune", "kwargs": {"train_mask": "task"}}),
            digits_arm("gem", {"name": "gem", "kwargs": {"n_memories": 64, "train_mask": "task"}})]
    finetune = digits_trainer(arms, "finetune").fit().summary
    gem_trainer = digits_trainer(arms, "gem")
    gem = gem_trainer.fit().summary
    assert finetune["til_bwt"] < -0.05
    assert gem["til_bwt"] > finetune["til_bwt"] + 0.05
    assert gem["til_acc"] > finetune["til_acc"]
    projected = gem_trainer.state.task_metrics["gem_projection_fraction"]
    assert projected[0] == 0 and max(projected[1:]) > 0  # no constraints on task 0, some later


def test_agem_projects_only_against_violated_reference() -> None:
    arms = [digits_arm("agem", {"name": "agem", "kwargs": {"n_memories": 32, "sample_size": 16}}, epoch=2)]
    trainer = digits_trainer(arms, "agem")
    result = trainer.fit()
    fractions = trainer.state.task_metrics["agem_projection_fraction"]
    assert fractions[0] == 0 and 0 < max(fractions) <= 1
    assert 0 <= result.summary["til_acc"] <= 1
