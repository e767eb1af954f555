"""Child processes the tests start: each in its own process group (a new session), and on a
timeout or a failure the whole group is stopped (SIGTERM, a grace period, then SIGKILL), so that
nothing a child started is left running: the `chexops train-round` that a `dvc repro` runs,
torchrun's workers, a server's workers.

Only groups the tests started are signalled, by the leader's pid (= the group id).
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator, Sequence

GRACE_S = 20.0


def group_alive(pgid: int) -> bool:
    """True while any process of the group exists (a zombie not yet reaped counts)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member we may not signal: still there
        return True
    return True


def stop_group(proc: subprocess.Popen, grace_s: float = GRACE_S) -> None:
    """SIGTERM the process group `proc` leads, wait up to grace_s for it to go, then SIGKILL
    whatever is left of it (members that ignored SIGTERM or outlived the leader); reap the
    leader. Safe to call when the leader (or the whole group) has already exited."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    end = time.monotonic() + grace_s
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    while group_alive(proc.pid) and time.monotonic() < end:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=grace_s)


def popen_group(cmd: Sequence[str], **kwargs) -> subprocess.Popen:
    """subprocess.Popen in a new session (its own process group); stop it with stop_group."""
    return subprocess.Popen(list(map(str, cmd)), start_new_session=True, **kwargs)


@contextlib.contextmanager
def group(cmd: Sequence[str], **kwargs) -> Iterator[subprocess.Popen]:
    """popen_group as a context: on an exception, or if the leader is still running (or failed)
    when the block ends, the whole group is stopped."""
    proc = popen_group(cmd, **kwargs)
    ok = False
    try:
        yield proc
        ok = True
    finally:
        if not ok or proc.poll() is None or proc.returncode != 0:
            stop_group(proc)


def run_group(cmd: Sequence[str], cwd: Path | str | None = None, env: dict[str, str] | None = None,
              timeout: float = 900, input: str | None = None,
              text: bool = True) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True) with the child in its own process group.

    On timeout the whole group is stopped and subprocess.TimeoutExpired is raised (with the
    output read so far); when the command fails (non-zero exit), whatever it left running in
    its group is stopped too. stdin is /dev/null unless `input` is given."""
    proc = popen_group(cmd, cwd=cwd, env=env, text=text, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE,
                       stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL)
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_group(proc)
        try:  # the group is gone: its ends of the pipes are closed
            out, err = proc.communicate(timeout=GRACE_S)
        except subprocess.TimeoutExpired:  # something outside the group still holds them
            out, err = "" if text else b"", "" if text else b""
        raise subprocess.TimeoutExpired(proc.args, timeout, out, err) from None
    except BaseException:
        stop_group(proc)
        raise
    if proc.returncode != 0:
        stop_group(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def file_barrier(folder: Path, party: str, parties: int, timeout: float = 120.0) -> float:
    """A barrier between processes that share a folder: each one writes `<party>.ready` there
    and waits until `parties` such files exist. Returns time.time() at release; raises
    TimeoutError if the others do not arrive within `timeout` s."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{party}.ready").touch()
    end = time.monotonic() + timeout
    while len(list(folder.glob("*.ready"))) < parties:
        if time.monotonic() > end:
            arrived = sorted(p.stem for p in folder.glob("*.ready"))
            raise TimeoutError(f"barrier {folder}: {arrived} of {parties} arrived in {timeout} s")
        time.sleep(0.002)
    return time.time()
