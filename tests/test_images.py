"""Reading images from the zip: path safety, header checks, the memory-mapped cache."""
from __future__ import annotations

import zipfile

import numpy as np
import pytest

from chexops.data.images import check_images, check_member_path, load_image_array, open_zip_images
from chexops.errors import ChexopsError
from tests.helpers import chexpert_rows, write_chexpert_zip


@pytest.mark.parametrize("bad", ["/etc/passwd", "CheXpert-v1.0-small/../../x.jpg", "..\\x.jpg",
                                 "C:/x.jpg", "", "CheXpert-v1.0-small/./train/x.jpg"])
def test_check_member_path_refuses_escaping_paths(bad):
    with pytest.raises(ChexopsError, match="image path"):
        check_member_path(bad)


def test_check_member_path_accepts_relative_and_checks_root():
    check_member_path("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg",
                      "CheXpert-v1.0-small")
    with pytest.raises(ChexopsError, match="outside the data root"):
        check_member_path("other/train/x.jpg", "CheXpert-v1.0-small")


def test_zip_images_reads_greyscale_and_knows_its_root(tiny_chexpert_zip):
    train, _ = chexpert_rows()
    with open_zip_images(tiny_chexpert_zip) as zi:
        img = zi.read(train["Path"][0])
        assert zi.root == "CheXpert-v1.0-small"
    assert img.dtype == np.uint8 and img.shape == (40, 32)


def test_check_images_lists_missing_and_unreadable(tmp_path):
    train, valid = chexpert_rows()
    paths = list(train["Path"])
    z = write_chexpert_zip(tmp_path / "c.zip", train, valid, skip_images=(paths[0],),
                           corrupt_images=(paths[1],))
    bad = dict(check_images(z, paths))
    assert bad[paths[0]] == "missing" and bad[paths[1]].startswith("unreadable")
    assert len(bad) == 2


def test_load_image_array_caches_once_and_workers_agree(tiny_chexpert_zip, tmp_path):
    train, valid = chexpert_rows()
    paths = list(train["Path"]) + list(valid["Path"])
    plain = load_image_array(tiny_chexpert_zip, paths, 16)
    assert plain.shape == (len(paths), 16, 16) and plain.dtype == np.uint8
    cache = tmp_path / "cache"
    first = load_image_array(tiny_chexpert_zip, paths, 16, cache, workers=0)
    files = list(cache.iterdir())
    assert len(files) == 1 and isinstance(first, np.memmap)
    stamp = files[0].stat().st_mtime_ns
    again = load_image_array(tiny_chexpert_zip, paths, 16, cache, workers=0)
    assert files[0].stat().st_mtime_ns == stamp and np.array_equal(again, plain)
    parallel = load_image_array(tiny_chexpert_zip, paths * 30, 16, None, workers=2)
    assert np.array_equal(parallel[: len(paths)], plain) and np.array_equal(parallel[-len(paths):], plain)
    other = load_image_array(tiny_chexpert_zip, paths[:3], 16, cache)
    assert len(list(cache.iterdir())) == 2 and np.array_equal(other, plain[:3])


def test_load_image_array_refuses_unsafe_paths_before_writing(tiny_chexpert_zip, tmp_path):
    with pytest.raises(ChexopsError, match="escapes the data root"):
        load_image_array(tiny_chexpert_zip, ["CheXpert-v1.0-small/../x.jpg"], 16, tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_stale_cache_is_rebuilt_when_the_zip_changes(tmp_path):
    train, valid = chexpert_rows()
    z = write_chexpert_zip(tmp_path / "c.zip", train, valid)
    paths = list(train["Path"][:2])
    a = np.array(load_image_array(z, paths, 8, tmp_path / "cache"))
    with zipfile.ZipFile(z, "a") as zf:   # the zip changes: size and mtime differ
        zf.writestr("CheXpert-v1.0-small/extra.txt", b"x")
    b = load_image_array(z, paths, 8, tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 2 and np.array_equal(a, b)
