"""The network: a timm body with a fastai-style head (or timm's own classifier), its three layer
groups for discriminative learning rates, and freezing (its weights files: chexops.model.weights).

The model is always `ChexNet(body, head)`, so layer groups, freezing and weight files have one
shape whichever architecture or head is chosen: weight keys are `body.*` and `head.*`.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import socket
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from chexops.config import ModelConfig
from chexops.errors import ChexopsError

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
              nn.LayerNorm, nn.GroupNorm)
HUB_HOST = ("huggingface.co", 443)
HUB_TIMEOUT_S = 3.0


class AdaptiveConcatPool2d(nn.Module):
    """fastai's pooling: max and average pooled features side by side (2 x channels).

    Reductions rather than nn.AdaptiveMax/AvgPool2d(1): the same values, but their CUDA backward
    is deterministic, so `runtime.deterministic: true` can train on a GPU (the adaptive pools'
    backward raises under torch.use_deterministic_algorithms)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.amax(dim=(2, 3), keepdim=True), x.mean(dim=(2, 3), keepdim=True)], dim=1)


class ChexNet(nn.Module):
    """body (timm features, no pooling) -> head (pooling + classifier) -> one logit per target."""

    def __init__(self, body: nn.Module, head: nn.Module, arch: str) -> None:
        super().__init__()
        self.body = body
        self.head = head
        self.arch = arch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def fastai_head(n_features: int, n_outputs: int, cfg: ModelConfig) -> nn.Sequential:
    """fastai's create_head: concat pool, BN, dropout ps/2, linear, ReLU, BN, dropout ps, linear."""
    layers: list[nn.Module] = [
        AdaptiveConcatPool2d(), nn.Flatten(),
        nn.BatchNorm1d(2 * n_features), nn.Dropout(cfg.ps / 2),
        nn.Linear(2 * n_features, cfg.hidden), nn.ReLU(inplace=True),
        nn.BatchNorm1d(cfg.hidden), nn.Dropout(cfg.ps),
        nn.Linear(cfg.hidden, n_outputs),
    ]
    if cfg.bn_final:
        layers.append(nn.BatchNorm1d(n_outputs, momentum=0.01))
    return nn.Sequential(*layers)


def timm_head(n_features: int, n_outputs: int) -> nn.Sequential:
    """timm's plain classifier: global average pool + linear."""
    from timm.layers import create_classifier

    pool, fc = create_classifier(n_features, n_outputs, pool_type="avg")
    return nn.Sequential(pool, fc)


def _check_arch(arch: str) -> None:
    import timm

    if not timm.is_model(arch):
        raise ChexopsError(f"model.arch: unknown timm architecture {arch!r}; list the known ones "
                           f"with `python -c \"import timm; print(timm.list_models('dense*'))\"`")


def _hub_reachable() -> bool:
    """A 3 s TCP probe, so an offline machine fails at once instead of retrying for a minute."""
    try:
        with socket.create_connection(HUB_HOST, timeout=HUB_TIMEOUT_S):
            return True
    except OSError:
        return False


HUB_ENV_DEFAULTS = {"HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "10"}


@contextlib.contextmanager
def _hub_settings(offline: bool) -> Iterator[None]:
    """Offline mode (and short hub timeouts) for the duration of one timm call; the process's
    environment and huggingface_hub's constants are restored afterwards, whatever happens."""
    keys = ("HF_HUB_OFFLINE", *HUB_ENV_DEFAULTS)
    saved_env = {k: os.environ.get(k) for k in keys}
    hub_constants: Any
    try:
        import huggingface_hub.constants as hub_constants
    except ImportError:  # pragma: no cover
        hub_constants = None
    saved_const = getattr(hub_constants, "HF_HUB_OFFLINE", None)
    try:
        if offline:  # the cache may still hold the weights; never wait on the network
            os.environ["HF_HUB_OFFLINE"] = "1"
            if hub_constants is not None:
                hub_constants.HF_HUB_OFFLINE = True
        for key, default in HUB_ENV_DEFAULTS.items():
            os.environ.setdefault(key, default)
        yield
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if hub_constants is not None:
            hub_constants.HF_HUB_OFFLINE = saved_const


def _create_pretrained(arch: str) -> nn.Module:
    """timm's pretrained body from the local Hugging Face cache or, with network, the hub."""
    import timm

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if not offline and not _hub_reachable():
        offline = True
    try:
        with _hub_settings(offline):
            return timm.create_model(arch, pretrained=True, num_classes=0, global_pool="")
    except Exception as exc:  # timm/hf raise many kinds; all mean "no weights"
        where = "offline and not in the local Hugging Face cache" if offline else "download failed"
        raise ChexopsError(
            f"model.pretrained: true but timm's pretrained weights for {arch!r} are unavailable "
            f"({where}: {exc.__class__.__name__}); connect to the internet once, or set "
            f"model.pretrained to a local .safetensors/.pth file, or to false") from None


def _read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # SafetensorError, OSError: a truncated or foreign file
            raise ChexopsError(
                f"model.pretrained: {path} is not a readable safetensors file "
                f"({exc.__class__.__name__}: {_first_line(exc)}); re-download or re-export it "
                f"with safetensors.torch.save_file(model.state_dict(), path)") from None
    try:  # never unpickle code: weights_only refuses pickled modules and functions
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError (code in the pickle), a truncated/foreign file
        why = ("UnpicklingError: a pickled object such as a whole model, which chexops never "
               "unpickles, or not a torch file" if isinstance(exc, pickle.UnpicklingError)
               else f"{exc.__class__.__name__}: {_first_line(exc)}")
        raise ChexopsError(
            f"model.pretrained: {path} cannot be loaded as plain weights ({why}); it must hold "
            f"only tensors: save "
            f"torch.save(model.state_dict(), path) (not the model object) or convert it to "
            f".safetensors") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ChexopsError(f"model.pretrained: {path} holds no state dict; save one with "
                           f"torch.save(model.state_dict(), path) or use safetensors")
    return state


def _first_line(exc: BaseException, limit: int = 120) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0].strip() if lines else ""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def pretrained_path(cfg: ModelConfig, root: str | Path | None = None) -> Path | None:
    """model.pretrained as a file path (None for true/false); a relative path is relative to
    the repository root (params.yaml's folder), not to the current directory."""
    if not isinstance(cfg.pretrained, str):
        return None
    path = Path(cfg.pretrained).expanduser()
    if not path.is_absolute() and root is not None:
        path = Path(root) / path
    return path


def load_body_weights(body: nn.Module, path: str | Path) -> None:
    """Load a timm state dict (`body.` prefix optional, classifier keys ignored) into the body."""
    path = Path(path)
    if not path.is_file():
        raise ChexopsError(f"model.pretrained: weights file {path} not found; "
                           f"give an existing .safetensors/.pth path, true or false")
    state = _read_weight_file(path)
    state = {k.removeprefix("body."): v for k, v in state.items()}
    own = body.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise ChexopsError(f"model.pretrained: {path} lacks {len(missing)} body weights "
                           f"(first: {missing[0]}); use weights of the same architecture")
    bad = [k for k in own if tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        raise ChexopsError(f"model.pretrained: {path} has weight {bad[0]} of shape "
                           f"{tuple(state[bad[0]].shape)}, the model expects "
                           f"{tuple(own[bad[0]].shape)}; use weights of the same architecture")
    body.load_state_dict({k: state[k] for k in own})


def build_body(cfg: ModelConfig, root: str | Path | None = None) -> nn.Module:
    import timm

    _check_arch(cfg.arch)
    if cfg.pretrained is True:
        return _create_pretrained(cfg.arch)
    body = timm.create_model(cfg.arch, pretrained=False, num_classes=0, global_pool="")
    path = pretrained_path(cfg, root)
    if path is not None:
        load_body_weights(body, path)
    return body


def build_model(model_cfg: ModelConfig, n_outputs: int,
                root: str | Path | None = None) -> ChexNet:
    """timm body + fastai-style head (or timm's classifier), one logit per target. A relative
    model.pretrained path is resolved against `root` (the repository root) when given."""
    if n_outputs < 1:
        raise ChexopsError(f"model: needs at least one output, got {n_outputs}; set targets")
    body = build_body(model_cfg, root)
    n_features = int(getattr(body, "num_features"))  # every timm body carries its width
    head = (fastai_head(n_features, n_outputs, model_cfg) if model_cfg.head == "fastai"
            else timm_head(n_features, n_outputs))
    return ChexNet(body, head, model_cfg.arch)


# ---------------------------------------------------------------- layer groups and freezing

def _split_prefix(body: nn.Module) -> str | None:
    """Name of the first module of the second body group: the feature stage after the middle one
    (densenet121: denseblock3, so transition2 stays in group 1; resnet: layer3)."""
    info = getattr(body, "feature_info", None)
    modules = [f["module"] for f in info] if info is not None else []
    if len(modules) < 3:
        return None
    return modules[len(modules) // 2 + 1]


def _body_groups(body: nn.Module) -> list[list[nn.Parameter]]:
    named = list(body.named_parameters())
    prefix = _split_prefix(body)
    cut = next((i for i, (n, _) in enumerate(named)
                if prefix and (n == prefix or n.startswith(prefix + "."))), None)
    if cut is None or cut == 0:  # generic fallback: halve the parameters in order
        cut = len(named) // 2
    return [[p for _, p in named[:cut]], [p for _, p in named[cut:]]]


def layer_groups(model: ChexNet) -> list[list[nn.Parameter]]:
    """[early body, late body, head]: every parameter exactly once (fastai's three groups)."""
    return [*_body_groups(model.body), list(model.head.parameters())]


def freeze_body(model: ChexNet, frozen: bool) -> None:
    """Freeze the body (not the head); normalisation layers stay trainable, as in fastai."""
    for module in model.body.modules():
        keep = isinstance(module, NORM_TYPES)
        for p in module.parameters(recurse=False):
            p.requires_grad_(keep or not frozen)
    for p in model.head.parameters():
        p.requires_grad_(True)

