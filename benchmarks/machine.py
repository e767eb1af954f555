"""What a benchmark ran on and which code it measured, for every results JSON: two figures are
comparable only when both the host and the commit are the same."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes ({} where there is none, e.g. macOS)."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        key, _, rest = line.partition(":")
        words = rest.split()
        if words:
            out[key] = int(words[0]) * (1024 if words[1:] == ["kB"] else 1)
    return out


def git_commit() -> dict[str, str | bool | None]:
    """HEAD and whether the tracked files differ from it (None outside a git checkout)."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def machine() -> dict:
    """CPU count, RAM, platform (kernel included), Python and the git commit measured."""
    mem = meminfo()
    return {"cpu_count": os.cpu_count(), "ram_bytes": mem.get("MemTotal"),
            "platform": platform.platform(), "python": platform.python_version(),
            **git_commit()}
