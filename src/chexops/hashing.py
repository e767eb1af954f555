"""md5 of files and folders, computed the way DVC 3 hashes a file (plain md5 of its bytes)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path


def file_md5(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Plain md5 of a file's bytes, read in chunks (DVC 3 hashes files the same way)."""
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def tree_md5(path: str | Path) -> str:
    """md5 of a file, or of a folder's sorted (relative path, file md5) list."""
    path = Path(path)
    if path.is_file():
        return file_md5(path)
    listing = [[f.relative_to(path).as_posix(), file_md5(f)]
               for f in sorted(path.rglob("*")) if f.is_file()]
    return hashlib.md5(json.dumps(listing).encode()).hexdigest()
