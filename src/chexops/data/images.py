"""The decoded-image store: decoded, resized images live in one memory-mapped uint8 store per
(zip content, size, decoder version) under the cache folder: one slot per image member, filled
lazily as path lists ask for them, shared by every round, resample draw and trial over the same
data. Reading the zip itself is chexops.data.zipimages; turning a file into pixels is
chexops.data.decode, the decoder predict and serving use too.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import time
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
from filelock import FileLock

from chexops import atomic
from chexops.data.decode import IMAGE_EXTENSIONS
from chexops.data.zipimages import ZipImages, check_member_path
from chexops.errors import ChexopsError

_CHUNK = 256


# ---------------------------------------------------------------- decoded-image cache
#
# One store per (zip content, image size, decoder): <cache_dir>/images-v<V>-<size>px-<key>/
#   members.txt  image members of the zip, sorted; line i is slot i (the name -> slot index)
#   pixels.npy   (n_members, size, size) uint8, memory-mapped; a sparse file, so slots never
#                filled cost no disk
#   filled.npy   (n_members,) bool: slots whose pixels are written and flushed (replaced atomically,
#                only after the pixels are on disk, so a crash never marks garbage as filled)
#   lock         an exclusive file lock (filelock) held while creating the store or filling slots:
#                every other process using the store (DVC queue workers running trials) waits for it
# The key hashes the zip's central directory (each image member's name, CRC32 and size), the size,
# DECODER_VERSION and Pillow's version: content-based, cheap, blind to mtime, so every path list
# (resample draws, seeds, valid in any order), round and trial on the same data shares one store.

# Bump whenever chexops.data.decode changes what pixels come out: old stores are then never read.
# 2: one decoder for every path (bit depth, sBIT, EXIF orientation, gamma, transparency refused).
DECODER_VERSION = 2

_PERSIST_EVERY_S = 30.0          # a long fill saves its progress this often (resumable after a kill)

_WORKER: dict = {}


def _init_worker(zip_path: str) -> None:
    _WORKER["zip"] = ZipImages(zip_path)   # one handle per process


def _decode_chunk(args: tuple[str, list[str], int]) -> np.ndarray:
    zip_path, members, size = args
    zi = _WORKER.get("zip")
    if zi is None or str(zi.path) != zip_path:
        _init_worker(zip_path)
        zi = _WORKER["zip"]
    out = np.empty((len(members), size, size), dtype=np.uint8)
    for i, m in enumerate(members):
        try:
            out[i] = zi.read(m, size)
        except KeyError:
            raise ChexopsError(f"{m}: not in {zip_path}; re-run `dvc repro clean`") from None
    return out


def _chunks(zip_path: Path, paths: list[str], size: int) -> list[tuple[str, list[str], int]]:
    return [(str(zip_path), paths[i:i + _CHUNK], size) for i in range(0, len(paths), _CHUNK)]


def _decode_blocks(zip_path: Path, paths: list[str], size: int,
                   workers: int) -> Iterator[tuple[int, np.ndarray]]:
    """(start, block) for consecutive chunks of `paths`; in a process pool when workers > 1."""
    jobs = _chunks(zip_path, paths, size)
    if workers > 1 and len(jobs) > 1:
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods()
                                          else "spawn")
        with ctx.Pool(workers, _init_worker, (str(zip_path),)) as pool:
            for i, block in enumerate(pool.imap(_decode_chunk, jobs)):
                yield i * _CHUNK, block
        return
    for i, job in enumerate(jobs):
        yield i * _CHUNK, _decode_chunk(job)


def _decode_into(out: np.ndarray, zip_path: Path, paths: list[str], size: int, workers: int) -> None:
    """Fill `out` (N, size, size) chunk by chunk."""
    for start, block in _decode_blocks(zip_path, paths, size, workers):
        out[start:start + len(block)] = block


def zip_members(zip_path: Path) -> tuple[list[str], str]:
    """The zip's image members, sorted (the store's slots), and a hash of their central-directory
    entries (name, CRC32, uncompressed size): the zip's content identity, read without the data."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            infos = sorted((i for i in zf.infolist()
                            if not i.is_dir() and i.filename.lower().endswith(IMAGE_EXTENSIONS)),
                           key=lambda i: i.filename)
    except (FileNotFoundError, zipfile.BadZipFile) as exc:
        raise ChexopsError(f"{zip_path}: cannot open the image zip ({exc.__class__.__name__}); "
                           f"run `dvc repro download`") from None
    h = hashlib.sha256()
    for i in infos:
        h.update(f"{i.filename}\0{i.CRC:08x}\0{i.file_size}\n".encode())
    return [i.filename for i in infos], h.hexdigest()


def store_dir(cache_dir: Path, content: str, size: int) -> Path:
    """The store of one zip content (zip_members' hash) at one size, for this decoder."""
    import PIL

    key = hashlib.sha256(f"{content}:{size}:{DECODER_VERSION}:{PIL.__version__}".encode())
    return Path(cache_dir) / f"images-v{DECODER_VERSION}-{size}px-{key.hexdigest()[:24]}"


def _save_filled(store: Path, filled: np.ndarray) -> None:
    with atomic.atomic_path(store / "filled.npy", ".npy") as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, filled)
            fh.flush()
            os.fsync(fh.fileno())


def _load_filled(store: Path, n: int) -> np.ndarray | None:
    """The filled bitmap, or None when the store is missing or does not match `n` slots."""
    try:
        filled = np.load(store / "filled.npy")
    except (FileNotFoundError, ValueError, OSError):
        return None
    return filled if filled.shape == (n,) and filled.dtype == np.bool_ else None


def _create_store(store: Path, members: list[str], size: int) -> np.ndarray:
    """members.txt, a sparse pixels.npy and an all-False filled.npy (written last: its presence
    means the store is complete). Called under the lock."""
    atomic.write_text(store / "members.txt", "".join(f"{m}\n" for m in members))
    with atomic.atomic_path(store / "pixels.npy", ".npy") as tmp:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                       shape=(len(members), size, size))  # sparse: no pixels yet
        del mm
    filled = np.zeros(len(members), dtype=bool)
    _save_filled(store, filled)
    return filled


def _fill(store: Path, zip_path: Path, members: list[str], slots: np.ndarray, size: int,
          workers: int) -> None:
    """Decode the members at `slots` not yet filled into their slots (under the lock)."""
    filled = _load_filled(store, len(members))
    index = store / "members.txt"
    if (filled is None or not (store / "pixels.npy").is_file() or not index.is_file()
            or index.read_text().splitlines() != members):
        filled = _create_store(store, members, size)
    todo = np.unique(slots[~filled[slots]])
    if len(todo) == 0:
        return
    pixels = np.load(store / "pixels.npy", mmap_mode="r+")
    done: list[np.ndarray] = []

    def persist() -> None:
        if done:
            pixels.flush()                      # pixels on disk before their bits are set
            filled[np.concatenate(done)] = True
            _save_filled(store, filled)
            done.clear()

    last = time.monotonic()
    try:
        for start, block in _decode_blocks(zip_path, [members[s] for s in todo], size, workers):
            rows = todo[start:start + len(block)]
            pixels[rows] = block
            done.append(rows)
            if time.monotonic() - last > _PERSIST_EVERY_S:
                persist()
                last = time.monotonic()
    finally:                                    # an error keeps the chunks decoded before it
        persist()


def _missing(zip_path: Path, paths: list[str], slots: np.ndarray) -> None:
    """Raise for the first path without a slot that is not in the zip at all."""
    with zipfile.ZipFile(zip_path) as zf:
        names = set(zf.namelist())
    for i in np.flatnonzero(slots < 0):
        if paths[i] not in names:
            raise ChexopsError(f"{paths[i]}: not in {zip_path}; re-run `dvc repro clean`")


def _slots(zip_path: Path, paths: list[str]) -> tuple[list[str], str, np.ndarray]:
    """The zip's image members, its content hash, and each path's slot (-1: no slot)."""
    members, content = zip_members(zip_path)
    slot_of = {m: i for i, m in enumerate(members)}
    slots = np.fromiter((slot_of.get(p, -1) for p in paths), dtype=np.int64, count=len(paths))
    return members, content, slots


def _open_store(zip_path: Path, members: list[str], content: str, slots: np.ndarray, size: int,
                cache_dir: Path, workers: int) -> np.ndarray:
    """The store's pixels (read-only memory map), with every slot in `slots` filled."""
    store = store_dir(Path(cache_dir), content, size)
    filled = _load_filled(store, len(members))
    if filled is None or not filled[slots].all():
        store.mkdir(parents=True, exist_ok=True)
        with FileLock(store / "lock"):          # waits while another process fills it
            _fill(store, zip_path, members, slots, size, workers)
    return np.load(store / "pixels.npy", mmap_mode="r")


def image_store(zip_path: str | Path, paths: list[str], size: int, cache_dir: Path,
                workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(pixels, slots): the whole store memory-mapped, (n_members, size, size), with `paths`
    filled, and the slot of each path (pixels[slots] == load_image_array(...)), for callers that
    index rows themselves and want no copy. Every path must be an image member of the zip."""
    zip_path = Path(zip_path)
    paths = [str(p) for p in paths]
    for p in paths:
        check_member_path(p)
    members, content, slots = _slots(zip_path, paths)
    if (slots < 0).any():
        _missing(zip_path, paths, slots)
        bad = paths[int(np.flatnonzero(slots < 0)[0])]
        raise ChexopsError(f"{bad}: not an image member of {zip_path} "
                           f"(images end with {', '.join(IMAGE_EXTENSIONS)})")
    return _open_store(zip_path, members, content, slots, size, cache_dir, workers), slots


def load_image_array(zip_path: str | Path, paths: list[str], size: int,
                     cache_dir: Path | None = None, workers: int = 0) -> np.ndarray:
    """(N, size, size) uint8 images in the order of `paths`, each decoded once per zip content and
    size: with `cache_dir`, from the store shared by every path list over the same zip (only
    members not yet in it are decoded). A contiguous run of slots comes back memory-mapped,
    any other selection as an array gathered from the store (image_store avoids that copy)."""
    zip_path = Path(zip_path)
    paths = [str(p) for p in paths]
    for p in paths:
        check_member_path(p)
    if cache_dir is None or not paths:
        out = np.empty((len(paths), size, size), dtype=np.uint8)
        _decode_into(out, zip_path, paths, size, workers)
        return out
    members, content, slots = _slots(zip_path, paths)
    if (slots < 0).any():          # absent, or in the zip but not an image member: no slot
        _missing(zip_path, paths, slots)
        out = np.empty((len(paths), size, size), dtype=np.uint8)
        odd, ok = np.flatnonzero(slots < 0), np.flatnonzero(slots >= 0)
        block = np.empty((len(odd), size, size), dtype=np.uint8)
        _decode_into(block, zip_path, [paths[i] for i in odd], size, workers)   # uncached
        out[odd] = block
        if len(ok):
            out[ok] = load_image_array(zip_path, [paths[i] for i in ok], size, cache_dir, workers)
        return out
    pixels = _open_store(zip_path, members, content, slots, size, Path(cache_dir), workers)
    first = int(slots[0])
    if np.array_equal(slots, np.arange(first, first + len(slots))):
        return pixels[first:first + len(slots)]           # zero-copy view
    return np.asarray(pixels[slots])
