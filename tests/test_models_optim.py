"""Backbone sizes, learning-rate schedules with warmup, and the decoded-image cache."""

from __future__ import annotations

import pytest
import torch

from baselines.pycil_gem import pycil_init
from harness.data.datasets import cache_dir, load_dataset
from harness.engine.optim import CosineAnnealingLR, MultiStepLR, StepLR, build_optimizer, build_scheduler
from harness.models import BACKBONES, build_network, count_parameters
from tests.conftest import CIFAR100, needs_cifar


@pytest.mark.parametrize("name, params, feat_dim", [("resnet32", 0.46e6, 64), ("reduced_resnet18", 1.09e6, 160),
                                                    ("resnet18", 11.2e6, 512), ("mlp", 0.32e6, 100)])
def test_backbone_sizes(name: str, params: float, feat_dim: int) -> None:
    net = build_network(name, {}, (3, 32, 32), 100)
    assert net.backbone.feat_dim == feat_dim
    assert count_parameters(net.backbone) == pytest.approx(params, rel=0.02)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 100)


def test_every_backbone_runs_on_one_channel_images() -> None:
    for name in BACKBONES:
        net = build_network(name, {}, (1, 28, 28), 10)
        assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10), name


def lrs(schedule: object, warmup: int, epochs: int, lr: float = 0.1) -> list[float]:
    optimizer = build_optimizer("SGD", {"lr": lr, "momentum": 0.9}, [torch.zeros(1, requires_grad=True)])
    scheduler = build_scheduler(optimizer, schedule, warmup)
    out = []
    for _ in range(epochs):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_schedules_in_closed_form_with_linear_warmup() -> None:
    assert lrs(MultiStepLR(milestones=[2, 4], gamma=0.1), 0, 6) == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    assert lrs(StepLR(step_size=3, gamma=0.5), 3, 7) == pytest.approx([0.1 / 3, 0.2 / 3, 0.1, 0.05, 0.05, 0.05, 0.025])
    cosine = lrs(CosineAnnealingLR(T_max=4, eta_min=0.01), 0, 6)
    assert cosine[0] == pytest.approx(0.1) and cosine[2] == pytest.approx(0.055) and cosine[4:] == pytest.approx([0.01] * 2)


@needs_cifar
def test_decoded_image_folders_are_cached_outside_the_data_folder() -> None:
    first = load_dataset("cifar100", CIFAR100, [3, 7])
    cached = list(cache_dir().glob("imagefolder-*.pt"))
    assert cached and all(CIFAR100.resolve() not in p.resolve().parents for p in cached)
    second = load_dataset("cifar100", CIFAR100, [3, 7])
    assert torch.equal(first.train_x, second.train_x) and torch.equal(first.test_y, second.test_y)
    assert first.train_x.shape == (1000, 3, 32, 32) and first.test_x.shape == (200, 3, 32, 32)
    means = first.train_x.float().div(255).mean((0, 2, 3))
    assert ((means > 0.2) & (means < 0.8)).all()


def test_xavier_uniform_init_is_the_original_gem_mlps() -> None:
    """Every layer, head included: weights in ±sqrt(6 / (fan_in + fan_out)), zero biases."""
    net = build_network("mlp", {"hidden": [100, 100], "init": "xavier_uniform"}, (1, 28, 28), 10)
    layers = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert len(layers) == 3
    for layer in layers:
        fan_out, fan_in = layer.weight.shape
        bound = (6 / (fan_in + fan_out)) ** 0.5
        assert float(layer.weight.abs().max()) <= bound and float(layer.weight.abs().max()) > 0.9 * bound
        assert float(layer.bias.abs().max()) == 0.0
    default = build_network("mlp", {"hidden": [100, 100]}, (1, 28, 28), 10)
    assert float(default.head.bias.abs().max()) > 0  # PyTorch's default draws biases too


def test_he_normal_init_draws_the_convolutions_as_the_pycil_reference() -> None:
    """With the same seed our ``he_normal`` ResNet-32 has the PyCIL-style reference's convolutions exactly
    (both redraw them in module order after construction); the head is Kaiming-uniform with gain 1, zero bias."""
    torch.manual_seed(0)
    ours = build_network("resnet32", {"init": "he_normal"}, (3, 32, 32), 100)
    torch.manual_seed(0)
    reference = build_network("resnet32", {}, (3, 32, 32), 100)
    pycil_init(reference)
    pairs = [(a, b) for a, b in zip(ours.modules(), reference.modules(), strict=True) if isinstance(a, torch.nn.Conv2d)]
    assert len(pairs) == 31  # the stem and two per block: option-A shortcuts have no convolution
    assert all(torch.equal(a.weight, b.weight) for a, b in pairs)
    weights = torch.cat([a.weight.flatten() for a, _ in pairs[1:]])  # every 3x3 conv but the stem's
    torch.manual_seed(0)
    default = build_network("resnet32", {}, (3, 32, 32), 100)
    default_weights = torch.cat([m.weight.flatten() for m in default.modules() if isinstance(m, torch.nn.Conv2d)][1:])
    assert float(weights.std()) > 2 * float(default_weights.std())  # He-normal is ~2.4x PyTorch's default scale
    bound = (3 / ours.head.in_features) ** 0.5
    assert 0.9 * bound < float(ours.head.weight.abs().max()) <= bound
    assert float(ours.head.bias.abs().max()) == 0.0
