"""The `download` stage: data/raw/chexpert.zip from one of four sources.

`synthetic` generates the built-in CheXpert; `url` streams the zip from $<data.url_env>
(a signed link: never stored, printed with its query string redacted); a local directory is
packed into a zip (the user's files are only read); a local zip is validated and copied
(chexops.data.archive: rewritten when another tool wrote '\\' separators or litter).
data/raw is written as a whole folder, atomically: a failure leaves nothing half-written.
"""
from __future__ import annotations

import csv
import hashlib
import io
import ipaddress
import os
import shutil
import time
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

from chexops import paths
from chexops.config import Params, url_in_source_message
from chexops.data.archive import is_litter, place_zip
from chexops.data.decode import IMAGE_EXTENSIONS
from chexops.data.schema import CHEXPERT_ROOTS
from chexops.data.zipimages import find_root
from chexops.errors import ChexopsError
from chexops.redact import redact_url

STAGE = "download"
_sleep = time.sleep           # tests replace it: back-off without waiting
_BLOCK = 1 << 20


# ---------------------------------------------------------------- local sources

def find_local_root(folder: Path) -> Path:
    """The CheXpert folder itself, or the one inside `folder`."""
    candidates = [folder] + [folder / r for r in CHEXPERT_ROOTS]
    for c in candidates:
        if c.name in CHEXPERT_ROOTS and (c / "train.csv").is_file() and (c / "valid.csv").is_file():
            return c
    raise ChexopsError(f"{folder} holds no CheXpert-v1.0-small/ (or CheXpert-v1.0/) with "
                       f"train.csv and valid.csv; point data.source at that folder")


def pack_folder(src_root: Path, dest: Path) -> int:
    """Zip the CheXpert folder (sorted, fixed timestamps, JPEGs stored): same folder, same bytes.
    Litter (.DS_Store, Thumbs.db, ._ files, __MACOSX/) is left out; returns how many."""
    files = sorted(p for p in src_root.rglob("*") if p.is_file())
    litter = [f for f in files if is_litter(f.relative_to(src_root).as_posix())]
    with zipfile.ZipFile(dest, "w", allowZip64=True) as zf:
        for f in files:
            if f in litter:
                continue
            if not f.resolve().is_relative_to(src_root.resolve()):
                raise ChexopsError(f"{f} links outside {src_root}; replace the link by the file")
            name = f"{src_root.name}/{f.relative_to(src_root).as_posix()}"
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED if f.suffix == ".csv" else zipfile.ZIP_STORED
            with f.open("rb") as fin, zf.open(info, "w", force_zip64=True) as fout:
                shutil.copyfileobj(fin, fout, _BLOCK)
    return len(litter)


def ingest_local(source: Path, dest: Path) -> int:
    """The local folder or zip `source` as the zip `dest`; returns the litter entries skipped."""
    if not source.exists():
        raise ChexopsError(f"data.source {source} does not exist; give an existing CheXpert "
                           f"folder or .zip, `url` or `synthetic`")
    if source.is_dir():
        return pack_folder(find_local_root(source), dest)
    return place_zip(source, str(source), dest)


# ---------------------------------------------------------------- URL source
# Exception texts from requests/urllib3 often quote the full URL (token included), so they are
# never shown: every failure is described by `describe_failure`, from its class and status only.

class IncompleteBody(Exception):
    """The server closed the connection before Content-Length bytes arrived."""

    def __init__(self, received: int, expected: int):
        super().__init__(f"{received} of {expected} bytes")
        self.received, self.expected = received, expected


def _expected_length(resp) -> int | None:
    """Content-Length when it counts the bytes iter_content yields (no content encoding)."""
    if resp.headers.get("content-encoding", "identity").lower() not in ("", "identity"):
        return None
    try:
        n = int(resp.headers.get("content-length", ""))
    except ValueError:
        return None
    return n if n >= 0 else None


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def fetch(url: str, dest: Path, timeout: float, expected_sha256: str = "") -> str:
    """Stream `url` to `dest` (a .part file renamed when complete); return its sha256.

    A body shorter than its Content-Length raises IncompleteBody; on any failure the .part
    file is removed."""
    import requests
    from tqdm import tqdm

    shown = redact_url(url)
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    try:
        with requests.get(url, stream=True, timeout=timeout) as resp:
            resp.raise_for_status()
            final = urlsplit(resp.url)
            if final.scheme != "https" and not is_loopback(final.hostname):
                raise ChexopsError(f"{shown} redirected to plain {final.scheme}:// "
                                   f"({redact_url(resp.url)}); use an https link")
            expected = _expected_length(resp)
            received = 0
            with part.open("wb") as fh, tqdm(total=expected, unit="B", unit_scale=True,
                                             desc="download", disable=None) as bar:
                for block in resp.iter_content(_BLOCK):
                    fh.write(block)
                    digest.update(block)
                    received += len(block)
                    bar.update(len(block))
            if expected is not None and received != expected:
                raise IncompleteBody(received, expected)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    got = digest.hexdigest()
    if expected_sha256 and got.lower() != expected_sha256.strip().lower():
        part.unlink()
        raise ChexopsError(f"checksum mismatch for {shown}: sha256 {got}, expected "
                           f"{expected_sha256}; re-download, or fix data.sha256")
    os.replace(part, dest)
    return got


def describe_failure(exc: BaseException) -> tuple[bool, str]:
    """(worth retrying?, what went wrong) for a failed attempt; never the exception's text."""
    import http.client

    import urllib3
    from requests import exceptions as rx

    if isinstance(exc, IncompleteBody):
        return True, f"connection closed after {exc.received} of {exc.expected} bytes"
    if isinstance(exc, rx.HTTPError):
        code = getattr(exc.response, "status_code", None) or 0
        return code >= 500 or code in (408, 429), f"HTTP {code}"
    if isinstance(exc, rx.SSLError):
        return False, "TLS/certificate error"
    if isinstance(exc, rx.Timeout) or (
            isinstance(exc, rx.ConnectionError) and exc.args
            and isinstance(exc.args[0], urllib3.exceptions.ReadTimeoutError)):
        return True, "timed out"
    if isinstance(exc, rx.ChunkedEncodingError):
        return True, "connection broken mid-download"
    if isinstance(exc, rx.ContentDecodingError):
        return True, "response body could not be decoded"
    if isinstance(exc, rx.ConnectionError):
        return True, "connection failed"
    if isinstance(exc, rx.TooManyRedirects):
        return False, "too many redirects"
    if isinstance(exc, (rx.InvalidURL, rx.MissingSchema, rx.InvalidSchema, rx.URLRequired)):
        return False, "invalid URL"
    if isinstance(exc, (urllib3.exceptions.HTTPError, http.client.HTTPException)):
        return True, f"connection broken ({exc.__class__.__name__})"
    return False, f"request failed ({exc.__class__.__name__})"


def _transport_errors() -> tuple[type[BaseException], ...]:
    import http.client

    import requests
    import urllib3

    return (requests.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException,
            IncompleteBody)


def fetch_with_retries(url: str, dest: Path, params: Params) -> str:
    """Retry transient failures (timeouts, broken or short bodies, 5xx) with exponential
    back-off; anything else fails at once. Errors are one line, the URL redacted."""
    shown, tries, env = redact_url(url), max(1, params.data.retries), params.data.url_env
    for attempt in range(1, tries + 1):
        try:
            return fetch(url, dest, params.data.timeout_s, params.data.sha256)
        except _transport_errors() as exc:
            transient, kind = describe_failure(exc)
        if kind == "HTTP 404":
            raise ChexopsError(f"{shown} answered HTTP 404 (not found); check "
                               f"${env} (signed links expire: get a fresh one)")
        if not transient:
            fix = {"HTTP 401": "the link is not authorised", "HTTP 403": "the link was refused",
                   "too many redirects": "the link loops", "invalid URL": "the link is malformed",
                   "TLS/certificate error": "the server's certificate could not be verified",
                   }.get(kind, "the request was refused")
            raise ChexopsError(f"download from {shown} failed ({kind}); {fix}: check ${env} "
                               f"(signed links expire: get a fresh one)")
        if attempt == tries:
            raise ChexopsError(f"download from {shown} failed ({kind}) after {attempt} "
                               f"attempt(s); check the link and network, or raise "
                               f"data.retries / data.timeout_s")
        wait = 2.0 ** (attempt - 1)
        print(f"download: {shown} attempt {attempt} failed ({kind}); retrying in {wait:g} s")
        _sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


def url_from_env(params: Params) -> str:
    env = params.data.url_env
    url = os.environ.get(env, "").strip()
    if not url:
        raise ChexopsError(f"data.source is url but ${env} is not set; "
                           f"export {env}=<your CheXpert link>")
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        parts, host = None, None
    if parts is None or parts.scheme not in ("https", "http") or not host:
        raise ChexopsError(f"${env} is not an http(s) URL ({shown}); "
                           f"set it to the CheXpert zip link")
    if parts.scheme == "http" and not is_loopback(host):
        raise ChexopsError(f"${env} is a plain http:// URL ({shown}); the signed link would "
                           f"travel unencrypted: use the https:// link (http only for "
                           f"localhost / 127.0.0.1 / ::1)")
    return url


# ---------------------------------------------------------------- the stage

def source_kind(source: str, url_env: str = "CHEXPERT_URL") -> str:
    """synthetic | url | local; a URL written into data.source is refused (redacted)."""
    if "://" in source:
        raise ChexopsError(url_in_source_message(source, url_env))
    return source if source in ("synthetic", "url") else "local"


def produce(params: Params, root: Path, out: Path) -> dict:
    """Fill the temp folder `out` with chexpert.zip (and the truth); return facts to log."""
    source, zip_path = params.data.source, out / paths.RAW_ZIP.name
    kind = source_kind(source, params.data.url_env)
    skipped = 0
    if kind == "synthetic":
        from chexops.data.synthetic.generate import generate_zip

        cfg = params.data.synthetic          # its own seed: the training seed leaves the data be
        generate_zip(cfg, cfg.seed, zip_path, out / paths.TRUTH.name)
    elif kind == "url":
        url = url_from_env(params)
        print(f"download: {redact_url(url)}")
        fetch_with_retries(url, zip_path, params)
        skipped = place_zip(zip_path, f"the file from {redact_url(url)}", zip_path)
    else:
        local = Path(source).expanduser()
        # relative to the user's repo, not a DVC temp workspace's copy of it
        skipped = ingest_local(local if local.is_absolute() else paths.main_repo_root(root) / local,
                               zip_path)
    return summarize(zip_path) | {"source": kind, "skipped_entries": skipped}


def csv_rows(data: bytes) -> int:
    """Data rows of a CSV (header excluded): a missing final newline, blank lines and quoted
    newlines inside a field all count right."""
    text = io.StringIO(data.decode("utf-8", errors="replace"), newline="")
    return max(sum(1 for row in csv.reader(text) if row) - 1, 0)


def summarize(zip_path: Path) -> dict:
    """Rows of each CSV (test_rows 0 without a test.csv) and image count, for the log."""
    with zipfile.ZipFile(zip_path) as zf:
        names = zf.namelist()
        root = find_root(names)
        rows = {s: csv_rows(zf.read(f"{root}/{s}.csv")) if f"{root}/{s}.csv" in names else 0
                for s in ("train", "valid", "test")}
    images = sum(n.lower().endswith(IMAGE_EXTENSIONS) for n in names)
    return {"train_rows": rows["train"], "valid_rows": rows["valid"], "test_rows": rows["test"],
            "images": images}
