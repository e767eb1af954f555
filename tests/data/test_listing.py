"""data/listing.py: a folder's (path, size, mtime) listing, by stats alone while no folder moved
since the memoised walk, and by a walk when one did (added, removed, renamed entries), when a
folder's mtime was too recent to trust, or when the memo is missing, foreign or unreadable."""
from __future__ import annotations

import os
import time

import pytest

from chexops.data import listing as lst

PAST_NS = time.time_ns() - 3600 * 10**9


def tree(root):
    """train/patient0000{1,2}/study1/view1_frontal.jpg, train.csv; every mtime an hour ago."""
    for p in (1, 2):
        study = root / "train" / f"patient0000{p}" / "study1"
        study.mkdir(parents=True)
        (study / "view1_frontal.jpg").write_bytes(b"jpg" * p)
    (root / "train.csv").write_text("Path,Cardiomegaly\n")
    for path in [root, *root.rglob("*")]:
        os.utime(path, ns=(PAST_NS, PAST_NS))
    return root


def reference(root):
    """The listing by the book: every file under root, stat'ed."""
    return sorted((p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in root.rglob("*") if p.is_file())


@pytest.fixture()
def walks(monkeypatch):
    """How many full walks the listing took."""
    count = []
    real = lst.walk
    monkeypatch.setattr(lst, "walk", lambda root: count.append(root) or real(root))
    return count


def test_the_listing_is_every_file_in_a_fixed_order(tmp_path):
    root = tree(tmp_path / "data")
    found = lst.listing(root)
    assert sorted(found) == reference(root)
    assert [p for p, _, _ in found] == ["train.csv", "train/patient00001/study1/view1_frontal.jpg",
                                        "train/patient00002/study1/view1_frontal.jpg"]
    (root / "elsewhere").mkdir()
    (root / "train" / "link").symlink_to(root / "elsewhere", target_is_directory=True)
    (root / "elsewhere" / "x.jpg").write_bytes(b"x")
    (root / "csv-link").symlink_to(root / "train.csv")
    paths = [p for p, _, _ in lst.listing(root)]
    assert "train/link/x.jpg" not in paths and "elsewhere/x.jpg" in paths and "csv-link" in paths


def test_an_unchanged_tree_is_listed_by_stats_and_an_edit_in_place_shows(tmp_path, walks):
    root, memo = tree(tmp_path / "data"), tmp_path / "memo/listing.tsv"
    first = lst.listing(root, memo)
    assert len(walks) == 1 and memo.is_file()
    assert lst.listing(root, memo) == first and len(walks) == 1     # stats only
    csv = root / "train.csv"
    csv.write_text("Path,Cardiomegalx\n")                           # same size, edited in place
    os.utime(root, ns=(PAST_NS, PAST_NS))                            # its folder did not move
    edited = lst.listing(root, memo)
    assert len(walks) == 1 and sorted(edited) == reference(root) and edited != first


@pytest.mark.parametrize("change", ["add", "remove", "rename", "new folder"])
def test_a_moved_folder_means_a_walk(tmp_path, walks, change):
    root, memo = tree(tmp_path / "data"), tmp_path / "listing.tsv"
    lst.listing(root, memo)
    study = root / "train/patient00002/study1"
    if change == "add":
        (study / "view2_lateral.jpg").write_bytes(b"lateral")
    elif change == "remove":
        (study / "view1_frontal.jpg").unlink()
    elif change == "rename":
        (study / "view1_frontal.jpg").rename(study / "view1_frontal.jpeg")
    else:
        (root / "train/patient00003/study1").mkdir(parents=True)
        (root / "train/patient00003/study1/view1_frontal.jpg").write_bytes(b"3")
    assert sorted(lst.listing(root, memo)) == reference(root) and len(walks) == 2


def test_a_folder_too_recent_to_trust_is_walked_again(tmp_path, walks):
    root, memo = tree(tmp_path / "data"), tmp_path / "listing.tsv"
    os.utime(root / "train/patient00001", ns=(time.time_ns(), time.time_ns()))   # just now
    lst.listing(root, memo)
    lst.listing(root, memo)
    assert len(walks) == 2      # its entries could have changed within the same clock tick
    os.utime(root / "train/patient00001", ns=(PAST_NS, PAST_NS))
    lst.listing(root, memo)
    lst.listing(root, memo)
    assert len(walks) == 3


def test_a_foreign_or_broken_memo_means_a_walk_and_odd_names_no_memo(tmp_path, walks):
    root, other, memo = tree(tmp_path / "data"), tree(tmp_path / "other"), tmp_path / "listing.tsv"
    lst.listing(other, memo)
    assert sorted(lst.listing(root, memo)) == reference(root) and len(walks) == 2
    memo.write_text("garbage\n")
    assert sorted(lst.listing(root, memo)) == reference(root) and len(walks) == 3
    odd = root / "train" / "patient\n00009"
    odd.mkdir()
    (odd / "view1.jpg").write_bytes(b"odd")
    assert sorted(lst.listing(root, memo)) == reference(root) and not memo.exists()
