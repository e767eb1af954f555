"""git, run one way for every caller: `git -C ROOT ARGS`, its output captured as text, never
raising for a failed, missing or hung git, so each caller decides what a failure means."""
from __future__ import annotations

import subprocess
from pathlib import Path

TIMEOUT_S = 30.0        # a query (rev-parse, status, show) answers in well under this


def git(root: str | Path, *args: str, timeout: float | None = TIMEOUT_S) -> subprocess.CompletedProcess:
    """`git -C root ARGS`. When git is not installed or times out, returncode is 127 and stderr
    says why; `timeout=None` waits as long as git takes (a clone, a checkout)."""
    cmd = ["git", "-C", str(root), *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        return subprocess.CompletedProcess(cmd, 127, "", f"{type(exc).__name__}: {exc}")


def output(root: str | Path, *args: str) -> str | None:
    """stdout of a git query that succeeded, else None."""
    proc = git(root, *args)
    return proc.stdout if proc.returncode == 0 else None
