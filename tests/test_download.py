"""The download stage: synthetic, local folder, local zip and URL sources; every bad input."""
from __future__ import annotations

import errno
import hashlib
import http.server
import shutil
import threading
import time
import zipfile

import pandas as pd
import pytest

from chexops.data import download
from chexops.errors import ChexopsError
from tests.helpers import TINY_SYNTHETIC, make_params, write_chexpert_zip


def params_for(source, **data):
    return make_params({"data": {"source": str(source), "synthetic": TINY_SYNTHETIC, **data}})


def md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def assert_raw_untouched(root, before=None):
    """data/raw is what it was (absent, or the previous zip); no temp folders are left."""
    raw = root / "data/raw"
    if before is None:
        assert not raw.exists()
    else:
        assert md5(raw / "chexpert.zip") == before
    assert [p.name for p in (root / "data").iterdir()] in ([], ["raw"]) if (root / "data").exists() else True


def test_synthetic_source_writes_zip_and_truth_deterministically(tmp_path, stage_runs):
    download.main(params_for("synthetic"), tmp_path)
    raw = tmp_path / "data/raw"
    assert sorted(p.name for p in raw.iterdir()) == ["chexpert.zip", "synthetic_truth.parquet"]
    first = md5(raw / "chexpert.zip")
    download.main(params_for("synthetic"), tmp_path)
    assert md5(raw / "chexpert.zip") == first
    run = stage_runs[0][1]
    assert run.params["source"] == "synthetic" and run.metrics["images"] == len(
        pd.read_parquet(raw / "synthetic_truth.parquet"))


@pytest.fixture()
def chexpert_folder(tmp_path, tiny_chexpert_zip):
    dest = tmp_path / "user"
    with zipfile.ZipFile(tiny_chexpert_zip) as zf:
        zf.extractall(dest)
    return dest


def snapshot(folder):
    return {p: (p.stat().st_mtime_ns, md5(p)) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("inner", [False, True])
def test_local_folder_is_packed_without_touching_it(tmp_path, stage_runs, chexpert_folder, inner):
    source = chexpert_folder / "CheXpert-v1.0-small" if inner else chexpert_folder
    before = snapshot(chexpert_folder)
    root = tmp_path / "repo"
    download.main(params_for(source), root)
    assert snapshot(chexpert_folder) == before
    with zipfile.ZipFile(root / "data/raw/chexpert.zip") as zf:
        names = set(zf.namelist())
    assert {"CheXpert-v1.0-small/train.csv", "CheXpert-v1.0-small/valid.csv"} <= names
    assert len([n for n in names if n.endswith(".jpg")]) == 18
    assert stage_runs[0][1].metrics["train_rows"] == 12
    first = md5(root / "data/raw/chexpert.zip")
    download.main(params_for(source), root)
    assert md5(root / "data/raw/chexpert.zip") == first


def test_local_zip_is_validated_and_copied(tmp_path, stage_runs, tiny_chexpert_zip):
    download.main(params_for(tiny_chexpert_zip), tmp_path / "repo")
    assert md5(tmp_path / "repo/data/raw/chexpert.zip") == md5(tiny_chexpert_zip)
    assert stage_runs[0][1].params["source"] == "local"


def bad_zip(tmp_path, kind):
    path = tmp_path / f"{kind}.zip"
    if kind == "not-zip":
        path.write_bytes(b"plain text")
    elif kind == "not-chexpert":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("photos/cat.jpg", b"x")
    elif kind == "zip-slip":
        write_chexpert_zip(path, extra={"CheXpert-v1.0-small/../../evil.sh": b"rm -rf"})
    elif kind == "absolute":
        write_chexpert_zip(path, extra={"/etc/cron.d/evil": b"x"})
    return path


@pytest.mark.parametrize("kind, message", [("not-zip", "is not a zip file"),
                                           ("not-chexpert", "is not CheXpert: no CheXpert-v1.0-small/train.csv"),
                                           ("zip-slip", "zip-slip"), ("absolute", "zip-slip")])
def test_bad_zips_are_refused_leaving_previous_data(tmp_path, stage_runs, tiny_chexpert_zip, kind, message):
    root = tmp_path / "repo"
    download.main(params_for(tiny_chexpert_zip), root)
    before = md5(root / "data/raw/chexpert.zip")
    with pytest.raises(ChexopsError, match=message) as info:
        download.main(params_for(bad_zip(tmp_path, kind)), root)
    assert "\n" not in str(info.value)
    assert_raw_untouched(root, before)


def test_missing_path_and_non_chexpert_folder(tmp_path, stage_runs):
    with pytest.raises(ChexopsError, match="does not exist; give an existing CheXpert"):
        download.main(params_for(tmp_path / "nope"), tmp_path / "repo")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ChexopsError, match="holds no CheXpert-v1.0-small/"):
        download.main(params_for(tmp_path / "empty"), tmp_path / "repo")
    assert not (tmp_path / "repo/data/raw").exists()
    assert not list((tmp_path / "repo/data").glob(".raw*"))


def test_disk_full_gives_a_clear_error_and_no_partial_output(tmp_path, stage_runs, tiny_chexpert_zip, monkeypatch):
    def full(src, dst, *a, **k):
        with open(dst, "wb") as fh:
            fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", full)
    with pytest.raises(ChexopsError, match="disk full while writing data/raw; free space"):
        download.main(params_for(tiny_chexpert_zip), tmp_path / "repo")
    assert list((tmp_path / "repo/data").iterdir()) == []


# ---------------------------------------------------------------- URL source, loopback server

@pytest.fixture()
def server(tiny_chexpert_zip):
    body = tiny_chexpert_zip.read_bytes()
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            if self.path.startswith("/slow"):
                time.sleep(1.5)
            if not self.path.startswith(("/chexpert.zip", "/slow")):
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield {"base": f"http://127.0.0.1:{httpd.server_address[1]}", "hits": hits, "sha": hashlib.sha256(body).hexdigest()}
    httpd.shutdown()
    httpd.server_close()


def test_url_download_verifies_checksum_and_redacts_the_token(tmp_path, stage_runs, server, monkeypatch, capsys):
    monkeypatch.setenv("CHEXPERT_URL", f"{server['base']}/chexpert.zip?token=SECRET123&sig=abc")
    download.main(params_for("url", sha256=server["sha"]), tmp_path)
    assert hashlib.sha256((tmp_path / "data/raw/chexpert.zip").read_bytes()).hexdigest() == server["sha"]
    out = capsys.readouterr()
    assert f"{server['base']}/chexpert.zip?***" in out.out
    assert "SECRET123" not in out.out + out.err + repr(stage_runs[0][1].params)


def test_url_checksum_mismatch(tmp_path, stage_runs, server, monkeypatch):
    monkeypatch.setenv("CHEXPERT_URL", f"{server['base']}/chexpert.zip?token=SECRET123")
    with pytest.raises(ChexopsError, match="checksum mismatch .* expected 0{64}; re-download") as info:
        download.main(params_for("url", sha256="0" * 64), tmp_path)
    assert "SECRET123" not in str(info.value)
    assert_raw_untouched(tmp_path)


def test_url_404_fails_at_once(tmp_path, stage_runs, server, monkeypatch):
    monkeypatch.setenv("CHEXPERT_URL", f"{server['base']}/gone.zip?token=SECRET123")
    with pytest.raises(ChexopsError, match=r"gone.zip\?\*\*\* answered HTTP 404 .* check \$CHEXPERT_URL"):
        download.main(params_for("url"), tmp_path)
    assert len(server["hits"]) == 1
    assert_raw_untouched(tmp_path)


def test_url_timeout_retries_with_backoff(tmp_path, stage_runs, server, monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr(download, "_sleep", waits.append)
    monkeypatch.setenv("CHEXPERT_URL", f"{server['base']}/slow.zip")
    with pytest.raises(ChexopsError, match=r"failed \(timed out\) after 3 attempt"):
        download.main(params_for("url", retries=3, timeout_s=0.3), tmp_path)
    assert waits == [1.0, 2.0] and len(server["hits"]) == 3
    assert_raw_untouched(tmp_path)


def test_url_source_needs_the_environment_variable(tmp_path, stage_runs, monkeypatch):
    monkeypatch.delenv("CHEXPERT_URL", raising=False)
    with pytest.raises(ChexopsError, match=r"\$CHEXPERT_URL is not set; export CHEXPERT_URL="):
        download.main(params_for("url"), tmp_path)


def test_redact_url_drops_credentials_query_and_fragment():
    assert download.redact_url("https://u:p@host:8443/a/b.zip?sig=1#f") == "https://host:8443/a/b.zip?***"
    assert download.redact_url("https://host/x.zip") == "https://host/x.zip"
