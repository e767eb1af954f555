"""uncertainty.py and its use by training/inference: the five CheXpert uncertainty approaches
and multi-label training, on tiny fake data (resnet18, 32 px; fixtures of the stage tests)."""
from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open

from chexops import paths
from chexops.config import ConfigError
from chexops.errors import ChexopsError
from chexops.inference.settings import Settings
from chexops.model.coding import OutputCoding, encode_labels, masked_bce, output_coding, relabel
from chexops.stages import train_round as stage
from chexops.training import rounds
from tests.stages.test_train_round import frame, params, root, runs  # noqa: F401 (fixtures)

torch.set_num_threads(1)
RAW = np.array([[1], [0], [-1], [np.nan]], dtype=np.float32)


def policy(name: str, **clean):
    return params(clean={"uncertainty": {"Cardiomegaly": name}, **clean})


@pytest.mark.parametrize("name, labels, mask", [
    ("ignore", [1, 0, 0, 0], [1, 1, 0, 0]),
    ("zeros", [1, 0, 0, 0], [1, 1, 1, 0]),
    ("ones", [1, 0, 1, 0], [1, 1, 1, 0]),
    ("multiclass", [1, 0, 2, 0], [1, 1, 1, 0]),       # uncertain is class 2
    ("selftrained", [1, 0, 0, 0], [1, 1, 0, 0]),      # masked until the teacher relabels
])
def test_encode_labels_per_policy(name, labels, mask):
    extra = {"teacher": "t.safetensors"} if name == "selftrained" else {}
    y, m = encode_labels(policy(name, **extra), RAW)
    assert y[:, 0].tolist() == labels and m[:, 0].astype(int).tolist() == mask


def test_multiclass_probability_is_pos_over_pos_plus_neg():
    coding = OutputCoding(("binary", "multiclass"))
    assert coding.n_outputs == 4 and coding.to_str() == "binary,multiclass"
    logits = np.array([[0.3, 1.0, 2.0, 5.0], [-1.0, -2.0, 0.5, -3.0]])
    p = coding.probs(logits)
    soft = np.exp(logits[:, 1:]) / np.exp(logits[:, 1:]).sum(1, keepdims=True)
    np.testing.assert_allclose(p[:, 1], soft[:, 1] / (soft[:, 1] + soft[:, 0]))
    np.testing.assert_allclose(p[:, 0], 1 / (1 + np.exp(-logits[:, 0])))


@pytest.mark.filterwarnings("error")
def test_extreme_logits_give_probabilities_without_overflow_warnings():
    # a diverged or very confident network gives |logit| in the thousands
    logits = np.array([[-1000.0, 0.0, 800.0, 3.0, -900.0]])  # multiclass: (neg, pos, uncertain)
    p = OutputCoding(("binary", "multiclass", "binary")).probs(logits)
    np.testing.assert_array_equal(p, [[0.0, 1.0, 0.0]])
    sigmoid = Settings(torch.device("cpu")).probs(np.array([[-1000.0], [0.0], [1000.0]]))
    np.testing.assert_array_equal(sigmoid, [[0.0], [0.5], [1.0]])


def test_coded_loss_matches_bce_and_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(6, 4)
    labels = torch.tensor([[1, 0], [0, 1], [1, 2], [0, 2], [1, 1], [0, 0]], dtype=torch.float32)
    mask = torch.ones(6, 2, dtype=torch.bool)
    mask[5, 1] = False
    got = OutputCoding(("binary", "multiclass")).loss(logits, labels, mask, None)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], labels[:, 0],
                                                               reduction="sum")
    ce = torch.nn.functional.cross_entropy(logits[:5, 1:], labels[:5, 1].long(), reduction="sum")
    assert got.item() == pytest.approx(((bce + ce) / 11).item(), rel=1e-6)
    binary = OutputCoding(("binary",))
    assert binary.loss(logits[:, :1], labels[:, :1], mask[:, :1], 2.0).item() == pytest.approx(
        masked_bce(logits[:, :1], labels[:, :1], mask[:, :1], 2.0).item(), rel=1e-6)


def test_relabel_soft_and_hard():
    p = policy("selftrained", teacher="t")
    y, m = encode_labels(p, RAW)
    teacher = np.array([[0.9], [0.9], [0.7], [0.9]], dtype=np.float32)
    soft_y, soft_m = relabel(y, m, RAW, teacher, [0], "soft")
    hard_y, _ = relabel(y, m, RAW, teacher, [0], "hard")
    assert soft_y[:, 0].tolist() == pytest.approx([1, 0, 0.7, 0]) and soft_m[2, 0]
    assert hard_y[:, 0].tolist() == [1, 0, 1, 0] and not soft_m[3, 0]


def with_uncertain(root, rows=(1, 4, 7)):
    """Make some training labels uncertain (-1), as clean keeps them for these policies."""
    train = pd.read_parquet(root / paths.RESAMPLED_TRAIN)
    train.loc[list(rows), "Cardiomegaly"] = -1
    train.to_parquet(root / paths.RESAMPLED_TRAIN)
    return train


def test_multiclass_round_trains_a_three_way_head_and_predicts_pos_probability(root, runs):
    from chexops.inference.frames import predict_frame

    with_uncertain(root)
    p = policy("multiclass")
    stage.main(p, root, 1)
    weights = root / paths.round_weights(1)
    with safe_open(str(weights), framework="pt") as fh:
        assert fh.metadata()["coding"] == "multiclass"
        assert fh.get_tensor("head.8.weight").shape[0] == 3      # neg / pos / uncertain
    valid = pd.read_parquet(root / paths.RESAMPLED_VALID)
    probs = predict_frame(p, weights, valid, root / paths.RAW_ZIP, root)
    assert probs.shape == (8, 1) and ((probs > 0) & (probs < 1)).all()
    metrics = json.loads((root / paths.round_metrics(1)).read_text())
    from chexops.evaluation.metrics import binary_metrics
    assert binary_metrics(valid["Cardiomegaly"], probs[:, 0])["confusion"] == metrics["confusion"]


def test_selftrained_round_relabels_with_the_teacher_and_logs_it(root, runs, tmp_path):
    stage.main(params(), root, 1)                       # a U-Zeros trial: the teacher
    teacher = tmp_path / "teacher.safetensors"
    shutil.copy(root / paths.round_weights(1), teacher)
    train = with_uncertain(root)
    p = policy("selftrained", teacher=str(teacher), teacher_labels="soft")
    data, identity = rounds.train_set(p, root, train, torch.device("cpu"))
    soft = data.labels[[1, 4, 7], 0]
    assert data.mask[[1, 4, 7], 0].all() and ((soft > 0) & (soft < 1)).all()
    assert identity["teacher"] == str(teacher) and len(identity["teacher_md5"]) == 32
    hard, _ = rounds.train_set(policy("selftrained", teacher=str(teacher), teacher_labels="hard"),
                              root, train, torch.device("cpu"))
    assert hard.labels[[1, 4, 7], 0].tolist() == (soft >= 0.5).astype(float).tolist()
    stage.main(p, root, 1)
    run = runs[-1][0]
    assert run.params["teacher"] == str(teacher)
    meta = json.loads((root / paths.round_meta(1)).read_text())
    assert meta["teacher"]["teacher_relabelled"] == "3"
    assert meta["params"]["teacher"] == [str(teacher), "soft"]


def test_missing_teacher_is_a_clear_error(root):
    with pytest.raises(ConfigError, match="selftrained needs a teacher; set clean.teacher"):
        policy("selftrained")
    p = policy("selftrained", teacher="nowhere/best.safetensors")
    with pytest.raises(ChexopsError, match="clean.teacher: weights nowhere/best.safetensors "
                                           "not found"):
        stage.main(p, root, 1)
    assert not (root / paths.round_dir(1)).exists()


def test_teacher_with_other_targets_or_not_weights_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    from chexops.training.teacher import load_teacher

    two_targets = tmp_path / "two.safetensors"
    save_file({"w": torch.zeros(1)}, str(two_targets), metadata={"coding": "binary,binary"})
    with pytest.raises(ChexopsError, match=r"^clean.teacher: the weights' output coding "
                                           r"'binary,binary' covers 2 targets, not the 1"):
        load_teacher(params(), two_targets)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors")
    with pytest.raises(ChexopsError, match=r"^clean.teacher: .*junk.safetensors"):
        load_teacher(params(), junk)


def test_the_teacher_runs_as_its_weights_say_not_as_the_students_params(root, tmp_path,
                                                                         monkeypatch, capsys):
    """A teacher from another trial (48 px, a 16-unit head) relabels a 32-px student's data: its
    own network, fed the images decoded at its own size; nothing to warn about. A teacher of
    other targets is refused; one from before the recipe falls back to params, with a warning."""
    from chexops.training.teacher import load_teacher
    from tests.stages.test_train_round import fake_images
    from tests.tiny_model import tiny_weights

    teacher_params = params(train={"image_size": 48}, model={"hidden": 16})
    path = tiny_weights(tmp_path, teacher_params, name="teacher.safetensors")
    student = policy("selftrained", teacher=str(path))
    teacher = load_teacher(student, path)
    assert teacher.image_size == 48 and teacher.model.head[4].out_features == 16
    sizes = []
    images = sys.modules["chexops.data.images"]
    monkeypatch.setattr(images, "load_image_array", lambda z, ps, size, *a: (
        sizes.append((size, len(ps))), fake_images(z, ps, size, *a))[1])
    train = with_uncertain(root)
    data, identity = rounds.train_set(student, root, train, torch.device("cpu"))
    assert sizes == [(32, 16), (48, 3)]  # the student's images, then the 3 uncertain at 48 px
    assert identity["teacher_relabelled"] == "3"
    expected = teacher.probabilities(fake_images(None, train["Path"].iloc[[1, 4, 7]].tolist(), 48,
                                                   None, 0))
    np.testing.assert_allclose(data.labels[[1, 4, 7], 0], expected[:, 0], rtol=1e-5)
    assert capsys.readouterr().err == ""
    edema = tiny_weights(tmp_path, params(targets=["Edema"]), name="edema.safetensors")
    with pytest.raises(ChexopsError, match=r"^clean.teacher: the teacher's weights .*edema"
                                           r".safetensors were trained with targets Edema, params "
                                           r"say Cardiomegaly; use a teacher trained on"):
        load_teacher(student, edema)
    old = tiny_weights(tmp_path, params(train={"image_size": 48}), name="old.safetensors",
                       legacy=True)
    assert load_teacher(student, old).image_size == 32  # params stand in
    line, = capsys.readouterr().err.splitlines()
    assert line.startswith("chexops: clean.teacher: warning: the teacher's weights ") and \
        line.endswith("train.image_size 32")


def test_multi_label_round_reports_each_target_and_selects_by_mean_auroc(root, runs):
    for split in (paths.RESAMPLED_TRAIN, paths.RESAMPLED_VALID):
        df = pd.read_parquet(root / split)
        df["Edema"] = np.array([(i // 2) % 2 for i in range(len(df))], dtype=np.int8)
        df.to_parquet(root / split)
    p = params(targets=["Cardiomegaly", "Edema"],
               clean={"uncertainty": {"Cardiomegaly": "multiclass"}})  # mixed heads too
    assert output_coding(p).n_outputs == 4
    stage.main(p, root, 1)
    metrics = json.loads((root / paths.round_metrics(1)).read_text())
    per = metrics["targets"]
    assert set(per) == {"Cardiomegaly", "Edema"}
    assert metrics["auroc"] == pytest.approx(np.mean([m["auroc"] for m in per.values()]))
    history = pd.read_csv(root / "plots/round-1/history.csv")
    assert metrics["auroc"] == pytest.approx(history["auroc"].max())   # best = max mean AUROC
    assert runs[0][0].figures == ["confusion-Cardiomegaly.png", "confusion-Edema.png"]
    logged = {k: v for step, m in runs[0][0].steps if step is None for k, v in m.items()}
    assert logged["best.Edema.auroc"] == pytest.approx(per["Edema"]["auroc"])


def test_teacher_from_an_mlflow_run_is_fetched_from_the_project_store(tmp_path, monkeypatch):
    """runs:/<id>/model resolves against the store it is given, not MLflow's default relative to
    the current folder (a queued trial runs in a DVC temp workspace)."""
    from mlflow.tracking import MlflowClient
    from safetensors.torch import save_file

    from chexops.training.teacher import resolve_teacher

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("t", artifact_location=(tmp_path / "store" / "art").as_uri())
    run_id = client.create_run(exp).info.run_id
    weights = tmp_path / "best.safetensors"
    save_file({"w": torch.ones(2)}, str(weights))
    client.log_artifact(run_id, str(weights), "model")
    elsewhere = tmp_path / "workspace"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    got = resolve_teacher(f"runs:/{run_id}/model", elsewhere, uri)
    assert got.name == "best.safetensors" and got.read_bytes() == weights.read_bytes()
    with pytest.raises(ChexopsError, match="cannot fetch runs:/"):
        resolve_teacher(f"runs:/{'0' * 32}/model", elsewhere, uri)
