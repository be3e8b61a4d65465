"""Batched data augmentation on uint8 image tensors [N,1,H,W]: cheap enough to run every step."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_translate(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to `max_shift` pixels in each direction, filling with black."""
    if max_shift <= 0:
        return images
    n, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator, device=generator.device)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator, device=generator.device)
    dy, dx = dy.to(images.device), dx.to(images.device)
    rows = (torch.arange(h, device=images.device) + dy[:, None])[:, None, :, None]
    cols = (torch.arange(w, device=images.device) + dx[:, None])[:, None, None, :]
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def random_hflip(images: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    flip = (torch.rand(images.shape[0], generator=generator, device=generator.device) < p).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def random_erase(
    images: torch.Tensor,
    p: float,
    generator: torch.Generator,
    area: tuple[float, float] = (0.02, 0.25),
    aspect: tuple[float, float] = (0.3, 3.3),
) -> torch.Tensor:
    """Black out one random rectangle (a fraction `area` of the image, log-uniform aspect ratio) in a
    fraction `p` of the images: the model must not rely on any single part of a garment."""
    if p <= 0:
        return images
    n, _, h, w = images.shape

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator, device=generator.device)

    target = uniform(*area) * h * w
    ratio = torch.exp(uniform(math.log(aspect[0]), math.log(aspect[1])))
    eh = (target * ratio).sqrt().round().clamp(1, h).long()
    ew = (target / ratio).sqrt().round().clamp(1, w).long()
    top = (uniform(0, 1) * (h - eh + 1)).long()
    left = (uniform(0, 1) * (w - ew + 1)).long()
    chosen = uniform(0, 1) < p
    rows = torch.arange(h, device=generator.device)[None, :]
    cols = torch.arange(w, device=generator.device)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])
    mask = (in_rows[:, :, None] & in_cols[:, None, :] & chosen[:, None, None]).to(images.device)
    return images.masked_fill(mask[:, None], 0)


def augment_batch(
    images: torch.Tensor,
    generator: torch.Generator,
    translate: int = 0,
    hflip: bool = False,
    erase: float = 0.0,
) -> torch.Tensor:
    """Random crop with zero padding (`translate` pixels), horizontal flip, random erasing, in that order."""
    images = random_translate(images, translate, generator)
    if hflip:
        images = random_hflip(images, generator)
    return random_erase(images, erase, generator)
