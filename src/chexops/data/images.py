"""Reading images straight out of the CheXpert zip, and the decoded-image cache.

The zip is one DVC object; images are never unpacked to 224k loose files. Decoded,
resized images live in a memory-mapped uint8 array under the cache folder, keyed by the
zip's identity (size, mtime), the path list and the size, and rebuilt atomically when stale.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import posixpath
import re
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from chexops import atomic
from chexops.data.schema import CHEXPERT_ROOTS
from chexops.errors import ChexopsError

_CHUNK = 256


def check_member_path(path: str, root: str | None = None) -> None:
    """Raise for a path that is absolute, climbs with '..', or leaves the data root."""
    p = str(path)
    if (not p or p.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", p)
            or "\\" in p or "\0" in p):
        raise ChexopsError(f"image path {p!r} is absolute or malformed; paths must be relative "
                           f"to the data root, like {CHEXPERT_ROOTS[0]}/train/patient00001/...")
    parts = p.split("/")
    if ".." in parts or posixpath.normpath(p) != p.rstrip("/"):
        raise ChexopsError(f"image path {p!r} escapes the data root ('..' or '.' parts); "
                           f"fix the CSV so every path stays inside the data root")
    if root is not None and parts[0] != root:
        raise ChexopsError(f"image path {p!r} is outside the data root {root}/; "
                           f"fix the CSV so every path starts with {root}/")


def find_root(names: list[str] | set[str]) -> str | None:
    """The CheXpert top folder of a zip: one holding both train.csv and valid.csv."""
    names = set(names)
    for root in CHEXPERT_ROOTS:
        if {f"{root}/train.csv", f"{root}/valid.csv"} <= names:
            return root
    return None


def decode(data: bytes | object, size: int | None = None) -> np.ndarray:
    """Greyscale uint8 pixels; with `size`, squished to size x size (whole thorax kept)."""
    with Image.open(data) as img:
        if size is not None:
            img.draft("L", (size, size))          # JPEG DCT scaling: much less work
        img = img.convert("L")
        if size is not None and img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.LANCZOS)
        return np.asarray(img, dtype=np.uint8)


# What a truncated or corrupt image raises while decoding (UnidentifiedImageError and
# "image file is truncated" are OSErrors; zip CRC failures are BadZipFile).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError,
                 zipfile.BadZipFile)


def undecodable(member: str, zip_path: Path, exc: BaseException) -> ChexopsError:
    reason = " ".join(str(exc).split())[:120]
    return ChexopsError(f"{member} in {zip_path} cannot be decoded ({exc.__class__.__name__}: "
                        f"{reason}): the image is truncated or corrupt; set clean.image_check: full "
                        f"and re-run `dvc repro clean` (it drops such images), or remove the file "
                        f"from the data source")


class ZipImages:
    """Images of one CheXpert zip, read member by member (one open handle)."""

    def __init__(self, zip_path: str | Path):
        self.path = Path(zip_path)
        try:
            self.zf = zipfile.ZipFile(self.path)
        except (FileNotFoundError, zipfile.BadZipFile) as exc:
            raise ChexopsError(f"{self.path}: cannot open the image zip ({exc.__class__.__name__}); "
                               f"run `dvc repro download`") from None
        self.names = set(self.zf.namelist())
        self.root = find_root(self.names) or CHEXPERT_ROOTS[0]

    def read(self, member: str, size: int | None = None) -> np.ndarray:
        """Decoded pixels of `member`; KeyError when absent, ChexopsError when undecodable."""
        check_member_path(member)
        with self.zf.open(member) as fh:
            try:
                return decode(fh, size)
            except DECODE_ERRORS as exc:
                raise undecodable(member, self.path, exc) from None

    def close(self) -> None:
        self.zf.close()

    def __enter__(self) -> "ZipImages":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_zip_images(zip_path: str | Path) -> ZipImages:
    return ZipImages(zip_path)


def check_images(zip_path: str | Path, paths: list[str]) -> list[tuple[str, str]]:
    """(path, reason) for every image that is missing or whose header is unreadable.

    A header check (PIL's open reads the markers up to the frame size), not a full decode,
    so 224k images take seconds."""
    bad: list[tuple[str, str]] = []
    with ZipImages(zip_path) as zi:
        for p in paths:
            if p not in zi.names:
                bad.append((p, "missing"))
                continue
            try:
                with zi.zf.open(p) as fh, Image.open(fh) as img:
                    if img.size[0] < 1 or img.size[1] < 1:
                        bad.append((p, "empty image"))
            except Exception as exc:  # any decoder complaint means unusable
                bad.append((p, f"unreadable ({exc.__class__.__name__})"))
    return bad


# ---------------------------------------------------------------- decoded-image cache

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


def cache_key(zip_path: Path, paths: list[str], size: int) -> str:
    st = zip_path.stat()
    h = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}:{size}\n".encode())
    h.update("\n".join(paths).encode())
    return h.hexdigest()[:24]


def _chunks(zip_path: Path, paths: list[str], size: int) -> list[tuple[str, list[str], int]]:
    return [(str(zip_path), paths[i:i + _CHUNK], size) for i in range(0, len(paths), _CHUNK)]


def _decode_into(out: np.ndarray, zip_path: Path, paths: list[str], size: int, workers: int) -> None:
    """Fill `out` (N, size, size) chunk by chunk; in a process pool when workers > 1."""
    jobs = _chunks(zip_path, paths, size)
    if workers > 1 and len(jobs) > 1:
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods()
                                          else "spawn")
        with ctx.Pool(workers, _init_worker, (str(zip_path),)) as pool:
            results = pool.imap(_decode_chunk, jobs)
            for i, block in enumerate(results):
                out[i * _CHUNK:i * _CHUNK + len(block)] = block
        return
    for i, job in enumerate(jobs):
        out[i * _CHUNK:i * _CHUNK + len(job[1])] = _decode_chunk(job)


def load_image_array(zip_path: str | Path, paths: list[str], size: int,
                     cache_dir: Path | None = None, workers: int = 0) -> np.ndarray:
    """(N, size, size) uint8 images, each decoded once; memory-mapped from `cache_dir` if given."""
    zip_path = Path(zip_path)
    paths = [str(p) for p in paths]
    for p in paths:
        check_member_path(p)
    if cache_dir is None or not paths:
        out = np.empty((len(paths), size, size), dtype=np.uint8)
        _decode_into(out, zip_path, paths, size, workers)
        return out
    cache = Path(cache_dir) / f"images-{size}px-{cache_key(zip_path, paths, size)}.npy"
    if not cache.is_file():
        with atomic.atomic_path(cache, ".npy") as tmp:   # written straight to disk: no RAM peak
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                            shape=(len(paths), size, size))
            _decode_into(out, zip_path, paths, size, workers)
            out.flush()
            del out
    return np.load(cache, mmap_mode="r")
