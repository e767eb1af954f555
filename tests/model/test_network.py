"""model.py: heads, layer groups, freezing, weights files, bad architectures and weight files."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from torch import nn

from chexops.config import ModelConfig
from chexops.errors import ChexopsError
from chexops.model.network import build_model, freeze_body, layer_groups
from chexops.model.weights import load_weights, save_weights

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def densenet():
    torch.manual_seed(0)
    return build_model(ModelConfig(arch="densenet121"), 2)


def test_fastai_head_layout_and_output_shape(densenet):
    head = list(densenet.head)
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["AdaptiveConcatPool2d", "Flatten", "BatchNorm1d", "Dropout", "Linear", "ReLU",
                     "BatchNorm1d", "Dropout", "Linear", "BatchNorm1d"]
    assert head[2].num_features == 2 * 1024          # avg + max of densenet121's 1024 channels
    assert head[3].p == 0.25 and head[7].p == 0.5     # ps/2 then ps
    assert head[4].out_features == 512 and head[8].out_features == 2
    densenet.eval()
    assert densenet(torch.zeros(3, 3, 32, 32)).shape == (3, 2)


def test_timm_head_and_no_final_bn():
    torch.manual_seed(0)
    timm_model = build_model(ModelConfig(arch="resnet18", head="timm"), 1)
    assert isinstance(timm_model.head[-1], nn.Linear) and timm_model.head[-1].out_features == 1
    assert timm_model.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 1)
    plain = build_model(ModelConfig(arch="resnet18", bn_final=False), 3)
    assert isinstance(plain.head[-1], nn.Linear) and plain.head[-1].out_features == 3


def test_layer_groups_cover_every_parameter_exactly_once(densenet):
    groups = layer_groups(densenet)
    assert len(groups) == 3 and all(groups)
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in densenet.parameters()}
    assert {id(p) for p in groups[2]} == {id(p) for p in densenet.head.parameters()}
    names = {id(p): n for n, p in densenet.body.named_parameters()}
    first = [names[id(p)] for p in groups[0]]
    second = [names[id(p)] for p in groups[1]]
    # densenet121: up to and including transition2, then denseblock3 onwards
    assert any(n.startswith("features.transition2.") for n in first)
    assert second[0].startswith("features.denseblock3.")


def test_layer_groups_split_resnet_after_layer2():
    model = build_model(ModelConfig(arch="resnet18"), 1)
    names = {id(p): n for n, p in model.body.named_parameters()}
    early, late, _ = layer_groups(model)
    assert names[id(early[-1])].startswith("layer2.") and names[id(late[0])].startswith("layer3.")


def test_freeze_keeps_batchnorm_and_head_trainable(densenet):
    freeze_body(densenet, True)
    for module in densenet.body.modules():
        for p in module.parameters(recurse=False):
            assert p.requires_grad == isinstance(module, nn.modules.batchnorm._BatchNorm)
    assert all(p.requires_grad for p in densenet.head.parameters())
    assert any(not p.requires_grad for p in densenet.body.parameters())
    freeze_body(densenet, False)
    assert all(p.requires_grad for p in densenet.parameters())


def test_unknown_arch_names_it_and_the_fix():
    with pytest.raises(ChexopsError, match=r"densenet999.*timm.list_models\('dense\*'\)"):
        build_model(ModelConfig(arch="densenet999"), 1)


def test_weights_roundtrip_with_metadata(tmp_path):
    torch.manual_seed(1)
    a = build_model(ModelConfig(arch="resnet18"), 1)
    torch.manual_seed(2)
    b = build_model(ModelConfig(arch="resnet18"), 1)
    save_weights(a, tmp_path / "w.safetensors", {"round": 1, "arch": "resnet18"})
    meta = load_weights(b, tmp_path / "w.safetensors")
    assert meta == {"round": "1", "arch": "resnet18"}
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temp file left


def test_load_weights_of_another_model_is_a_clear_error(tmp_path):
    save_weights(build_model(ModelConfig(arch="resnet18"), 1), tmp_path / "w.safetensors")
    with pytest.raises(ChexopsError, match="does not match the model"):
        load_weights(build_model(ModelConfig(arch="resnet18"), 2), tmp_path / "w.safetensors")
    with pytest.raises(ChexopsError, match="not found"):
        load_weights(build_model(ModelConfig(arch="resnet18"), 1), tmp_path / "missing.safetensors")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_pretrained_path_loads_into_body(tmp_path, suffix):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(5)
    source = timm.create_model("resnet18", pretrained=False)  # full timm model, with classifier
    path = tmp_path / f"r18{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    model = build_model(ModelConfig(arch="resnet18", pretrained=str(path)), 1)
    assert torch.equal(model.body.conv1.weight, source.conv1.weight)
    assert torch.equal(model.body.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)


def test_pretrained_path_errors(tmp_path):
    with pytest.raises(ChexopsError, match="not found"):
        build_model(ModelConfig(arch="resnet18", pretrained=str(tmp_path / "no.pth")), 1)
    other = tmp_path / "d.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, other)
    with pytest.raises(ChexopsError, match="lacks .* body weights"):
        build_model(ModelConfig(arch="resnet18", pretrained=str(other)), 1)


def test_pretrained_true_offline_fails_fast_with_fix(monkeypatch, tmp_path):
    import chexops.model.network as model_mod

    monkeypatch.setattr(model_mod, "_hub_reachable", lambda: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    try:  # huggingface_hub reads its cache folder at import: point it at the empty one
        import huggingface_hub.constants as c
        monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    except ImportError:
        pass
    cfg = dataclasses.replace(ModelConfig(arch="resnet18"), pretrained=True)
    with pytest.raises(ChexopsError, match="pretrained weights .* unavailable.*pretrained to a local"):
        build_model(cfg, 1)


def test_pickled_module_pth_is_refused_in_one_line_naming_file_and_fix(tmp_path):
    path = tmp_path / "whole-model.pth"
    torch.save(nn.Linear(2, 2), path)  # the model object, pickled: code, not plain weights
    with pytest.raises(ChexopsError) as err:
        build_model(ModelConfig(arch="resnet18", pretrained=str(path)), 1)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    assert "UnpicklingError" in msg and "torch.save(model.state_dict(), path)" in msg


def test_corrupt_safetensors_is_refused_in_one_line_naming_file_and_fix(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all, just garbage")
    with pytest.raises(ChexopsError) as err:
        build_model(ModelConfig(arch="resnet18", pretrained=str(path)), 1)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "not a readable safetensors file" in msg


def test_relative_pretrained_path_is_resolved_against_the_root_not_the_cwd(tmp_path,
                                                                           monkeypatch):
    import timm
    from safetensors.torch import save_file

    from chexops.model.network import pretrained_path

    torch.manual_seed(5)
    source = timm.create_model("resnet18", pretrained=False)
    (tmp_path / "repo" / "weights").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()},
              str(tmp_path / "repo" / "weights" / "r18.safetensors"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = ModelConfig(arch="resnet18", pretrained="weights/r18.safetensors")
    assert pretrained_path(cfg, tmp_path / "repo") == tmp_path / "repo/weights/r18.safetensors"
    assert pretrained_path(ModelConfig(pretrained=False), tmp_path) is None
    model = build_model(cfg, 1, root=tmp_path / "repo")
    assert torch.equal(model.body.conv1.weight, source.conv1.weight)


@pytest.mark.parametrize("succeeds", [True, False])
def test_pretrained_true_restores_the_hub_environment(monkeypatch, succeeds):
    """Offline mode is forced only for the one timm call: os.environ and huggingface_hub's
    constants are as they were afterwards, whether the call worked or failed."""
    import huggingface_hub.constants as hub_constants
    import timm

    import chexops.model.network as model_mod

    for key in ("HF_HUB_OFFLINE", "HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(model_mod, "_hub_reachable", lambda: False)
    during = {}

    def fake_create_model(arch, **kwargs):
        if not kwargs.get("pretrained"):  # the arch check and plain bodies are untouched
            return real_create(arch, **kwargs)
        during.update(env=os.environ.get("HF_HUB_OFFLINE"), const=hub_constants.HF_HUB_OFFLINE)
        if not succeeds:
            raise OSError("not in the cache")
        return real_create(arch, **{**kwargs, "pretrained": False})

    real_create = timm.create_model
    monkeypatch.setattr(timm, "create_model", fake_create_model)
    cfg = dataclasses.replace(ModelConfig(arch="resnet18"), pretrained=True)
    if succeeds:
        build_model(cfg, 1)
    else:
        with pytest.raises(ChexopsError, match="pretrained weights .* unavailable"):
            build_model(cfg, 1)
    assert during == {"env": "1", "const": True}
    assert "HF_HUB_OFFLINE" not in os.environ and hub_constants.HF_HUB_OFFLINE is False
    assert "HF_HUB_ETAG_TIMEOUT" not in os.environ


def test_concat_pool_equals_the_adaptive_pools():
    from chexops.model.network import AdaptiveConcatPool2d

    x = torch.randn(3, 5, 4, 6)
    want = torch.cat([torch.nn.AdaptiveMaxPool2d(1)(x), torch.nn.AdaptiveAvgPool2d(1)(x)], dim=1)
    assert torch.allclose(AdaptiveConcatPool2d()(x), want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_head_backward_runs_under_deterministic_algorithms_on_cuda(monkeypatch):
    from chexops.model.network import AdaptiveConcatPool2d

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        x = torch.randn(2, 4, 7, 7, device="cuda", requires_grad=True)
        AdaptiveConcatPool2d()(x).sum().backward()  # adaptive pools' CUDA backward would raise
        assert x.grad is not None
    finally:
        torch.use_deterministic_algorithms(was)
