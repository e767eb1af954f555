"""Loader benchmark: batches from the decoded-image cache (load_image_array, memory-mapped,
+ chexops.data.batches) against decoding each JPEG out of the zip with PIL per item (what a plain
torchvision-style Dataset does), on the same cores, same batch size, same output (uint8 batches).

    python benchmarks/loader_bench.py [--images 512] [--size 64] [--workers 0] [--epochs 3]
                                      [--out benchmarks/results/loader_bench.json]

Builds its own CheXpert-layout zip of greyscale JPEGs (320 x 384, quality 90, like
CheXpert-v1.0-small) in a temporary folder. Goal: cached >= 5x the JPEG loader's images/s.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from chexops.data.batches import ArraySet, make_loader

ROOT = Path(__file__).resolve().parents[1]
TOP = "CheXpert-v1.0-small"


def fake_radiograph(rng: np.random.Generator, w: int = 320, h: int = 384) -> np.ndarray:
    """Smooth anatomy-like blobs plus film noise: JPEG sizes near CheXpert-small's."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = 60 + 40 * np.sin(xx / rng.uniform(20, 40)) * np.cos(yy / rng.uniform(25, 50))
    for _ in range(3):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(30, 90)
        img += 80 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_zip(path: Path, n: int, seed: int = 0) -> list[str]:
    """n JPEGs under CheXpert-v1.0-small/train/...; returns their member paths."""
    rng = np.random.default_rng(seed)
    members = [f"{TOP}/train/patient{i:05d}/study1/view1_frontal.jpg" for i in range(n)]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for m in members:
            buf = io.BytesIO()
            Image.fromarray(fake_radiograph(rng)).save(buf, "JPEG", quality=90)
            zf.writestr(m, buf.getvalue())
    return members


class JpegZipDataset(Dataset):
    """The baseline: open the zip member, decode with PIL, resize, per item."""

    def __init__(self, zip_path: Path, members: list[str], size: int) -> None:
        self.zip_path, self.members, self.size = zip_path, members, size
        self._zf: zipfile.ZipFile | None = None  # one handle per worker process

    def __len__(self) -> int:
        return len(self.members)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._zf is None:
            self._zf = zipfile.ZipFile(self.zip_path)
        with self._zf.open(self.members[i]) as fh:
            img = Image.open(fh).convert("L").resize((self.size, self.size), Image.BILINEAR)
        return torch.from_numpy(np.array(img))


def images_per_s(loader, n_items: int, epochs: int) -> tuple[float, list[float]]:
    """Median images/s over `epochs` full passes (each batch touched, as training would)."""
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        total = 0
        for batch in loader:
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            total += int(images.shape[0])
            images.float().sum()  # touch the pixels (a memory map is lazy)
        times.append(time.perf_counter() - start)
        assert total == n_items, (total, n_items)
    return n_items / statistics.median(times), times


def run(n: int, size: int, batch: int, workers: int, epochs: int, tmp: Path) -> dict:
    from chexops.data.images import load_image_array

    zip_path = tmp / "chexpert.zip"
    members = make_zip(zip_path, n)
    jpeg = DataLoader(JpegZipDataset(zip_path, members, size), batch_size=batch, shuffle=True,
                      num_workers=workers, generator=torch.Generator().manual_seed(0))
    jpeg_rate, jpeg_s = images_per_s(jpeg, n, epochs)
    start = time.perf_counter()
    load_image_array(zip_path, members, size, tmp / "cache", workers)  # first use builds it
    build_s = time.perf_counter() - start
    images = load_image_array(zip_path, members, size, tmp / "cache", workers)  # memory-mapped
    data = ArraySet.from_labels(images, np.zeros(n, np.float32))
    cached = make_loader(data, batch, True, torch.Generator().manual_seed(0), workers)
    cached_rate, cached_s = images_per_s(cached, n, epochs)
    return {"images": n, "image_size": size, "batch": batch, "workers": workers,
            "epochs": epochs, "jpeg_images_per_s": jpeg_rate, "cached_images_per_s": cached_rate,
            "ratio": cached_rate / jpeg_rate, "cache_build_s": build_s,
            "cache_build_images_per_s": n / build_s, "jpeg_s": jpeg_s, "cached_s": cached_s,
            "zip_mb": zip_path.stat().st_size / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=64, help="cached image size (px)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0, help="loader workers, both loaders")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/loader_bench.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.images, args.size, args.batch, args.workers, args.epochs, Path(tmp))
    result["machine"] = {"python": platform.python_version(), "torch": torch.__version__,
                         "platform": platform.platform(), "cpu_count": os.cpu_count(),
                         "torch_threads": torch.get_num_threads()}
    result["goal"] = "ratio >= 5 (cached vs JPEG-per-item, same cores)"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"JPEG per item {result['jpeg_images_per_s']:.0f} img/s, cached "
          f"{result['cached_images_per_s']:.0f} img/s, ratio {result['ratio']:.1f}x "
          f"(cache built in {result['cache_build_s']:.2f} s); wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
