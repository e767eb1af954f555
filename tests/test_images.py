"""Reading images from the zip: path safety, header checks, the memory-mapped cache."""
from __future__ import annotations

import zipfile

import numpy as np
import pytest

from chexops.data.images import check_images, check_member_path, load_image_array, open_zip_images
from chexops.errors import ChexopsError
from tests.helpers import chexpert_rows, jpeg_bytes, write_chexpert_zip


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


def truncated_zip(tmp_path):
    """A CheXpert zip whose first train image is a JPEG cut in half: header intact, data short."""
    train, valid = chexpert_rows()
    victim = train["Path"][0]
    z = write_chexpert_zip(tmp_path / "t.zip", train, valid, skip_images=(victim,))
    whole = jpeg_bytes(0, 200, 160)
    with zipfile.ZipFile(z, "a") as zf:
        zf.writestr(victim, whole[: len(whole) // 2])
    return z, victim, list(train["Path"]) + list(valid["Path"])


def test_truncated_jpeg_passes_the_header_check_but_reads_as_a_one_line_error(tmp_path):
    z, victim, _ = truncated_zip(tmp_path)
    assert check_images(z, [victim]) == []            # the fast check cannot see it
    with open_zip_images(z) as zi:
        for size in (None, 16):
            with pytest.raises(ChexopsError) as info:
                zi.read(victim, size)
            msg = str(info.value)
            assert msg.startswith(f"{victim} in {z} cannot be decoded (OSError: ")
            assert "truncated or corrupt; set clean.image_check: full and re-run `dvc repro clean`" in msg
            assert "remove the file from the data source" in msg and "\n" not in msg
            assert info.value.__cause__ is None


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_jpeg_stops_the_image_cache_leaving_no_file(tmp_path, workers):
    z, victim, paths = truncated_zip(tmp_path)
    cache = tmp_path / "cache"
    with pytest.raises(ChexopsError, match=f"{victim} in .* cannot be decoded"):
        load_image_array(z, paths * 30, 16, cache, workers=workers)
    assert not cache.exists() or list(cache.iterdir()) == []


def test_garbage_member_is_a_chexops_error_too(tmp_path):
    train, valid = chexpert_rows()
    z = write_chexpert_zip(tmp_path / "c.zip", train, valid, corrupt_images=(train["Path"][1],))
    with open_zip_images(z) as zi, pytest.raises(ChexopsError, match="UnidentifiedImageError"):
        zi.read(train["Path"][1])
