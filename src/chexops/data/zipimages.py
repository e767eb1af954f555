"""Reading images straight out of the CheXpert zip: member paths checked against the data root
(zip-slip), the CheXpert root folder found, one image decoded (by chexops.data.decode, the one
decoder), headers checked against the decoder's policy. The zip is one DVC object; images are
never unpacked to 224k loose files."""
from __future__ import annotations

import posixpath
import re
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from chexops.data.decode import ImageProblem, decode_image, header_problem, is_colour
from chexops.data.schema import CHEXPERT_ROOTS
from chexops.errors import ChexopsError


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


def undecodable(member: str, zip_path: Path, exc: ImageProblem) -> ChexopsError:
    return ChexopsError(f"{member} in {zip_path} cannot be decoded ({exc.problem}): set "
                        f"clean.image_check: full and re-run `dvc repro clean` (it drops such "
                        f"images), or fix or remove the file in the data source")


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
        """Pixels of `member` from the one decoder (chexops.data.decode.decode_image): (H, W)
        uint8, or (size, size) squished; KeyError when absent, ChexopsError when undecodable."""
        check_member_path(member)
        with self.zf.open(member) as fh:
            try:
                return decode_image(fh, size)
            except ImageProblem as exc:
                raise undecodable(member, self.path, exc) from None

    def close(self) -> None:
        self.zf.close()

    def __enter__(self) -> "ZipImages":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_images(zip_path: str | Path, paths: list[str]) -> tuple[list[tuple[str, str]], int]:
    """((path, reason) for every image that is missing, unreadable or refused by the decoder's
    policy (chexops.data.decode.header_problem), number of images stored in colour).

    A header check (PIL's open reads the markers up to the frame size), not a full decode,
    so 224k images take seconds."""
    bad: list[tuple[str, str]] = []
    colour = 0
    with ZipImages(zip_path) as zi:
        for p in paths:
            if p not in zi.names:
                bad.append((p, "missing"))
                continue
            try:
                with zi.zf.open(p) as fh, Image.open(fh) as img:
                    problem = header_problem(img)
                    if problem is not None:
                        bad.append((p, problem.problem))
                    elif img.size[0] < 1 or img.size[1] < 1:
                        bad.append((p, "empty image"))
                    else:
                        colour += is_colour(img)
            except Exception as exc:  # any decoder complaint means unusable
                bad.append((p, f"unreadable ({exc.__class__.__name__})"))
    return bad, colour
