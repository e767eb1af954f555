"""Augmentation on image tensors (on the training device), seeded per batch.

A small, explicit menu (params `train.augment`): lighting (brightness, contrast), a small
rotation, translation and scale, and horizontal flips — off by default, since a flipped chest
radiograph puts the heart on the wrong side. Presets:
- none:     no augmentation (the default);
- lighting: the seed study's "lighting only": brightness +-0.2, contrast x[0.8, 1.2];
- light:    lighting +-0.1 / x[0.9, 1.1], rotation +-5 deg, translation +-5 %, scale +-5 %;
- custom:   the `train.augment` fields as given.

Each batch's random draw comes from a generator seeded by (seed, rank, step), so a resumed
round draws exactly what an uninterrupted one would, without checkpointing augmentation state.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from chexops.config import AugmentConfig
from chexops.errors import ChexopsError

PRESETS: dict[str, AugmentConfig] = {
    "lighting": AugmentConfig(preset="custom", brightness=0.2, contrast=0.2),
    "light": AugmentConfig(preset="custom", brightness=0.1, contrast=0.1, rotate_deg=5.0,
                           translate=0.05, scale=0.05),
}
STEP_STRIDE = 1_000_003   # spreads (seed, rank, step) over distinct generator seeds


def resolve(cfg: AugmentConfig) -> AugmentConfig | None:
    """The effective fields of a preset (None for `none`); unknown presets are refused."""
    if cfg.preset == "none":
        return None
    if cfg.preset == "custom":
        return cfg
    if cfg.preset not in PRESETS:
        raise ChexopsError(f"train.augment.preset: unknown preset {cfg.preset!r}; choose from "
                           f"none, {', '.join(PRESETS)}, custom")
    return PRESETS[cfg.preset]


def _uniform(n: int, half_width: float, g: torch.Generator) -> torch.Tensor:
    return (torch.rand(n, generator=g) * 2 - 1) * half_width


def _geometric(cfg: AugmentConfig) -> bool:
    return bool(cfg.rotate_deg or cfg.translate or cfg.scale or cfg.hflip)


def affine_matrices(n: int, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """(n, 2, 3) sampling matrices for affine_grid: rotation, scale, translation, flip."""
    angle = _uniform(n, math.radians(cfg.rotate_deg), g)
    zoom = 1.0 + _uniform(n, cfg.scale, g)
    shift = _uniform(2 * n, 2.0 * cfg.translate, g).view(n, 2)  # grid units span 2
    flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0) if cfg.hflip else torch.ones(n)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                         torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
    return theta


def augment_batch(images: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """uint8 or float (B, S, S) in 0..255 -> float32 (B, S, S) in 0..255, augmented per image
    (random draws on the CPU generator, arithmetic on the images' device)."""
    x = images.float().div(255.0).unsqueeze(1)
    n, dev = len(x), x.device
    contrast = (1.0 + _uniform(n, cfg.contrast, g)).to(dev).view(n, 1, 1, 1)
    brightness = _uniform(n, cfg.brightness, g).to(dev).view(n, 1, 1, 1)
    if _geometric(cfg):
        theta = affine_matrices(n, cfg, g).to(dev)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection",
                          align_corners=False)
    x = ((x - 0.5) * contrast + 0.5 + brightness).clamp_(0.0, 1.0)
    return x.squeeze(1).mul_(255.0)


@dataclass(frozen=True)
class Augmenter:
    """Callable (images, step) -> augmented float images on `device`; draws seeded per step."""
    cfg: AugmentConfig
    seed: int
    device: torch.device = torch.device("cpu")

    def generator(self, step: int) -> torch.Generator:
        from chexops.runtime import rank as process_rank

        rank = process_rank()
        return torch.Generator().manual_seed((self.seed * STEP_STRIDE + step) * 1009 + rank)

    def __call__(self, images: torch.Tensor, step: int) -> torch.Tensor:
        return augment_batch(images.to(self.device, non_blocking=True), self.cfg,
                             self.generator(step))


def make_augmenter(cfg: AugmentConfig, seed: int,
                   device: torch.device | str = "cpu") -> Augmenter | None:
    spec = resolve(cfg)
    return None if spec is None else Augmenter(spec, seed, torch.device(device))
