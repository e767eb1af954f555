"""Seeding, torch configuration, device choice, DVC data md5s, git and library capture."""
from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from chexops import runtime
from chexops.config import RuntimeConfig
from chexops.errors import ChexopsError
from chexops.tracking import provenance as repro
from tests.processes import run_group

DIR_MD5 = "0123456789abcdef0123456789abcdef.dir"
ZIP_BYTES = b"zip bytes"


def draw() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_seed_everything_repeats_python_numpy_and_torch():
    runtime.seed_everything(7)
    first = draw()
    runtime.seed_everything(7)
    assert draw() == first
    runtime.seed_everything(8)
    assert draw() != first


def test_seed_worker_derives_numpy_seed_from_torch():
    torch.manual_seed(123)
    runtime.seed_worker(0)
    a = np.random.rand()
    torch.manual_seed(123)
    runtime.seed_worker(0)
    assert np.random.rand() == a


def test_configure_torch_threads_and_determinism(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    threads, was_deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        runtime.configure_torch(RuntimeConfig(threads=1, deterministic=True))
        assert torch.get_num_threads() == 1
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(was_deterministic)


def test_resolve_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert runtime.resolve_device(RuntimeConfig(device="auto")).type == expected
    assert runtime.resolve_device(RuntimeConfig(device="cpu")) == torch.device("cpu")
    with pytest.raises(ChexopsError, match="runtime.device: 'gpu0' is not a device"):
        runtime.resolve_device(RuntimeConfig(device="gpu0"))
    if not torch.cuda.is_available():
        with pytest.raises(ChexopsError, match="no CUDA device is available; set runtime.device"):
            runtime.resolve_device(RuntimeConfig(device="cuda"))


def test_file_md5_is_plain_md5_in_chunks(tmp_path):
    data = os.urandom(3000)
    (tmp_path / "f").write_bytes(data)
    assert repro.file_md5(tmp_path / "f", chunk_size=1024) == hashlib.md5(data).hexdigest()


def write_repo(root: Path, manifest: list | None) -> None:
    stages = {
        "download": {"cmd": "x", "outs": ["data/raw"]},
        "resample": {"cmd": "x", "outs": ["data/resampled"]},
        "train": {"cmd": "x", "deps": ["src/chexops/training/loop.py", "data/raw/chexpert.zip",
                                       {"data/resampled": {"cache": True}}, "notes.txt",
                                       "missing.bin"], "outs": ["models/round-1"]},
    }
    lock = {"schema": "2.0", "stages": {
        "download": {"cmd": "x", "outs": [{"path": "data/raw", "hash": "md5", "md5": DIR_MD5,
                                           "size": 9, "nfiles": 1}]},
        "resample": {"cmd": "x", "outs": [{"path": "data/resampled", "hash": "md5",
                                           "md5": "f" * 32 + ".dir", "size": 1, "nfiles": 2}]},
        # a stale entry from this stage's previous run: must not be used
        "train": {"cmd": "x", "deps": [{"path": "data/raw/chexpert.zip", "hash": "md5",
                                        "md5": "stale", "size": 1}]},
    }}
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    (root / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    (root / "data/raw").mkdir(parents=True)
    (root / "data/raw/chexpert.zip").write_bytes(ZIP_BYTES)
    (root / "notes.txt").write_text("hello")
    if manifest is not None:
        obj = root / ".dvc/cache/files/md5" / DIR_MD5[:2] / DIR_MD5[2:]
        obj.parent.mkdir(parents=True)
        obj.write_text(json.dumps(manifest))


def test_dvc_input_md5s_follows_outs_manifest_then_file(tmp_path):
    write_repo(tmp_path, [{"md5": "b" * 32, "relpath": "chexpert.zip"}])
    assert repro.dvc_input_md5s(tmp_path, "train") == {
        "data/raw/chexpert.zip": "b" * 32,              # from data/raw's .dir manifest
        "data/resampled": "f" * 32 + ".dir",            # an upstream out
        "notes.txt": hashlib.md5(b"hello").hexdigest(),  # a plain file: hashed now
    }  # src/ code deps and missing files are left out


def test_dvc_input_md5s_hashes_a_file_when_the_manifest_is_not_cached(tmp_path):
    write_repo(tmp_path, None)
    got = repro.dvc_input_md5s(tmp_path, "train")
    assert got["data/raw/chexpert.zip"] == hashlib.md5(ZIP_BYTES).hexdigest()
    with pytest.raises(ChexopsError, match="stage 'nope' is not in"):
        repro.dvc_input_md5s(tmp_path, "nope")


def test_dvc_input_md5s_reads_the_main_cache_from_a_temp_workspace(tmp_path):
    write_repo(tmp_path, [{"md5": "c" * 32, "relpath": "chexpert.zip"}])
    workspace = tmp_path / ".dvc/tmp/exps/tmp123"
    workspace.mkdir(parents=True)
    for name in ("dvc.yaml", "dvc.lock", "notes.txt"):
        (workspace / name).write_bytes((tmp_path / name).read_bytes())
    assert repro.dvc_input_md5s(workspace, "train")["data/raw/chexpert.zip"] == "c" * 32


def test_dvc_input_md5s_equals_what_real_dvc_records(tmp_path):
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    dvc = [str(Path(sys.executable).parent / "dvc")]
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    assert run_group(dvc + ["init", "-q"], cwd=tmp_path, env=env, timeout=120).returncode == 0
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "make": {"cmd": "mkdir -p data/raw && printf zipbytes > data/raw/chexpert.zip "
                        "&& printf x > data/raw/other", "outs": ["data/raw"]},
        "use": {"cmd": "cat data/raw/chexpert.zip > out.txt",
                "deps": ["data/raw/chexpert.zip", "data/raw"], "outs": ["out.txt"]},
    }}))
    done = run_group(dvc + ["repro", "-q"], cwd=tmp_path, env=env, timeout=120)  # + its stages
    assert done.returncode == 0, done.stderr[-3000:]
    lock = yaml.safe_load((tmp_path / "dvc.lock").read_text())
    recorded = {d["path"]: d["md5"] for d in lock["stages"]["use"]["deps"]}
    assert repro.dvc_input_md5s(tmp_path, "use") == recorded


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                   check=True, capture_output=True)


def test_git_info_commit_dirty_and_outside_a_repo(tmp_path):
    assert repro.git_info(tmp_path) == {"commit": None, "dirty": None, "changed": []}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"s": {
        "cmd": "x", "metrics": [{"metrics/m.json": {"cache": False}}]}}}))
    (tmp_path / "metrics").mkdir()
    for name in ("code.py", "dvc.lock", "metrics/m.json"):
        (tmp_path / name).write_text("v1")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "init")
    info = repro.git_info(tmp_path)
    assert len(info["commit"]) == 40 and info["dirty"] is False
    for name in ("dvc.lock", "metrics/m.json"):  # the pipeline's own outputs: not dirt
        (tmp_path / name).write_text("v2")
    (tmp_path / "untracked.txt").write_text("x")
    assert repro.git_info(tmp_path)["dirty"] is False
    (tmp_path / "params.yaml").write_text("lr: 1")
    git(tmp_path, "add", "params.yaml")
    git(tmp_path, "commit", "-q", "-m", "params")
    (tmp_path / "params.yaml").write_text("lr: 2")  # what `dvc exp run -S lr=2` does: logged, not dirt
    assert repro.git_info(tmp_path)["dirty"] is False
    (tmp_path / "code.py").write_text("v2")
    assert repro.git_info(tmp_path) | {"commit": None} == {
        "commit": None, "dirty": True, "changed": ["code.py"]}
    git(tmp_path, "mv", "code.py", "my code.py")  # a rename with a space: one clean path
    assert repro.git_info(tmp_path)["changed"] == ["my code.py"]


def test_library_versions_from_metadata():
    versions = repro.library_versions()
    assert set(versions) == {"python", "torch", "torchvision", "timm", "mlflow", "dvc", "numpy",
                             "pandas", "sklearn"}
    assert torch.__version__.startswith(versions["torch"])  # metadata has no +cpu suffix
    assert versions["python"] == ".".join(map(str, sys.version_info[:3]))


def test_dvc_input_md5s_outside_a_pipeline_is_empty(tmp_path):
    assert repro.dvc_input_md5s(tmp_path, "clean") == {}
