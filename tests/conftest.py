"""Shared fixtures: a tiny CheXpert zip, tracking replaced by a recorder for stage tests, and the
reduced pipeline built once per test run for the end-to-end tests."""
from __future__ import annotations

import pytest

from tests.helpers import fake_stage_run, write_chexpert_zip
from tests.pipeline_repo import BuiltPipeline, build_shared_pipeline


@pytest.fixture()
def tiny_chexpert_zip(tmp_path):
    """A CheXpert-v1.0-small zip: 6 train + 3 valid patients, two views each, real JPEGs."""
    return write_chexpert_zip(tmp_path / "tiny-chexpert.zip")


@pytest.fixture()
def stage_runs(monkeypatch):
    """chexops.tracking.runs.stage_run -> an in-memory recorder; yields [(stage, run), ...]."""
    import chexops.tracking.runs as tracking

    runs: list = []
    monkeypatch.setattr(tracking, "stage_run", fake_stage_run(runs))
    return runs


@pytest.fixture(scope="session")
def shared_pipeline(tmp_path_factory) -> BuiltPipeline:
    """The reduced pipeline after `make repro`, built once for the whole run (slow: ~2 min)."""
    return build_shared_pipeline(tmp_path_factory.mktemp("shared-pipeline"))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """On a pytest-xdist worker with --dist loadgroup, fail loudly when grouped tests did not get
    their group (some pytest releases drop it silently; then every worker would build the shared
    pipeline and the queue's two trials could run beside other training)."""
    if not (getattr(config, "workerinput", None) and config.getvalue("loadgroup")):
        return
    lost = [i.nodeid for i in items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]
    if lost:
        raise pytest.UsageError(f"xdist_group ignored for {lost[0]} and {len(lost) - 1} more: this "
                                f"pytest breaks --dist loadgroup; install the pinned test extra")
