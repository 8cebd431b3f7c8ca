"""Domain-incremental protocols of the GEM paper: every task has all classes, inputs transformed per task.

- ``permutations`` (MNIST permutations): task t applies one fixed random permutation to the pixels.
- ``rotations`` (MNIST rotations): task t rotates every image by a fixed angle; the angles are spread
  evenly over [0°, 180°).

Each task trains on its own random ``samples_per_task`` training images (the paper: 1,000) and is tested
on the whole test set under its transform. The expanded dataset is built once; the task blocks index it.
"""

from __future__ import annotations

import numpy as np
import torch

from harness.data.datasets import ImageDataset


def _permute(images: torch.Tensor, permutation: torch.Tensor) -> torch.Tensor:
    flat = images.reshape(len(images), -1)
    return flat[:, permutation].reshape(images.shape)


def _rotate(images: torch.Tensor, degrees: float) -> torch.Tensor:
    from torchvision.transforms.functional import InterpolationMode, rotate

    return rotate(images, degrees, interpolation=InterpolationMode.BILINEAR)


def expand_tasks(dataset: ImageDataset, protocol: str, task_num: int, samples_per_task: int | None, seed: int
                 ) -> tuple[ImageDataset, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The dataset with every task's transformed train and test images, and each task's index blocks."""
    rng = np.random.RandomState(seed)
    pixels = int(np.prod(dataset.image_shape))
    train_parts, train_labels, test_parts, blocks = [], [], [], []
    train_at = 0
    for t in range(task_num):
        n = len(dataset.train_x) if samples_per_task is None else samples_per_task
        chosen = torch.from_numpy(np.sort(rng.choice(len(dataset.train_x), size=n, replace=False)))
        if protocol == "permutations":
            permutation = torch.from_numpy(rng.permutation(pixels))
            transform = lambda x, p=permutation: _permute(x, p)  # noqa: E731 - bound per task
        else:
            transform = lambda x, a=180.0 * t / task_num: _rotate(x, a)  # noqa: E731
        train_parts.append(transform(dataset.train_x[chosen]))
        train_labels.append(dataset.train_y[chosen])
        test_parts.append(transform(dataset.test_x))
        blocks.append((torch.arange(train_at, train_at + n), torch.arange(t * len(dataset.test_x),
                                                                         (t + 1) * len(dataset.test_x))))
        train_at += n
    expanded = ImageDataset(f"{dataset.name}_{protocol}", torch.cat(train_parts), torch.cat(train_labels),
                            torch.cat(test_parts), dataset.test_y.repeat(task_num), dataset.mean, dataset.std)
    return expanded, blocks
