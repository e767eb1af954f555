"""compare: trials found by run id, DVC experiment name or `workspace`; metrics with CIs; the
paired DeLong verdict; refusal when the validation data differ."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from chexops import cli
from chexops.commands import compare
from chexops.config import to_dict
from chexops.errors import ChexopsError
from chexops.tracking import store
from tests.tiny_model import tiny_params

N = 240


def valid_frame(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    paths = [f"CheXpert-v1.0-small/valid/patient{60000 + i // 2:05d}/study1/view{i % 2 + 1}_frontal.jpg"
             for i in range(N)]
    return pd.DataFrame({"Path": paths, "Sex": rng.choice(["Male", "Female"], N),
                         "Cardiomegaly": (rng.random(N) < 0.35).astype("int8")})


def probs(valid: pd.DataFrame, strength: float, seed: int) -> np.ndarray:
    y = valid["Cardiomegaly"].to_numpy()
    return np.clip(0.3 + strength * y + np.random.default_rng(seed).normal(0, 0.2, N), 0, 1)[:, None]


def log_trial(params, root, name: str, frame: pd.DataFrame, raw_md5: str,
              test: pd.DataFrame | None = None) -> str:
    """An evaluate run with the predictions artifact and data tags, and its trial run."""
    client, exp_id = store.open_store(params, root)
    ev = client.create_run(exp_id, run_name="evaluate").info.run_id
    client.set_tag(ev, "chexops.stage", "evaluate")
    client.set_tag(ev, "data.md5.data/raw", raw_md5)
    client.set_tag(ev, "data.md5.models/round-5/best.safetensors", name)  # differs: ignored
    out = root / "art" / name / "predictions.parquet"
    out.parent.mkdir(parents=True)
    frame.to_parquet(out)
    client.log_artifact(ev, str(out), "report")
    if test is not None:
        test.to_parquet(out.parent / "test_predictions.parquet")
        client.log_artifact(ev, str(out.parent / "test_predictions.parquet"), "report")
    trial = client.create_run(exp_id, run_name=name).info.run_id
    for k, v in {"chexops.trial": "true", "dvc.exp_name": name, "chexops.evaluate_run_id": ev}.items():
        client.set_tag(trial, k, v)
    return trial


@pytest.fixture()
def repo(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = tiny_params(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(to_dict(params)))
    valid = valid_frame()
    targets = ("Cardiomegaly",)
    weak = compare.predictions_frame(valid, probs(valid, 0.15, 1), targets)
    strong = compare.predictions_frame(valid, probs(valid, 0.45, 2), targets)
    # on the held-out cohort the validation winner does no better: selection flattered it
    test = valid_frame(seed=9).assign(Path=lambda f: f["Path"].str.replace("/valid/", "/test/"))
    held = compare.predictions_frame(test, probs(test, 0.3, 3), targets)
    ids = {"weak": log_trial(params, tmp_path, "weak-trial", weak, "aaa", held),
           "strong": log_trial(params, tmp_path, "strong-trial", strong, "aaa", held)}
    return tmp_path, params, valid, ids, weak


def test_predictions_frame_keeps_labels_and_probabilities():
    valid = valid_frame()
    frame = compare.predictions_frame(valid, probs(valid, 0.3, 0), ("Cardiomegaly",))
    assert list(frame.columns) == ["Path", "Sex", "label:Cardiomegaly", "prob:Cardiomegaly"]
    assert compare.targets_of(frame) == ["Cardiomegaly"]
    assert compare.labels_digest(frame) == compare.labels_digest(frame.iloc[::-1])
    flipped = frame.assign(**{"label:Cardiomegaly": 1 - frame["label:Cardiomegaly"]})
    assert compare.labels_digest(frame) != compare.labels_digest(flipped)


def test_compare_by_experiment_name_finds_the_better_trial(repo, capsys):
    root, *_ = repo
    assert cli.main(["--root", str(root), "compare", "weak-trial", "strong-trial"]) == 0
    out = capsys.readouterr().out
    assert "B is better than A at the 5 % level" in out
    assert "auroc" in out and "specificity" in out and "paired DeLong: AUROC B - A = +" in out
    assert cli.main(["--root", str(root), "compare", "strong-trial", "weak-trial", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["targets"][0]
    assert result["verdict"] == "A is better than B at the 5 % level"
    assert result["delong"]["diff"] < 0 and result["delong"]["p_value"] < 0.05
    a = result["A"]["auroc"]
    assert a["lo"] < a["value"] < a["hi"] and result["n"] == N


def test_compare_by_run_id_with_workspace_and_per_study(repo, capsys):
    root, params, valid, ids, weak = repo
    (root / compare.PREDICTIONS).parent.mkdir(parents=True)
    weak.to_parquet(root / compare.PREDICTIONS)
    assert cli.main(["--root", str(root), "compare", ids["weak"], "workspace", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["targets"][0]
    assert result["delong"]["diff"] == 0 and result["verdict"].startswith("no detectable difference")
    assert cli.main(["--root", str(root), "compare", "workspace", "strong-trial", "--per-study"]) == 0
    out = capsys.readouterr().out
    assert f"Cardiomegaly: {N // 2} validation studies" in out


def test_compare_on_the_held_out_test_cohort(repo, capsys):
    root, params, valid, ids, weak = repo
    assert cli.main(["--root", str(root), "compare", "weak-trial", "strong-trial",
                     "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert f"Cardiomegaly: {N} held-out test images" in out
    assert "no detectable difference" in out          # same test predictions in both trials
    assert cli.main(["--root", str(root), "compare", "weak-trial", "strong-trial", "--split",
                     "test", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "test" and result["targets"][0]["delong"]["diff"] == 0
    assert cli.main(["--root", str(root), "compare", "weak-trial", "workspace", "--split",
                     "test"]) == 2
    assert ("reports/evaluate/test_predictions.parquet not found in the workspace; the data "
            "has no test.csv") in capsys.readouterr().err


def test_refuses_different_validation_data_and_unknown_trials(repo, capsys):
    root, params, valid, ids, weak = repo
    other_raw = log_trial(params, root, "other-raw", weak, "bbb")
    with pytest.raises(ChexopsError, match="different validation data \\(data/raw: md5 aaa vs bbb\\)"):
        compare.check_same_data(compare.resolve("weak-trial", params, root),
                                compare.resolve(other_raw, params, root))
    relabelled = weak.assign(**{"label:Cardiomegaly": 1 - weak["label:Cardiomegaly"]})
    log_trial(params, root, "relabelled", relabelled, "aaa")
    assert cli.main(["--root", str(root), "compare", "weak-trial", "relabelled"]) == 2
    assert "different validation images or labels" in capsys.readouterr().err
    assert cli.main(["--root", str(root), "compare", "weak-trial", "no-such-exp"]) == 2
    assert "unknown trial 'no-such-exp'" in capsys.readouterr().err
    assert cli.main(["--root", str(root), "compare", "weak-trial", "0" * 32]) == 2
    assert "unknown trial" in capsys.readouterr().err
    assert cli.main(["--root", str(root), "compare", "weak-trial", "workspace"]) == 2
    assert "run `dvc repro evaluate` first" in capsys.readouterr().err
