"""Nearest-mean-of-exemplars classification (iCaRL; what PyCIL reports as NME next to the CNN accuracy)."""

from __future__ import annotations

import torch
from torch import nn

from harness.data.augment import BatchTransform


@torch.no_grad()
def embed(net: nn.Module, images: torch.Tensor, transform: BatchTransform, batch_size: int = 512) -> torch.Tensor:
    """L2-normalised backbone features of uint8 ``images`` (eval transform, eval mode)."""
    was_training = net.training
    net.eval()
    # fp32 features whatever the autocast precision: means and herding distances are sums of many terms.
    feats = [net.features(transform(images[i : i + batch_size], train=False)).float()
             for i in range(0, len(images), batch_size)]
    net.train(was_training)
    return nn.functional.normalize(torch.cat(feats), dim=1)


@torch.no_grad()
def class_means(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                transform: BatchTransform) -> torch.Tensor:
    """Normalised mean feature per class; classes without exemplars get NaN rows (never predicted)."""
    feats = embed(net, images, transform)
    sums = torch.zeros(num_classes, feats.shape[1], device=feats.device).index_add_(0, labels, feats)
    counts = torch.bincount(labels, minlength=num_classes)[:, None]
    means = nn.functional.normalize(sums / counts.clamp_min(1), dim=1)
    return torch.where(counts > 0, means, torch.nan)


@torch.no_grad()
def cnn_and_nme_scores(net: nn.Module, inputs: torch.Tensor, means: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The network's logits and, once class means exist, the NME scores (for arms with exemplars), from one
    pass through the backbone."""
    features = net.features(inputs)
    scores = {"cnn": net.head(features)}
    if means is not None:
        scores["nme"] = nme_scores(features.float(), means)
    return scores


def nme_scores(features: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Negative squared distance of normalised features to each class mean (-inf without a mean)."""
    scores = -torch.cdist(nn.functional.normalize(features, dim=1), means.nan_to_num(0.0)) ** 2
    return scores.masked_fill(means.isnan().any(1)[None, :], -torch.inf)
