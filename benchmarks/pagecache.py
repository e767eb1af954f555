"""Making a file cold without root: flush it, then ask the kernel to drop its pages from the page
cache (posix_fadvise POSIX_FADV_DONTNEED), and check with mincore(2) how much of it is still
resident. DONTNEED drops only clean pages that no process has mapped, so callers close their
memory maps first; `resident` tells whether it worked. Linux only."""
from __future__ import annotations

import ctypes
import mmap
import os
import time
from pathlib import Path

_PAGE = mmap.PAGESIZE


def files(path: Path) -> list[Path]:
    """`path` itself, or every regular file below it."""
    path = Path(path)
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def evict(path: Path) -> None:
    """Drop the pages of `path` (a file or every file under a folder) from the page cache."""
    if not hasattr(os, "posix_fadvise"):
        raise SystemExit("the cold case needs os.posix_fadvise (Linux); run it on Linux")
    for f in files(path):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)                 # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


def _resident_pages(f: Path, libc: ctypes.CDLL) -> tuple[int, int]:
    """(resident pages, pages) of one file, by mincore on a fresh read-only mapping."""
    size = f.stat().st_size
    pages = (size + _PAGE - 1) // _PAGE
    if size == 0:
        return 0, 0
    fd = os.open(f, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap {f}")
        try:
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {f}")
            return sum(v & 1 for v in vec), pages
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def resident(path: Path) -> float | None:
    """Fraction of the pages of `path` (file or folder) in the page cache; None off Linux."""
    if not os.path.exists("/proc/self"):
        return None
    libc = _libc()
    counts = [_resident_pages(f, libc) for f in files(path)]
    total = sum(p for _, p in counts)
    return sum(r for r, _ in counts) / total if total else 0.0


def read_mb_per_s(path: Path, block: int = 1 << 20) -> float:
    """Sequential read speed of `path` (a file) as it stands: hot or cold."""
    start, n = time.perf_counter(), 0
    with open(path, "rb", buffering=0) as fh:
        while chunk := fh.read(block):
            n += len(chunk)
    return n / 2**20 / (time.perf_counter() - start)
