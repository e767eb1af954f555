"""DVC data by md5, for team work and `chexops reproduce`: where the cache is, whether it holds
an object, fetching an object from the remote by its md5 alone, and DVC's failure messages
turned into one line that names the problem and the fix.

Objects are addressed the way DVC 3 stores them: <cache>/files/md5/<2 hex>/<rest>, a directory
being a JSON manifest `<md5>.dir` listing {md5, relpath} for each of its files.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from chexops import atomic
from chexops.errors import ChexopsError
from chexops.redact import redact_text

FETCH_DIR = ".chexops-fetch"  # side folder for temporary .dvc files (must not overlap pipeline outs)

# (kind, pattern in DVC's output, what went wrong, the fix); the first match wins
DVC_ERRORS: tuple[tuple[str, str, str, str], ...] = (
    ("no-remote",
     r"no remote specified|[Nn]o default remote|No remote provided|remote .* doesn't exist|"
     r"not a valid remote",
     "no DVC remote is configured",
     "add one with `dvc remote add -d NAME URL` (see docs/TEAM.md)"),
    ("credentials",
     r"InvalidAccessKeyId|SignatureDoesNotMatch|AccessDenied|Forbidden|\b403\b|"
     r"Unable to locate credentials|NoCredentialsError|ExpiredToken|InvalidToken|"
     r"could not find default credentials|Anonymous caller",
     "the DVC remote {remote} rejected the credentials",
     "set them with `dvc remote modify --local {remote} access_key_id ...` (and "
     "secret_access_key), or the provider's environment variables"),
    ("unreachable",
     r"Could not connect|Connection refused|ConnectTimeout|EndpointConnectionError|"
     r"Name or service not known|nodename nor servname|Temporary failure in name resolution|"
     r"ClientConnectorError|timed out",
     "the DVC remote {remote} is unreachable",
     "check its URL/endpointurl (`dvc remote list`) and the network"),
    ("no-bucket",
     r"NoSuchBucket|bucket does not exist|specified bucket does not exist",
     "the DVC remote {remote} names a bucket that does not exist",
     "create the bucket or fix the URL with `dvc remote modify {remote} url ...`"),
    ("not-pushed",
     r"[Mm]issing cache files|do not exist neither locally nor on remote|"
     r"failed to (fetch|pull|download)|files failed to download",
     "the data is not in the DVC remote {remote}",
     "run `dvc push` where the data was made, then try again"),
)


class RemoteError(ChexopsError):
    """A DVC remote could not provide an object: `kind` is one of DVC_ERRORS' kinds or 'other';
    `problem` and `fix` are the two halves of the one-line message."""

    def __init__(self, kind: str, problem: str, fix: str):
        super().__init__(f"{problem}; {fix}")
        self.kind, self.problem, self.fix = kind, problem, fix


def dvc_executable() -> str:
    """The dvc beside this Python (the project venv), else the one on PATH."""
    local = Path(sys.executable).parent / "dvc"
    return str(local) if local.is_file() else "dvc"


def run_dvc(root: Path, *args: str, env: dict[str, str] | None = None,
            timeout: float = 3600) -> subprocess.CompletedProcess:
    """Run dvc in `root` (never raises for a non-zero exit; callers decide)."""
    env = dict(os.environ if env is None else env)
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return subprocess.run([dvc_executable(), *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=timeout)


def classify_dvc_error(output: str, remote: str | None) -> RemoteError:
    """The RemoteError (kind, problem, fix) for a failed dvc push/pull/fetch, from its output;
    credentials in the output are never echoed."""
    name = remote or "(default)"
    for kind, pattern, problem, fix in DVC_ERRORS:
        if re.search(pattern, output):
            return RemoteError(kind, problem.format(remote=name), fix.format(remote=name))
    last = next((ln.strip() for ln in reversed(output.splitlines()) if ln.strip()), "no output")
    return RemoteError("other", f"dvc failed with the DVC remote {name} ({redact_text(last)[:300]})",
                       "run the dvc command by hand to see why")


# ---------------------------------------------------------------- the cache

def cache_dir(root: Path) -> Path:
    """The DVC cache this repository uses (honours cache.dir in .dvc/config[.local])."""
    proc = run_dvc(root, "cache", "dir")
    if proc.returncode != 0 or not proc.stdout.strip():
        return root / ".dvc" / "cache"
    return Path(proc.stdout.strip().splitlines()[-1])


def object_path(cache: Path, md5: str) -> Path:
    return cache / "files" / "md5" / md5[:2] / md5[2:]


def dir_entries(cache: Path, md5: str) -> list[dict] | None:
    """The {md5, relpath} list of a directory object, or None when its manifest is not cached."""
    manifest = object_path(cache, md5)
    if not manifest.is_file():
        return None
    return [e for e in json.loads(manifest.read_text()) if "md5" in e and "relpath" in e]


def in_cache(cache: Path, md5: str) -> bool:
    """True when the object (for a directory: its manifest and every file) is in the cache."""
    if not md5.endswith(".dir"):
        return object_path(cache, md5).is_file()
    entries = dir_entries(cache, md5)
    return entries is not None and all(object_path(cache, e["md5"]).is_file() for e in entries)


def _safe_relpath(relpath: str) -> Path:
    rel = Path(relpath)
    if rel.is_absolute() or ".." in rel.parts:
        raise ChexopsError(f"DVC manifest entry {relpath!r} escapes its directory; "
                           f"the cache is corrupt: remove the object and fetch it again")
    return rel


def copy_from_cache(cache: Path, md5: str, dest: Path) -> None:
    """Materialise an object at `dest` (a file or a directory), atomically."""
    if not md5.endswith(".dir"):
        with atomic.atomic_path(dest) as tmp:
            shutil.copyfile(object_path(cache, md5), tmp)
        return
    entries = dir_entries(cache, md5) or []
    with atomic.atomic_dir(dest) as tmp:
        for entry in entries:
            target = tmp / _safe_relpath(entry["relpath"])
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(object_path(cache, entry["md5"]), target)


def dir_differences(cache: Path, old_md5: str, new_md5: str) -> list[str]:
    """Files that differ between two cached directory objects (empty when unknown)."""
    old, new = dir_entries(cache, old_md5), dir_entries(cache, new_md5)
    if old is None or new is None:
        return []
    a = {e["relpath"]: e["md5"] for e in old}
    b = {e["relpath"]: e["md5"] for e in new}
    return sorted(p for p in a.keys() | b.keys() if a.get(p) != b.get(p))


# ---------------------------------------------------------------- the remote

# remote options that hold a path, which DVC resolves relative to the config file naming them
REMOTE_PATH_KEYS = ("url", "credentialpath", "keyfile", "configpath", "cert_path", "key_path",
                    "gdrive_user_credentials_file", "gdrive_service_account_json_file_path")


def _relative_local(value: object) -> bool:
    return (isinstance(value, str) and bool(value.strip()) and not re.match(r"\w+://", value)
            and not os.path.isabs(os.path.expanduser(str(value))))


def pin_remote_paths(origin: Path, ws: Path) -> dict[str, str]:
    """Make the relative paths of `ws`'s DVC remotes (.dvc/config and .dvc/config.local) mean
    what they mean in `origin`, by writing their absolute form to ws's config.local.

    DVC resolves a relative remote url (`../../chexops-dvc-remote`) against the folder of the
    config file that holds it, so in a clone elsewhere (reproduce's temporary workspace) it
    would name another folder. Returns {"NAME.key": absolute path} for what was pinned."""
    from configobj import ConfigObj

    base = origin.resolve() / ".dvc"
    local_file = ws / ".dvc" / "config.local"
    local = ConfigObj(str(local_file)) if local_file.is_file() else ConfigObj()
    local.filename = str(local_file)
    project_file = ws / ".dvc" / "config"
    project = ConfigObj(str(project_file)) if project_file.is_file() else ConfigObj()
    pinned: dict[str, str] = {}
    # project level first; a value set in config.local overrides it and is pinned in place
    for level in (project, local):
        for section, values in list(level.items()):
            named = re.fullmatch(r'\s*remote\s+"(.+)"\s*', section)
            if not named or not isinstance(values, dict):
                continue
            for key in REMOTE_PATH_KEYS:
                value = values.get(key)
                if not _relative_local(value):
                    continue
                if level is project and key in (local.get(section) or {}):
                    continue  # config.local sets its own value
                absolute = os.path.normpath(os.path.join(base, os.path.expanduser(str(value))))
                local.setdefault(section, {})[key] = absolute
                pinned[f"{named.group(1)}.{key}"] = absolute
    if pinned:
        local.write()
    return pinned


def default_remote(root: Path) -> str | None:
    """Name of the default DVC remote (core.remote), or None when there is none."""
    proc = run_dvc(root, "remote", "default")
    name = proc.stdout.strip()
    return name if proc.returncode == 0 and name else None


def fetch_object(root: Path, cache: Path, name: str, md5: str, remote: str | None = None) -> None:
    """Download one object into `cache` by md5 alone, through a temporary .dvc file; raises a
    one-line RemoteError (no remote, credentials, unreachable, not there) when it is not fetched."""
    side = root / FETCH_DIR
    side.mkdir(exist_ok=True)
    dvcfile = side / f"{name}.dvc"
    dvcfile.write_text(yaml.safe_dump({"outs": [{"md5": md5, "hash": "md5", "path": name}]}))
    try:
        args = ["fetch", str(dvcfile.relative_to(root))] + (["-r", remote] if remote else [])
        proc = run_dvc(root, *args)
    finally:
        dvcfile.unlink(missing_ok=True)
    # dvc fetch exits 0 when objects are missing on the remote or no remote is set: check the cache
    if proc.returncode != 0 or not in_cache(cache, md5):
        raise classify_dvc_error(proc.stdout + proc.stderr, remote or default_remote(root))
