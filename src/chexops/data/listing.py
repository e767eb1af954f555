"""A folder's listing: (relative path, size, mtime_ns) of every file under it, cheap enough to
take on every `dvc repro` of a CheXpert-sized folder (223,648 files in ~250,000 folders).

Walking a tree costs an open, two reads and a close per folder, and at this scale the folders
cost more than the files. But creating, deleting or renaming an entry always moves its folder's
mtime, so when no folder's (mtime, inode) moved since the last walk, the tree holds the same
names, and a stat of each folder and each file gives the listing (a file edited in place moves
its own mtime, not its folder's). The last walk is kept in a memo; any folder that moved (or a
missing memo) means a full walk, which rewrites it. As with git's "racy" index entries, a folder
whose mtime lies within RACY_NS of the walk is recorded as untrusted, so the next run walks
again: a change in the same clock tick would not have moved its mtime.

The memo is text (never unpickled): a header line naming the root, then three lines of
NUL-separated fields: the folders (relative paths, in walk order), their "mtime_ns:inode" keys,
the files (relative paths, in walk order).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from chexops import atomic

HEADER = "chexops-listing 2"
RACY_NS = 2_000_000_000
UNTRUSTED = "-1"

Listing = list[tuple[str, int, int]]


def _key(st: os.stat_result, now: int) -> str:
    return UNTRUSTED if st.st_mtime_ns >= now - RACY_NS else f"{st.st_mtime_ns}:{st.st_ino}"


def walk(root: str) -> tuple[list[str], list[str], Listing]:
    """(folders, their keys, files) under root, depth first with names sorted: symlinks to
    files count as files, symlinks to folders are not followed. A folder's key is read before
    its entries are."""
    now = time.time_ns()
    folders, keys, files = [], [], []
    stack = [("", _key(os.stat(root), now))]
    while stack:
        rel, key = stack.pop()
        folders.append(rel)
        keys.append(key)
        prefix = f"{rel}/" if rel else ""
        subdirs, found = [], []
        with os.scandir(f"{root}/{rel}" if rel else root) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append((entry.name, _key(entry.stat(follow_symlinks=False), now)))
                elif entry.is_file():
                    st = entry.stat()
                    found.append((prefix + entry.name, st.st_size, st.st_mtime_ns))
        files.extend(sorted(found))
        stack.extend((prefix + name, key) for name, key in sorted(subdirs, reverse=True))
    return folders, keys, files


def read_memo(memo: Path, root: str) -> tuple[list[str], list[str], list[str]] | None:
    """(folders, keys, file paths) of the last walk of `root`; None when there is none."""
    try:
        lines = memo.read_bytes().decode("utf-8", "surrogateescape").split("\n")
    except OSError:
        return None
    if len(lines) < 4 or lines[0] != f"{HEADER}\t{root}":
        return None
    folders, keys, files = (line.split("\0") for line in lines[1:4])
    return (folders, keys, files) if len(folders) == len(keys) else None


def write_memo(memo: Path, root: str, folders: list[str], keys: list[str], files: Listing) -> None:
    """The memo of a walk; none (the old one removed) when a name holds a newline."""
    if "\n" in root or any("\n" in rel for rel in folders) or any("\n" in p for p, _, _ in files):
        memo.unlink(missing_ok=True)
        return
    text = "\n".join([f"{HEADER}\t{root}", "\0".join(folders), "\0".join(keys),
                      "\0".join(path for path, _, _ in files)]) + "\n"
    with atomic.atomic_path(memo) as tmp:   # bytes: names need not be UTF-8
        tmp.write_bytes(text.encode("utf-8", "surrogateescape"))


def _unchanged(root: str, known: tuple[list[str], list[str], list[str]]) -> Listing | None:
    """The listing by stats alone when no folder moved since the memo; else None."""
    folders, keys, paths = known
    try:
        for rel, key in zip(folders, keys):
            st = os.stat(f"{root}/{rel}" if rel else root)
            if key != f"{st.st_mtime_ns}:{st.st_ino}":   # moved, or untrusted
                return None
        out = []
        for rel in paths:
            st = os.stat(f"{root}/{rel}")
            out.append((rel, st.st_size, st.st_mtime_ns))
    except OSError:   # a folder or file gone: walk
        return None
    return out


def listing(root: Path, memo: Path | None = None) -> Listing:
    """(path relative to root with "/", size, mtime_ns) of every file under root, in a fixed
    order (depth first, names sorted). With `memo`: stats only, when no folder moved since the
    last walk; else a walk, memoised."""
    base = str(root)
    known = read_memo(memo, base) if memo is not None else None
    if known is not None:
        found = _unchanged(base, known)
        if found is not None:
            return found
    folders, keys, files = walk(base)
    if memo is not None:
        write_memo(memo, base, folders, keys, files)
    return files
