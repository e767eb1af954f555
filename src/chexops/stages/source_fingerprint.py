"""`chexops source-fingerprint`: fingerprints/source.json, a cheap fingerprint of data.source
(chexops.data.fingerprint) that the download stage depends on. DVC runs this stage on every
`dvc repro` (`always_changed: true`); when the fingerprint comes out the same, DVC leaves
download and its outputs as they are, and when the source changed, download re-runs.

It writes no MLflow run (it is bookkeeping, and it must stay cheap) and rewrites the file only
when its content changes.
"""
from __future__ import annotations

import json
from pathlib import Path

from chexops import atomic, paths
from chexops.config import Params
from chexops.data.fingerprint import fingerprint


def describe(found: dict) -> str:
    """One line for the log: what was fingerprinted."""
    if found.get("unavailable"):
        return f"{found['kind']} (unavailable)"
    if found["kind"] == "folder" and "files" in found:
        return f"folder {found['source']}: {found['files']:,} files, {found['bytes']:,} bytes"
    if found["kind"] == "zip":
        return f"zip {found['source']}: {found['bytes']:,} bytes, md5 {found['md5']}"
    if found["kind"] == "url":
        return f"url {found['url']}: ETag {found['etag']}, Last-Modified {found['last_modified']}"
    return found["kind"]


def main(params: Params, root: Path) -> None:
    root = Path(root)
    out = root / paths.SOURCE_FINGERPRINT
    try:
        previous = json.loads(out.read_text())
    except (OSError, ValueError):
        previous = {}
    found = fingerprint(params, root, previous if isinstance(previous, dict) else {},
                        paths.source_memos(root))
    text = json.dumps(found, indent=2, sort_keys=True) + "\n"
    same = out.is_file() and out.read_text() == text
    if not same:
        atomic.write_text(out, text)
    print(f"source-fingerprint: {describe(found)} ({'unchanged' if same else 'changed'})")
