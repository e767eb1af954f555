"""Loader benchmark: batches from the decoded-image store (load_image_array, memory-mapped, +
chexops.data.batches) against decoding each image out of the zip per item with the store's own
decoder (ZipImages.read: JPEG draft + Lanczos, the function that fills the store), so both
loaders yield the same pixels (checked on every image), same cores, same batch, same order.

    python benchmarks/loader_bench.py [--images 4096] [--size 64] [--cold-images 4096]
                                      [--cold-size 320] [--epochs 3] [--workers 0]
                                      [--out benchmarks/results/loader_bench.json]

Two cases, each with its own store:
  hot   the store fits in the page cache and stays there (the default profile, 64 px);
  cold  before every epoch the store's and the zip's pages are dropped from the page cache with
        posix_fadvise(POSIX_FADV_DONTNEED) (no root needed; benchmarks/pagecache.py), as for a
        store larger than RAM (the seed profile: CheXpert at 320 px is a 22.9 GB store); mincore
        checks that the pages are gone and a read of the zip hot vs cold shows what a miss costs.
Epoch 1 of the store includes its fill (decoding every image once); later epochs only read it.
The zip holds JPEGs the size of CheXpert-small's (benchmarks/fake_jpegs.py). Goal: the store's
images/s >= 5x the per-item decoder's over all epochs, fill included (ratio.all_epochs, 3 epochs).
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import fake_jpegs  # noqa: E402
import pagecache  # noqa: E402
from machine import machine, meminfo  # noqa: E402

from chexops.data.batches import ArraySet, make_loader  # noqa: E402
from chexops.data.images import load_image_array  # noqa: E402
from chexops.data.zipimages import ZipImages  # noqa: E402

TOP = "CheXpert-v1.0-small"
CHEXPERT_IMAGES = 223_648     # train + valid rows of CheXpert-v1.0-small
MAX_RESIDENT_AFTER_EVICT = 0.01


def make_zip(path: Path, n: int, workers: int) -> list[str]:
    """n CheXpert-sized JPEGs under CheXpert-v1.0-small/train/...; returns their member paths."""
    members = [f"{TOP}/train/patient{i:05d}/study1/view1_frontal.jpg" for i in range(n)]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for m, data in zip(members, fake_jpegs.jpegs(n, seed=0, workers=workers)):
            zf.writestr(m, data)
    return members


class PerItemDecode(Dataset):
    """The baseline: each item read from the zip and decoded by the store's own decoder."""

    def __init__(self, zip_path: Path, members: list[str], size: int) -> None:
        self.zip_path, self.members, self.size = zip_path, members, size
        self._zip: ZipImages | None = None  # one handle per worker process

    def __len__(self) -> int:
        return len(self.members)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._zip is None:
            self._zip = ZipImages(self.zip_path)
        return torch.from_numpy(np.array(self._zip.read(self.members[i], self.size)))


def drain(loader) -> int:
    """Images in one full pass; each batch's pixels touched, as training would."""
    total = 0
    for batch in loader:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        total += int(images.shape[0])
        images.float().sum()  # a memory map is lazy: make it read
    return total


def cold(paths: list[Path]) -> float:
    """Evict every path; the largest fraction still resident (refused above the limit)."""
    gc.collect()                        # close dropped memory maps: mapped pages stay cached
    for p in paths:
        if p.exists():
            pagecache.evict(p)
    left = max((pagecache.resident(p) or 0.0) for p in paths if p.exists())
    if left > MAX_RESIDENT_AFTER_EVICT:
        raise SystemExit(f"page-cache eviction left {left:.0%} of {paths} resident (a process still "
                         f"maps it?); the cold figures would be hot, so none are written")
    return left


def per_item_epochs(zip_path: Path, members: list[str], size: int, args, evict: bool) -> list[dict]:
    out = []
    for epoch in range(args.epochs):
        left = cold([zip_path]) if evict else None
        loader = DataLoader(PerItemDecode(zip_path, members, size), batch_size=args.batch,
                            shuffle=True, num_workers=args.workers,
                            drop_last=len(members) > args.batch,   # as make_loader does
                            generator=torch.Generator().manual_seed(epoch))
        start = time.perf_counter()
        n = drain(loader)
        seconds = time.perf_counter() - start
        out.append({"epoch": epoch + 1, "images": n, "s": seconds, "images_per_s": n / seconds,
                    "zip_resident_after_evict": left})
    return out


def store_epochs(zip_path: Path, members: list[str], size: int, cache: Path, args,
                 evict: bool) -> list[dict]:
    out = []
    for epoch in range(args.epochs):
        left = cold([zip_path, cache]) if evict else None
        start = time.perf_counter()
        images = load_image_array(zip_path, members, size, cache, args.workers)  # epoch 1 fills
        fill_s = time.perf_counter() - start
        if evict and epoch == 0:        # the pass reads from disk too, not what the fill left
            del images
            cold([cache])
            images = load_image_array(zip_path, members, size, cache, args.workers)
        resident = pagecache.resident(cache)
        data = ArraySet.from_labels(images, np.zeros(len(members), np.float32))
        loader = make_loader(data, args.batch, True, torch.Generator().manual_seed(epoch),
                             args.workers)
        start = time.perf_counter()
        n = drain(loader)
        pass_s = time.perf_counter() - start
        del loader, data, images
        out.append({"epoch": epoch + 1, "images": n, "fill_s": fill_s, "pass_s": pass_s,
                    "s": fill_s + pass_s, "images_per_s": n / (fill_s + pass_s),
                    "store_resident_at_pass": resident, "resident_after_evict": left})
    return out


def identical(zip_path: Path, members: list[str], size: int, cache: Path) -> int:
    """Every image: the per-item decoder's pixels == the store's; returns how many were checked."""
    store = load_image_array(zip_path, members, size, cache)
    items = PerItemDecode(zip_path, members, size)
    for i, m in enumerate(members):
        if not np.array_equal(items[i].numpy(), store[i]):
            raise SystemExit(f"{m}: the per-item decoder and the store differ; the two loaders "
                             f"must yield the same pixels for the comparison to mean anything")
    return len(members)


def ratios(per_item: list[dict], store: list[dict]) -> dict:
    """Store / per-item images/s: epoch 1 (fill included), later epochs (median), all epochs."""
    def rate(epochs: list[dict]) -> float:
        return sum(e["images"] for e in epochs) / sum(e["s"] for e in epochs)
    later = (statistics.median(e["images_per_s"] for e in store[1:])
             / statistics.median(e["images_per_s"] for e in per_item[1:])) if len(store) > 1 else None
    return {"first_epoch": store[0]["images_per_s"] / per_item[0]["images_per_s"],
            "later_epochs": later, "all_epochs": rate(store) / rate(per_item)}


def run_case(name: str, zip_path: Path, members: list[str], size: int, tmp: Path, args) -> dict:
    evict = name == "cold"
    cache = tmp / f"cache-{name}"
    probe = None
    if evict:                           # what a page-cache miss costs on this disk
        hot = pagecache.read_mb_per_s(zip_path)
        left = cold([zip_path])
        probe = {"zip_read_mb_per_s_hot": hot, "zip_resident_after_evict": left,
                 "zip_read_mb_per_s_cold": pagecache.read_mb_per_s(zip_path)}
    per_item = per_item_epochs(zip_path, members, size, args, evict)
    store = store_epochs(zip_path, members, size, cache, args, evict)
    store_bytes = sum(f.stat().st_size for f in pagecache.files(cache))
    ram = meminfo().get("MemTotal") or 0
    with zipfile.ZipFile(zip_path) as zf:
        image_bytes = sum(zf.getinfo(m).file_size for m in members)
    return {"case": name, "images": len(members), "image_size": size, "epochs": args.epochs,
            "page_cache": ("store and zip evicted before every epoch (posix_fadvise DONTNEED)"
                           if evict else "kept: the store stays cached between epochs"),
            "jpeg_bytes": image_bytes, "store_bytes": store_bytes,
            "chexpert_store_bytes": CHEXPERT_IMAGES * size * size,
            "store_fits_in_ram": store_bytes < ram,
            "chexpert_store_fits_in_ram": CHEXPERT_IMAGES * size * size < ram,
            "cold_probe": probe, "per_item": per_item, "store": store,
            "ratio": ratios(per_item, store),
            "pixels_identical": identical(zip_path, members, size, cache)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4096, help="hot case: images")
    parser.add_argument("--size", type=int, default=64, help="hot case: store image size (px)")
    parser.add_argument("--cold-images", type=int, default=4096, help="cold case: images (0: skip)")
    parser.add_argument("--cold-size", type=int, default=320, help="cold case: image size (px)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0, help="loader and fill workers, both loaders")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jpeg-workers", type=int, default=2, help="processes making the zip")
    parser.add_argument("--out", default=str(HERE / "results/loader_bench.json"))
    args = parser.parse_args(argv)
    if args.images < 1 or args.cold_images < 0 or args.epochs < 1 or args.batch < 1:
        parser.error("--images, --epochs and --batch must be >= 1, --cold-images >= 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = [("hot", args.images, args.size)]
    cases += [("cold", args.cold_images, args.cold_size)] if args.cold_images else []
    with tempfile.TemporaryDirectory() as tmp:
        zip_path = Path(tmp) / "chexpert.zip"
        start = time.perf_counter()
        members = make_zip(zip_path, max(n for _, n, _ in cases), args.jpeg_workers)
        result = {"machine": machine() | {"torch": torch.__version__,
                                          "torch_threads": torch.get_num_threads()},
                  "batch": args.batch, "workers": args.workers, "zip_build_s":
                  time.perf_counter() - start, "zip_bytes": zip_path.stat().st_size,
                  "goal": "ratio.all_epochs >= 5 (store vs per-item images/s, fill included)",
                  "cases": [run_case(name, zip_path, members[:n], size, Path(tmp), args)
                            for name, n, size in cases]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for c in result["cases"]:
        r = c["ratio"]
        later = "-" if r["later_epochs"] is None else f"{r['later_epochs']:.1f}x"
        print(f"{c['case']}: {c['images']} images at {c['image_size']} px, store "
              f"{c['store_bytes'] / 2**20:.0f} MiB; store vs per-item decoder: epoch 1 (fill "
              f"included) {r['first_epoch']:.1f}x, later epochs {later}, all "
              f"{c['epochs']} epochs {r['all_epochs']:.1f}x", file=sys.stderr)
    print(f"wrote {out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
