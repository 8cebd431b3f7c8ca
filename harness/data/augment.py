"""Augmentation and normalisation of whole uint8 batches on the model's device (no per-image PIL work)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.config.options import opt


@dataclass
class AugmentOptions:
    """``crop``: RandomCrop padding in pixels (0 = off); ``flip``: horizontal flip with p = 0.5;
    ``brightness``: ColorJitter-style factor drawn from [1-b, 1+b] (PyCIL: 63/255); ``normalize``: subtract
    the dataset mean and divide by its std (off = inputs in [0, 1], as the original GEM)."""

    crop: int = opt(4, lo=0)
    flip: bool = True
    brightness: float = opt(0.0, lo=0.0, hi=1.0)
    normalize: bool = True


NO_AUGMENT = AugmentOptions(crop=0, flip=False, brightness=0.0)


def random_crop(x: torch.Tensor, padding: int) -> torch.Tensor:
    """Zero-pad by ``padding`` and cut a window of the original size at a random offset per image."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    oy = torch.randint(0, 2 * padding + 1, (b, 1), device=x.device)
    ox = torch.randint(0, 2 * padding + 1, (b, 1), device=x.device)
    rows = (oy + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (ox + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


class BatchTransform:
    """Turns uint8 images ``[B, C, H, W]`` into the network's float input, augmenting when training."""

    def __init__(self, options: AugmentOptions, mean: tuple[float, ...], std: tuple[float, ...],
                 device: torch.device, *, channels_last: bool = False) -> None:
        """``channels_last``: return NHWC-strided inputs, for a network kept in channels-last memory."""
        self.options, self.channels_last = options, channels_last
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor, *, train: bool) -> torch.Tensor:
        x = images.float().div_(255.0)
        o = self.options
        if train and o.crop > 0:
            x = random_crop(x, o.crop)
        if train and o.flip:
            flip = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5
            x = torch.where(flip, x.flip(3), x)
        if train and o.brightness > 0:
            factor = torch.empty(x.shape[0], 1, 1, 1, device=x.device).uniform_(1 - o.brightness, 1 + o.brightness)
            x = (x * factor).clamp_(0.0, 1.0)
        if o.normalize:
            x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
