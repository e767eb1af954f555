"""The loader benchmark: a dry run's JSON, the page-cache eviction the cold case rests on, and
the pixel check that keeps the two loaders comparable."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import loader_bench
import numpy as np
import pagecache
import pytest

from chexops.data.images import load_image_array


def on_tmpfs(path: Path) -> bool:
    """tmpfs pages are the file itself: they cannot be evicted."""
    mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    best = max((m for m in mounts if str(path.resolve()).startswith(m[1])), key=lambda m: len(m[1]))
    return best[2] == "tmpfs"


linux_disk = pytest.mark.skipif(not Path("/proc/mounts").exists() or on_tmpfs(Path(tempfile.gettempdir())),
                                reason="needs Linux and a temporary folder on disk, not tmpfs")


@linux_disk
def test_evict_drops_a_files_pages_from_the_page_cache(tmp_path):
    f = tmp_path / "blob"
    f.write_bytes(os.urandom(4 << 20))
    f.read_bytes()
    assert pagecache.resident(f) > 0.9
    pagecache.evict(tmp_path)
    assert pagecache.resident(f) < 0.01
    f.read_bytes()
    assert pagecache.resident(f) > 0.9


@linux_disk
def test_dry_run_writes_both_cases_with_per_epoch_figures(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    out = tmp_path / "loader.json"
    loader_bench.main(["--images", "24", "--size", "16", "--cold-images", "12", "--cold-size", "32",
                       "--epochs", "2", "--batch", "4", "--jpeg-workers", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert {"cpu_count", "ram_bytes", "platform", "commit"} <= set(result["machine"])
    hot, cold = result["cases"]
    assert (hot["case"], hot["images"], hot["image_size"]) == ("hot", 24, 16)
    assert (cold["case"], cold["images"], cold["image_size"]) == ("cold", 12, 32)
    for case in (hot, cold):
        assert case["pixels_identical"] == case["images"]
        assert case["store_bytes"] >= case["images"] * case["image_size"] ** 2
        for loader in ("per_item", "store"):
            assert [e["epoch"] for e in case[loader]] == [1, 2]
            assert all(e["images"] == case["images"] and e["images_per_s"] > 0 for e in case[loader])
        assert case["store"][0]["fill_s"] > case["store"][1]["fill_s"] >= 0  # epoch 1 decodes
        assert set(case["ratio"]) == {"first_epoch", "later_epochs", "all_epochs"}
    assert hot["cold_probe"] is None and hot["store"][1]["store_resident_at_pass"] == 1.0
    assert cold["cold_probe"]["zip_resident_after_evict"] < 0.01
    assert all(e["resident_after_evict"] < 0.01 for e in cold["store"])
    assert all(e["zip_resident_after_evict"] < 0.01 for e in cold["per_item"])


def test_pixel_check_refuses_a_store_that_differs_from_the_per_item_decoder(tmp_path):
    zip_path = tmp_path / "c.zip"
    members = loader_bench.make_zip(zip_path, 6, workers=1)
    cache = tmp_path / "cache"
    load_image_array(zip_path, members, 16, cache)
    assert loader_bench.identical(zip_path, members, 16, cache) == 6
    pixels_file = next(cache.rglob("pixels.npy"))
    pixels = np.load(pixels_file, mmap_mode="r+")
    pixels[3] ^= 1
    pixels.flush()
    del pixels
    with pytest.raises(SystemExit, match="view1_frontal.jpg: the per-item decoder and the store differ"):
        loader_bench.identical(zip_path, members, 16, cache)


@linux_disk
def test_cold_refuses_to_go_on_when_a_live_memory_map_keeps_the_pages(tmp_path):
    f = tmp_path / "store.npy"
    np.save(f, np.arange(1 << 20, dtype=np.int64))
    mapped = np.load(f, mmap_mode="r")
    assert int(mapped.sum()) > 0                      # every page faulted in and mapped
    with pytest.raises(SystemExit, match="page-cache eviction left"):
        loader_bench.cold([f])
    del mapped
    assert loader_bench.cold([f]) < 0.01
