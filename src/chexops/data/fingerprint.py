"""A cheap fingerprint of the download stage's source, so that DVC re-runs `download` when the
source changed and leaves it (and its outputs) alone when not. DVC cannot watch data.source
itself (a param, maybe a URL or a folder outside the repository), so the `source-fingerprint`
stage, which DVC runs on every `dvc repro` (`always_changed`), writes this fingerprint as the
download stage's dependency.

- synthetic: {"kind": "synthetic"}; its params are download's deps already.
- a local folder: file count, bytes and the sha256 of the (path, size, mtime_ns) listing of the
  CheXpert root that download packs (chexops.data.listing: a stat per file and per folder,
  folders listed again only when their mtime moved), nothing read: edits, additions, deletions
  and renames all show; a same-size edit that also restores the old mtime does not.
- a local zip: size and md5, the md5 computed only when the file's size, mtime, ctime or inode
  changed since it was last computed, so an unchanged zip costs one stat and a touched but
  identical one does not re-run download.
- url: the server's validators (ETag, Last-Modified, Content-Length) from the headers of a GET
  whose body is never read (a signed link may allow GET only), and the URL with its query
  redacted (a re-signed link of the same file is the same source).

The memos (folder listing, zip md5) live in the main repository's data/cache/source/, not
tracked: losing them costs one slower run.

Nothing secret is written: the URL is redacted, no header but those three is kept. A source that
cannot be looked at now (a teammate who has the data from the DVC remote, an offline machine)
keeps the previous fingerprint, with a warning, so download is not re-run for that.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from chexops import atomic, paths
from chexops.config import Params
from chexops.data.archive import is_litter
from chexops.data.download import find_local_root, is_loopback, source_kind, url_from_env
from chexops.data.listing import RACY_NS, listing
from chexops.errors import ChexopsError
from chexops.hashing import file_md5
from chexops.redact import redact_url

VALIDATORS = {"etag": "ETag", "last_modified": "Last-Modified", "bytes": "Content-Length"}
LISTING_MEMO, ZIP_MEMO = "listing.tsv", "zip-md5.json"   # in the memo folder


class Unavailable(Exception):
    """The source cannot be looked at now (absent, unset, unreachable); str(): why."""


# ---------------------------------------------------------------- a local folder

def folder_fingerprint(folder: Path, memo: Path | None = None) -> dict[str, Any]:
    """{kind, root, files, bytes, listing_sha256} of the CheXpert root in `folder` (what download
    packs; chexops.data.listing, its folders memoised in `memo`); a folder with no CheXpert root
    gets an `error` (download then runs and says why)."""
    try:
        root = find_local_root(folder)
    except ChexopsError as exc:
        return {"kind": "folder", "error": str(exc)}
    digest, size = hashlib.sha256(), 0
    # what download packs: archive litter (.DS_Store, ...) changing must not re-run it
    files = [f for f in listing(root, memo) if not is_litter(f[0])]
    for path, nbytes, mtime in files:
        digest.update(f"{path}\0{nbytes}\0{mtime}\n".encode("utf-8", "surrogateescape"))
        size += nbytes
    return {"kind": "folder", "root": root.name, "files": len(files), "bytes": size,
            "listing_sha256": digest.hexdigest()}


# ---------------------------------------------------------------- a local zip

def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def zip_fingerprint(path: Path, memo: Path) -> dict[str, Any]:
    """{kind, bytes, md5} of a zip; the md5 is read from `memo` while the file's stat (size,
    mtime, ctime, inode) is the one it was computed for, else computed and memoised (not when
    the mtime is too recent to trust: see chexops.data.listing)."""
    path = path.resolve()
    key, entries = _stat_key(path), _read_json(memo)
    known = entries.get(str(path))
    if isinstance(known, dict) and known.get("stat") == key and known.get("md5"):
        md5 = str(known["md5"])
    else:
        md5 = file_md5(path)
        # memoised only when it did not change while read, nor within a clock tick of now
        if _stat_key(path) == key and key[1] < time.time_ns() - RACY_NS:
            entries[str(path)] = {"stat": key, "md5": md5}
            atomic.write_text(memo, json.dumps(entries, indent=1) + "\n")
    return {"kind": "zip", "bytes": key[0], "md5": md5}


# ---------------------------------------------------------------- a URL

def url_fingerprint(url: str, timeout: float) -> dict[str, Any]:
    """{kind, url (redacted), etag, last_modified, bytes} from the response headers of a GET
    whose body is never read; raises Unavailable when the server cannot be asked."""
    import requests

    shown = redact_url(url)
    try:
        with requests.get(url, stream=True, timeout=timeout,
                          headers={"Accept-Encoding": "identity"}) as resp:
            resp.raise_for_status()
            final = urlsplit(resp.url)
            if final.scheme != "https" and not is_loopback(final.hostname):
                raise Unavailable(f"{shown} redirected to plain {final.scheme}://")
            found = {key: resp.headers.get(name) for key, name in VALIDATORS.items()}
    except requests.HTTPError as exc:
        code = getattr(exc.response, "status_code", None)
        raise Unavailable(f"{shown} answered HTTP {code}") from None
    except requests.RequestException as exc:  # never its text: it may quote the signed URL
        raise Unavailable(f"{shown} did not answer ({exc.__class__.__name__})") from None
    if not (found["etag"] or found["last_modified"]):
        _warn(f"{shown} sends no ETag or Last-Modified, so a changed file there is noticed only "
              f"by its size; after replacing it, run `dvc repro -f download`")
    return {"kind": "url", "url": shown, **found}


# ---------------------------------------------------------------- the stage's fingerprint

def _read_json(path: Path) -> dict[str, Any]:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _warn(text: str) -> None:
    print(f"chexops source-fingerprint: warning: {text}", file=sys.stderr)


def _look(params: Params, root: Path, memos: Path) -> dict[str, Any]:
    """The source's fingerprint now; Unavailable when it cannot be looked at."""
    kind = source_kind(params.data.source, params.data.url_env)
    if kind == "synthetic":
        return {"kind": "synthetic"}
    if kind == "url":
        try:
            url = url_from_env(params)
        except ChexopsError as exc:
            raise Unavailable(str(exc)) from None
        return {**url_fingerprint(url, params.data.timeout_s), "source": params.data.source}
    local = Path(params.data.source).expanduser()
    # relative to the user's repo, also from a DVC temp workspace (its copy holds no source)
    local = local if local.is_absolute() else paths.main_repo_root(root) / local
    if not local.exists():
        raise Unavailable(f"data.source {params.data.source} does not exist here")
    found = (folder_fingerprint(local, memos / LISTING_MEMO) if local.is_dir()
             else zip_fingerprint(local, memos / ZIP_MEMO))
    return {**found, "source": params.data.source}


def fingerprint(params: Params, root: Path, previous: dict[str, Any],
                memos: Path) -> dict[str, Any]:
    """The fingerprint of data.source (see the module's docstring), its memos (a folder's
    listing, a zip's md5) in the folder `memos`. When the source cannot be looked at, the
    previous fingerprint of the same source is kept (a warning says so), else one that records
    why (download then runs and fails with its own message)."""
    try:
        return _look(params, Path(root), memos)
    except Unavailable as why:
        if previous.get("source") == params.data.source:
            _warn(f"{why}; keeping the previous fingerprint, so download is not re-run for it")
            return previous
        _warn(f"{why}; download will run and say what is missing")
        kind = source_kind(params.data.source, params.data.url_env)
        return {"kind": kind, "source": params.data.source, "unavailable": str(why)}
