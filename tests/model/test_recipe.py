"""model/recipe.py: what a weights file records about using it, read back; params that disagree
(the weights win, one warning line per key, or a refusal); files from before it was recorded."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml

import chexops
from chexops.config import params_from_dict
from chexops.data.batches import NORMALISATION
from chexops.errors import ChexopsError
from chexops.model import recipe as rc
from chexops.model.weights import load_model, read_recipe, weights_metadata
from tests.tiny_model import REPO, tiny_weights

torch.set_num_threads(1)


def params(**extra):
    """The repo's params, two targets, a small resnet18 head at 64 px, then `extra` merged in."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw.update(targets=["Cardiomegaly", "Edema"], runtime={**raw["runtime"], "threads": 1})
    raw["model"].update(arch="resnet18", hidden=64, head="fastai", bn_final=True, ps=0.5)
    raw["train"]["image_size"] = 64
    for key, value in extra.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return params_from_dict(raw)


def test_the_metadata_records_the_whole_recipe_and_reads_back_whatever_params_say():
    trained = params(clean={"uncertainty": {"Edema": "multiclass"}}, model={"ps": 0.25})
    meta = rc.recipe_metadata(rc.params_recipe(trained))
    assert all(isinstance(v, str) for v in meta.values())
    assert json.loads(meta["model"]) == {"arch": "resnet18", "head": "fastai", "hidden": 64,
                                         "ps": 0.25, "bn_final": True}
    assert (meta["targets"], meta["coding"], meta["image_size"]) == (
        "Cardiomegaly,Edema", "binary,multiclass", "64")
    assert meta["normalisation"] == NORMALISATION and "imagenet" in NORMALISATION
    assert meta["chexops_version"] == chexops.__version__
    other = params(targets=["Pleural Effusion"], model={"arch": "densenet121", "hidden": 512},
                   train={"image_size": 320})
    back = rc.recipe_from_metadata(meta, other)
    assert back == rc.params_recipe(trained) and back.assumed == ()
    assert back.model.pretrained is False and back.image_size == 64


def test_a_file_from_before_the_recipe_falls_back_to_params_and_says_which_keys(capsys):
    p = params()
    old = rc.recipe_from_metadata({"arch": "resnet18", "targets": "Cardiomegaly,Edema"}, p)
    assert old.assumed == ("model.head", "model.hidden", "model.ps", "model.bn_final",
                           "train.image_size")
    assert old.image_size == 64 and old.model.hidden == 64 and old.coding.all_binary
    assert old.normalisation == NORMALISATION and old.version == ""
    assert rc.differences(old, params(model={"hidden": 32}, train={"image_size": 320})) == []
    rc.warn_assumed(old, p, "chexops predict")
    line, = capsys.readouterr().err.splitlines()
    assert line == ("chexops predict: warning: the weights do not record model.head, "
                    "model.hidden, model.ps, model.bn_final, train.image_size (written before "
                    "chexops recorded them); assuming params' model.head fastai, model.hidden 64, "
                    "model.ps 0.5, model.bn_final true, train.image_size 64")
    bare = rc.recipe_from_metadata({}, p)
    assert bare.assumed[:2] == ("targets", "model.arch") and bare.targets == ("Cardiomegaly", "Edema")


def test_params_that_disagree_lose_with_one_warning_line_per_key(capsys):
    weights = rc.params_recipe(params())
    assert rc.differences(weights, params()) == []
    asked = params(train={"image_size": 320}, model={"hidden": 512})
    assert rc.differences(weights, asked) == [("model.hidden", "64", "512"),
                                              ("train.image_size", "64", "320")]
    assert rc.check_recipe(weights, asked, "chexops predict") is weights
    assert capsys.readouterr().err.splitlines() == [
        "chexops predict: warning: the weights were trained with model.hidden 64; using 64, not "
        "params' 512",
        "chexops predict: warning: the weights were trained with train.image_size 64; using 64, "
        "not params' 320"]


def test_targets_and_coding_differences_are_named_and_refused_where_asked(capsys):
    weights = rc.params_recipe(params())
    multiclass = params(clean={"uncertainty": {"Edema": "multiclass"}})
    assert rc.differences(weights, multiclass) == [
        (rc.CODING_KEY, "binary,binary", "binary,multiclass")]
    one = params(targets=["Cardiomegaly"])
    assert rc.differences(weights, one) == [("targets", "Cardiomegaly,Edema", "Cardiomegaly")]
    with pytest.raises(ChexopsError, match=r"^the weights were trained with targets "
                                           r"Cardiomegaly,Edema, params say Cardiomegaly; their "
                                           r"scores would land in the wrong columns"):
        rc.check_recipe(weights, one, "chexops evaluate", rc.SCORED_KEYS, rc.SCORED_FIX)
    assert capsys.readouterr().err == ""  # refused before any warning
    rc.refuse(weights, params(train={"image_size": 32}), rc.SCORED_KEYS, "w", "")  # not refused
    with pytest.raises(ChexopsError, match="w were trained with train.image_size 64, params "
                                           "say 32; fix it"):
        rc.refuse(weights, params(train={"image_size": 32}), ("*",), "w", "fix it")


@pytest.mark.parametrize("meta, match", [
    ({"image_size": "large"}, "image_size 'large' is not understood"),
    ({"image_size": "0"}, "image_size '0' is not understood"),
    ({"model": "{not json"}, "model '{not json' is not understood"),
    ({"model": json.dumps({"arch": "resnet18"})}, "model .* is not understood"),
    ({"coding": "binary"}, "covers 1 targets, not the 2"),
])
def test_metadata_chexops_cannot_read_is_refused(meta, match):
    with pytest.raises(ChexopsError, match=match):
        rc.recipe_from_metadata(meta, params())


def test_weights_fed_another_normalisation_are_refused_whatever_recipe_loads_them(tmp_path):
    from chexops.model.weights import save_weights

    p = params(targets=["Cardiomegaly"], train={"image_size": 32})
    path = tiny_weights(tmp_path, p)
    meta = weights_metadata(path)
    model, recipe = load_model(path, p)
    assert recipe == read_recipe(path, p) and recipe.version == chexops.__version__
    other = tmp_path / "other.safetensors"
    save_weights(model, other, {**meta, "normalisation": "x/127.5 - 1", "chexops_version": "9.0"})
    for how in ({"params": p}, {"recipe": rc.params_recipe(p)}):
        with pytest.raises(ChexopsError, match=r"other.safetensors expects inputs normalised as "
                                               r"'x/127.5 - 1' \(written by chexops 9.0\)"):
            load_model(other, **how)


def test_load_model_builds_the_network_the_file_records_not_params(tmp_path):
    trained = params(targets=["Cardiomegaly"], model={"hidden": 16, "bn_final": False},
                     train={"image_size": 32})
    path = tiny_weights(tmp_path, trained)
    model, recipe = load_model(path, params(targets=["Cardiomegaly"]))  # hidden 64, bn_final
    assert recipe.model == dataclasses.replace(trained.model, pretrained=False)
    assert model.head[4].out_features == 16 and len(model.head) == 9  # no final BatchNorm
