"""stages/train_round.py: a round's files, its MLflow calls, fresh draws, resume, bad input.

Images and MLflow are replaced by small fakes (their own modules have their own tests): images
come from a function of the path, the MLflow run records what the stage logged.
"""
from __future__ import annotations

import json
import sys
import types
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from chexops import paths
from chexops.config import params_from_dict
from chexops.errors import ChexopsError
from chexops.stages import train_round as stage
from chexops.tracking import runs as tracking
from chexops.training import rounds
from tests.helpers import fake_stage_run
from tests.training.test_loop import kill_in_epoch

torch.set_num_threads(1)


def params(**extra):
    raw = {
        "seed": 3, "lr": 1e-3, "targets": ["Cardiomegaly"],
        "runtime": {"threads": 1, "workers": 0, "device": "cpu"},
        "model": {"arch": "resnet18"},
        "train": {"image_size": 32, "batch_size": 4},
        "rounds": {"r1": {"epochs": 2, "freeze": False},
                   "r2": {"epochs": 1, "freeze": True, "lr": [1e-4, 1e-3]},
                   "r3": {"epochs": 1, "freeze": False, "lr": 1e-4,
                          "resample": {"seed": 5, "size": 12}},
                   "r4": {"epochs": 1, "freeze": False, "lr": 1e-4},
                   "r5": {"epochs": 1, "freeze": False, "lr": 1e-4}},
    }
    for key, value in extra.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return params_from_dict(raw)


def fake_images(zip_path, image_paths, size, cache_dir, workers):
    """Positives ('pos' in the path) are brighter; the rest is noise seeded by the path."""
    out = np.empty((len(image_paths), size, size), np.uint8)
    for i, p in enumerate(image_paths):
        rng = np.random.default_rng(zlib.crc32(p.encode()))
        out[i] = rng.integers(0, 120, (size, size)) + (100 if "pos" in p else 0)
    return out


def frame(n: int, valid: bool, start: int = 0) -> pd.DataFrame:
    labels = [i % 2 for i in range(n)]
    return pd.DataFrame({
        "Path": [f"CheXpert-v1.0-small/{'valid' if valid else 'train'}/patient{start + i:05d}/"
                 f"study1/view1_frontal_{'pos' if y else 'neg'}.jpg" for i, y in enumerate(labels)],
        "Cardiomegaly": np.array(labels, dtype=np.int8), "valid": valid,
        "patient": [f"patient{start + i:05d}" for i in range(n)]})


@pytest.fixture
def runs() -> list:
    """(FakeRun, resume_run_id) of every stage_run the stage opened, in order."""
    return []


@pytest.fixture
def root(tmp_path, monkeypatch, runs):
    """A repo root with the resample stage's outputs, fake images and a recording MLflow."""
    (tmp_path / paths.RESAMPLED_DIR).mkdir(parents=True)
    train, valid = frame(16, False), frame(8, True, start=100)
    train.to_parquet(tmp_path / paths.RESAMPLED_TRAIN)
    valid.to_parquet(tmp_path / paths.RESAMPLED_VALID)
    (tmp_path / paths.CLEAN_LABELS).parent.mkdir(parents=True)
    pd.concat([frame(30, False, start=200), valid]).to_parquet(tmp_path / paths.CLEAN_LABELS)
    (tmp_path / paths.RAW_ZIP).parent.mkdir(parents=True)
    (tmp_path / paths.RAW_ZIP).write_bytes(b"stands in for the zip")
    images = types.ModuleType("chexops.data.images")  # for the code that imports it late
    images.load_image_array = fake_images
    monkeypatch.setitem(sys.modules, "chexops.data.images", images)
    # the real store maps every member; this one holds just the requested paths, slot = position
    monkeypatch.setattr(rounds, "image_store", lambda zip_path, ps, size, *a: (
        sys.modules["chexops.data.images"].load_image_array(zip_path, ps, size, *a),
        np.arange(len(ps))))

    monkeypatch.setattr(tracking, "stage_run", fake_stage_run(runs, by_stage=False))
    return tmp_path


def test_round_one_writes_outputs_and_logs_to_mlflow(root, runs):
    stage.main(params(), root, 1)
    weights = root / paths.round_weights(1)
    assert weights.is_file()
    meta = json.loads((root / paths.round_meta(1)).read_text())
    assert meta["seed"] == 3 and meta["round"] == 1 and meta["run_id"] == "run-0"
    assert meta["best_epoch"] in (0, 1, 2) and meta["params"]["rounds"]["lr"] == 1e-3
    assert set(meta["inputs"]) == {"data/raw/chexpert.zip", "data/resampled/train.parquet",
                                   "data/resampled/valid.parquet"}
    metrics = json.loads((root / paths.round_metrics(1)).read_text())
    assert metrics["best_epoch"] == meta["best_epoch"]
    assert {"auroc", "precision", "recall", "error_rate", "confusion", "valid_loss"} <= set(metrics)
    assert sum(map(sum, metrics["confusion"])) == 8
    assert metrics["loss"] == "bce"  # the round's training loss (train.loss, rounds.rK.loss)
    history = pd.read_csv(root / "plots/round-1/history.csv")
    assert list(history.columns) == ["epoch", "train_loss", "valid_loss", "auroc", "precision",
                                     "recall", "error_rate", "lr"]
    assert history["epoch"].tolist() == [0, 1, 2]  # 0: the start, scored before training
    run, resumed = runs[0]
    assert resumed is None
    assert run.params["lr"] == 1e-3 and run.params["epochs"] == 2 and run.params["seed"] == 3
    assert run.params["image_size"] == 32 and run.params["batch_size"] == 4
    assert run.params["loss"] == "bce"
    assert [step for step, _ in run.steps] == [0, 1, 2]
    assert set(run.steps[1][1]) == {"train_loss", "valid_loss", "auroc", "precision", "recall",
                                      "error_rate", "lr"}
    assert run.dicts["confusion.json"] == {"Cardiomegaly": metrics["confusion"]}
    assert run.figures == ["confusion.png"] and "best.safetensors" in run.artifacts
    assert not (root / paths.CHECKPOINT_DIR / "round-1" / "last.pt").exists()


def test_predict_frame_uses_the_rounds_weights(root):
    from chexops.inference.frames import predict_frame

    p = params()
    stage.main(p, root, 1)
    valid = pd.read_parquet(root / paths.RESAMPLED_VALID)
    probs = predict_frame(p, root / paths.round_weights(1), valid, root / paths.RAW_ZIP, root)
    assert probs.shape == (8, 1) and ((probs > 0) & (probs < 1)).all()
    again = predict_frame(p, root / paths.round_weights(1), valid.iloc[::-1], root / paths.RAW_ZIP,
                          root)
    np.testing.assert_allclose(again[::-1], probs, rtol=1e-5)  # row order follows the frame
    metrics = json.loads((root / paths.round_metrics(1)).read_text())
    from chexops.evaluation.metrics import binary_metrics
    assert binary_metrics(valid["Cardiomegaly"], probs[:, 0])["confusion"] == metrics["confusion"]


def test_the_rounds_weights_record_their_recipe_and_evaluation_follows_it(root, monkeypatch):
    """The weights say how to use them: scored at their own size whatever params say, and
    refused for other targets (the columns would be mislabelled)."""
    from safetensors import safe_open

    from chexops.inference.frames import predict_frame
    from chexops.model.recipe import params_recipe, recipe_from_metadata

    p = params()
    stage.main(p, root, 1)
    weights = root / paths.round_weights(1)
    with safe_open(str(weights), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["round"] == "1" and meta["image_size"] == "32"
    other = params(train={"image_size": 48}, model={"hidden": 64})
    assert recipe_from_metadata(meta, other) == params_recipe(p)
    images = sys.modules["chexops.data.images"]
    sizes = []
    monkeypatch.setattr(images, "load_image_array", lambda z, ps, size, *a: (
        sizes.append(size), fake_images(z, ps, size, *a))[1])
    valid = pd.read_parquet(root / paths.RESAMPLED_VALID)
    probs = predict_frame(p, weights, valid, root / paths.RAW_ZIP, root)
    bigger = predict_frame(params(train={"image_size": 48}), weights, valid, root / paths.RAW_ZIP,
                           root)
    assert sizes == [32, 32]
    np.testing.assert_allclose(bigger, probs, rtol=1e-6)
    with pytest.raises(ChexopsError, match=r"round-1/best.safetensors were trained with targets "
                                           r"Cardiomegaly, params say Edema; their scores"):
        predict_frame(params(targets=["Edema"]), weights, valid, root / paths.RAW_ZIP, root)


def test_a_round_refuses_to_continue_weights_trained_otherwise(root, capsys):
    """Round k (and `lr-find k`, which starts from the same model) continues round k-1's weights
    only as params describe them: a stale round k-1 is refused, before anything is written."""
    stage.main(params(), root, 1)
    capsys.readouterr()
    with pytest.raises(ChexopsError, match=r"the weights .*round-1/best.safetensors were trained "
                                           r"with train.image_size 32, params say 48; they are "
                                           r"stale: re-run the earlier rounds"):
        stage.main(params(train={"image_size": 48}), root, 2)
    assert not (root / paths.round_dir(2)).exists()
    with pytest.raises(ChexopsError, match="model.hidden 512, params say 64"):
        rounds.build_start_model(params(model={"hidden": 64}), root / paths.round_weights(1))
    assert capsys.readouterr().err == ""


def test_round_two_needs_round_one_weights(root):
    with pytest.raises(ChexopsError, match=r"^models/round-1/best.safetensors not found; "
                                           r"run `dvc repro train-round-1` first$"):
        stage.main(params(), root, 2)
    assert not (root / paths.round_dir(2)).exists()


def test_round_two_starts_from_round_one_and_logs_the_lr_range(root, runs):
    # every epoch handed on, so the frozen round's weights are the trained ones
    p = params(train={"image_size": 32, "batch_size": 4, "score_start": False})
    stage.main(p, root, 1)
    stage.main(p, root, 2)
    run = runs[1][0]
    assert run.params["lr"] == "[0.0001, 0.001]" and run.params["freeze"] is True
    first = load_file(str(root / paths.round_weights(1)))
    second = load_file(str(root / paths.round_weights(2)))
    # frozen round: convolutions keep round 1's weights, the head moved on
    assert torch.equal(first["body.conv1.weight"], second["body.conv1.weight"])
    assert not torch.equal(first["head.8.weight"], second["head.8.weight"])
    assert "models/round-1/best.safetensors" in json.loads(
        (root / paths.round_meta(2)).read_text())["inputs"]


def test_fresh_draw_uses_resample_frame_with_the_rounds_seed_and_size(root, monkeypatch):
    calls = []

    def resample_frame(df, target, strategy, fraction, seed):
        calls.append((len(df), target, strategy, fraction, seed, bool(df["valid"].any())))
        return pd.concat([df, df[df[target] == 1]]).reset_index(drop=True)

    monkeypatch.setattr(rounds, "resample_frame", resample_frame)
    drawn = rounds.fresh_draw(params(), root, params().round(3).resample)
    assert calls == [(30, "Cardiomegaly", "oversample", 1.0, 5, False)]
    assert len(drawn) == 12
    again = rounds.fresh_draw(params(), root, params().round(3).resample)
    assert drawn["Path"].tolist() == again["Path"].tolist()  # seeded


def test_round_out_of_range_is_refused(root):
    # (multiclass, selftrained and lr: auto are tested in tests/model/test_uncertainty.py and
    # tests/training/test_lr_finder.py)
    with pytest.raises(ChexopsError, match="round 6 does not exist"):
        stage.main(params(), root, 6)


def test_uncertain_labels_are_masked_under_ignore(root):
    p = params(clean={"uncertainty": {"Cardiomegaly": "ignore"}})
    df = frame(4, False)
    df.loc[1, "Cardiomegaly"] = -1
    data = rounds.array_set(p, root, df)
    assert data.mask[:, 0].tolist() == [True, False, True, True]


def test_oversampled_rows_decode_each_image_once(root, monkeypatch):
    seen = []
    monkeypatch.setattr(sys.modules["chexops.data.images"], "load_image_array",
                        lambda z, ps, *a: seen.append(list(ps)) or fake_images(z, ps, *a))
    df = frame(4, False)
    data = rounds.array_set(params(), root, pd.concat([df, df.iloc[[1, 1]]]))
    assert len(seen[0]) == 4 and len(data) == 6 and data.images.shape[0] == 4


def test_interrupted_round_resumes_its_run_and_matches_an_uninterrupted_one(root, runs,
                                                                             monkeypatch):
    p = params()
    stage.main(p, root, 1)
    uninterrupted = load_file(str(root / paths.round_weights(1)))
    metrics = json.loads((root / paths.round_metrics(1)).read_text())
    restore = kill_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        stage.main(p, root, 1)
    assert (root / paths.CHECKPOINT_DIR / "round-1" / "last.pt").is_file()
    restore()
    stage.main(p, root, 1)
    crashed_run, resumed = runs[2]
    assert resumed == runs[1][0].run_id          # the same MLflow run continues
    assert [step for step, _ in crashed_run.steps] == [2]
    for key, value in load_file(str(root / paths.round_weights(1))).items():
        assert torch.equal(value, uninterrupted[key]), key
    assert json.loads((root / paths.round_metrics(1)).read_text()) == metrics


def _with_dvc_yaml(root: Path) -> Path:
    """A dvc.yaml whose train-round-1 stage has a code dep under src/ (as the real one does)."""
    code = root / "src" / "chexops" / "training" / "loop.py"
    code.parent.mkdir(parents=True)
    code.write_text("# the training loop, version 1\n")
    (root / "dvc.yaml").write_text(
        "stages:\n  train-round-1:\n    cmd: chexops train-round 1\n    deps:\n"
        "      - src/chexops/training/loop.py\n      - data/raw/chexpert.zip\n"
        "      - data/resampled\n")
    return code


def test_code_deps_are_in_the_fingerprint(root):
    code = _with_dvc_yaml(root)
    p = params()
    md5s = rounds.input_md5s(root, 1, False, p)
    assert "src/chexops/training/loop.py" not in md5s                    # code is not a data input
    assert set(rounds.code_md5s(root, 1)) == {"src/chexops/training/loop.py"}
    before = rounds.round_fingerprint(p, root, 1, md5s)
    assert rounds.round_fingerprint(p, root, 1, md5s) == before
    code.write_text("# the training loop, version 2\n")
    assert rounds.round_fingerprint(p, root, 1, md5s) != before


def test_a_code_change_is_not_resumed_from_the_old_codes_checkpoint(root, runs, monkeypatch):
    code = _with_dvc_yaml(root)
    p = params()
    restore = kill_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        stage.main(p, root, 1)
    assert (root / paths.CHECKPOINT_DIR / "round-1" / "last.pt").is_file()
    restore()
    code.write_text("# the training loop, fixed\n")             # e.g. a bug fix in train.py
    stage.main(p, root, 1)
    rerun, resumed = runs[1]
    assert resumed is None                                       # a new MLflow run
    assert [step for step, _ in rerun.steps] == [0, 1, 2]      # epoch 1 trained again
    meta = json.loads((root / paths.round_meta(1)).read_text())
    assert meta["resumed_from_epoch"] is None and set(meta["code"]) == {"src/chexops/training/loop.py"}


def _resnet18_weights(path: Path, seed: int) -> None:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def test_pretrained_weights_file_md5_is_an_input_and_in_the_fingerprint(root):
    from chexops.hashing import file_md5

    weights = root / "weights" / "r18.safetensors"
    _resnet18_weights(weights, 1)
    p = params(model={"pretrained": "weights/r18.safetensors"})  # relative to the repo root
    md5s = rounds.input_md5s(root, 1, False, p)
    assert md5s["weights/r18.safetensors"] == file_md5(weights)
    assert "weights/r18.safetensors" not in rounds.input_md5s(root, 2, False, p)  # round 1's only
    assert "weights/r18.safetensors" not in rounds.input_md5s(root, 1, False, params())
    before = rounds.round_fingerprint(p, root, 1, md5s)
    _resnet18_weights(weights, 2)                                # same path, new content
    after_md5s = rounds.input_md5s(root, 1, False, p)
    assert after_md5s["weights/r18.safetensors"] != md5s["weights/r18.safetensors"]
    assert rounds.round_fingerprint(p, root, 1, after_md5s) != before


def test_round_one_with_pretrained_file_tags_its_md5_and_resolves_from_the_root(
        root, runs, tmp_path_factory, monkeypatch):
    from chexops.hashing import file_md5

    weights = root / "weights" / "r18.safetensors"
    _resnet18_weights(weights, 1)
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))      # not the repo root
    p = params(model={"pretrained": "weights/r18.safetensors"},
               rounds={"r1": {"epochs": 1, "freeze": False}})
    stage.main(p, root, 1)
    run = runs[0][0]
    assert run.tags["pretrained_path"] == "weights/r18.safetensors"
    assert run.tags["pretrained_md5"] == file_md5(weights)
    meta = json.loads((root / paths.round_meta(1)).read_text())
    assert meta["inputs"]["weights/r18.safetensors"] == file_md5(weights)


def test_resumed_auto_lr_round_reuses_the_lr_found(root, runs, monkeypatch):
    """`lr: auto`: the range test runs once; the resume trains with the LR stored in the
    checkpoint and matches an uninterrupted run."""
    found = []

    def fake_auto_lr(model, data, plan, device, cfg, where, stage_run=None):
        found.append(where)
        return 2e-3, None

    monkeypatch.setattr(rounds, "auto_lr", fake_auto_lr)
    p = params(rounds={"r1": {"epochs": 2, "freeze": False, "lr": "auto"}})
    stage.main(p, root, 1)
    uninterrupted = load_file(str(root / paths.round_weights(1)))
    assert found == ["rounds.r1"]
    restore = kill_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        stage.main(p, root, 1)
    ck = root / paths.CHECKPOINT_DIR / "round-1" / "last.pt"
    assert torch.load(ck, weights_only=True)["lr_found"] == 2e-3
    assert len(found) == 2
    restore()
    monkeypatch.setattr(rounds, "auto_lr",
                        lambda *a, **k: pytest.fail("the LR range test ran again on resume"))
    stage.main(p, root, 1)
    assert runs[2][1] == runs[1][0].run_id                        # it did resume
    meta = json.loads((root / paths.round_meta(1)).read_text())
    assert meta["lr_found"] == 2e-3 and meta["resumed_from_epoch"] == 1
    for key, value in load_file(str(root / paths.round_weights(1))).items():
        assert torch.equal(value, uninterrupted[key]), key
