"""The evaluate stage's statistics, report, Grad-CAM and registry, end to end on a tiny real model
(resnet18, 32 px):
CIs, operating point, calibration and subgroups in metrics/evaluate.json; predictions.parquet,
Grad-CAM grids and a self-contained report.html; the model registered as champion; and
`compare workspace <trial>` working on what the stage wrote."""
from __future__ import annotations

import json
import re
import shutil
import sys
import types

import numpy as np
import pandas as pd
import pytest
import torch

from chexops.commands import compare, predict
from tests.tiny_model import REPO, SIZE, tiny_params, tiny_weights

torch.set_num_threads(1)
N = 60


def valid_frame() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    lateral = np.arange(N) % 5 == 4
    return pd.DataFrame({
        "Path": [f"CheXpert-v1.0-small/valid/patient{64000 + i // 2:05d}/study1/"
                 f"view{i % 2 + 1}_{'lateral' if lateral[i] else 'frontal'}.jpg" for i in range(N)],
        "Sex": rng.choice(["Male", "Female"], N), "Age": rng.integers(20, 90, N),
        "Frontal/Lateral": np.where(lateral, "Lateral", "Frontal"),
        "AP/PA": np.where(lateral, "", rng.choice(["AP", "PA"], N)),
        "Cardiomegaly": (np.arange(N) % 3 == 0).astype("int8"), "valid": True})


@pytest.fixture()
def stage_repo(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    params = tiny_params(tmp_path, model_name="chexops-stage-test", champion=True,
                         gradcam_per_kind=2, per_study=True)
    weights = tiny_weights(tmp_path, params)
    (tmp_path / "models/round-5").mkdir(parents=True)
    shutil.move(weights, tmp_path / "models/round-5/best.safetensors")
    (tmp_path / "data/resampled").mkdir(parents=True)
    valid_frame().to_parquet(tmp_path / "data/resampled/valid.parquet")
    (tmp_path / "data/clean").mkdir(parents=True)
    test = valid_frame().drop(columns="valid")        # a held-out cohort of other patients
    test["Path"] = test["Path"].str.replace("/valid/patient64", "/test/patient65", regex=False)
    test.to_parquet(tmp_path / "data/clean/test.parquet")
    images = np.random.default_rng(1).integers(0, 255, (N, SIZE, SIZE), dtype=np.uint8)
    predictor = predict.predictor_from_weights(tmp_path / "models/round-5/best.safetensors", params)
    fake = types.SimpleNamespace(  # no zip here: images come from memory, the model is real
        predict_frame=lambda p, w, df, z, r: predictor.probabilities(images[: len(df)]),
        load_images=lambda p, df, z, r, size=None: images[: len(df)])
    monkeypatch.setitem(sys.modules, "chexops.inference.frames", fake)
    return tmp_path, params


def test_stage_writes_statistics_report_predictions_and_registers(stage_repo, capsys):
    from mlflow.tracking import MlflowClient

    from chexops.stages import evaluate as stage

    root, params = stage_repo
    stage.main(params, root)
    m = json.loads((root / "metrics/evaluate.json").read_text())["Cardiomegaly"]
    assert m["ci"]["auroc"]["lo"] <= m["auroc"] <= m["ci"]["auroc"]["hi"]
    assert set(m["ci"]) == {"auroc", "precision", "recall", "specificity"}
    assert m["auroc_delong"]["auroc"] == pytest.approx(m["auroc"])
    assert m["operating_point"]["sensitivity"] >= 0.9 and m["operating_point"]["threshold"] is not None
    assert 0 <= m["ece"] <= 1 and 0 <= m["brier"] <= 1
    assert {s["kind"] for s in m["subgroups"]} == {"sex", "age", "view", "ap_pa"}
    assert m["per_study"]["n"] == N // 2
    out = root / "reports/evaluate"
    preds = pd.read_parquet(out / "predictions.parquet")
    assert len(preds) == N and compare.targets_of(preds) == ["Cardiomegaly"]
    cams = sorted(p.name for p in out.glob("gradcam-*.png"))
    assert cams == ["gradcam-cardiomegaly-fn.png", "gradcam-cardiomegaly-fp.png",
                    "gradcam-cardiomegaly-tp.png"]
    calibration = pd.read_csv(root / "plots/evaluate/calibration.csv")
    assert list(calibration.columns) == ["lower", "upper", "count", "mean_prob", "frac_pos"]
    assert calibration["count"].sum() == N
    assert set(pd.read_csv(root / "plots/evaluate/subgroups.csv").kind) == {"sex", "age", "view", "ap_pa"}
    page = (out / "report.html").read_text()
    # roc, precision-recall, confusion, reliability, subgroups, 3 cams
    assert page.count("data:image/png;base64,") >= 8
    assert "ROC, precision-recall and confusion at threshold" in page
    assert not re.search(r"(src|href)=\"(?!data:)", page)  # self-contained: nothing external
    assert "Operating point at sensitivity 0.9" in page

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    run_id = json.loads((root / "runs/evaluate.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.data.metrics["Cardiomegaly.ci.auroc.lo"] <= run.data.metrics["Cardiomegaly.auroc"]
    arts = {a.path for a in client.list_artifacts(run_id, "report")}
    assert {"report/predictions.parquet", "report/report.html"} <= arts
    champion = client.get_model_version_by_alias("chexops-stage-test", "champion")
    assert run.data.tags["chexops.registered_model"] == f"chexops-stage-test/{champion.version}"

    # the stage's outputs are what compare reads: workspace against its own trial run
    trial_id = run.data.tags["mlflow.parentRunId"]
    import yaml

    from chexops import cli
    from chexops.config import to_dict
    (root / "params.yaml").write_text(yaml.safe_dump(to_dict(params)))
    capsys.readouterr()
    assert cli.main(["--root", str(root), "compare", trial_id, "workspace", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["targets"][0]
    assert result["delong"]["diff"] == 0 and result["n"] == N
    # and on the held-out cohort, from the trial's logged test predictions
    assert m["test"]["n"] == N and m["test"]["auroc_lo"] <= m["test"]["auroc"] <= m["test"]["auroc_hi"]
    assert "report/test_predictions.parquet" in arts
    assert cli.main(["--root", str(root), "compare", trial_id, "workspace", "--split", "test",
                     "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "test" and result["targets"][0]["n"] == N


def test_report_page_is_self_contained_and_escapes_text():
    from matplotlib.figure import Figure

    from chexops.evaluation import report

    fig = Figure(figsize=(1, 1))
    fig.subplots().plot([0, 1], [0, 1])
    table = pd.DataFrame({"group": ["<script>x</script>"], "auroc": [0.81234], "lo": [None]})
    page = report.page("t <b>", [("section", [table, fig, "note & more"])])
    assert page.startswith("<!DOCTYPE html>") and "<script>" not in page
    assert "&lt;script&gt;" in page and "0.812" in page and "n/a" in page
    assert page.count("data:image/png;base64,") == 1 and "note &amp; more" in page


def test_gradcam_figures_read_multiclass_weights_by_their_coding(tmp_path, monkeypatch):
    """U-MultiClass weights (3 logits per target): the report's Grad-CAM path builds the right
    head and scores each case by z_pos - z_neg (the coding goes through to gradcam)."""
    from chexops.inference import gradcam
    from chexops.stages import evaluate_report
    from tests.tiny_model import tiny_multiclass_weights

    params = tiny_params(tmp_path, gradcam_per_kind=2)
    weights = tiny_multiclass_weights(tmp_path, params)
    valid = valid_frame()
    images = np.random.default_rng(1).integers(0, 255, (N, SIZE, SIZE), dtype=np.uint8)
    fake = types.SimpleNamespace(load_images=lambda p, df, z, r, size=None: images[: len(df)])
    monkeypatch.setitem(sys.modules, "chexops.inference.frames", fake)
    predictor = predict.predictor_from_weights(weights, params)
    probs = predictor.probabilities(images)
    seen = []
    real = gradcam.gradcam

    def spy(model, imgs, target, device="cpu", batch=16, coding=None):
        seen.append(coding)
        return real(model, imgs, target, device, batch, coding=coding)

    monkeypatch.setattr(gradcam, "gradcam", spy)
    figures = evaluate_report._gradcam_figures(params, tmp_path, valid, probs, weights)
    assert sorted(figures) == ["gradcam-cardiomegaly-fn.png", "gradcam-cardiomegaly-fp.png",
                               "gradcam-cardiomegaly-tp.png"]
    assert len(seen) == 3 and all(c is not None and c.kinds == ("multiclass",) for c in seen)
    titles = [ax.get_title() for f in figures.values() for ax in f.axes if ax.get_title()]
    assert titles and all(re.search(r"p=\d\.\d\d", t) for t in titles)
