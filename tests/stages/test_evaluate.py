"""Evaluate: pure metric/curve/report functions, and the stage end to end on a tiny split with
the model's predictions replaced by fixed probabilities (the model is tested elsewhere)."""
from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from chexops.config import load_params
from chexops.evaluation import confusion, figures
from chexops.evaluation import targets as evaluate

REPO = Path(__file__).resolve().parents[2]
Y = np.array([0, 0, 0, 1, 1, 0, 1, 0])
P = np.array([0.1, 0.4, 0.35, 0.8, 0.3, 0.6, 0.9, 0.2])
YT = np.array([0, 1, 0, 1, 0, 0, 1, 1, 0, 0])           # the held-out test cohort
PT = np.array([0.2, 0.7, 0.4, 0.3, 0.1, 0.5, 0.8, 0.6, 0.65, 0.05])


def frame(labels, n_offset: int = 0, split: str = "valid") -> pd.DataFrame:
    paths = [f"CheXpert-v1.0-small/{split}/patient{i + n_offset:05d}/study1/view1_frontal.jpg"
             for i in range(len(labels))]
    return pd.DataFrame({"Path": paths, "Cardiomegaly": np.asarray(labels, dtype="int8"),
                         "valid": True})


def test_metrics_and_curves_match_sklearn():
    metrics, curves = evaluate.evaluate_targets(frame(Y), P[:, None], ("Cardiomegaly",), 0.5)
    m = metrics["Cardiomegaly"]
    assert m["auroc"] == pytest.approx(roc_auc_score(Y, P))
    assert m["confusion"] == [[4, 1], [1, 2]] and m["n"] == 8 and m["n_pos"] == 3
    assert m["error_rate"] == pytest.approx(2 / 8) and "note" not in m
    assert list(curves["Cardiomegaly"]["roc"].columns) == ["fpr", "tpr"]
    assert list(curves["Cardiomegaly"]["pr"].columns) == ["recall", "precision"]
    confusion = curves["Cardiomegaly"]["confusion"]
    assert list(confusion.columns) == ["actual", "predicted"] and len(confusion) == 8
    assert int(((confusion.actual == 1) & (confusion.predicted == 0)).sum()) == 1
    assert json.dumps(metrics)  # plain Python values only


def test_single_class_and_empty_splits_say_why_instead_of_crashing():
    ones = np.ones(5, dtype=int)
    metrics, curves = evaluate.evaluate_targets(frame(ones), np.full((5, 1), 0.7),
                                                ("Cardiomegaly",), 0.5)
    m = metrics["Cardiomegaly"]
    assert m["auroc"] is None and "only positive cases" in m["note"]
    assert curves["Cardiomegaly"]["roc"].empty
    empty, _ = evaluate.evaluate_targets(frame([]), np.zeros((0, 1)), ("Cardiomegaly",), 0.5)
    assert empty["Cardiomegaly"]["auroc"] is None and "empty" in empty["Cardiomegaly"]["note"]
    assert "AUROC is undefined" in figures.markdown_report(metrics, ("Cardiomegaly",), "w")


def test_ceiling_auroc_uses_the_latent_score():
    df = frame(Y)
    truth = pd.DataFrame({"Path": df.Path[::-1], "ctr": (0.45 + 0.1 * Y)[::-1]})
    assert evaluate.ceiling_auroc(truth, df.Path, Y, "Cardiomegaly") == 1.0
    assert evaluate.ceiling_auroc(truth.rename(columns={"ctr": "x"}), df.Path, Y,
                                  "Cardiomegaly") is None
    assert evaluate.ceiling_auroc(truth.iloc[1:], df.Path, Y, "Cardiomegaly") is None


def test_multi_target_adds_target_column_and_mean():
    df = frame(Y).assign(Edema=Y[::-1].astype("int8"))
    probs = np.stack([P, P[::-1]], axis=1)
    metrics, curves = evaluate.evaluate_targets(df, probs, ("Cardiomegaly", "Edema"), 0.5)
    assert metrics["mean"]["auroc"] == pytest.approx(roc_auc_score(Y, P))
    assert set(evaluate.stack_curves(curves, "roc").target) == {"Cardiomegaly", "Edema"}


def test_multi_target_mean_averages_every_scalar_metric_skipping_undefined():
    from chexops.evaluation.metrics import binary_metrics

    y2 = np.array([1, 0, 1, 1, 0, 0, 1, 0])
    p2 = np.array([0.7, 0.6, 0.2, 0.9, 0.1, 0.3, 0.55, 0.8])
    df = frame(Y).assign(Edema=y2.astype("int8"), Effusion=np.ones(8, dtype="int8"))
    probs = np.stack([P, p2, np.full(8, 0.7)], axis=1)
    metrics, _ = evaluate.evaluate_targets(df, probs, ("Cardiomegaly", "Edema", "Effusion"), 0.5)
    mean = metrics["mean"]
    a, b, c = binary_metrics(Y, P), binary_metrics(y2, p2), binary_metrics(np.ones(8), np.full(8, 0.7))
    # AUROC: undefined for the all-positive Effusion, so the mean of the other two
    assert metrics["Effusion"]["auroc"] is None
    assert mean["auroc"] == pytest.approx((a["auroc"] + b["auroc"]) / 2)
    for key in ("precision", "recall", "specificity", "error_rate", "accuracy"):
        assert mean[key] == pytest.approx((a[key] + b[key] + c[key]) / 3), key
    assert len({mean[k] for k in ("precision", "recall", "specificity", "error_rate")}) == 4
    assert "n" not in mean and "threshold" not in mean and "confusion" not in mean
    assert json.dumps(metrics)


def test_mean_metrics_averages_tta_records_and_keeps_none_when_nowhere_defined():
    records = [{"auroc": 0.8, "precision": None, "tta": {"auroc": 0.82, "recall": 0.5, "views": 4}},
               {"auroc": 0.6, "precision": None, "tta": {"auroc": 0.7, "recall": 0.7, "views": 4}}]
    mean = evaluate.mean_metrics(records)
    assert mean["auroc"] == pytest.approx(0.7) and mean["precision"] is None
    assert mean["tta"] == {"auroc": pytest.approx(0.76), "recall": pytest.approx(0.6), "views": 4}
    assert "recall" not in mean  # only what the targets report


def test_headline_first_puts_mean_then_auroc_and_its_interval_before_the_rest():
    metrics = {"Edema": {"precision": 0.5, "auroc_hi": 0.9, "ci": {"recall": {}, "auroc": {}},
                         "auroc": 0.8, "accuracy": 0.7, "auroc_lo": 0.6, "subgroups": [{"n": 1}]},
               "Atelectasis": {"brier": 0.1, "auroc": None},
               "mean": {"recall": 0.4, "auroc": 0.8, "tta": {"recall": 0.3, "auroc": 0.7}}}
    out = evaluate.headline_first(metrics)
    assert out == metrics
    assert list(out) == ["mean", "Edema", "Atelectasis"]       # targets keep params' order
    assert list(out["Edema"]) == ["auroc", "auroc_lo", "auroc_hi", "accuracy", "ci", "precision",
                                  "subgroups"]
    assert list(out["Edema"]["ci"]) == ["auroc", "recall"]
    assert list(out["mean"]) == ["auroc", "recall", "tta"] and list(out["mean"]["tta"]) == ["auroc", "recall"]


# ---------------------------------------------------------------- the stage

def write_recipe_only(path: Path, params) -> None:
    """A safetensors file with the recipe params train and one tensor, no network: the
    stage reads the recipe; predictions are fixed here."""
    import torch
    from safetensors.torch import save_file

    from chexops.model.recipe import params_recipe, recipe_metadata

    save_file({"w": torch.zeros(1)}, str(path), metadata=recipe_metadata(params_recipe(params)))


@pytest.fixture()
def stage_repo(tmp_path, monkeypatch):
    """dvc.yaml, final weights, a valid split and a truth table; predictions are fixed."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / "models/round-5").mkdir(parents=True)
    write_recipe_only(tmp_path / "models/round-5/best.safetensors", load_params(REPO / "params.yaml"))
    (tmp_path / "data/resampled").mkdir(parents=True)
    frame(Y).to_parquet(tmp_path / "data/resampled/valid.parquet")
    (tmp_path / "data/clean").mkdir(parents=True)
    test = frame(YT, 64741, "test").drop(columns="valid")
    test.to_parquet(tmp_path / "data/clean/test.parquet")
    (tmp_path / "data/raw").mkdir()
    truth = pd.DataFrame({"Path": [*frame(Y).Path, *test.Path], "ctr": 0.45 + 0.1 * np.r_[Y, YT]})
    truth.to_parquet(tmp_path / "data/raw/synthetic_truth.parquet")
    for k, aurocs in ((1, [0.5, 0.7, 0.8]), (2, [0.8, 0.75])):   # two rounds' histories
        history = tmp_path / f"plots/round-{k}/history.csv"
        history.parent.mkdir(parents=True)
        pd.DataFrame({"epoch": range(len(aurocs)), "train_loss": [None, *[0.5] * (len(aurocs) - 1)],
                      "valid_loss": 0.6, "auroc": aurocs}).to_csv(history, index=False)
    calls = []

    def predict_frame(params, weights_path, df, zip_path, root):
        calls.append(Path(weights_path))
        held = df["Path"].str.contains("/test/").all()
        return (PT if held else P)[: len(df), None]

    monkeypatch.setitem(sys.modules, "chexops.inference.frames",
                        types.SimpleNamespace(predict_frame=predict_frame))
    # these weights hold no network, so no Grad-CAM and no registry here; both are tested
    # with a real tiny model in tests/stages/test_evaluate_report.py
    from chexops.stages import evaluate_report
    monkeypatch.setattr(evaluate_report, "_gradcam_figures", lambda *a, **k: {})
    monkeypatch.setattr(evaluate_report, "register_model", lambda *a, **k: None)
    return tmp_path, calls


def test_stage_writes_metrics_plots_report_and_closes_the_trial(stage_repo):
    from mlflow.tracking import MlflowClient

    from chexops.stages import evaluate as stage

    root, calls = stage_repo
    stage.main(load_params(REPO / "params.yaml"), root)
    assert calls == [root / "models/round-5/best.safetensors"] * 2   # validation, test cohort
    metrics = json.loads((root / "metrics/evaluate.json").read_text())
    assert metrics["Cardiomegaly"]["auroc"] == pytest.approx(roc_auc_score(Y, P))
    assert metrics["Cardiomegaly"]["ceiling_auroc"] == 1.0
    head = list(metrics["Cardiomegaly"].items())[:3]   # the file's order is what DVC shows
    assert [k for k, _ in head] == ["auroc", "auroc_lo", "auroc_hi"]
    assert head[1][1] == metrics["Cardiomegaly"]["ci"]["auroc"]["lo"] <= head[0][1] <= head[2][1]
    assert list(pd.read_csv(root / "plots/evaluate/roc.csv").columns) == ["fpr", "tpr"]
    assert len(pd.read_csv(root / "plots/evaluate/confusion.csv")) == len(Y)
    assert pd.read_csv(root / "plots/evaluate/precision_recall.csv").shape[1] == 2
    report = root / "reports/evaluate"
    assert {"report.md", "roc.png", "precision_recall.png", "confusion.png"} <= \
        {p.name for p in report.iterdir()}
    assert (report / "precision_recall.png").read_bytes()[:4] == b"\x89PNG"
    assert (report / "roc.png").read_bytes()[:4] == b"\x89PNG"
    run_id = json.loads((root / "runs/evaluate.json").read_text())["run_id"]
    c = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    run = c.get_run(run_id)
    assert run.data.metrics["Cardiomegaly.auroc"] == pytest.approx(roc_auc_score(Y, P))
    assert run.data.tags["data.md5.data/resampled/valid.parquet"]
    artifacts = {a.path for a in c.list_artifacts(run_id)} | \
        {a.path for a in c.list_artifacts(run_id, "report")}
    assert {"confusion.json", "report/confusion.png", "report/report.md"} <= artifacts
    trial_id = run.data.tags["mlflow.parentRunId"]
    trial = c.get_run(trial_id)
    assert trial.data.tags["chexops.trial"] == "true"
    assert trial.data.metrics["evaluate.Cardiomegaly.auroc"] == pytest.approx(roc_auc_score(Y, P))
    assert trial.data.metrics["evaluate.Cardiomegaly.test.auroc"] == \
        pytest.approx(roc_auc_score(YT, PT))
    assert "figures/rounds.png" in {a.path for a in c.list_artifacts(trial_id, "figures")}


def test_stage_scores_the_held_out_cohort_beside_validation(stage_repo, capsys):
    from chexops.stages import evaluate as stage

    root, _ = stage_repo
    stage.main(load_params(REPO / "params.yaml"), root)
    metrics = json.loads((root / "metrics/evaluate.json").read_text())["Cardiomegaly"]
    held = metrics["test"]
    assert held["auroc"] == pytest.approx(roc_auc_score(YT, PT))
    assert held["n"] == len(YT) and held["n_pos"] == int(YT.sum())
    assert held["auroc_lo"] <= held["auroc"] <= held["auroc_hi"] and held["auroc_hi"] > held["auroc_lo"]
    assert held["ceiling_auroc"] == 1.0 and held["ceiling_fraction"] == pytest.approx(held["auroc"])
    assert held["optimism"] == pytest.approx(metrics["auroc"] - held["auroc"])
    assert list(held)[:3] == ["auroc", "auroc_lo", "auroc_hi"]
    predictions = pd.read_parquet(root / "reports/evaluate/test_predictions.parquet")
    assert list(predictions["prob:Cardiomegaly"]) == list(PT)
    assert "## Held-out test cohort" in (root / "reports/evaluate/report.md").read_text()
    assert "held-out test, 10 images" in (root / "reports/evaluate/report.html").read_text()
    assert f"evaluate held-out test cohort Cardiomegaly: AUROC {held['auroc']:.3f}" in \
        capsys.readouterr().out


def test_stage_draws_every_rounds_epochs_on_one_axis(stage_repo):
    from chexops.stages import evaluate as stage

    root, _ = stage_repo
    stage.main(load_params(REPO / "params.yaml"), root)
    table = pd.read_csv(root / "plots/evaluate/rounds.csv")
    assert list(table["round"]) == [1, 1, 1, 2, 2] and list(table["step"]) == [0, 1, 2, 2, 3]
    assert list(table["best"]) == [False, False, True, True, False]
    assert (root / "reports/evaluate/rounds.png").read_bytes()[:4] == b"\x89PNG"


def test_stage_without_a_test_cohort_says_so_and_scores_validation(stage_repo, capsys):
    from chexops.stages import evaluate as stage

    root, calls = stage_repo
    pd.read_parquet(root / "data/clean/test.parquet").iloc[:0].to_parquet(
        root / "data/clean/test.parquet")
    stage.main(load_params(REPO / "params.yaml"), root)
    metrics = json.loads((root / "metrics/evaluate.json").read_text())["Cardiomegaly"]
    assert "test" not in metrics and len(calls) == 1
    assert not (root / "reports/evaluate/test_predictions.parquet").exists()
    assert "no held-out test cohort" in capsys.readouterr().out


def test_stage_on_a_single_class_split_reports_undefined_auroc(stage_repo):
    from chexops.stages import evaluate as stage

    root, _ = stage_repo
    frame(np.zeros(4, dtype=int)).to_parquet(root / "data/resampled/valid.parquet")
    stage.main(load_params(REPO / "params.yaml"), root)
    metrics = json.loads((root / "metrics/evaluate.json").read_text())
    assert metrics["Cardiomegaly"]["auroc"] is None
    assert "only negative cases" in metrics["Cardiomegaly"]["note"]
    assert metrics["Cardiomegaly"]["ceiling_auroc"] is None
    assert (root / "reports/evaluate/report.md").read_text().count("AUROC is undefined") == 1


def test_stage_without_final_weights_names_the_fix(stage_repo):
    from chexops.errors import ChexopsError
    from chexops.stages import evaluate as stage

    root, _ = stage_repo
    (root / "models/round-5/best.safetensors").unlink()
    with pytest.raises(ChexopsError, match="round-5/best.safetensors not found; run"):
        stage.main(load_params(REPO / "params.yaml"), root)
    assert not (root / "metrics").exists() and not (root / "runs").exists()


def test_stage_shows_blank_demographics_as_an_unknown_subgroup(stage_repo):
    """Rows whose Age or Sex the CSV leaves blank pass clean and form an `unknown` subgroup."""
    from chexops.data import clean
    from chexops.stages import evaluate as stage
    from tests.helpers import chexpert_rows, write_chexpert_zip

    root, _ = stage_repo
    train, valid = chexpert_rows(valid_patients=len(Y) // 2)   # 2 views each: one row per P
    valid = valid.astype({"Age": object})
    valid.loc[[0, 3], "Age"] = ""
    valid.loc[5, "Sex"] = ""
    params = load_params(REPO / "params.yaml")
    table, _, _ = clean.clean_table(write_chexpert_zip(root / "chexpert.zip", train, valid), params)
    table[table["valid"]].to_parquet(root / "data/resampled/valid.parquet", index=False)
    stage.main(params, root)
    subgroups = json.loads((root / "metrics/evaluate.json").read_text())["Cardiomegaly"]["subgroups"]
    unknown = {s["kind"]: s["n"] for s in subgroups if s["group"] == "unknown"}
    assert unknown == {"age": 2, "sex": 1}
    assert sum(s["n"] for s in subgroups if s["kind"] == "age") == len(Y)
    plotted = pd.read_csv(root / "plots/evaluate/subgroups.csv")
    assert set(plotted.loc[plotted.group == "unknown", "kind"]) == {"age", "sex"}
    assert "<td>unknown</td>" in (root / "reports/evaluate/report.html").read_text()
