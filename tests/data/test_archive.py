"""Zips and folders made by other tools: Windows separators read as folders, archive litter
skipped and counted, real escapes still refused."""
from __future__ import annotations

import hashlib
import zipfile

import pandas as pd
import pytest

from chexops.data.archive import is_litter, place_zip, read_members
from chexops.data.zipimages import ZipImages
from chexops.errors import ChexopsError
from chexops.stages import clean as clean_stage
from chexops.stages import download as download_stage
from tests.helpers import ROOT, chexpert_rows, make_params, write_chexpert_zip

LITTER = {"__MACOSX/CheXpert-v1.0-small/._train.csv": b"\x00\x05\x16\x07",
          "CheXpert-v1.0-small\\.DS_Store": b"Bud1",
          "CheXpert-v1.0-small/train/Thumbs.db": b"\xd0\xcf",
          "CheXpert-v1.0-small/valid/._view1_frontal.jpg": b"\x00\x05"}


def params_for(source):
    return make_params({"data": {"source": str(source)}})


def md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def windows_zip(tmp_path, extra: dict[str, bytes] | None = None):
    """The tiny CheXpert zip as a Windows tool writes it: every name with backslashes, folder
    entries included, plus `extra` entries as given."""
    plain = write_chexpert_zip(tmp_path / "plain.zip")
    path = tmp_path / "windows.zip"
    with zipfile.ZipFile(plain) as zin, zipfile.ZipFile(path, "w") as zout:
        zout.writestr(f"{ROOT}\\", b"")
        zout.writestr(f"{ROOT}\\train\\", b"")
        for name in zin.namelist():
            zout.writestr(name.replace("/", "\\"), zin.read(name))
        for name, data in (extra or {}).items():
            zout.writestr(name, data)
    return path, plain


def test_backslash_names_and_litter_are_read_skipped_and_counted(tmp_path, stage_runs, capsys):
    source, plain = windows_zip(tmp_path, LITTER)
    root = tmp_path / "repo"
    download_stage.main(params_for(source), root)
    raw = root / "data/raw/chexpert.zip"
    with zipfile.ZipFile(raw) as zr, zipfile.ZipFile(plain) as zp:
        assert sorted(zr.namelist()) == sorted(zp.namelist())       # clean names, no litter
        assert all(zr.read(n) == zp.read(n) for n in zp.namelist())
    run = stage_runs[0][1]
    assert run.metrics["skipped_entries"] == len(LITTER)
    assert f"{len(LITTER)} archive litter entries skipped" in capsys.readouterr().out
    clean_stage.main(make_params(), root)                           # and the rest reads it
    train, valid = chexpert_rows()
    labels = pd.read_parquet(root / "data/clean/labels.parquet")
    assert len(labels) == len(train) + len(valid)
    with ZipImages(raw) as zi:
        assert zi.read(train["Path"][0]).shape == (40, 32)


def test_a_clean_zip_is_copied_as_it_is(tmp_path, stage_runs):
    plain = write_chexpert_zip(tmp_path / "plain.zip")
    download_stage.main(params_for(plain), tmp_path / "repo")
    assert md5(tmp_path / "repo/data/raw/chexpert.zip") == md5(plain)
    assert stage_runs[0][1].metrics["skipped_entries"] == 0


@pytest.mark.parametrize("evil", ["..\\..\\evil.jpg", "../x", f"{ROOT}\\..\\..\\evil.jpg",
                                  "C:\\Windows\\evil.jpg", "\\\\server\\share\\x.jpg",
                                  "__MACOSX/../../x"])
def test_real_escapes_are_still_refused(tmp_path, stage_runs, evil):
    source, _ = windows_zip(tmp_path, {evil: b"x"})
    root = tmp_path / "repo"
    with pytest.raises(ChexopsError, match=r"would be written outside the data folder \(zip-slip\)"):
        download_stage.main(params_for(source), root)
    assert not (root / "data/raw").exists()


def test_names_that_collide_once_normalised_are_refused(tmp_path):
    source, _ = windows_zip(tmp_path, {f"{ROOT}/train.csv": b"Path\n"})
    with pytest.raises(ChexopsError, match="appears twice once"):
        read_members(source, "the zip")


def test_a_downloaded_zip_is_rewritten_in_place(tmp_path, capsys):
    source, plain = windows_zip(tmp_path, LITTER)
    assert place_zip(source, "the file from https://example.org/x.zip", source) == len(LITTER)
    with zipfile.ZipFile(source) as zs, zipfile.ZipFile(plain) as zp:
        assert sorted(zs.namelist()) == sorted(zp.namelist())
    assert not list(tmp_path.glob("*.rewrite"))
    assert "rewriting the zip" in capsys.readouterr().out


def test_folder_litter_is_left_out_and_counted(tmp_path, stage_runs, tiny_chexpert_zip):
    folder = tmp_path / "user"
    with zipfile.ZipFile(tiny_chexpert_zip) as zf:
        zf.extractall(folder)
    for name in (f"{ROOT}/.DS_Store", f"{ROOT}/train/Thumbs.db", f"{ROOT}/._train.csv"):
        (folder / name).write_bytes(b"litter")
    download_stage.main(params_for(folder), tmp_path / "repo")
    with zipfile.ZipFile(tmp_path / "repo/data/raw/chexpert.zip") as zf:
        names = zf.namelist()
    assert not any(is_litter(n) for n in names) and len(names) == len(zipfile.ZipFile(
        tiny_chexpert_zip).namelist())
    assert stage_runs[0][1].metrics["skipped_entries"] == 3


@pytest.mark.parametrize("name, litter", [
    ("__MACOSX/a/b.jpg", True), ("x/.DS_Store", True), ("Thumbs.db", True), ("x/._y.jpg", True),
    (f"{ROOT}/train/patient1/study1/view1_frontal.jpg", False), ("x/thumbs.jpg", False)])
def test_litter_names(name, litter):
    assert is_litter(name) is litter
