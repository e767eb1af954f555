"""`python -m chexops.tuning.launch NAME DVC-ARGS...`: run `dvc DVC-ARGS` in-process for one
tuning trial (experiment NAME), safe beside other workers' trials.

Why not plain `dvc exp run --temp`: DVC puts the experiment on a stash shared by every
`--temp` run of the repository and then takes the *newest* entry, and after its run it keeps
taking entries until the stash is empty (dvc/repo/experiments/queue/tempdir.py, workspace.py;
DVC 3.x). Two workers starting at once may take each other's entries, and a worker that ends
while another has just stashed its own would run that one too. So this launcher
  - holds an exclusive lock (.dvc/tmp/chexops-tune-start.lock) from before DVC stashes until
    its entry is taken, so no other worker's entry is on the stash meanwhile,
  - takes one entry only (a second take finds the queue "empty"), and checks it is NAME.
It also ends everything it started (the stage dvc runs) and removes its temp workspace when
its worker dies, so a killed worker leaves nothing training and no experiment shown as running.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from filelock import FileLock

START_LOCK = Path(".dvc/tmp/chexops-tune-start.lock")
PARENT_POLL_S = 1.0


def _take_one(lock: FileLock, name: str, workspaces: list[str]) -> None:
    """Make DVC's temp-dir queue hand out this launcher's entry once, then report it empty;
    the temp workspace it runs in is added to `workspaces`."""
    from dvc.exceptions import DvcException
    from dvc.repo.experiments.exceptions import ExpQueueEmptyError
    from dvc.repo.experiments.queue.tempdir import TempDirQueue

    original = TempDirQueue.get
    taken: list[str] = []

    def get_once(self: Any) -> Any:
        if taken:
            raise ExpQueueEmptyError("chexops tune runs one experiment per launch")
        try:
            result = original(self)
        finally:
            lock.release()
        taken.append(result.entry.name)
        workspaces.append(result.executor.root_dir)
        if result.entry.name != name:
            raise DvcException(f"chexops tune: took experiment {result.entry.name!r} instead of "
                               f"{name!r}; another `dvc exp run --temp` ran beside the study")
        return result

    TempDirQueue.get = get_once  # type: ignore[method-assign]


# removes the temp workspaces once the launcher is gone (dvc would write on into them meanwhile)
CLEANUP = ("import shutil, sys, time; time.sleep(2); "
           "[shutil.rmtree(p, ignore_errors=True) for p in sys.argv[1:]]")


def _die_with_parent(workspaces: list[str]) -> None:
    """When the worker that started this launcher is gone (reparented): kill what it runs,
    exit, and leave a detached process to remove its temp workspace."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        for child in psutil.Process().children(recursive=True):
            try:
                child.send_signal(signal.SIGKILL)
            except psutil.Error:
                continue
        if workspaces:
            subprocess.Popen([sys.executable, "-c", CLEANUP, *workspaces], start_new_session=True,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        os._exit(128 + signal.SIGKILL)

    threading.Thread(target=watch, daemon=True).start()


def main(argv: list[str]) -> int:
    name, dvc_args = argv[0], argv[1:]
    workspaces: list[str] = []
    _die_with_parent(workspaces)
    START_LOCK.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(START_LOCK)
    lock.acquire()
    try:
        _take_one(lock, name, workspaces)
        from dvc.cli import main as dvc_main

        return int(dvc_main(dvc_args) or 0)
    finally:
        lock.release(force=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
