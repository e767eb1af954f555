"""`chexops reproduce RUN`: finding the trial, restoring code/params/data, the verdict; and, on the
reduced pipeline, an identical reproduction and a refusal when one image of the data changed."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from chexops.commands import reproduce
from chexops.errors import ChexopsError
from chexops.tracking import dvcfiles, remote, sourcedata, trials, workspace
from chexops.tracking import verdict as tracking_verdict
from tests.pipeline_repo import SHARED, VENV_BIN, pipeline_env, run
from tests.processes import run_group

# ---------------------------------------------------------------- a small MLflow store

@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite store with one trial (two stage children), a linked cached stage and a lone run."""
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("store")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.create_experiment("chexops", artifact_location=(tmp / "art").as_uri())
    trial = client.create_run(exp, run_name="lr-small").info.run_id
    evaluate = client.create_run(exp, tags={"chexops.stage": "evaluate",
                                            "mlflow.parentRunId": trial}).info.run_id
    round1 = client.create_run(exp, tags={"chexops.stage": "train-round-1",
                                          "mlflow.parentRunId": trial}).info.run_id
    cached = client.create_run(exp, tags={"chexops.stage": "download"}).info.run_id
    lone = client.create_run(exp, tags={"chexops.stage": "clean"}).info.run_id
    for key, value in {"chexops.trial": "true", "dvc.exp_name": "lr-small",
                       "chexops.evaluate_run_id": evaluate, "stage.download.run_id": cached,
                       "git.commit": "abc", "git.dirty": "False",
                       "data.md5.data/raw": "d" * 32 + ".dir"}.items():
        client.set_tag(trial, key, value)
    client.log_param(trial, "seed", "42")
    client.log_param(trial, "rounds.r2.lr", "[0.0001, 0.001]")
    client.log_dict(evaluate, {"seed": 42, "rounds": {"r2": {"lr": [0.0001, 0.001]}}},
                    "config/params.json")
    # a trial made from a dirty tree: code changes that no commit holds
    dirty = client.create_run(exp, run_name="dirty").info.run_id
    for key, value in {"chexops.trial": "true", "git.commit": "abc", "git.dirty": "True",
                       "git.changed": "params.yaml, src/chexops/training/loop.py, notes.md",
                       "data.md5.data/raw": "d" * 32 + ".dir"}.items():
        client.set_tag(dirty, key, value)
    return {"client": client, "trial": trial, "evaluate": evaluate, "round1": round1,
            "cached": cached, "lone": lone, "dirty": dirty, "tmp": tmp}


def test_find_trial_by_run_id_stage_run_and_experiment_name(store):
    client, trial = store["client"], store["trial"]
    assert trials.find_trial_run(client, trial, "s").info.run_id == trial
    assert trials.find_trial_run(client, store["round1"], "s").info.run_id == trial
    assert trials.find_trial_run(client, "lr-small", "s").info.run_id == trial


def test_unknown_run_and_non_trial_run_are_refused(store):
    with pytest.raises(ChexopsError, match=r"no trial run or DVC experiment named 'nope' in "
                                           r"the tracking store S; find the id"):
        trials.find_trial_run(store["client"], "nope", "S")
    with pytest.raises(ChexopsError, match="is not a chexops trial run"):
        trials.find_trial_run(store["client"], store["lone"], "S")


def test_load_trial_collects_children_links_and_data_md5s(store):
    t = trials.load_trial(store["client"], "lr-small", "s")
    assert t.stage_runs == {"evaluate": store["evaluate"], "train-round-1": store["round1"],
                            "download": store["cached"]}
    assert t.data_md5s == {"data/raw": "d" * 32 + ".dir"}


def test_restored_params_come_from_the_evaluate_run_and_match_logged_params(store):
    t = trials.load_trial(store["client"], store["trial"], "s")
    raw = trials.restored_params(store["client"], t)
    assert raw == {"seed": 42, "rounds": {"r2": {"lr": [0.0001, 0.001]}}}
    assert trials.params_mismatch(raw, t) == []
    assert trials.params_mismatch({**raw, "seed": 7}, t) == ["seed"]


def trial_with(tags: dict) -> trials.Trial:
    return trials.Trial("r" * 32, "t", {"git.commit": "c" * 40, **tags}, {}, {})


def test_dirty_tree_warning_names_what_cannot_be_restored():
    assert trials.code_warning(trial_with({"git.dirty": "False"})) is None
    # `dvc exp run -S` changes only params.yaml, which reproduce restores from the run
    assert trials.code_warning(trial_with({"git.dirty": "True",
                                           "git.changed": "params.yaml"})) is None
    msg = trials.code_warning(trial_with({"git.dirty": "True",
                                          "git.changed": "params.yaml, src/chexops/training/loop.py"}))
    assert "dirty git tree" in msg and "src/chexops/training/loop.py" in msg
    assert "params.yaml" not in msg.split("changes to")[1].split(" were")[0]
    assert "unknown files" in trials.code_warning(trial_with({"git.dirty": "True"}))


# ---------------------------------------------------------------- the verdict

def verdict(old_m, new_m, old_w=None, new_w=None, old_d=None, new_d=None, tol=0.01):
    return tracking_verdict.compare(old_m, new_m, old_w or {}, new_w or {}, old_d or {}, new_d or {},
                                    tol)


def test_verdicts_identical_within_tolerance_and_different():
    same = verdict({"auroc": 0.8}, {"auroc": 0.8}, {"r1": "h"}, {"r1": "h"}, {"d": "m"}, {"d": "m"})
    assert same.verdict == "identical"
    near = verdict({"auroc": 0.8}, {"auroc": 0.805}, {"r1": "h"}, {"r1": "x"})
    assert near.verdict == "within tolerance"
    assert ("weights r1", "h", "x", "DIFFERS") in near.rows
    assert verdict({"auroc": 0.8}, {"auroc": 0.85}).verdict == "different"
    assert verdict({"auroc": 0.8}, {}).verdict == "different"  # a metric went missing
    # derived data must match exactly even when the metrics are close
    assert verdict({"a": 1.0}, {"a": 1.0}, old_d={"d": "m"}, new_d={"d": "n"}).verdict == "different"
    # the tolerance scales with large values (counts, losses)
    assert verdict({"n": 200.0}, {"n": 201.0}).verdict == "within tolerance"


def test_two_nan_metrics_are_the_same_and_nan_against_a_number_differs():
    nan = float("nan")
    c = verdict({"auroc": nan, "loss": 0.5}, {"auroc": nan, "loss": 0.5})
    assert c.verdict == "identical"
    assert ("auroc", "nan", "nan", "same") in c.rows
    assert verdict({"auroc": nan}, {"auroc": 0.5}).verdict == "different"
    assert verdict({"auroc": 0.5}, {"auroc": nan}).verdict == "different"
    assert verdict({"auroc": nan}, {}).verdict == "different"  # still: a metric went missing


def test_unrecorded_weights_are_shown_not_judged_and_table_states_tolerance():
    c = verdict({"a": 1.0}, {"a": 1.0}, {"r1": None}, {"r1": "h"})
    assert c.verdict == "identical"
    text = reproduce.format_comparison(verdict({"a": 1.0}, {"a": 1.001}), "o" * 32, "n" * 32, 0.01)
    assert "verdict: WITHIN TOLERANCE" in text and "0.01 x max(1, |old|)" in text
    assert "trial oooooooooooo" in text and "reproduction nnnnnnnnnnnn" in text


def test_tensor_hash_ignores_file_metadata_but_not_values(tmp_path):
    from safetensors.torch import save_file

    t = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(2)}
    save_file(t, str(tmp_path / "a.safetensors"), metadata={"run": "1"})
    save_file(t, str(tmp_path / "b.safetensors"), metadata={"run": "2"})
    save_file({**t, "b": torch.tensor([0.0, 1e-7])}, str(tmp_path / "c.safetensors"))
    a, b, c = (tracking_verdict.tensor_hash(tmp_path / f"{n}.safetensors") for n in "abc")
    assert a == b != c


# ---------------------------------------------------------------- data by md5 (remote.py)

def fake_cache(tmp_path: Path) -> tuple[Path, str]:
    cache = tmp_path / "cache"
    files = {"chexpert.zip": b"zip bytes", "synthetic_truth.parquet": b"truth"}
    entries = []
    for rel, data in files.items():
        md5 = hashlib.md5(data).hexdigest()
        remote.object_path(cache, md5).parent.mkdir(parents=True, exist_ok=True)
        remote.object_path(cache, md5).write_bytes(data)
        entries.append({"md5": md5, "relpath": rel})
    manifest = json.dumps(entries).encode()
    dir_md5 = hashlib.md5(manifest).hexdigest() + ".dir"
    remote.object_path(cache, dir_md5).parent.mkdir(parents=True, exist_ok=True)
    remote.object_path(cache, dir_md5).write_bytes(manifest)
    return cache, dir_md5


def test_cache_lookup_and_materialise(tmp_path):
    cache, dir_md5 = fake_cache(tmp_path)
    assert remote.in_cache(cache, dir_md5)
    remote.copy_from_cache(cache, dir_md5, tmp_path / "ws/data/raw")
    assert (tmp_path / "ws/data/raw/chexpert.zip").read_bytes() == b"zip bytes"
    assert not remote.in_cache(cache, "0" * 32 + ".dir")
    # a manifest whose files are gone is not "in the cache"
    entries = remote.dir_entries(cache, dir_md5)
    remote.object_path(cache, entries[0]["md5"]).unlink()
    assert not remote.in_cache(cache, dir_md5)


def test_manifest_escaping_its_directory_is_refused_and_nothing_written(tmp_path):
    cache, _ = fake_cache(tmp_path)
    evil = json.dumps([{"md5": "a" * 32, "relpath": "../../etc/x"}]).encode()
    md5 = "e" * 32 + ".dir"
    remote.object_path(cache, md5).parent.mkdir(parents=True, exist_ok=True)
    remote.object_path(cache, md5).write_bytes(evil)
    with pytest.raises(ChexopsError, match="escapes its directory"):
        remote.copy_from_cache(cache, md5, tmp_path / "out/raw")
    assert not (tmp_path / "out/raw").exists() and not list((tmp_path / "out").iterdir())


def test_dir_differences_names_the_changed_file(tmp_path):
    cache, old = fake_cache(tmp_path)
    entries = remote.dir_entries(cache, old)
    entries[0] = {"md5": "f" * 32, "relpath": entries[0]["relpath"]}
    new = "1" * 32 + ".dir"
    remote.object_path(cache, new).parent.mkdir(parents=True, exist_ok=True)
    remote.object_path(cache, new).write_text(json.dumps(entries))
    assert remote.dir_differences(cache, old, new) == ["chexpert.zip"]
    assert remote.dir_differences(cache, old, "2" * 32 + ".dir") == []


@pytest.mark.parametrize("output, expected", [
    ("ERROR: failed to fetch: config file error: no remote specified", "no DVC remote is configured"),
    ("botocore.exceptions.ClientError: InvalidAccessKeyId", "rejected the credentials"),
    ("Cannot connect to host 127.0.0.1:1 ssl:default [Connection refused]", "is unreachable"),
    ("The specified bucket does not exist (NoSuchBucket)", "bucket that does not exist"),
    ("WARNING: Some of the cache files do not exist neither locally nor on remote. Missing cache "
     "files:", "not in the DVC remote"),
    ("something else entirely", "run the dvc command by hand"),
])
def test_dvc_errors_become_one_line_with_a_fix(output, expected):
    msg = str(remote.classify_dvc_error(output, "team"))
    assert expected in msg and ";" in msg and "\n" not in msg


# ---------------------------------------------------------------- the command, refusing early

def chexops(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """The console script in its own process group (stopped as a group on timeout/failure)."""
    return run_group([str(VENV_BIN / "chexops"), *args], cwd=cwd, env=env, timeout=300)


def cli_dirs(tmp_path: Path) -> tuple[Path, Path]:
    """(a folder with the project's params.yaml to run from, an empty --workdir)."""
    repo, work = tmp_path / "repo", tmp_path / "work"
    repo.mkdir()
    work.mkdir()
    shutil.copy(Path(__file__).resolve().parents[2] / "params.yaml", repo / "params.yaml")
    return repo, work


def test_cli_refuses_unknown_run_and_missing_store_leaving_no_workspace(store, tmp_path):
    repo, work = cli_dirs(tmp_path)
    env = pipeline_env()
    proc = chexops(["reproduce", "no-such-trial", "--workdir", str(work)], repo, env)
    assert proc.returncode == 2
    assert "no MLflow store at" in proc.stderr and "MLFLOW_TRACKING_URI" in proc.stderr
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{store['tmp'] / 'mlflow.db'}"
    proc = chexops(["reproduce", "no-such-trial", "--workdir", str(work)], repo, env)
    assert proc.returncode == 2
    assert "no trial run or DVC experiment named 'no-such-trial'" in proc.stderr
    assert proc.stderr.count("\n") == 1  # one line
    # the trial's commit 'abc' is not in any repository here
    proc = chexops(["reproduce", store["trial"], "--workdir", str(work)], repo, env)
    assert proc.returncode == 2 and "of the trial is not in" in proc.stderr
    assert list(work.iterdir()) == []
    env["MLFLOW_TRACKING_URI"] = "http://127.0.0.1:9"
    proc = chexops(["reproduce", store["trial"]], repo, env)
    assert proc.returncode == 2 and "is unreachable" in proc.stderr


def test_cli_warns_that_a_dirty_tree_trial_is_restored_only_as_of_its_commit(store, tmp_path):
    repo, work = cli_dirs(tmp_path)
    env = {**pipeline_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{store['tmp'] / 'mlflow.db'}"}
    proc = chexops(["reproduce", store["dirty"], "--workdir", str(work)], repo, env)
    lines = proc.stderr.splitlines()
    # what is missing: the changed code files, not params.yaml (restored from the run)
    assert (f"warning: trial {store['dirty']} was made from a dirty git tree; its uncommitted "
            f"changes to src/chexops/training/loop.py, notes.md were never recorded, so the code is "
            f"restored only as of commit abc and the result may differ") in lines, proc.stderr
    # then it goes on, and here refuses (this trial logged no params): one line, exit 2
    assert proc.returncode == 2
    assert lines[-1].startswith(f"chexops reproduce: error: trial {store['dirty']} has no logged "
                                f"params")
    assert list(work.iterdir()) == []


# ---------------------------------------------------------------- the reduced pipeline, end to end

def change_one_image(src: Path, dest: Path) -> str:
    """Copy the zip, flipping one byte-run of the first JPEG's data (still a readable file)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        names = zin.namelist()
        victim = next(n for n in names if n.endswith(".jpg"))
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == victim:
                data = data[:-200] + bytes(b ^ 0x01 for b in data[-200:-2]) + data[-2:]
            zout.writestr(info, data)
    return victim


@pytest.fixture()
def trial_repo(shared_pipeline, tmp_path) -> dict:
    """The shared reduced repo (data from a local zip) and make repro's trial in it."""
    from mlflow.tracking import MlflowClient

    repo = shared_pipeline.repo
    return {"repo": repo, "source": shared_pipeline.source, "trial": shared_pipeline.trial,
            "env": pipeline_env(), "tmp": tmp_path,
            "client": MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")}


@pytest.mark.slow
@SHARED
def test_reproduce_gives_identical_metrics_and_weights(trial_repo):
    repo, env = trial_repo["repo"], trial_repo["env"]
    lock_before = (repo / "dvc.lock").read_bytes()
    weights_before = (repo / "models/round-5/best.safetensors").read_bytes()
    proc = run([str(VENV_BIN / "chexops"), "reproduce", trial_repo["trial"]], repo, env,
               timeout=900)
    out = proc.stdout
    print(out)  # the side-by-side table, shown with -s or on failure
    assert "verdict: IDENTICAL" in out, out + proc.stderr
    for k in range(1, 6):
        line = next(ln for ln in out.splitlines() if ln.startswith(f"weights train-round-{k}"))
        assert line.split()[-1] == "same", line
    assert any(ln.startswith("evaluate.") and ln.split()[-1] == "same" for ln in out.splitlines())
    assert "data/raw at the recorded md5 (DVC cache)" in proc.stderr
    # the user's workspace is untouched; the reproduction is a new trial tagged with the old one
    assert (repo / "dvc.lock").read_bytes() == lock_before
    assert (repo / "models/round-5/best.safetensors").read_bytes() == weights_before
    client = trial_repo["client"]
    exp = client.get_experiment_by_name("chexops")
    again = client.search_runs([exp.experiment_id],
                               f"tags.`chexops.reproduces` = '{trial_repo['trial']}'")
    assert len(again) == 1


@pytest.mark.slow
@SHARED
def test_reproduce_refuses_when_one_image_changed_and_data_is_not_cached(trial_repo):
    """A fresh clone (no DVC cache, no remote) whose local zip had one image modified."""
    repo, tmp = trial_repo["repo"], trial_repo["tmp"]
    clone = tmp / "clone"
    env = {**trial_repo["env"], "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}
    run(["git", "clone", "-q", str(repo), str(clone)], tmp, env)
    original = trial_repo["source"].read_bytes()
    victim = change_one_image(trial_repo["source"], tmp / "changed.zip")
    with zipfile.ZipFile(trial_repo["source"]) as a, zipfile.ZipFile(tmp / "changed.zip") as b:
        assert a.namelist() == b.namelist()  # same layout, exactly one image's bytes differ
        assert [n for n in a.namelist() if a.read(n) != b.read(n)] == [victim]
    work = tmp / "work"
    work.mkdir()
    try:
        shutil.copyfile(tmp / "changed.zip", trial_repo["source"])
        proc = run_group([str(VENV_BIN / "chexops"), "reproduce", trial_repo["trial"],
                          "--workdir", str(work)], cwd=clone, env=env, timeout=600)
    finally:
        trial_repo["source"].write_bytes(original)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("chexops reproduce: error: data/raw: the data differs from the trial's")
    assert str(trial_repo["source"]) in last
    # the cause, exactly: the project's default remote (a folder beside the clone, found from the
    # clone and not from the temporary workspace) is configured but holds nothing. The clone has
    # the project's tracked .dvc/config (`core.remote = local`), so there always is one
    name = remote.default_remote(clone)
    assert name == "local", name
    problem = f"the data is not in the DVC remote {name}"
    fix = "run `dvc push` where the data was made, then try again"
    assert f"; it is not in the DVC cache and {problem} ({fix}); " in last
    assert (f"reproduce: data/raw is not in the DVC cache and not had from the DVC remote "
            f"({problem}; {fix}); re-deriving it with stage download") in proc.stderr
    assert list(work.iterdir()) == []  # the refused workspace is gone
    assert "verdict" not in proc.stdout  # refused before any training


# ---------------------------------------------------------------- workspace and source data (toy DVC repo)

def toy_repo(tmp_path: Path, source: Path) -> tuple[Path, str, str]:
    """git + DVC repo whose only source stage copies `source` into data/raw; (repo, commit, md5)."""
    repo = tmp_path / "toy"
    repo.mkdir()
    env = pipeline_env()
    run(["git", "init", "-q", "-b", "main"], repo, env)
    run([str(VENV_BIN / "dvc"), "init", "-q"], repo, env)
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "download": {"cmd": f"mkdir -p data/raw && cp {source} data/raw/chexpert.zip",
                     "outs": ["data/raw"]},
        "clean": {"cmd": "cp data/raw/chexpert.zip clean.bin", "deps": ["data/raw/chexpert.zip"],
                  "outs": ["clean.bin"]}}}))
    run([str(VENV_BIN / "dvc"), "repro", "-q"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-q", "-m", "toy"], repo, env)
    commit = run(["git", "rev-parse", "HEAD"], repo, env).stdout.strip()
    return repo, commit, dvcfiles.lock_outs(repo)["data/raw"]


def test_workspace_restores_source_data_from_cache_or_rederives_it_or_refuses(tmp_path):
    source = tmp_path / "source.zip"
    source.write_bytes(b"original images")
    repo, commit, md5 = toy_repo(tmp_path, source)
    trial = trial_with({"data.md5.data/raw": md5})
    env = pipeline_env()
    assert dvcfiles.source_stages(repo) == {"download": ["data/raw"]}

    ws = tmp_path / "ws1"
    workspace.make_workspace(repo, commit, ws)
    cache = workspace.share_dvc_config(repo, ws)
    assert cache == remote.cache_dir(repo) and remote.in_cache(cache, md5)
    assert sourcedata.restore_data(ws, trial, cache, env, str(source)) == {"data/raw": "DVC cache"}
    assert (ws / "data/raw/chexpert.zip").read_bytes() == b"original images"

    shutil.rmtree(cache)  # a teammate without the cache and without a remote
    ws2 = tmp_path / "ws2"
    workspace.make_workspace(repo, commit, ws2)
    workspace.share_dvc_config(repo, ws2)
    how = sourcedata.restore_data(ws2, trial, cache, env, str(source))
    assert how == {"data/raw": "re-derived by download, same md5"}

    shutil.rmtree(cache)
    source.write_bytes(b"original images, one changed")
    ws3 = tmp_path / "ws3"
    workspace.make_workspace(repo, commit, ws3)
    workspace.share_dvc_config(repo, ws3)
    with pytest.raises(ChexopsError) as err:
        sourcedata.restore_data(ws3, trial, cache, env, str(source))
    msg = str(err.value)
    assert msg.startswith("data/raw: the data differs from the trial's")
    assert md5 in msg and str(source) in msg and "no DVC remote is configured" in msg
    assert "\n" not in msg
    # the user's repository was never touched
    assert run(["git", "status", "--porcelain"], repo, env).stdout == ""
    assert not (repo / "data/raw/chexpert.zip").read_bytes().endswith(b"changed")


def test_rerun_forces_every_stage_below_the_source_and_not_the_source(tmp_path):
    source = tmp_path / "source.zip"
    source.write_bytes(b"x")
    repo, commit, md5 = toy_repo(tmp_path, source)
    source.unlink()  # the source stage must not run again
    (repo / "clean.bin").unlink()
    workspace.rerun(repo, pipeline_env())
    assert (repo / "clean.bin").read_bytes() == b"x"


def test_unknown_commit_is_refused(tmp_path):
    source = tmp_path / "s"
    source.write_bytes(b"x")
    repo, _, _ = toy_repo(tmp_path, source)
    with pytest.raises(ChexopsError, match=r"commit 0123456789ab of the trial is not in .*; "
                                           r"`git fetch` the branch"):
        workspace.make_workspace(repo, "0123456789ab" * 3 + "0123", tmp_path / "ws")
    assert not (tmp_path / "ws").exists()


# ---------------------------------------------------------------- the DVC remote from the workspace

def dvc_(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run([str(VENV_BIN / "dvc"), *args], cwd, pipeline_env())


def remote_list(root: Path) -> dict[str, str]:
    """{name: url} as DVC resolves it there (`dvc config --list`: `dvc remote list` wraps)."""
    out = dvc_(["config", "--list"], root).stdout
    pairs = (ln.split("=", 1) for ln in out.splitlines() if "=" in ln)
    return {k[len("remote."):-len(".url")]: v for k, v in pairs
            if k.startswith("remote.") and k.endswith(".url")}


def test_workspace_reaches_the_relative_default_remote_of_the_original_repo(tmp_path, capfd):
    """`url = ../../store` in .dvc/config means <repo>/../store; in a workspace elsewhere it
    must still mean that folder, or the fetch silently misses."""
    source = tmp_path / "source.zip"
    source.write_bytes(b"original images")
    repo, _, md5 = toy_repo(tmp_path, source)
    dvc_(["remote", "add", "-d", "local", "../store"], repo)  # as docs/TEAM.md says
    assert "url = ../../store" in (repo / ".dvc/config").read_text()
    dvc_(["remote", "add", "--local", "mine", "../mine"], repo)  # a relative one in config.local
    run(["git", "commit", "-q", "-am", "remote"], repo, pipeline_env())
    commit = run(["git", "rev-parse", "HEAD"], repo, pipeline_env()).stdout.strip()
    dvc_(["push", "-q"], repo)
    trial = trial_with({"data.md5.data/raw": md5})

    ws = tmp_path / "work" / "deeper" / "ws"  # not a sibling: the relative url would differ
    workspace.make_workspace(repo, commit, ws)
    assert remote_list(ws)["local"] != str(tmp_path / "store")  # the defect, without the fix
    cache = workspace.share_dvc_config(repo, ws)
    assert remote_list(ws) == remote_list(repo) == {"local": str(tmp_path / "store"),
                                                    "mine": str(tmp_path / "mine")}
    assert remote.default_remote(ws) == "local"
    assert "../../store" in (ws / ".dvc/config").read_text()  # the tracked config is unchanged

    shutil.rmtree(cache)  # not in the cache: it must come from the remote, not be re-derived
    source.unlink()
    assert sourcedata.restore_data(ws, trial, cache, pipeline_env(), str(source)) == \
        {"data/raw": "DVC remote local"}
    assert (ws / "data/raw/chexpert.zip").read_bytes() == b"original images"
    assert "re-deriving" not in capfd.readouterr().err


def test_rederive_message_states_why_the_remote_did_not_help(tmp_path, capfd):
    source = tmp_path / "source.zip"
    source.write_bytes(b"original images")
    repo, _, md5 = toy_repo(tmp_path, source)
    (tmp_path / "empty").mkdir()
    dvc_(["remote", "add", "-d", "local", "../empty"], repo)  # configured, never pushed to
    run(["git", "commit", "-q", "-am", "remote"], repo, pipeline_env())
    commit = run(["git", "rev-parse", "HEAD"], repo, pipeline_env()).stdout.strip()
    ws = tmp_path / "work" / "ws"
    workspace.make_workspace(repo, commit, ws)
    cache = workspace.share_dvc_config(repo, ws)
    shutil.rmtree(cache)
    how = sourcedata.restore_data(ws, trial_with({"data.md5.data/raw": md5}), cache,
                                  pipeline_env(), str(source))
    assert how == {"data/raw": "re-derived by download, same md5"}
    err = capfd.readouterr().err
    assert ("reproduce: data/raw is not in the DVC cache and not had from the DVC remote (the "
            "data is not in the DVC remote local; run `dvc push` where the data was made, then "
            "try again); re-deriving it with stage download\n") in err


def s3_remote(repo: Path, endpoint: str) -> None:
    dvc_(["remote", "add", "-d", "team", "s3://chexops-team/dvcstore"], repo)
    dvc_(["remote", "modify", "team", "endpointurl", endpoint], repo)
    run(["git", "commit", "-q", "-am", "team remote"], repo, pipeline_env())
    dvc_(["remote", "modify", "--local", "team", "access_key_id", "AKIAABCDEFGHIJKLMNOP"], repo)
    dvc_(["remote", "modify", "--local", "team", "secret_access_key", "s3cretvalue"], repo)


def test_unreachable_remote_is_refused_unless_rederive(tmp_path, monkeypatch, capfd):
    from tests.servers import free_port

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore: fail at once, no retries
    source = tmp_path / "source.zip"
    source.write_bytes(b"original images")
    repo, _, md5 = toy_repo(tmp_path, source)
    s3_remote(repo, f"http://127.0.0.1:{free_port()}")  # nothing listens there
    commit = run(["git", "rev-parse", "HEAD"], repo, pipeline_env()).stdout.strip()
    trial = trial_with({"data.md5.data/raw": md5})
    ws = tmp_path / "work" / "ws"
    workspace.make_workspace(repo, commit, ws)
    cache = workspace.share_dvc_config(repo, ws)
    shutil.rmtree(cache)
    with pytest.raises(ChexopsError) as err:
        sourcedata.restore_data(ws, trial, cache, pipeline_env(), str(source))
    assert str(err.value) == (
        "data/raw: it is not in the DVC cache and the DVC remote team is unreachable (check its "
        "URL/endpointurl (`dvc remote list`) and the network); or pass --rederive to re-derive "
        f"it with stage download from data.source {str(source)!r} (its md5 is still checked)")
    assert not (ws / "data/raw").exists() and "re-deriving" not in capfd.readouterr().err
    how = sourcedata.restore_data(ws, trial, cache, pipeline_env(), str(source), rederive=True)
    assert how == {"data/raw": "re-derived by download, same md5"}
    err_text = capfd.readouterr().err
    assert ("reproduce: data/raw is not in the DVC cache and not had from the DVC remote (the DVC "
            "remote team is unreachable; check its URL/endpointurl (`dvc remote list`) and the "
            "network); re-deriving it with stage download\n") in err_text
    assert "s3cretvalue" not in err_text and "AKIAABCDEFGHIJKLMNOP" not in err_text


def test_rejected_credentials_are_refused_and_the_cause_is_redacted(tmp_path, monkeypatch,
                                                                     capfd):
    """DVC's own words for bad keys (as moto/S3 answer, see test_remote.py), with secrets in
    them: the refusal and the --rederive note carry the cause, never the secret."""
    source = tmp_path / "source.zip"
    source.write_bytes(b"original images")
    repo, commit, md5 = toy_repo(tmp_path, source)
    output = ("ERROR: failed to fetch data from the cloud - An error occurred (InvalidAccessKeyId) "
              "when calling s3://AKIAABCDEFGHIJKLMNOP:s3cretvalue@chexops-team/dvcstore")

    def rejected(root, cache, name, md5_, remote_name=None):
        raise remote.classify_dvc_error(output, "team")

    monkeypatch.setattr(remote, "default_remote", lambda root: "team")
    monkeypatch.setattr(remote, "fetch_object", rejected)
    ws = tmp_path / "work" / "ws"
    workspace.make_workspace(repo, commit, ws)
    cache = workspace.share_dvc_config(repo, ws)
    shutil.rmtree(cache)
    trial = trial_with({"data.md5.data/raw": md5})
    with pytest.raises(ChexopsError, match=r"^data/raw: it is not in the DVC cache and the DVC "
                                           r"remote team rejected the credentials \(set them with "
                                           r"`dvc remote modify --local team access_key_id"):
        sourcedata.restore_data(ws, trial, cache, pipeline_env(), str(source))
    sourcedata.restore_data(ws, trial, cache, pipeline_env(), str(source), rederive=True)
    err = capfd.readouterr().err
    assert "(the DVC remote team rejected the credentials; set them with" in err
    assert "s3cretvalue" not in err and "AKIA" not in err


def test_unexpected_failure_is_one_line_naming_the_step_and_leaves_nothing(tmp_path, monkeypatch,
                                                                           capfd):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from chexops import cli

    source = tmp_path / "source.zip"
    source.write_bytes(b"original images")
    repo, commit, md5 = toy_repo(tmp_path, source)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("chexops", artifact_location=(tmp_path / "art").as_uri())
    trial = client.create_run(exp, run_name="t").info.run_id
    evaluate = client.create_run(exp, tags={"chexops.stage": "evaluate",
                                            "mlflow.parentRunId": trial}).info.run_id
    for key, value in {"chexops.trial": "true", "chexops.evaluate_run_id": evaluate,
                       "git.commit": commit, "git.dirty": "False",
                       "data.md5.data/raw": md5}.items():
        client.set_tag(trial, key, value)
    client.log_dict(evaluate, {"seed": 42}, "config/params.json")

    def fails(ws, env):
        raise MlflowException("API request to http://alice:s3cret@mlflow.example/api failed\n"
                              "Traceback (most recent call last): ...")

    monkeypatch.setattr(workspace, "rerun", fails)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    work = tmp_path / "work"
    work.mkdir()
    params = Path(__file__).resolve().parents[2] / "params.yaml"
    code = cli.main(["--root", str(repo), "--params", str(params), "reproduce", trial,
                     "--workdir", str(work)])
    err = capfd.readouterr().err
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        "chexops reproduce: error: re-running the pipeline failed: MlflowException: API request "
        "to http://***@mlflow.example/api failed; nothing in your workspace was changed "
        "(reproduce with --keep to inspect the temporary one)")
    assert "Traceback" not in err and "s3cret" not in err
    assert "data/raw at the recorded md5 (DVC cache)" in err  # it got that far
    assert list(work.iterdir()) == []  # the temporary workspace is gone
    assert run(["git", "status", "--porcelain"], repo, pipeline_env()).stdout == ""


# ---------------------------------------------------------------- a DVC experiment's own commit

def exp_repo(tmp_path: Path) -> tuple[Path, str]:
    """git + DVC repo with one params-driven stage, and one `dvc exp run -n toy-exp -S seed=7`
    made with an uncommitted change to code.py; (repo, baseline commit)."""
    repo = tmp_path / "exp"
    repo.mkdir()
    env = pipeline_env()
    run(["git", "init", "-q", "-b", "main"], repo, env)
    dvc_(["init", "-q"], repo)
    (repo / "code.py").write_text("v1\n")
    (repo / "params.yaml").write_text("seed: 1\n")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": {
        "cmd": "cat code.py params.yaml > out.txt", "deps": ["code.py"], "params": ["seed"],
        "outs": ["out.txt"]}}}))
    dvc_(["repro", "-q"], repo)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-q", "-m", "baseline"], repo, env)
    baseline = run(["git", "rev-parse", "HEAD"], repo, env).stdout.strip()
    (repo / "code.py").write_text("v2, uncommitted\n")
    dvc_(["exp", "run", "-q", "-n", "toy-exp", "-S", "seed=7"], repo)
    run(["git", "checkout", "-q", "--", "."], repo, env)
    return repo, baseline


def test_experiment_is_restored_from_its_own_commit_else_from_the_baseline(tmp_path):
    repo, baseline = exp_repo(tmp_path)
    ref = f"refs/exps/{baseline[:2]}/{baseline[2:]}/toy-exp"
    exp_commit = run(["git", "rev-parse", ref], repo, pipeline_env()).stdout.strip()
    tags = {"git.commit": baseline, "dvc.exp_name": "toy-exp", "git.dirty": "True",
            "git.changed": "code.py, params.yaml"}
    trial = trials.Trial("r" * 32, "t", tags, {}, {"seed": "7"})
    assert workspace.experiment_ref(trial) == ref
    assert workspace.code_commit(repo, trial) == (exp_commit, "toy-exp", None)
    assert trials.code_warning(trial, "toy-exp") is None  # its changes are in that commit
    ws = tmp_path / "ws"
    workspace.make_workspace(repo, exp_commit, ws)
    assert (ws / "code.py").read_text() == "v2, uncommitted\n"
    assert yaml.safe_load((ws / "params.yaml").read_text()) == {"seed": 7}

    # the experiment was re-run since with other params: not the trial's code, use the baseline
    other = trials.Trial("r" * 32, "t", tags, {}, {"seed": "8"})
    commit, name, note = workspace.code_commit(repo, other)
    assert (commit, name) == (baseline, None)
    assert note.startswith(f"DVC experiment 'toy-exp' ({exp_commit[:12]}) has other params than "
                           f"the trial (seed; re-run since?)")
    assert "code.py" in trials.code_warning(other, name)
    # not here (never pulled): the baseline, saying how to get it
    gone = trials.Trial("r" * 32, "t", {**tags, "dvc.exp_name": "elsewhere"}, {}, {})
    commit, name, note = workspace.code_commit(repo, gone)
    assert (commit, name) == (baseline, None)
    assert f"no {ref[:-len('toy-exp')]}elsewhere" in note and "`dvc exp pull REMOTE elsewhere`" in note
    # a plain `dvc repro` trial has no experiment
    plain = trials.Trial("r" * 32, "t", {"git.commit": baseline, "dvc.exp_name": "None"}, {}, {})
    assert workspace.code_commit(repo, plain) == (baseline, None, None)
