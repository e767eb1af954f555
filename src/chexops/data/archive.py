"""Zips made by other tools: member names with Windows separators (backslashes) are read as
folders, archive litter (macOS `__MACOSX/` and `._*` resource forks, `.DS_Store`, Windows
`Thumbs.db`) is skipped and counted, and every name is still checked for escapes (zip-slip)
after the separators are normalised. A zip that needs either is rewritten with clean names, so
every later stage reads plain `CheXpert-v1.0-small/...` members.
"""
from __future__ import annotations

import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

from chexops.data.schema import CHEXPERT_ROOTS
from chexops.data.zipimages import check_member_path, find_root
from chexops.errors import ChexopsError

LITTER_FOLDERS = frozenset({"__MACOSX"})
LITTER_FILES = frozenset({".DS_Store", "Thumbs.db"})
_BLOCK = 1 << 20


def is_litter(name: str) -> bool:
    """True for an entry an archiver or file browser adds (a normalised, '/'-separated name):
    anything under __MACOSX/, a .DS_Store, Thumbs.db or AppleDouble `._` file."""
    parts = name.rstrip("/").split("/")
    return (any(p in LITTER_FOLDERS for p in parts) or parts[-1] in LITTER_FILES
            or parts[-1].startswith("._"))


@dataclass(frozen=True)
class Members:
    """The entries of a zip as they will be kept: (original name, normalised name) of every file
    that is not litter, the number of litter entries skipped, and whether any name changed."""
    keep: tuple[tuple[str, str], ...]
    skipped: int
    renamed: bool

    @property
    def names(self) -> list[str]:
        return [new for _, new in self.keep]

    @property
    def needs_rewrite(self) -> bool:
        return self.renamed or self.skipped > 0


def read_members(path: Path, label: str) -> Members:
    """The zip's members with '\\' read as '/'; raises ChexopsError for a non-zip, for any name
    that is absolute or climbs out of the data folder (litter included), and for two names that
    become the same."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except zipfile.BadZipFile:
        raise ChexopsError(f"{label} is not a zip file; give a CheXpert-v1.0-small zip "
                           f"or folder as data.source") from None
    keep: list[tuple[str, str]] = []
    skipped, seen = 0, set()
    for name in names:
        new = name.replace("\\", "/")
        try:
            check_member_path(new.rstrip("/") or "/")
        except ChexopsError:
            raise ChexopsError(f"{label}: entry {name!r} would be written outside the data folder "
                               f"(zip-slip); refusing it, use an untampered CheXpert zip") from None
        if is_litter(new):
            skipped += 1
        elif not new.endswith("/"):           # folders are implied by their files
            if new in seen:
                raise ChexopsError(f"{label}: entry {new!r} appears twice once '\\' is read as "
                                   f"'/'; repack the zip with one copy of each file")
            seen.add(new)
            keep.append((name, new))
    # folder entries are dropped only when the zip is rewritten anyway: they alone never need it
    return Members(tuple(keep), skipped, any(old != new for old, new in keep))


def rewrite(src: Path, members: Members, dest: Path) -> None:
    """Copy the kept members of `src` into a new zip `dest` under their normalised names, each
    with its own compression and timestamp (streamed: the zip may be 11 GB)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", allowZip64=True) as zout:
        for old, new in members.keep:
            info = zin.getinfo(old)
            out = zipfile.ZipInfo(new, date_time=info.date_time)
            out.compress_type, out.external_attr = info.compress_type, info.external_attr
            with zin.open(info) as fin, zout.open(out, "w", force_zip64=True) as fout:
                shutil.copyfileobj(fin, fout, _BLOCK)


def validate_zip(path: Path, label: str) -> Members:
    """The zip's members as kept (chexops.data.archive: '\\' read as '/', litter skipped);
    errors for a non-zip, a non-CheXpert zip, zip-slip entries."""
    members = read_members(path, label)
    if find_root(members.names) is None:
        raise ChexopsError(f"{label} is not CheXpert: no {CHEXPERT_ROOTS[0]}/train.csv and "
                           f"valid.csv inside; give the CheXpert-v1.0-small zip")
    return members


def place_zip(source: Path, label: str, dest: Path) -> int:
    """Validate the zip `source` and put it at `dest` (may be `source` itself): copied as it is,
    or rewritten with clean names when it has '\\' separators or litter. Returns the number of
    litter entries skipped."""
    members = validate_zip(source, label)
    if members.needs_rewrite:
        print(f"download: {label}: rewriting the zip with '/' separators and without "
              f"{members.skipped} litter entries")
        tmp = dest.with_name(dest.name + ".rewrite")
        try:
            rewrite(source, members, tmp)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
    elif source != dest:
        shutil.copyfile(source, dest)
    return members.skipped
