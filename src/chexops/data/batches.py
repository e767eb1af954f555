"""Batches from a decoded uint8 image array: a Dataset, seeded DataLoaders, and the
uint8 -> normalised 3-channel float conversion, done per batch on the target device.

Greyscale radiographs are replicated to 3 channels and normalised with ImageNet's mean/std,
so timm's pretrained (ImageNet) weights apply unchanged.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Sized

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# what to_input does, as a weights file records it (chexops.model.recipe)
NORMALISATION = (f"grey x3, /255, imagenet mean {','.join(map(str, IMAGENET_MEAN))} "
                 f"std {','.join(map(str, IMAGENET_STD))}")


@dataclass
class ArraySet:
    """Images (M, S, S) uint8 (may be memory-mapped), labels (N, T) float32, mask (N, T) bool,
    and `index` (N,) mapping each row to its image, so an oversampled table that repeats images
    does not copy them (None: row i is image i)."""
    images: np.ndarray
    labels: np.ndarray
    mask: np.ndarray
    index: np.ndarray | None = None

    @classmethod
    def from_labels(cls, images: np.ndarray, raw_labels: np.ndarray,
                    index: np.ndarray | None = None) -> "ArraySet":
        """Labels other than 0/1 (-1 under U-Ignore, NaN) are masked out of loss and metrics."""
        raw = np.asarray(raw_labels, dtype=np.float32)
        raw = raw[:, None] if raw.ndim == 1 else raw
        mask = np.isin(raw, (0.0, 1.0))
        return cls(images, np.where(mask, raw, 0.0).astype(np.float32), mask, index)

    def __len__(self) -> int:
        return len(self.labels)

    def image_rows(self, rows: np.ndarray) -> np.ndarray:
        return rows if self.index is None else self.index[rows]


class ImageDataset(Dataset):
    """Items (uint8 image, labels, mask); __getitems__ fetches a whole batch with one indexing."""

    def __init__(self, data: ArraySet) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d = self.data
        img = d.images[int(d.image_rows(np.asarray([i]))[0])]
        return (torch.from_numpy(np.array(img)), torch.from_numpy(d.labels[i]),
                torch.from_numpy(d.mask[i]))

    def __getitems__(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d, order = self.data, np.asarray(idx)
        return (torch.from_numpy(np.ascontiguousarray(d.images[d.image_rows(order)])),
                torch.from_numpy(d.labels[order]), torch.from_numpy(d.mask[order]))


def collate(batch):
    """Batches from __getitems__ are already stacked; single items go through default_collate."""
    if isinstance(batch, tuple) and isinstance(batch[0], torch.Tensor):
        return batch
    return default_collate(batch)


def make_loader(data: ArraySet, batch_size: int, shuffle: bool, generator: torch.Generator | None,
                workers: int = 0, pin_memory: bool = False,
                sampler_fn: Callable[[Dataset], Sampler | None] | None = None) -> DataLoader:
    """A seeded loader; training drops the last short batch (BatchNorm needs > 1 item, and
    fastai does the same) unless the whole set is smaller than one batch. `sampler_fn(dataset)`
    may supply the order instead of `shuffle` (the epoch-seeded, rank-sharded samplers of
    chexops.training.distributed)."""
    from chexops.runtime import seed_worker

    dataset = ImageDataset(data)
    sampler = sampler_fn(dataset) if sampler_fn is not None else None
    n = len(sampler) if isinstance(sampler, Sized) else len(data)
    drop_last = shuffle and n > batch_size
    return DataLoader(dataset, batch_size=min(batch_size, max(1, n)),
                      shuffle=shuffle and sampler is None, sampler=sampler,
                      generator=generator, num_workers=workers,
                      worker_init_fn=seed_worker if workers else None, collate_fn=collate,
                      pin_memory=pin_memory, drop_last=drop_last)


@functools.lru_cache(maxsize=8)
def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Made once per device: a host-to-GPU copy every batch would stall the launch queue."""
    return (torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1))


def to_input(images: torch.Tensor, device: torch.device,
             channels_last: bool = False) -> torch.Tensor:
    """uint8 (B, S, S) -> float (B, 3, S, S) on `device`, ImageNet-normalised."""
    x = images.to(device, non_blocking=True).unsqueeze(1).float().div_(255.0)
    mean, std = _mean_std(device)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
