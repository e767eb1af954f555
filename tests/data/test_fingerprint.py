"""data/fingerprint.py and its stage: a local folder by its listing, a zip by size/mtime then md5,
a URL by the server's validators (a loopback server), a source that is not there now; and the
stage file, rewritten only when the fingerprint changes."""
from __future__ import annotations

import http.server
import json
import os
import shutil
import threading
import time
import zipfile

import pytest

from chexops import hashing, paths
from chexops.data import fingerprint as fp
from chexops.stages import source_fingerprint as stage
from tests.helpers import make_params


def params_for(source, **data):
    return make_params({"data": {"source": str(source), **data}})


@pytest.fixture()
def folder(tmp_path, tiny_chexpert_zip):
    """A user's CheXpert folder (the CheXpert-v1.0-small root inside) and a note beside it."""
    dest = tmp_path / "user"
    with zipfile.ZipFile(tiny_chexpert_zip) as zf:
        zf.extractall(dest)
    (dest / "notes.txt").write_text("not part of the data")
    return dest


def edit_keeping_size(path, old: bytes, new: bytes) -> None:
    """A label fixed in place: same length, new bytes, a later mtime."""
    data = path.read_bytes()
    assert len(old) == len(new) and old in data
    st = path.stat()
    path.write_bytes(data.replace(old, new, 1))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_a_folder_is_its_listing_of_sizes_and_mtimes(folder):
    root = folder / "CheXpert-v1.0-small"
    first = fp.folder_fingerprint(folder)
    files = [p for p in root.rglob("*") if p.is_file()]
    assert first["files"] == len(files) and first["bytes"] == sum(p.stat().st_size for p in files)
    assert first["root"] == "CheXpert-v1.0-small" and fp.folder_fingerprint(root) == first
    memo = folder.parent / "memos/listing.tsv"
    assert fp.folder_fingerprint(folder, memo) == first == fp.folder_fingerprint(folder, memo)
    (folder / "notes.txt").write_text("edited: outside the data download packs")
    assert fp.folder_fingerprint(folder) == first
    csv = root / "train.csv"
    before = csv.stat()
    edit_keeping_size(csv, b",1.0", b",0.0")   # the field's case: a label fixed in train.csv
    edited = fp.folder_fingerprint(folder)
    assert edited["listing_sha256"] != first["listing_sha256"] and edited["bytes"] == first["bytes"]
    os.utime(csv, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert fp.folder_fingerprint(folder) == first   # the stated limit: same size, same mtime
    jpg = next(root.rglob("*.jpg"))
    jpg.rename(jpg.with_name("renamed.jpg"))
    assert fp.folder_fingerprint(folder)["listing_sha256"] != first["listing_sha256"]
    (root / "train" / "extra.jpg").write_bytes(b"x")
    assert fp.folder_fingerprint(folder)["files"] == first["files"] + 1


def test_a_folder_without_chexpert_gets_an_error_not_a_listing(tmp_path):
    (tmp_path / "photos").mkdir()
    found = fp.folder_fingerprint(tmp_path / "photos")
    assert set(found) == {"kind", "error"} and "holds no CheXpert-v1.0-small" in found["error"]


def test_a_zip_is_hashed_only_when_its_stat_changed(tmp_path, tiny_chexpert_zip, monkeypatch):
    source, memo = tmp_path / "CheXpert-v1.0-small.zip", tmp_path / "cache/zip-md5.json"
    shutil.copy(tiny_chexpert_zip, source)
    an_hour_ago = time.time_ns() - 3600 * 10**9
    os.utime(source, ns=(an_hour_ago, an_hour_ago))
    hashed = []
    real = hashing.file_md5
    monkeypatch.setattr(fp, "file_md5", lambda p: hashed.append(p) or real(p))
    first = fp.zip_fingerprint(source, memo)
    assert first == {"kind": "zip", "bytes": source.stat().st_size, "md5": real(source)}
    assert fp.zip_fingerprint(source, memo) == first and len(hashed) == 1   # memo: no read
    os.utime(source, ns=(an_hour_ago, an_hour_ago + 10**9))  # touched, same bytes: same md5
    assert fp.zip_fingerprint(source, memo) == first and len(hashed) == 2
    assert fp.zip_fingerprint(source, memo) == first and len(hashed) == 2
    data = bytearray(source.read_bytes())
    data[-1] ^= 0xFF                                  # replaced in place, same size
    replacement = tmp_path / "new.zip"
    replacement.write_bytes(bytes(data))
    st = source.stat()
    os.utime(replacement, ns=(st.st_atime_ns, st.st_mtime_ns))   # even with the old mtime
    os.replace(replacement, source)
    changed = fp.zip_fingerprint(source, memo)
    assert changed["md5"] == real(source) != first["md5"] and changed["bytes"] == first["bytes"]
    assert len(hashed) == 3
    os.utime(source)         # written just now: a change within the same tick could follow
    fp.zip_fingerprint(source, memo)
    fp.zip_fingerprint(source, memo)
    assert len(hashed) == 5  # so it is not memoised


@pytest.fixture()
def server(tmp_path):
    """/data.zip with ETag and Last-Modified (both follow the `state`), /bare.zip with neither,
    /big.zip: 256 MiB with an ETag, `sent` counting its bytes written, `done` set when its
    handler has stopped."""
    state = {"body": b"PK" + b"x" * 4096, "etag": '"v1"', "sent": 0, "done": threading.Event()}
    big = 256 << 20

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if not self.path.startswith(("/data.zip", "/bare.zip", "/big.zip")):
                self.send_error(404)
                return
            self.send_response(200)
            is_big = self.path.startswith("/big.zip")
            self.send_header("Content-Length", str(big if is_big else len(state["body"])))
            if not self.path.startswith("/bare.zip"):
                self.send_header("ETag", state["etag"])
                self.send_header("Last-Modified", f"Mon, 0{len(state['etag'])} Jan 2024 00:00:00 GMT")
            self.end_headers()
            self.close_connection = True
            if not is_big:
                self.wfile.write(state["body"])
                return
            block = bytes(1 << 16)
            try:
                while state["sent"] < big:
                    self.wfile.write(block)
                    state["sent"] += len(block)
            except OSError:   # the client closed the connection after the headers
                pass
            finally:
                state["done"].set()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.handle_error = lambda request, address: None
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield {"base": f"http://127.0.0.1:{httpd.server_address[1]}", "state": state}
    httpd.shutdown()
    httpd.server_close()


def test_a_url_is_its_validators_and_no_secret_is_kept(server, capsys):
    url = f"{server['base']}/data.zip?token=SECRET123&X-Amz-Signature=abc"
    first = fp.url_fingerprint(url, 5.0)
    assert first == {"kind": "url", "url": f"{server['base']}/data.zip?***", "etag": '"v1"',
                     "last_modified": "Mon, 04 Jan 2024 00:00:00 GMT", "bytes": "4098"}
    assert "SECRET123" not in json.dumps(first) and "abc" not in json.dumps(first)
    resigned = f"{server['base']}/data.zip?token=OTHER&X-Amz-Signature=def"
    assert fp.url_fingerprint(resigned, 5.0) == first   # a fresh signature, the same file
    server["state"]["etag"] = '"v22"'
    assert fp.url_fingerprint(url, 5.0)["etag"] == '"v22"'
    assert capsys.readouterr().err == ""
    bare = fp.url_fingerprint(f"{server['base']}/bare.zip", 5.0)
    assert (bare["etag"], bare["last_modified"], bare["bytes"]) == (None, None, "4098")
    assert "sends no ETag or Last-Modified" in capsys.readouterr().err
    with pytest.raises(fp.Unavailable, match=r"/gone.zip\?\*\*\* answered HTTP 404"):
        fp.url_fingerprint(f"{server['base']}/gone.zip?token=SECRET123", 5.0)
    assert fp.url_fingerprint(f"{server['base']}/big.zip", 5.0)["bytes"] == str(256 << 20)
    assert server["state"]["done"].wait(60)
    assert server["state"]["sent"] < 64 << 20    # the body is never read


def test_a_source_not_there_now_keeps_the_previous_fingerprint(tmp_path, server, monkeypatch,
                                                               capsys):
    memo = tmp_path / "memos"
    assert fp.fingerprint(params_for("synthetic"), tmp_path, {}, memo) == {"kind": "synthetic"}
    monkeypatch.setenv("CHEXPERT_URL", f"{server['base']}/data.zip?token=SECRET123")
    online = fp.fingerprint(params_for("url"), tmp_path, {}, memo)
    assert online["etag"] == '"v1"' and online["source"] == "url"
    monkeypatch.delenv("CHEXPERT_URL")            # a teammate with the data from the remote
    assert fp.fingerprint(params_for("url"), tmp_path, online, memo) == online
    err = capsys.readouterr().err
    assert "CHEXPERT_URL is not set" in err and "keeping the previous fingerprint" in err
    monkeypatch.setenv("CHEXPERT_URL", "http://127.0.0.1:9/data.zip?token=SECRET123")  # offline
    assert fp.fingerprint(params_for("url"), tmp_path, online, memo) == online
    err = capsys.readouterr().err
    assert "did not answer" in err and "SECRET123" not in err
    gone = tmp_path / "elsewhere/CheXpert-v1.0-small.zip"
    found = fp.fingerprint(params_for(gone), tmp_path, online, memo)   # not the same source
    assert found == {"kind": "local", "source": str(gone),
                     "unavailable": f"data.source {gone} does not exist here"}
    assert "download will run and say what is missing" in capsys.readouterr().err


def test_the_stage_rewrites_its_file_only_when_the_source_changed(tmp_path, folder, capsys):
    root = tmp_path / "repo"
    p = params_for(folder)
    stage.main(p, root)
    out = root / paths.SOURCE_FINGERPRINT
    first, mtime = out.read_text(), out.stat().st_mtime_ns
    assert json.loads(first)["source"] == str(folder) and "(changed)" in capsys.readouterr().out
    stage.main(p, root)
    assert out.read_text() == first and out.stat().st_mtime_ns == mtime
    assert "(unchanged)" in capsys.readouterr().out
    edit_keeping_size(folder / "CheXpert-v1.0-small/valid.csv", b",1.0", b",0.0")
    stage.main(p, root)
    assert out.read_text() != first
    shutil.rmtree(folder)                      # the source gone: the last fingerprint stays
    before = out.read_text()
    stage.main(p, root)
    assert out.read_text() == before


def test_a_relative_source_is_the_main_repos_also_from_a_dvc_temp_workspace(tmp_path,
                                                                            tiny_chexpert_zip):
    repo = tmp_path / "repo"
    (repo / "sources").mkdir(parents=True)
    shutil.copy(tiny_chexpert_zip, repo / "sources/CheXpert-v1.0-small.zip")
    workspace = repo / ".dvc/tmp/exps/tmp1a2b3c"   # `dvc exp run --temp`: no source in its copy
    workspace.mkdir(parents=True)
    p = params_for("sources/CheXpert-v1.0-small.zip")
    found = fp.fingerprint(p, workspace, {}, tmp_path / "memos")
    assert found == fp.fingerprint(p, repo, {}, tmp_path / "memos")
    assert found["md5"] == hashing.file_md5(tiny_chexpert_zip)


def test_archive_litter_in_the_source_folder_changes_nothing(tmp_path):
    """download skips .DS_Store and friends, so their coming and going must not re-run it."""
    from chexops.data.fingerprint import folder_fingerprint

    root = tmp_path / "CheXpert-v1.0-small"
    (root / "train").mkdir(parents=True)
    for name in ("train.csv", "valid.csv"):
        (root / name).write_text("Path\n")
    (root / "train/a.jpg").write_bytes(b"x")
    before = folder_fingerprint(tmp_path)
    (root / ".DS_Store").write_bytes(b"finder")
    (root / "train/Thumbs.db").write_bytes(b"explorer")
    assert folder_fingerprint(tmp_path) == before
    (root / "train/a.jpg").write_bytes(b"changed")
    assert folder_fingerprint(tmp_path) != before
