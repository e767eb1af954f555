"""Reading images from the zip: path safety, header checks, the memory-mapped cache."""
from __future__ import annotations

import os
import shutil
import zipfile

import numpy as np
import pytest

from chexops.data import images, zipimages
from chexops.data.images import image_store, load_image_array
from chexops.data.zipimages import ZipImages, check_images, check_member_path
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
    with ZipImages(tiny_chexpert_zip) as zi:
        img = zi.read(train["Path"][0])
        assert zi.root == "CheXpert-v1.0-small"
    assert img.dtype == np.uint8 and img.shape == (40, 32)


def test_check_images_lists_missing_and_unreadable(tmp_path):
    train, valid = chexpert_rows()
    paths = list(train["Path"])
    z = write_chexpert_zip(tmp_path / "c.zip", train, valid, skip_images=(paths[0],),
                           corrupt_images=(paths[1],))
    found, colour = check_images(z, paths)
    bad = dict(found)
    assert bad[paths[0]] == "missing" and bad[paths[1]].startswith("unreadable")
    assert len(bad) == 2 and colour == 0


def test_load_image_array_caches_once_and_workers_agree(tiny_chexpert_zip, tmp_path):
    train, valid = chexpert_rows()
    paths = list(train["Path"]) + list(valid["Path"])
    plain = load_image_array(tiny_chexpert_zip, paths, 16)
    assert plain.shape == (len(paths), 16, 16) and plain.dtype == np.uint8
    cache = tmp_path / "cache"
    first = load_image_array(tiny_chexpert_zip, paths, 16, cache, workers=0)
    stores = list(cache.iterdir())
    assert len(stores) == 1 and np.array_equal(first, plain)
    pixels = stores[0] / "pixels.npy"
    stamp = pixels.stat().st_mtime_ns
    again = load_image_array(tiny_chexpert_zip, paths, 16, cache, workers=0)
    assert pixels.stat().st_mtime_ns == stamp and np.array_equal(again, plain)
    parallel = load_image_array(tiny_chexpert_zip, paths * 30, 16, None, workers=2)
    assert np.array_equal(parallel[: len(paths)], plain) and np.array_equal(parallel[-len(paths):], plain)
    other = load_image_array(tiny_chexpert_zip, paths[:3], 16, cache)
    assert list(cache.iterdir()) == stores and np.array_equal(other, plain[:3])


def count_decodes(monkeypatch) -> list:
    """Patch the decoder to record each call (same process: workers <= 1)."""
    calls = []
    real = zipimages.decode_image
    monkeypatch.setattr(zipimages, "decode_image",
                        lambda data, size=None: calls.append(size) or real(data, size))
    return calls


@pytest.mark.parametrize("workers", [0, 2])
def test_path_lists_share_one_store_and_only_new_members_are_decoded(tmp_path, monkeypatch, workers):
    train, valid = chexpert_rows()
    z = write_chexpert_zip(tmp_path / "c.zip", train, valid)
    paths = list(train["Path"]) + list(valid["Path"])
    plain = load_image_array(z, paths, 16)
    calls = count_decodes(monkeypatch)
    cache = tmp_path / "cache"
    a = load_image_array(z, paths[:5], 16, cache, workers)
    b = load_image_array(z, paths[3:9][::-1] + paths[3:4], 16, cache, workers)   # overlap, reordered
    assert len(list(cache.iterdir())) == 1
    assert np.array_equal(a, plain[:5]) and np.array_equal(b, np.concatenate([plain[3:9][::-1], plain[3:4]]))
    if workers <= 1:
        assert len(calls) == 5 + 4          # the second list decoded only its 4 new members
    calls.clear()
    c = load_image_array(z, paths[::-1], 16, cache, workers)   # valid in any order: the same store
    assert np.array_equal(c, plain[::-1]) and len(list(cache.iterdir())) == 1
    if workers <= 1:
        assert len(calls) == len(paths) - 9
        calls.clear()
        load_image_array(z, paths, 16, cache, workers)
        assert calls == []
    assert load_image_array(z, paths, 8, cache).shape == (len(paths), 8, 8)   # another size: its own store
    assert len(list(cache.iterdir())) == 2
    with pytest.raises(ChexopsError, match="not in .*re-run `dvc repro clean`"):
        load_image_array(z, ["CheXpert-v1.0-small/train/nope.jpg"], 16, cache)


def test_store_is_sparse_and_fills_only_what_was_asked(tmp_path):
    train, valid = chexpert_rows()
    z = write_chexpert_zip(tmp_path / "c.zip", train, valid)
    paths = list(train["Path"]) + list(valid["Path"])
    load_image_array(z, paths[:2], 16, tmp_path / "cache")
    (store,) = (tmp_path / "cache").iterdir()
    members = (store / "members.txt").read_text().splitlines()
    assert members == sorted(paths) and np.load(store / "filled.npy").sum() == 2
    assert np.load(store / "pixels.npy", mmap_mode="r").shape == (len(paths), 16, 16)


def test_image_store_gives_slots_without_a_copy(tiny_chexpert_zip, tmp_path):
    paths = list(chexpert_rows()[0]["Path"])[::-1]
    pixels, slots = image_store(tiny_chexpert_zip, paths, 16, tmp_path / "cache")
    assert isinstance(pixels, np.memmap) and np.array_equal(pixels[slots], load_image_array(
        tiny_chexpert_zip, paths, 16))
    with pytest.raises(ChexopsError, match="not an image member"):
        image_store(tiny_chexpert_zip, ["CheXpert-v1.0-small/train.csv"], 16, tmp_path / "cache")


def test_member_without_an_image_extension_is_decoded_uncached(tmp_path):
    train, valid = chexpert_rows()
    z = write_chexpert_zip(tmp_path / "c.zip", train, valid)
    odd = "CheXpert-v1.0-small/train/odd.jfif"
    with zipfile.ZipFile(z, "a") as zf:
        zf.writestr(odd, jpeg_bytes(7))
    paths = [train["Path"][0], odd, train["Path"][1]]
    assert np.array_equal(load_image_array(z, paths, 16, tmp_path / "cache"), load_image_array(z, paths, 16))


def _fill_in_child(args):
    z, paths, cache = args
    return np.asarray(load_image_array(z, paths, 16, cache)).sum()


def test_processes_filling_one_store_at_once_agree(tmp_path):
    import multiprocessing

    train, valid = chexpert_rows()
    z = write_chexpert_zip(tmp_path / "c.zip", train, valid)
    paths = list(train["Path"]) + list(valid["Path"])
    jobs = [(z, paths[i % 3::2], tmp_path / "cache") for i in range(6)]
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        sums = pool.map(_fill_in_child, jobs)
    plain = load_image_array(z, paths, 16)
    assert sums == [plain[i % 3::2].sum() for i in range(6)]
    (store,) = (tmp_path / "cache").iterdir()
    assert np.load(store / "filled.npy").all()
    assert np.array_equal(load_image_array(z, paths, 16, tmp_path / "cache"), plain)


def test_mtime_change_alone_reuses_the_store(tmp_path, monkeypatch):
    train, valid = chexpert_rows()
    z = write_chexpert_zip(tmp_path / "c.zip", train, valid)
    paths = list(train["Path"][:4])
    a = load_image_array(z, paths, 8, tmp_path / "cache")
    st = z.stat()
    os.utime(z, ns=(st.st_atime_ns, st.st_mtime_ns + 10**12))      # e.g. a `dvc checkout` copy
    copy = tmp_path / "elsewhere" / "c.zip"
    copy.parent.mkdir()
    shutil.copy(z, copy)
    calls = count_decodes(monkeypatch)
    assert np.array_equal(load_image_array(z, paths, 8, tmp_path / "cache"), a)
    assert np.array_equal(load_image_array(copy, paths, 8, tmp_path / "cache"), a)
    assert calls == [] and len(list((tmp_path / "cache").iterdir())) == 1


def test_changed_image_content_gets_a_new_store(tmp_path):
    train, valid = chexpert_rows()
    paths = list(train["Path"][:3])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    z = write_chexpert_zip(tmp_path / "a" / "c.zip", train, valid)
    a = np.array(load_image_array(z, paths, 8, tmp_path / "cache"))
    # same member names, one image re-encoded (different CRC)
    z2 = write_chexpert_zip(tmp_path / "b" / "c.zip", train, valid, skip_images=(paths[1],))
    with zipfile.ZipFile(z2, "a") as zf:
        zf.writestr(paths[1], jpeg_bytes(999))
    with zipfile.ZipFile(z) as za, zipfile.ZipFile(z2) as zb:
        assert sorted(za.namelist()) == sorted(zb.namelist())
    b = load_image_array(z2, paths, 8, tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 2
    assert np.array_equal(a[[0, 2]], b[[0, 2]]) and not np.array_equal(a[1], b[1])
    assert np.array_equal(b, load_image_array(z2, paths, 8))


def test_decoder_version_is_part_of_the_key(tiny_chexpert_zip, tmp_path, monkeypatch):
    paths = list(chexpert_rows()[0]["Path"][:2])
    load_image_array(tiny_chexpert_zip, paths, 8, tmp_path / "cache")
    monkeypatch.setattr(images, "DECODER_VERSION", images.DECODER_VERSION + 1)
    load_image_array(tiny_chexpert_zip, paths, 8, tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_experiment_workspace_uses_the_main_repo_cache(tmp_path):
    from chexops.paths import image_cache_dir

    repo = tmp_path / "repo"
    temp = repo / ".dvc" / "tmp" / "exps" / "x"
    temp.mkdir(parents=True)
    assert image_cache_dir(temp) == (repo / "data" / "cache").resolve()
    assert image_cache_dir(repo) == (repo / "data" / "cache").resolve()


def test_load_image_array_refuses_unsafe_paths_before_writing(tiny_chexpert_zip, tmp_path):
    with pytest.raises(ChexopsError, match="escapes the data root"):
        load_image_array(tiny_chexpert_zip, ["CheXpert-v1.0-small/../x.jpg"], 16, tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


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
    assert check_images(z, [victim]) == ([], 0)       # the fast check cannot see it
    with ZipImages(z) as zi:
        for size in (None, 16):
            with pytest.raises(ChexopsError) as info:
                zi.read(victim, size)
            msg = str(info.value)
            assert msg.startswith(f"{victim} in {z} cannot be decoded (image is truncated or "
                                  f"corrupt (OSError: ")
            assert "set clean.image_check: full and re-run `dvc repro clean`" in msg
            assert "fix or remove the file in the data source" in msg and "\n" not in msg
            assert info.value.__cause__ is None


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_jpeg_stops_the_image_cache_marking_it_unfilled(tmp_path, workers):
    z, victim, paths = truncated_zip(tmp_path)
    cache = tmp_path / "cache"
    with pytest.raises(ChexopsError, match=f"{victim} in .* cannot be decoded"):
        load_image_array(z, paths * 30, 16, cache, workers=workers)
    (store,) = cache.iterdir()
    members = (store / "members.txt").read_text().splitlines()
    assert not np.load(store / "filled.npy")[members.index(victim)]   # never served as pixels
    with pytest.raises(ChexopsError, match="cannot be decoded"):
        load_image_array(z, [victim], 16, cache)
    good = [p for p in paths if p != victim]
    assert np.array_equal(load_image_array(z, good, 16, cache), load_image_array(z, good, 16))


def test_garbage_member_is_a_chexops_error_too(tmp_path):
    train, valid = chexpert_rows()
    z = write_chexpert_zip(tmp_path / "c.zip", train, valid, corrupt_images=(train["Path"][1],))
    with ZipImages(z) as zi, pytest.raises(ChexopsError, match="UnidentifiedImageError"):
        zi.read(train["Path"][1])


def test_train_round_rows_index_the_memory_mapped_store_without_a_copy(tmp_path, tiny_chexpert_zip):
    """An oversampled training table: rows point into the shared store (no per-round copy of
    the images), and each row sees the same pixels a direct decode gives."""
    import pandas as pd

    from chexops import paths
    from chexops.stages import train_round
    from chexops.training import rounds
    from tests.stages.test_train_round import params

    (tmp_path / paths.RAW_ZIP).parent.mkdir(parents=True)
    shutil.copy(tiny_chexpert_zip, tmp_path / paths.RAW_ZIP)
    with zipfile.ZipFile(tiny_chexpert_zip) as zf:
        members = sorted(n for n in zf.namelist() if n.endswith(".jpg"))[:3]
    rows = [members[0], members[1], members[1], members[2], members[0]]
    df = pd.DataFrame({"Path": rows, "Cardiomegaly": [1.0, 0.0, 0.0, 1.0, 1.0]})
    data = rounds.array_set(params(), tmp_path, df)
    assert isinstance(data.images, np.memmap)
    got = data.images[data.image_rows(np.arange(len(rows)))]
    want = load_image_array(tmp_path / paths.RAW_ZIP, rows, 32)  # no cache: a plain decode
    assert np.array_equal(got, want)
