"""The download stage: synthetic, local folder, local zip and URL sources; every bad input."""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import http.server
import shutil
import threading
import time
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import requests
import yaml

from chexops.data import download
from chexops.data.synthetic.generate import generate_zip
from chexops.errors import ChexopsError
from chexops.stages import download as download_stage
from tests.helpers import TINY_SYNTHETIC, chexpert_rows, csv_text, make_params, write_chexpert_zip


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
    download_stage.main(params_for("synthetic"), tmp_path)
    raw = tmp_path / "data/raw"
    assert sorted(p.name for p in raw.iterdir()) == ["chexpert.zip", "synthetic_truth.parquet"]
    first = md5(raw / "chexpert.zip")
    download_stage.main(params_for("synthetic"), tmp_path)
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
    download_stage.main(params_for(source), root)
    assert snapshot(chexpert_folder) == before
    with zipfile.ZipFile(root / "data/raw/chexpert.zip") as zf:
        names = set(zf.namelist())
    assert {"CheXpert-v1.0-small/train.csv", "CheXpert-v1.0-small/valid.csv"} <= names
    assert len([n for n in names if n.endswith(".jpg")]) == 18
    assert stage_runs[0][1].metrics["train_rows"] == 12
    first = md5(root / "data/raw/chexpert.zip")
    download_stage.main(params_for(source), root)
    assert md5(root / "data/raw/chexpert.zip") == first


def test_local_zip_is_validated_and_copied(tmp_path, stage_runs, tiny_chexpert_zip):
    download_stage.main(params_for(tiny_chexpert_zip), tmp_path / "repo")
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
                                           ("not-chexpert",
                                            "is not CheXpert: no CheXpert-v1.0-small/train.csv"),
                                           ("zip-slip", "zip-slip"), ("absolute", "zip-slip")])
def test_bad_zips_are_refused_leaving_previous_data(tmp_path, stage_runs, tiny_chexpert_zip, kind, message):
    root = tmp_path / "repo"
    download_stage.main(params_for(tiny_chexpert_zip), root)
    before = md5(root / "data/raw/chexpert.zip")
    with pytest.raises(ChexopsError, match=message) as info:
        download_stage.main(params_for(bad_zip(tmp_path, kind)), root)
    assert "\n" not in str(info.value)
    assert_raw_untouched(root, before)


def test_missing_path_and_non_chexpert_folder(tmp_path, stage_runs):
    with pytest.raises(ChexopsError, match="does not exist; give an existing CheXpert"):
        download_stage.main(params_for(tmp_path / "nope"), tmp_path / "repo")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ChexopsError, match="holds no CheXpert-v1.0-small/"):
        download_stage.main(params_for(tmp_path / "empty"), tmp_path / "repo")
    assert not (tmp_path / "repo/data/raw").exists()
    assert not list((tmp_path / "repo/data").glob(".raw*"))


def test_disk_full_gives_a_clear_error_and_no_partial_output(tmp_path, stage_runs, tiny_chexpert_zip,
                                                             monkeypatch):
    def full(src, dst, *a, **k):
        with open(dst, "wb") as fh:
            fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", full)
    with pytest.raises(ChexopsError, match="disk full while writing data/raw; free space"):
        download_stage.main(params_for(tiny_chexpert_zip), tmp_path / "repo")
    assert list((tmp_path / "repo/data").iterdir()) == []


# ---------------------------------------------------------------- URL source, loopback server

@pytest.fixture()
def server(tiny_chexpert_zip):
    """/chexpert.zip: the zip; /slow: headers after 1.5 s; /short: half the body, then the
    connection closes; /flaky: HTTP 503 on the first request, the zip after; /loop: redirects
    to itself (with a token in the Location); anything else: 404."""
    body = tiny_chexpert_zip.read_bytes()
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            if self.path.startswith("/slow"):
                time.sleep(1.5)
            if self.path.startswith("/loop"):
                self.send_response(302)
                self.send_header("Location", "/loop?token=SECRET123")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if self.path.startswith("/flaky") and len([h for h in hits if h.startswith("/flaky")]) == 1:
                self.send_error(503)
                return
            if not self.path.startswith(("/chexpert.zip", "/slow", "/short", "/flaky")):
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2] if self.path.startswith("/short") else body)
            self.close_connection = True

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.handle_error = lambda request, address: None   # a client that gave up: not news
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield {"base": f"http://127.0.0.1:{httpd.server_address[1]}", "hits": hits,
           "sha": hashlib.sha256(body).hexdigest()}
    httpd.shutdown()
    httpd.server_close()


def test_url_download_verifies_checksum_and_redacts_the_token(tmp_path, stage_runs, server, monkeypatch,
                                                             capsys):
    monkeypatch.setenv("CHEXPERT_URL", f"{server['base']}/chexpert.zip?token=SECRET123&sig=abc")
    download_stage.main(params_for("url", sha256=server["sha"]), tmp_path)
    assert hashlib.sha256((tmp_path / "data/raw/chexpert.zip").read_bytes()).hexdigest() == server["sha"]
    out = capsys.readouterr()
    assert f"{server['base']}/chexpert.zip?***" in out.out
    assert "SECRET123" not in out.out + out.err + repr(stage_runs[0][1].params)


def test_url_checksum_mismatch(tmp_path, stage_runs, server, monkeypatch):
    monkeypatch.setenv("CHEXPERT_URL", f"{server['base']}/chexpert.zip?token=SECRET123")
    with pytest.raises(ChexopsError, match="checksum mismatch .* expected 0{64}; re-download") as info:
        download_stage.main(params_for("url", sha256="0" * 64), tmp_path)
    assert "SECRET123" not in str(info.value)
    assert_raw_untouched(tmp_path)


def test_url_404_fails_at_once(tmp_path, stage_runs, server, monkeypatch):
    monkeypatch.setenv("CHEXPERT_URL", f"{server['base']}/gone.zip?token=SECRET123")
    with pytest.raises(ChexopsError, match=r"gone.zip\?\*\*\* answered HTTP 404 .* check \$CHEXPERT_URL"):
        download_stage.main(params_for("url"), tmp_path)
    assert len(server["hits"]) == 1
    assert_raw_untouched(tmp_path)


def test_url_timeout_retries_with_backoff(tmp_path, stage_runs, server, monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr(download, "_sleep", waits.append)
    monkeypatch.setenv("CHEXPERT_URL", f"{server['base']}/slow.zip")
    with pytest.raises(ChexopsError, match=r"failed \(timed out\) after 3 attempt"):
        download_stage.main(params_for("url", retries=3, timeout_s=0.3), tmp_path)
    assert waits == [1.0, 2.0] and len(server["hits"]) == 3
    assert_raw_untouched(tmp_path)


def test_url_source_needs_the_environment_variable(tmp_path, stage_runs, monkeypatch):
    monkeypatch.delenv("CHEXPERT_URL", raising=False)
    with pytest.raises(ChexopsError, match=r"\$CHEXPERT_URL is not set; export CHEXPERT_URL="):
        download_stage.main(params_for("url"), tmp_path)


def test_redact_url_drops_credentials_query_and_fragment():
    assert download.redact_url("https://u:p@host:8443/a/b.zip?sig=1#f") == "https://host:8443/a/b.zip?***"
    assert download.redact_url("https://host/x.zip") == "https://host/x.zip"


# ---------------------------------------------------------------- broken transfers, redaction

def no_secret(*texts) -> bool:
    return not any("SECRET123" in t for t in texts)


def test_body_cut_short_is_retried_then_one_clean_line(tmp_path, stage_runs, server, monkeypatch, capsys):
    waits: list[float] = []
    monkeypatch.setattr(download, "_sleep", waits.append)
    monkeypatch.setenv("CHEXPERT_URL", f"{server['base']}/short.zip?token=SECRET123")
    with pytest.raises(ChexopsError, match=r"short.zip\?\*\*\* failed \(connection (broken mid-download|"
                                           r"closed after \d+ of \d+ bytes)\) after 3 attempt\(s\); "
                                           r"check the link and network") as info:
        download_stage.main(params_for("url", retries=3), tmp_path)
    assert "\n" not in str(info.value) and info.value.__cause__ is None
    assert waits == [1.0, 2.0] and len(server["hits"]) == 3
    out = capsys.readouterr()
    assert no_secret(str(info.value), out.out, out.err)
    assert_raw_untouched(tmp_path)
    assert not list((tmp_path / "data").rglob("*.part")) and not list((tmp_path / "data").rglob("*.zip"))


def test_a_5xx_is_retried_and_the_retry_succeeds(tmp_path, stage_runs, server, monkeypatch, capsys):
    waits: list[float] = []
    monkeypatch.setattr(download, "_sleep", waits.append)
    monkeypatch.setenv("CHEXPERT_URL", f"{server['base']}/flaky.zip?token=SECRET123")
    download_stage.main(params_for("url", retries=3, sha256=server["sha"]), tmp_path)
    assert hashlib.sha256((tmp_path / "data/raw/chexpert.zip").read_bytes()).hexdigest() == server["sha"]
    assert waits == [1.0] and len(server["hits"]) == 2
    out = capsys.readouterr().out
    assert "attempt 1 failed (HTTP 503); retrying in 1 s" in out and no_secret(out)
    assert sorted(p.name for p in (tmp_path / "data/raw").iterdir()) == ["chexpert.zip"]


def test_redirect_loop_fails_at_once_without_the_token(tmp_path, stage_runs, server, monkeypatch, capsys):
    waits: list[float] = []
    monkeypatch.setattr(download, "_sleep", waits.append)
    monkeypatch.setenv("CHEXPERT_URL", f"{server['base']}/loop.zip?token=SECRET123")
    with pytest.raises(ChexopsError, match=r"failed \(too many redirects\); the link loops") as info:
        download_stage.main(params_for("url", retries=3), tmp_path)
    assert waits == [] and "\n" not in str(info.value)
    out = capsys.readouterr()
    assert no_secret(str(info.value), out.out, out.err)
    assert_raw_untouched(tmp_path)


class FakeResponse:
    """A streamed response whose body stops short of its Content-Length (no urllib3 check)."""

    def __init__(self, url, chunks, length):
        self.url, self.chunks = url, chunks
        self.headers = {"content-length": str(length)}

    def raise_for_status(self):
        pass

    def iter_content(self, size):
        yield from self.chunks

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_short_read_against_content_length_is_caught_and_no_part_is_left(tmp_path, monkeypatch):
    url = "https://host.example/c.zip?token=SECRET123"
    monkeypatch.setattr(requests, "get", lambda u, **k: FakeResponse(u, [b"x" * 10], 25))
    monkeypatch.setattr(download, "_sleep", lambda s: None)
    with pytest.raises(ChexopsError, match=r"failed \(connection closed after 10 of 25 bytes\) "
                                           r"after 2 attempt") as info:
        download.fetch_with_retries(url, tmp_path / "c.zip", params_for("url", retries=2))
    assert no_secret(str(info.value)) and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("exc, transient, kind", [
    (requests.exceptions.ChunkedEncodingError, True, "connection broken mid-download"),
    (requests.exceptions.ContentDecodingError, True, "response body could not be decoded"),
    (requests.exceptions.ConnectionError, True, "connection failed"),
    (requests.exceptions.InvalidURL, False, "invalid URL"),
    (requests.exceptions.TooManyRedirects, False, "too many redirects"),
    (requests.exceptions.SSLError, False, "TLS/certificate error"),
    (requests.exceptions.InvalidHeader, False, "request failed (InvalidHeader)"),
])
def test_every_requests_error_is_one_redacted_line(tmp_path, monkeypatch, capsys, exc, transient, kind):
    url = "https://host.example/c.zip?token=SECRET123"

    def boom(u, **k):
        raise exc(f"failed for url: {u}")          # requests quotes the full URL like this

    waits: list[float] = []
    monkeypatch.setattr(requests, "get", boom)
    monkeypatch.setattr(download, "_sleep", waits.append)
    with pytest.raises(ChexopsError) as info:
        download.fetch_with_retries(url, tmp_path / "c.zip", params_for("url", retries=2))
    msg = str(info.value)
    assert f"({kind})" in msg and "https://host.example/c.zip?***" in msg and "\n" not in msg
    assert waits == ([1.0] if transient else [])
    out = capsys.readouterr()
    assert no_secret(msg, out.out, out.err) and list(tmp_path.iterdir()) == []


def test_url_in_data_source_is_refused_redacted(tmp_path, stage_runs):
    url = "https://host.example/CheXpert-v1.0-small.zip?token=SECRET123"
    with pytest.raises(ChexopsError, match=r"data.source: a URL \(https://host.example/"
                                           r"CheXpert-v1.0-small.zip\?\*\*\*\) does not belong") as info:
        params_for(url)                                   # load-time check (config)
    assert "export CHEXPERT_URL=" in str(info.value) and "set data.source: url" in str(info.value)
    params = make_params({"data": {"url_env": "MY_LINK"}})
    params = dataclasses.replace(params, data=dataclasses.replace(params.data, source=url))
    with pytest.raises(ChexopsError, match="export MY_LINK=.* set data.source: url") as info:
        download_stage.main(params, tmp_path)                   # and the stage's own guard
    assert no_secret(str(info.value)) and "\n" not in str(info.value)
    assert not (tmp_path / "data/raw").exists()


@pytest.mark.parametrize("url", ["http://example.com/c.zip?token=SECRET123",
                                 "http://10.0.0.5:8080/c.zip?token=SECRET123"])
def test_plain_http_is_refused_unless_loopback(tmp_path, stage_runs, monkeypatch, url):
    monkeypatch.setenv("CHEXPERT_URL", url)
    plain = r"\$CHEXPERT_URL is a plain http:// URL .* use the https:// link"
    with pytest.raises(ChexopsError, match=plain) as info:
        download_stage.main(params_for("url"), tmp_path)
    assert no_secret(str(info.value))
    assert_raw_untouched(tmp_path)


def test_loopback_hosts():
    for host in ("localhost", "127.0.0.1", "127.8.9.10", "::1", "LOCALHOST"):
        assert download.is_loopback(host), host
    for host in ("example.com", "10.0.0.1", "128.0.0.1", "localhost.evil.com", "", None):
        assert not download.is_loopback(host), host


# ---------------------------------------------------------------- the synthetic seed, DVC params

def test_synthetic_data_follows_its_own_seed_not_the_training_seed(tmp_path, stage_runs):
    download_stage.main(params_for("synthetic"), tmp_path / "a")
    assert make_params().data.synthetic.seed == 42
    direct = make_params({"data": {"synthetic": TINY_SYNTHETIC}}).data.synthetic
    generate_zip(direct, 42, tmp_path / "direct.zip", tmp_path / "direct.parquet")
    base = md5(tmp_path / "a/data/raw/chexpert.zip")
    assert base == md5(tmp_path / "direct.zip")          # seed 42: the data as before
    other_seed = make_params({"seed": 7, "data": {"source": "synthetic", "synthetic": TINY_SYNTHETIC}})
    download_stage.main(other_seed, tmp_path / "b")
    assert md5(tmp_path / "b/data/raw/chexpert.zip") == base
    download_stage.main(params_for("synthetic", synthetic={**TINY_SYNTHETIC, "seed": 43}), tmp_path / "c")
    assert md5(tmp_path / "c/data/raw/chexpert.zip") != base


def test_download_stage_depends_only_on_keys_that_change_the_zip():
    repo = Path(__file__).resolve().parents[2]
    stage = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]["download"]
    listed = set(stage["params"])
    synthetic = {f"data.synthetic.{k}" for k in yaml.safe_load(
        (repo / "params.yaml").read_text())["data"]["synthetic"] if k != "workers"}
    assert listed == {"data.source", "data.sha256", "data.url_env"} | synthetic
    assert "data.synthetic.seed" in listed


# ---------------------------------------------------------------- counting rows

@pytest.mark.parametrize("text, rows", [("a,b\n1,2\n3,4\n", 2), ("a,b\n1,2\n3,4", 2), ("a,b\n", 0),
                                        ("a,b", 0), ("", 0), ("a,b\r\n1,2\r\n3,4", 2),
                                        ('a,b\n"x\ny",2\n\n3,4', 2)])
def test_csv_rows_counts_records_not_newlines(text, rows):
    assert download.csv_rows(text.encode()) == rows


def test_rows_are_counted_without_a_trailing_newline(tmp_path, stage_runs):
    train, valid = chexpert_rows()
    text = csv_text(train).rstrip("\n")
    z = write_chexpert_zip(tmp_path / "c.zip", train, valid, train_csv=text)
    assert not text.endswith("\n")
    download_stage.main(params_for(z), tmp_path / "repo")
    metrics = stage_runs[0][1].metrics
    assert metrics["train_rows"] == len(train) and metrics["valid_rows"] == len(valid)
