"""The real nine-stage DVC pipeline (and its source fingerprint), reduced, end to end: `make repro`,
`dvc exp run -S lr=...`, `dvc exp show`, and what lands in the MLflow store."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.pipeline_repo import SHARED, VENV_BIN, pipeline_env, reduced_params, run
from tests.processes import run_group

pytestmark = [pytest.mark.slow, SHARED]

# the nine stages that log to MLflow, and dvc.yaml's stages: the source fingerprint first
PIPELINE = ["download", "clean", "resample"] + [f"train-round-{k}" for k in range(1, 6)] + ["evaluate"]
STAGES = ["source-fingerprint"] + PIPELINE
ALWAYS_CHANGED = {"source-fingerprint": ["always changed"]}  # what `dvc status` shows when idle
ROUND_METRICS = {"train_loss", "valid_loss", "auroc", "precision", "recall", "error_rate", "lr"}


@pytest.fixture()
def repo(shared_pipeline) -> Path:
    """The reduced repo after `make repro` (the README's pipeline command), shared with other
    end-to-end tests (tests/conftest.py): tests add trials (`dvc exp run`) and change its
    workspace in any order, so each checks what it caused or what `make repro` itself made
    (`made_by_make_repro`), not the repo's state now."""
    return shared_pipeline.repo


def made_by_make_repro(repo: Path) -> dict:
    """{"trial": run id, "lock": dvc.lock as a dict}: what the shared pipeline's make repro left."""
    built = json.loads((repo.parent / "built.json").read_text())
    return {"trial": built["trial"], "lock": yaml.safe_load(built["dvc.lock"])}


def client(repo: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")


def all_runs(repo: Path) -> list:
    c = client(repo)
    exp = c.get_experiment_by_name("chexops")
    assert exp is not None, "no 'chexops' experiment in the embedded store"
    return c.search_runs([exp.experiment_id], max_results=1000)


def trial_runs(runs: list) -> list:
    return sorted((r for r in runs if r.data.tags.get("chexops.trial") == "true"),
                  key=lambda r: r.info.start_time)


def children(runs: list, trial) -> dict:
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == trial.info.run_id]
    return {r.data.tags["chexops.stage"]: r for r in kids}


def lock_out_md5s(lock: dict) -> dict[str, str]:
    return {o["path"]: o["md5"] for s in lock["stages"].values() for o in s.get("outs", [])}


def new_trials(before: list, runs: list) -> list:
    """The trials in `runs` that were not among the trials `before`."""
    old = {t.info.run_id for t in before}
    return [t for t in trial_runs(runs) if t.info.run_id not in old]


def test_all_nine_stages_ran_and_are_locked(repo):
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert list(lock["stages"]) == STAGES
    for k in range(1, 6):
        assert (repo / f"models/round-{k}/best.safetensors").stat().st_size > 1_000_000
    evaluation = json.loads((repo / "metrics/evaluate.json").read_text())["Cardiomegaly"]
    # the reduced run is too small to promise learning (tests/pipeline/test_default_pipeline.py does);
    # here: every figure of the seed's table is there, and the ceiling from the hidden truth
    assert isinstance(evaluation["auroc"], float) and 0.0 <= evaluation["auroc"] <= 1.0
    for key in ("precision", "recall", "error_rate", "confusion"):
        assert evaluation.get(key) is not None, key
    # the data came from a local zip, as a user's own would: no hidden truth, so no ceiling (the
    # built-in synthetic source's ceiling is checked end to end in test_tracking_server.py)
    assert evaluation.get("ceiling_auroc") is None
    # the zip's test.csv (the generator's held-out cohort) is scored, and only by evaluate
    held = evaluation["test"]
    assert held["n"] == len(pd.read_parquet(repo / "data/clean/test.parquet")) > 0
    assert held["auroc_lo"] <= held["auroc"] <= held["auroc_hi"]
    assert held["optimism"] == pytest.approx(evaluation["auroc"] - held["auroc"])
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    readers = [s for s, st in lock.items() if any(d["path"] == "data/clean/test.parquet"
                                                  for d in st.get("deps", []))]
    assert readers == ["evaluate"]


def dvc_status(repo: Path) -> dict:
    return json.loads(run(["dvc", "status", "--json"], repo, pipeline_env()).stdout)


def test_noop_repro_has_nothing_to_do(repo):
    """Nothing changed: only the source fingerprint runs (DVC runs it every time), finds the
    source as it was, and every pipeline stage is skipped."""
    assert dvc_status(repo) == ALWAYS_CHANGED
    trials_before = len(trial_runs(all_runs(repo)))
    lock_before = (repo / "dvc.lock").read_text()
    out = run(["dvc", "repro"], repo, pipeline_env()).stdout
    assert "Running stage 'source-fingerprint'" in out, out
    assert not [s for s in PIPELINE if f"Running stage '{s}'" in out], out
    assert (repo / "dvc.lock").read_text() == lock_before
    assert len(trial_runs(all_runs(repo))) == trials_before  # nothing ran: no new trial


@pytest.mark.parametrize("module", ["src/chexops/evaluation/figures.py",
                                    "src/chexops/evaluation/report.py",
                                    "src/chexops/inference/gradcam.py"])
def test_editing_report_code_changes_evaluate_and_no_training_round(repo, module):
    """A figure, report or Grad-CAM edit must never retrain: DVC sees evaluate change, and
    nothing before it (minutes here, hours on real CheXpert)."""
    path = repo / module
    original = path.read_bytes()
    try:
        path.write_bytes(original + b"\n# a wording change in the report\n")
        status = dvc_status(repo)
        assert set(status) == {"evaluate", *ALWAYS_CHANGED}, status
    finally:
        path.write_bytes(original)
    assert dvc_status(repo) == ALWAYS_CHANGED


def test_trial_run_has_a_child_per_stage_with_round_metrics(repo):
    runs = all_runs(repo)
    trial, = (r for r in runs if r.info.run_id == made_by_make_repro(repo)["trial"])
    kids = children(runs, trial)
    assert set(kids) == set(PIPELINE)  # the source fingerprint logs no run
    assert "evaluate.Cardiomegaly.auroc" in trial.data.metrics or any(
        k.endswith("auroc") for k in trial.data.metrics)
    assert trial.data.params["lr"] == str(reduced_params()["lr"])
    c = client(repo)
    for k in range(1, 6):
        kid = kids[f"train-round-{k}"]
        assert ROUND_METRICS <= set(kid.data.metrics), kid.data.metrics
        history = c.get_metric_history(kid.info.run_id, "auroc")
        assert [m.step for m in history] == [1]  # one epoch per round, step = epoch
        for key in ("epochs", "lr", "freeze", "batch_size", "image_size", "seed"):
            assert any(p == key or p.endswith(f".{key}") for p in kid.data.params), (k, key)
        artifacts = _artifact_paths(c, kid.info.run_id)
        assert any("confusion" in a and a.endswith(".json") for a in artifacts), artifacts
        assert any(a.endswith(".safetensors") for a in artifacts), artifacts
    evaluate = kids["evaluate"]
    for key in ("auroc", "precision", "recall", "error_rate"):
        assert f"Cardiomegaly.{key}" in evaluate.data.metrics, evaluate.data.metrics.keys()
    assert any("confusion" in a for a in _artifact_paths(c, evaluate.info.run_id))


def lock_data_deps(lock: dict) -> dict[str, dict[str, str]]:
    """{stage: {dep path: md5}} for every non-code dep, as DVC recorded it in dvc.lock."""
    return {name: {d["path"]: d["md5"] for d in s.get("deps", []) if not d["path"].startswith("src/")}
            for name, s in lock["stages"].items()}


def test_data_hash_tags_equal_dvc_lock(repo):
    # make repro's trial against the dvc.lock make repro wrote (an `exp run` may have changed it)
    made = made_by_make_repro(repo)
    deps = lock_data_deps(made["lock"])
    runs = all_runs(repo)
    trial, = (r for r in runs if r.info.run_id == made["trial"])
    kids = children(runs, trial)
    checked = 0
    for stage, kid in kids.items():
        for path, md5 in deps[stage].items():  # every data input of every stage, none skipped
            assert kid.data.tags.get(f"data.md5.{path}") == md5, (stage, path)
            checked += 1
        digests = {d.dataset.name: d.dataset.digest for d in kid.inputs.dataset_inputs}
        assert digests == deps[stage], stage  # mlflow.log_input, digest = DVC's md5
    assert checked >= 20  # zip, labels, resampled data and the previous round's weights
    outs = lock_out_md5s(made["lock"])
    for tag, value in trial.data.tags.items():  # the trial names the data outs it was made from
        if tag.startswith("data.md5."):
            assert value == outs[tag[len("data.md5."):]], tag
    assert {d.dataset.digest for d in trial.inputs.dataset_inputs} >= {
        outs["data/raw"], outs["data/resampled"]}


def test_rerun_of_a_round_is_bit_identical(repo):
    weights = repo / "models/round-1/best.safetensors"
    before = hashlib.md5(weights.read_bytes()).hexdigest()
    metrics_before = json.loads((repo / "metrics/round-1.json").read_text())
    run(["dvc", "repro", "-f", "-s", "train-round-1"], repo, pipeline_env())
    assert hashlib.md5(weights.read_bytes()).hexdigest() == before
    assert json.loads((repo / "metrics/round-1.json").read_text()) == metrics_before


def test_exp_run_set_param_lr_changes_round_one_and_lands_as_a_new_trial(repo):
    env = pipeline_env()
    before = trial_runs(all_runs(repo))
    run(["dvc", "exp", "run", "-n", "lr-small", "-S", "lr=0.0005"], repo, env)
    runs = all_runs(repo)
    added = new_trials(before, runs)
    assert len(added) == 1  # this experiment landed as exactly one new trial
    newest, = added
    assert newest.data.tags.get("dvc.exp_name") == "lr-small"
    kids = children(runs, newest)
    assert float(kids["train-round-1"].data.params["lr"]) == pytest.approx(5e-4)
    # data stages were cached: linked by tag, not re-run
    assert "download" not in kids
    assert newest.data.tags.get("stage.download.run_id")
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo, env).stdout)
    assert "lr-small" in json.dumps(shown)


def test_exp_run_of_evaluate_only_links_all_cached_stages(repo):
    """An evaluate-only variant re-runs one stage; the trial still shows all nine by link."""
    env = pipeline_env()
    before = trial_runs(all_runs(repo))
    run(["dvc", "exp", "run", "-n", "thr-low", "-S", "evaluate.threshold=0.4"], repo, env)
    runs = all_runs(repo)
    by_id = {r.info.run_id: r for r in runs}
    added = new_trials(before, runs)
    assert len(added) == 1
    newest, = added
    assert newest.data.tags.get("dvc.exp_name") == "thr-low"
    assert set(children(runs, newest)) == {"evaluate"}
    for stage in PIPELINE[:-1]:
        linked = by_id[newest.data.tags[f"stage.{stage}.run_id"]]
        assert linked.data.tags["chexops.stage"] == stage
        assert linked.info.status == "FINISHED"


def _artifact_paths(c, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for item in c.list_artifacts(run_id, path):
        out.extend(_artifact_paths(c, run_id, item.path) if item.is_dir else [item.path])
    return out


def test_plots_show_renders(repo):
    out = run(["dvc", "plots", "show", "--json"], repo, pipeline_env()).stdout
    rendered = json.loads(out)
    names = json.dumps(rendered)
    assert "plots/evaluate/roc.csv" in names and "plots/round-1/history.csv" in names
    # every round's epochs on one axis, from the top-level plots
    steps = [int(v["step"]) for v in rendered["data"]["rounds-auroc"][0]["content"]["data"]["values"]]
    assert steps == [1, 2, 3, 4, 5]      # five rounds of one epoch each (reduced: no epoch 0)


def test_a_trial_failing_in_a_temp_workspace_lands_failed_in_the_main_store(repo):
    """`MLFLOW_TRACKING_URI=sqlite:///mlflow.db dvc exp run --temp` with a round that blows up:
    the relative URI means the main repo's store (not one inside DVC's temporary copy, deleted
    afterwards), and the trial shows as FAILED in round 2 with the error the user saw."""
    env = {**pipeline_env(), "MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"}
    before = trial_runs(all_runs(repo))
    proc = run_group([str(VENV_BIN / "dvc"), "exp", "run", "--temp", "-n", "lr-blowup",
                      "-S", "rounds.r2.lr=[1.0e+30, 1.0e+31]"], cwd=repo, env=env, timeout=900)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "non-finite training loss" in proc.stdout + proc.stderr
    runs = all_runs(repo)
    added = new_trials(before, runs)
    assert len(added) == 1, [t.info.run_name for t in added]
    failed, = added
    assert failed.info.status == "FAILED" and failed.data.tags["dvc.exp_name"] == "lr-blowup"
    assert failed.data.tags["chexops.failed_stage"] == "train-round-2"
    assert failed.data.tags["chexops.error"].startswith("non-finite training loss")
    kids = children(runs, failed)
    assert kids["train-round-2"].info.status == "FAILED"
    assert not set(kids) & {"train-round-3", "evaluate"}  # DVC stopped at the failure
    assert not list((repo / ".dvc/tmp").rglob("mlflow.db"))
