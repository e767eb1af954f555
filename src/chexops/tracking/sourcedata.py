"""A trial's source data put back in a reproduce workspace at the md5 the trial recorded: from
the DVC cache, else the DVC remote, else re-derived by its source stage and checked against that
md5; refused, naming the input, when none of these gives it.
"""
from __future__ import annotations

import sys
from pathlib import Path

from chexops.errors import ChexopsError
from chexops.redact import redact_text
from chexops.tracking import dvcfiles, remote
from chexops.tracking.trials import Trial
from chexops.tracking.workspace import repro

# remote failures that say the remote is misconfigured rather than missing the data: re-deriving
# would hide them, so reproduce refuses unless --rederive
REFUSE_REMOTE_KINDS = ("credentials", "unreachable")


def _mismatch(out: str, old: str, new: str | None, source: str, cache: Path,
              remote_note: str) -> ChexopsError:
    files = remote.dir_differences(cache, old, new) if new else []
    which = f" ({', '.join(files[:5])} differ)" if files else ""
    return ChexopsError(f"{out}: the data differs from the trial's{which}: recorded md5 {old}, "
                        f"data.source {source!r} now gives {new or 'nothing'}; {remote_note}; "
                        f"restore the original data or `dvc push` it from where the trial ran")


def _fetch(ws: Path, out: str, md5: str, cache: Path) -> tuple[str | None, remote.RemoteError | None]:
    """(remote name, None) once `out` is fetched from the default DVC remote into the workspace;
    (None, None) when no remote is configured; (None, why) when the remote did not give it."""
    name = remote.default_remote(ws)
    if not name:
        return None, None
    try:
        remote.fetch_object(ws, cache, Path(out).name, md5)
    except remote.RemoteError as exc:
        return None, exc
    remote.copy_from_cache(cache, md5, ws / out)
    return name, None


def restore_source(ws: Path, stage: str, out: str, md5: str, cache: Path, env: dict[str, str],
                   source: str, rederive: bool = False) -> str:
    """Put `out` at md5 in the workspace: DVC cache, else remote, else re-derive; say how.
    A remote that rejects the credentials or is unreachable is refused unless `rederive`."""
    if remote.in_cache(cache, md5):
        remote.copy_from_cache(cache, md5, ws / out)
        return "DVC cache"
    name, failure = _fetch(ws, out, md5, cache)
    if name:
        return f"DVC remote {name}"
    cause = redact_text(str(failure)) if failure else "no DVC remote is configured"
    note = redact_text(f"it is not in the DVC cache and {failure.problem} ({failure.fix})") \
        if failure else f"it is not in the DVC cache and {cause}"
    if failure and failure.kind in REFUSE_REMOTE_KINDS and not rederive:
        raise ChexopsError(f"{out}: {note}; or pass --rederive to re-derive it with stage {stage} "
                           f"from data.source {source!r} (its md5 is still checked)")
    print(f"reproduce: {out} is not in the DVC cache and not had from the DVC remote "
          f"({cause}); re-deriving it with stage {stage}", file=sys.stderr)
    # not --single-item: the source's fingerprint stage, its one upstream, runs first
    repro(ws, env, ["--force", stage], f"stage {stage}")
    new = dvcfiles.lock_outs(ws).get(out)
    if new != md5:
        raise _mismatch(out, md5, new, source, cache, note)
    return f"re-derived by {stage}, same md5"


def restore_data(ws: Path, trial: Trial, cache: Path, env: dict[str, str],
                 source: str, rederive: bool = False) -> dict[str, str]:
    """Every source output the trial recorded, at its recorded md5; {out: how}."""
    recorded, sources = trial.data_md5s, dvcfiles.source_stages(ws)
    how = {out: restore_source(ws, stage, out, recorded[out], cache, env, source, rederive)
           for stage, outs in sources.items() for out in outs if out in recorded}
    if not how:
        raise ChexopsError(f"trial {trial.run_id} recorded no md5 for the pipeline's source data "
                           f"({', '.join(o for v in sources.values() for o in v)}); "
                           f"it cannot be checked, so it is not reproduced")
    return how
