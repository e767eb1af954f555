"""CheXpert-sized JPEG bytes: the size the benchmarks claim, the same for any worker count."""
from __future__ import annotations

import io
import zipfile

import fake_jpegs
import numpy as np
from data_bench import build_scale_zip
from PIL import Image


def test_sizes_average_chexpert_smalls_and_images_are_320_wide_greyscale():
    blobs = list(fake_jpegs.jpegs(64, seed=0))
    sizes = np.array([len(b) for b in blobs])
    # log-sd 0.25 over 64 draws: the mean lands within ~3 % of MEAN_BYTES, 15 % is generous
    assert abs(sizes.mean() / fake_jpegs.MEAN_BYTES - 1) < 0.15
    assert sizes.std() > 0.1 * sizes.mean()          # a spread, not one size repeated
    assert len(set(blobs)) == len(blobs)
    with Image.open(io.BytesIO(blobs[0])) as img:
        assert (img.format, img.mode, img.size) == ("JPEG", "L", (320, 389))


def test_bytes_do_not_depend_on_the_worker_count(monkeypatch):
    monkeypatch.setattr(fake_jpegs, "_CHUNK", 4)      # several chunks from a few images
    assert list(fake_jpegs.jpegs(12, seed=3, workers=2)) == list(fake_jpegs.jpegs(12, seed=3))
    assert list(fake_jpegs.jpegs(4, seed=4)) != list(fake_jpegs.jpegs(4, seed=3))


def test_scale_zip_realistic_mode_carries_chexpert_sized_jpegs_and_tiny_mode_one_small_jpeg(tmp_path):
    real = build_scale_zip(tmp_path / "real.zip", 20, "realistic", workers=1)
    tiny = build_scale_zip(tmp_path / "tiny.zip", 20, "tiny")
    for facts, path in ((real, tmp_path / "real.zip"), (tiny, tmp_path / "tiny.zip")):
        with zipfile.ZipFile(path) as zf:
            jpegs = [i for i in zf.infolist() if i.filename.endswith(".jpg")]
        assert facts["jpeg_count"] == len(jpegs) == 20 + 234
        assert facts["jpeg_bytes"] == sum(i.file_size for i in jpegs)
        assert facts["zip_bytes"] == path.stat().st_size
    assert abs(real["mean_jpeg_bytes"] / fake_jpegs.MEAN_BYTES - 1) < 0.15
    assert tiny["mean_jpeg_bytes"] < fake_jpegs.MEAN_BYTES / 10
