"""Loopback servers for the team-scale tests: a free port, a process started and stopped by
its own id, and waiting for an HTTP endpoint with a deadline (never a fixed sleep)."""
from __future__ import annotations

import contextlib
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

from tests.processes import popen_group, stop_group


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, deadline_s: float, log: Path) -> None:
    """Poll `url` until it answers 200; fail with the server's log if it dies or the deadline passes."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"server exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {deadline_s} s:\n{log.read_text()[-4000:]}")


@contextlib.contextmanager
def server(cmd: list[str], health_url: str, log: Path, deadline_s: float,
           env: dict[str, str] | None = None,
           cwd: Path | None = None) -> Iterator[subprocess.Popen]:
    """Start `cmd` in its own process group, wait for `health_url`, stop that group afterwards
    (SIGTERM, then SIGKILL for what is left after a grace period: tests/processes.py)."""
    with open(log, "w") as fh:
        proc = popen_group(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                           env=env, cwd=cwd)
    try:
        wait_http(health_url, proc, deadline_s, log)
        yield proc
    finally:
        stop_group(proc)
