"""Where a `chexops tune` study lives, opening it, and its pruner.

The storage is a database URL (Optuna's RDBStorage, SQLAlchemy underneath): by default a SQLite
file at the main repository root, PostgreSQL (or MySQL) for a team. A relative SQLite URL means
the main repository, also from a DVC temp workspace (<repo>/.dvc/tmp/exps/...), so every worker
and every trial's stages reach the same file.

optuna and sqlalchemy are imported inside functions: a training round outside a study never
loads them.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock

from chexops.config import Params
from chexops.config.schema import TunePruner
from chexops.errors import ChexopsError
from chexops.paths import main_repo_root
from chexops.redact import redact_url

if TYPE_CHECKING:  # pragma: no cover
    from optuna.pruners import BasePruner
    from optuna.storages import RDBStorage

SQLITE_BUSY_TIMEOUT_S = 60  # workers, heartbeats and rounds write the one file in turns


def storage_url(params: Params, root: str | Path) -> str:
    """tune.storage with a relative SQLite path made absolute against the main repository root
    (sqlite:///optuna.db -> sqlite:////<repo>/optuna.db); any other URL as written."""
    url = params.tune.storage.strip()
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        return f"sqlite:///{main_repo_root(root) / url[len('sqlite:///'):]}"
    return url


def sqlite_file(url: str) -> Path | None:
    """The database file of a sqlite:/// URL; None for a server."""
    return Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else None


def _creation_lock(url: str) -> contextlib.AbstractContextManager:
    """Workers starting at once on one SQLite file create its tables in turn (<db>.lock)."""
    db = sqlite_file(url)
    return FileLock(db.with_name(db.name + ".lock")) if db is not None else contextlib.nullcontext()


def _enable_wal(url: str) -> None:
    """WAL lets the workers' and rounds' reads go on while one of them writes (a heartbeat
    must not wait behind a reader); the mode stays with the file."""
    import sqlite3

    db = sqlite_file(url)
    if db is not None:
        with contextlib.closing(sqlite3.connect(db, timeout=SQLITE_BUSY_TIMEOUT_S)) as conn:
            conn.execute("PRAGMA journal_mode=WAL")


def open_storage(url: str, heartbeat_s: int | None = None) -> "RDBStorage":
    """The study storage at `url`, its tables made if new. With `heartbeat_s`, a trial whose
    worker records no heartbeat for 2 x heartbeat_s is stale and later failed
    (optuna.storages.fail_stale_trials). Raises ChexopsError, one line, when the database
    cannot be reached or its driver is missing."""
    import warnings

    import sqlalchemy.exc
    from optuna.exceptions import ExperimentalWarning
    from optuna.storages import RDBStorage

    kwargs: dict[str, Any] = ({"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
                              if url.startswith("sqlite") else {"pool_pre_ping": True})
    try:
        with _creation_lock(url), warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeat_interval
            storage = RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=heartbeat_s,
                                 grace_period=2 * heartbeat_s if heartbeat_s else None)
            _enable_wal(url)
            return storage
    except ImportError as exc:
        raise ChexopsError(f"tune.storage {redact_url(url)}: its database driver is not installed "
                           f"({exc.name or exc}); pip install it (docs/TEAM.md: psycopg2-binary "
                           f"for PostgreSQL)") from None
    except (sqlalchemy.exc.SQLAlchemyError, OSError, ValueError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0][:300]
        raise ChexopsError(f"tune.storage {redact_url(url)} cannot be reached ({reason}); check "
                           f"the URL, that the server runs and the folder exists") from None


def make_pruner(cfg: TunePruner) -> "BasePruner":
    """Optuna's MedianPruner: a trial is stopped after a round (step = round number) whose
    best validation AUROC is below the median of the finished trials' at that round, once
    cfg.startup_trials trials have finished; NopPruner for kind none."""
    from optuna.pruners import MedianPruner, NopPruner

    if cfg.kind == "none":
        return NopPruner()
    return MedianPruner(n_startup_trials=cfg.startup_trials, n_warmup_steps=cfg.warmup_rounds)


def load_study(params: Params, url: str, name: str, storage: "RDBStorage | None" = None,
               sampler: Any = None) -> Any:
    """The study `name` in the storage, made when new, with the pruner of params.tune; raises
    ChexopsError when it exists with the other direction."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    direction = optuna.study.StudyDirection[params.tune.direction.upper()]
    study = optuna.create_study(storage=storage or open_storage(url), study_name=name,
                                direction=direction, load_if_exists=True,
                                sampler=sampler, pruner=make_pruner(params.tune.pruner))
    if study.direction != direction:
        raise ChexopsError(f"study {name!r} in {redact_url(url)} is set to {study.direction.name.lower()}, "
                           f"not tune.direction: {params.tune.direction}; use another --study")
    return study
