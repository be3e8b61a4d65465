"""Batched data augmentation on uint8 image tensors [N,1,H,W]: cheap enough to run every step."""
from __future__ import annotations

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


def augment_batch(
    images: torch.Tensor, generator: torch.Generator, translate: int = 0, hflip: bool = False
) -> torch.Tensor:
    images = random_translate(images, translate, generator)
    if hflip:
        images = random_hflip(images, generator)
    return images
