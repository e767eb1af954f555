"""The `download` stage: data/raw/chexpert.zip from one of four sources.

`synthetic` generates the built-in CheXpert; `url` streams the zip from $<data.url_env>
(a signed link: never stored, printed with its query string redacted); a local directory is
packed into a zip (the user's files are only read); a local zip is validated and copied.
data/raw is written as a whole folder, atomically: a failure leaves nothing half-written.
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import time
import zipfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from chexops import paths
from chexops.atomic import atomic_dir
from chexops.config import Params
from chexops.data.images import check_member_path, find_root
from chexops.data.schema import CHEXPERT_ROOTS
from chexops.errors import ChexopsError

STAGE = "download"
_sleep = time.sleep           # tests replace it: back-off without waiting
_BLOCK = 1 << 20


def redact_url(url: str) -> str:
    """scheme://host/path only: drop user:password@, the query string and the fragment."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "***" if parts.query else "", ""))


# ---------------------------------------------------------------- validating a zip

def validate_zip(path: Path, label: str) -> str:
    """The CheXpert root of a zip; errors for a non-zip, a non-CheXpert zip, zip-slip entries."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except zipfile.BadZipFile:
        raise ChexopsError(f"{label} is not a zip file; give a CheXpert-v1.0-small zip "
                           f"or folder as data.source") from None
    for name in names:
        try:
            check_member_path(name.rstrip("/") or "/")
        except ChexopsError:
            raise ChexopsError(f"{label}: entry {name!r} would be written outside the data folder "
                               f"(zip-slip); refusing it, use an untampered CheXpert zip") from None
    root = find_root(names)
    if root is None:
        raise ChexopsError(f"{label} is not CheXpert: no {CHEXPERT_ROOTS[0]}/train.csv and "
                           f"valid.csv inside; give the CheXpert-v1.0-small zip")
    return root


# ---------------------------------------------------------------- local sources

def find_local_root(folder: Path) -> Path:
    """The CheXpert folder itself, or the one inside `folder`."""
    candidates = [folder] + [folder / r for r in CHEXPERT_ROOTS]
    for c in candidates:
        if c.name in CHEXPERT_ROOTS and (c / "train.csv").is_file() and (c / "valid.csv").is_file():
            return c
    raise ChexopsError(f"{folder} holds no CheXpert-v1.0-small/ (or CheXpert-v1.0/) with "
                       f"train.csv and valid.csv; point data.source at that folder")


def pack_folder(src_root: Path, dest: Path) -> None:
    """Zip the CheXpert folder (sorted, fixed timestamps, JPEGs stored): same folder, same bytes."""
    files = sorted(p for p in src_root.rglob("*") if p.is_file())
    with zipfile.ZipFile(dest, "w", allowZip64=True) as zf:
        for f in files:
            if not f.resolve().is_relative_to(src_root.resolve()):
                raise ChexopsError(f"{f} links outside {src_root}; replace the link by the file")
            name = f"{src_root.name}/{f.relative_to(src_root).as_posix()}"
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED if f.suffix == ".csv" else zipfile.ZIP_STORED
            with f.open("rb") as fin, zf.open(info, "w", force_zip64=True) as fout:
                shutil.copyfileobj(fin, fout, _BLOCK)


def ingest_local(source: Path, dest: Path) -> None:
    if not source.exists():
        raise ChexopsError(f"data.source {source} does not exist; give an existing CheXpert "
                           f"folder or .zip, `url` or `synthetic`")
    if source.is_dir():
        pack_folder(find_local_root(source), dest)
    else:
        validate_zip(source, str(source))
        shutil.copyfile(source, dest)


# ---------------------------------------------------------------- URL source

def fetch(url: str, dest: Path, timeout: float, expected_sha256: str = "") -> str:
    """Stream `url` to `dest` (a .part file renamed when complete); return its sha256."""
    import requests
    from tqdm import tqdm

    shown = redact_url(url)
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    with requests.get(url, stream=True, timeout=timeout) as resp:
        resp.raise_for_status()
        total = int(resp.headers.get("content-length", 0)) or None
        with part.open("wb") as fh, tqdm(total=total, unit="B", unit_scale=True,
                                         desc="download", disable=None) as bar:
            for block in resp.iter_content(_BLOCK):
                fh.write(block)
                digest.update(block)
                bar.update(len(block))
    got = digest.hexdigest()
    if expected_sha256 and got.lower() != expected_sha256.lower():
        part.unlink()
        raise ChexopsError(f"checksum mismatch for {shown}: sha256 {got}, expected "
                           f"{expected_sha256}; re-download, or fix data.sha256")
    os.replace(part, dest)
    return got


def fetch_with_retries(url: str, dest: Path, params: Params) -> str:
    """Retry transient failures (timeouts, connection errors, 5xx) with exponential back-off."""
    import requests

    shown, tries = redact_url(url), max(1, params.data.retries)
    for attempt in range(1, tries + 1):
        try:
            return fetch(url, dest, params.data.timeout_s, params.data.sha256)
        except (requests.Timeout, requests.ConnectionError, requests.HTTPError) as exc:
            code = getattr(getattr(exc, "response", None), "status_code", None)
            if code == 404:
                raise ChexopsError(f"{shown} answered HTTP 404 (not found); check "
                                   f"${params.data.url_env} (signed links expire: get a fresh one)") from None
            if code is not None and code < 500 or attempt == tries:
                kind = f"HTTP {code}" if code else ("timed out" if isinstance(exc, requests.Timeout)
                                                    else "connection failed")
                raise ChexopsError(f"download from {shown} failed ({kind}) after {attempt} "
                                   f"attempt(s); check the link and network, or raise "
                                   f"data.retries / data.timeout_s") from None
            print(f"download: {shown} attempt {attempt} failed ({exc.__class__.__name__}); retrying")
            _sleep(2.0 ** (attempt - 1))
    raise AssertionError("unreachable")  # pragma: no cover


def url_from_env(params: Params) -> str:
    url = os.environ.get(params.data.url_env, "").strip()
    if not url:
        raise ChexopsError(f"data.source is url but ${params.data.url_env} is not set; "
                           f"export {params.data.url_env}=<your CheXpert link>")
    if urlsplit(url).scheme not in ("https", "http"):
        raise ChexopsError(f"${params.data.url_env} is not an http(s) URL ({redact_url(url)}); "
                           f"set it to the CheXpert zip link")
    return url


# ---------------------------------------------------------------- the stage

def source_kind(source: str) -> str:
    return source if source in ("synthetic", "url") else "local"


def produce(params: Params, root: Path, out: Path) -> dict:
    """Fill the temp folder `out` with chexpert.zip (and the truth); return facts to log."""
    source, zip_path = params.data.source, out / paths.RAW_ZIP.name
    kind = source_kind(source)
    if kind == "synthetic":
        from chexops.data.synthetic import generate_zip

        generate_zip(params.data.synthetic, params.seed, zip_path, out / paths.TRUTH.name)
    elif kind == "url":
        url = url_from_env(params)
        print(f"download: {redact_url(url)}")
        fetch_with_retries(url, zip_path, params)
        validate_zip(zip_path, f"the file from {redact_url(url)}")
    else:
        local = Path(source).expanduser()
        ingest_local(local if local.is_absolute() else root / local, zip_path)
    return summarize(zip_path) | {"source": kind}


def summarize(zip_path: Path) -> dict:
    """Rows of each CSV and JPEG count, for the log."""
    with zipfile.ZipFile(zip_path) as zf:
        names = zf.namelist()
        root = find_root(names)
        rows = {s: max(zf.read(f"{root}/{s}.csv").count(b"\n") - 1, 0) for s in ("train", "valid")}
    images = sum(n.lower().endswith((".jpg", ".jpeg", ".png")) for n in names)
    return {"train_rows": rows["train"], "valid_rows": rows["valid"], "images": images}


def main(params: Params, root: Path) -> None:
    from chexops import tracking

    root = Path(root)
    with tracking.stage_run(params, root, STAGE) as run:
        try:
            with atomic_dir(root / paths.RAW_DIR) as tmp:
                facts = produce(params, root, tmp)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise ChexopsError(f"disk full while writing {paths.RAW_DIR}; free space "
                                   f"(the CheXpert zip needs ~11 GB) and re-run") from None
            raise
        print(f"download ({facts['source']}): {facts['train_rows']} train + "
              f"{facts['valid_rows']} valid rows, {facts['images']} images")
        run.log_params({"source": facts["source"]})
        run.log_metrics({k: v for k, v in facts.items() if k != "source"})
