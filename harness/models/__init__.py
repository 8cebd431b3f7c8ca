"""Backbones and the classifier network (backbone + one linear head over every class of the split)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from harness.models.resnet import reduced_resnet18, resnet12, resnet18, resnet32, resnet34


class MLP(nn.Module):
    """Fully connected ReLU network on flattened inputs (the GEM paper's MNIST net: 2 x 100)."""

    def __init__(self, in_channels: int, image_size: int, hidden: list[int] | None = None) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_channels * image_size * image_size
        for h in hidden or [100, 100]:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.feat_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def mlp(in_channels: int, image_size: int, hidden: list[int] | None = None) -> MLP:
    return MLP(in_channels, image_size, hidden)


BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet32": resnet32,
    "reduced_resnet18": reduced_resnet18,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet12": resnet12,
    "mlp": mlp,
}


def convolutional(name: str) -> bool:
    """Whether backbone ``name`` convolves 4-d image batches: every backbone but the MLP, which flattens its
    input, so only these gain from channels-last (and from compiling, ``choose_compile``)."""
    return name != "mlp"


# LibContinual backbone blocks carry these; they are checked against the split instead of passed on.
LIBCONTINUAL_BACKBONE_KEYS = ("num_classes", "args")
# Keys of a backbone block that concern the whole network (backbone and head), not the backbone builder.
NETWORK_KEYS = ("init",)
INITS = ("default", "xavier_uniform", "he_normal")


class Network(nn.Module):
    """``features`` = backbone output; ``forward`` = logits over all classes of the split (methods decide
    which logits each loss sees). ``num_classes`` None: no head (a method that brings its own classifier)."""

    def __init__(self, backbone: nn.Module, num_classes: int | None) -> None:
        super().__init__()
        self.backbone = backbone
        if num_classes is not None:
            self.head = nn.Linear(backbone.feat_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def build_backbone(name: str, kwargs: dict[str, Any], image_shape: tuple[int, int, int]) -> nn.Module:
    kwargs = {k: v for k, v in kwargs.items() if k not in (*LIBCONTINUAL_BACKBONE_KEYS, *NETWORK_KEYS)}
    if name == "mlp":
        return mlp(image_shape[0], image_shape[1], **kwargs)
    return BACKBONES[name](image_shape[0], **kwargs)


def build_network(name: str, kwargs: dict[str, Any], image_shape: tuple[int, int, int],
                  num_classes: int | None) -> Network:
    """The backbone named ``name`` with a linear head over ``num_classes``; ``kwargs['init']`` picks the
    initialisation of every layer (``initialize``)."""
    net = Network(build_backbone(name, kwargs, image_shape), num_classes)
    initialize(net, kwargs.get("init", "default"))
    return net


def initialize(net: nn.Module, scheme: str) -> None:
    """``default``: PyTorch's own layer initialisation. ``xavier_uniform``: Xavier-uniform weights and zero
    biases for every linear and convolutional layer, head included, as the original GEM code's MLP.
    ``he_normal``: He-normal convolutions (fan_out, ReLU gain) and Kaiming-uniform linear layers with gain 1
    and zero biases, as PyCIL's CIFAR ResNet-32 and its linear head (and LibContinual's CIFAR ResNets) draw
    them. BatchNorm stays at PyTorch's weight 1, bias 0 in every scheme."""
    if scheme == "default":
        return
    for module in net.modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if scheme == "xavier_uniform":
            nn.init.xavier_uniform_(module.weight)
        elif isinstance(module, nn.Conv2d):
            # fan_out keeps the backward pass's gradient variance at 1 through each ReLU layer (He et al. 2015)
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        else:
            nn.init.kaiming_uniform_(module.weight, nonlinearity="linear")
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def count_parameters(module: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in module.parameters())
