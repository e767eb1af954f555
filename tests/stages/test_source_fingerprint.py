"""The source-fingerprint stage in a real DVC repository (this one's dvc.yaml and code, a tiny
local CheXpert source): `dvc repro download` re-runs download when the source changed (a label
fixed in a folder's train.csv, a zip replaced in place) and leaves it and data/raw untouched
when it did not."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile

import pytest

from tests.pipeline_repo import VENV_BIN, make_repo_copy, pipeline_env, reduced_params, run


def dvc_repro_download(repo) -> str:
    return run([str(VENV_BIN / "dvc"), "repro", "download"], repo, pipeline_env(), timeout=600).stdout


def raw_state(repo) -> tuple[str, int]:
    zip_path = repo / "data/raw/chexpert.zip"
    return hashlib.md5(zip_path.read_bytes()).hexdigest(), zip_path.stat().st_mtime_ns


def fix_a_label(csv) -> None:
    """What the field did: one label corrected in place (same size, a later mtime)."""
    data = csv.read_bytes()
    assert b",1.0" in data
    st = csv.stat()
    csv.write_bytes(data.replace(b",1.0", b",0.0", 1))
    os.utime(csv, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_dvc_repro_notices_a_changed_source_and_skips_an_unchanged_one(tmp_path, kind,
                                                                       tiny_chexpert_zip):
    if kind == "folder":
        source = tmp_path / "user"
        with zipfile.ZipFile(tiny_chexpert_zip) as zf:
            zf.extractall(source)
    else:
        source = tmp_path / "CheXpert-v1.0-small.zip"
        shutil.copy(tiny_chexpert_zip, source)
    params = reduced_params({"data": {"source": str(source)}})
    repo = make_repo_copy(tmp_path / "repo", params)

    out = dvc_repro_download(repo)
    assert "Running stage 'source-fingerprint'" in out and "Running stage 'download'" in out
    first = raw_state(repo)

    lock = (repo / "dvc.lock").read_text()
    out = dvc_repro_download(repo)   # nothing changed: the fingerprint stage only
    assert "Running stage 'source-fingerprint'" in out, out
    assert "Running stage 'download'" not in out and "'download' didn't change" in out, out
    assert raw_state(repo) == first and (repo / "dvc.lock").read_text() == lock
    status = run([str(VENV_BIN / "dvc"), "status", "--json", "--with-deps", "download"], repo,
                 pipeline_env())
    assert json.loads(status.stdout) == {"source-fingerprint": ["always changed"]}

    if kind == "folder":
        fix_a_label(source / "CheXpert-v1.0-small/train.csv")
    else:
        with zipfile.ZipFile(tiny_chexpert_zip) as zf:
            members = {n: zf.read(n) for n in zf.namelist()}
        csv = "CheXpert-v1.0-small/train.csv"
        members[csv] = members[csv].replace(b",1.0", b",0.0", 1)
        new = tmp_path / "new.zip"
        with zipfile.ZipFile(new, "w") as zf:
            for name, data in members.items():
                zf.writestr(name, data)
        os.replace(new, source)        # replaced in place, under the same name
    out = dvc_repro_download(repo)
    assert "Running stage 'download'" in out, out
    assert raw_state(repo)[0] != first[0]
    with zipfile.ZipFile(repo / "data/raw/chexpert.zip") as zf:
        assert b",0.0" in zf.read("CheXpert-v1.0-small/train.csv")
    assert "'download' didn't change" in dvc_repro_download(repo)
