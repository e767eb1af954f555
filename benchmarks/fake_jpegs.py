"""JPEG bytes the size of CheXpert-v1.0-small's, for benchmarks that read, copy or hash the zip.

CheXpert-v1.0-small is about 11 GB for 223,648 greyscale JPEGs (about 49 KB each, 320 px wide,
most near 320 x 390). Each image here is a smooth, radiograph-like base plus seeded Gaussian
noise; the noise's strength is chosen per image so the JPEG encoder lands near a drawn target
size. Targets are log-normal with mean MEAN_BYTES; their spread (LOG_SD) is an assumption, not
measured on CheXpert. Image i depends only on (seed, i): the bytes are the same for any number
of worker processes.
"""
from __future__ import annotations

import io
import multiprocessing
from functools import lru_cache
from typing import Iterator

import numpy as np
from PIL import Image

MEAN_BYTES = 50_000        # ~11 GB / 223,648 images in CheXpert-v1.0-small
LOG_SD = 0.25              # assumed spread of the sizes (log space)
WIDTH, HEIGHT = 320, 389   # CheXpert-small's typical frontal film
QUALITY = 90
_SIGMAS = np.array([0, 1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 26, 32, 40, 52, 64], dtype=np.float64)
_BASES = 8
_CHUNK = 128


@lru_cache(maxsize=2)
def _bases(seed: int) -> np.ndarray:
    """(_BASES, HEIGHT, WIDTH) float32 smooth images: a lung-field gradient and soft blobs."""
    rng = np.random.default_rng((seed, 0xBA5E))
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    out = np.empty((_BASES, HEIGHT, WIDTH), np.float32)
    for b in range(_BASES):
        img = 70 + 40 * np.sin(xx / rng.uniform(20, 40)) * np.cos(yy / rng.uniform(25, 50))
        for _ in range(3):
            cx, cy, r = rng.uniform(0, WIDTH), rng.uniform(0, HEIGHT), rng.uniform(30, 90)
            img += 70 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
        out[b] = img
    return out


def encode(base: np.ndarray, sigma: float, rng: np.random.Generator) -> bytes:
    """`base` plus N(0, sigma) noise, as a greyscale JPEG (quality QUALITY)."""
    noisy = base + np.float32(sigma) * rng.standard_normal(base.shape, dtype=np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=QUALITY)
    return buf.getvalue()


@lru_cache(maxsize=2)
def calibration(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(bytes, sigma): JPEG size at each noise strength of _SIGMAS, made non-decreasing."""
    rng = np.random.default_rng((seed, 0xCA1))
    sizes = [np.mean([len(encode(b, s, rng)) for b in _bases(seed)[:2]]) for s in _SIGMAS]
    return np.maximum.accumulate(np.asarray(sizes)), _SIGMAS


def sigma_for(target_bytes: float, seed: int) -> float:
    sizes, sigmas = calibration(seed)
    return float(np.interp(target_bytes, sizes, sigmas))


def jpeg(seed: int, i: int) -> bytes:
    """Image i of the set `seed`: a target size drawn from the log-normal, then encoded."""
    rng = np.random.default_rng((seed, i))
    target = MEAN_BYTES * np.exp(rng.normal(-LOG_SD ** 2 / 2, LOG_SD))   # mean MEAN_BYTES
    base = _bases(seed)[int(rng.integers(_BASES))]
    return encode(base, sigma_for(target, seed), rng)


def _chunk(args: tuple[int, int, int]) -> list[bytes]:
    seed, start, stop = args
    return [jpeg(seed, i) for i in range(start, stop)]


def jpegs(n: int, seed: int = 0, workers: int = 1) -> Iterator[bytes]:
    """The first n images of the set `seed`, in order; encoded in `workers` processes."""
    jobs = [(seed, s, min(s + _CHUNK, n)) for s in range(0, n, _CHUNK)]
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield from _chunk(job)
        return
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods()
                                      else "spawn")
    with ctx.Pool(workers) as pool:
        for block in pool.imap(_chunk, jobs):
            yield from block
