"""DVC remotes for a team: a local-directory remote and an S3-compatible one (moto's server on
loopback, with IAM credentials enforced): push, pull into a fresh clone, `dvc repro` there with
nothing recomputed; and the faults -- no remote, data not on the remote, wrong credentials,
an unreachable endpoint -- each a one-line message, nothing written."""
from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from chexops.errors import ChexopsError
from chexops.redact import redact_text
from chexops.tracking import remote
from tests.pipeline_repo import VENV_BIN, make_repo_copy, pipeline_env, reduced_params, run
from tests.processes import run_group
from tests.servers import free_port, server

DATA_STAGES = ["download", "clean", "resample"]


def dvc(args: list[str], cwd: Path, env: dict | None = None, check: bool = True):
    env = env or pipeline_env()
    return run([str(VENV_BIN / "dvc"), *args], cwd, env) if check else run_group(
        [str(VENV_BIN / "dvc"), *args], cwd=cwd, env=env)


def git_dvc_repo(path: Path) -> Path:
    """A tiny git + DVC repository with one tracked directory."""
    env = pipeline_env()
    path.mkdir()
    run(["git", "init", "-q", "-b", "main"], path, env)
    dvc(["init", "-q"], path)
    (path / "data").mkdir()
    (path / "data/a.txt").write_text("radiograph\n")
    (path / "data/b.txt").write_text("labels\n")
    dvc(["add", "-q", "data"], path)
    run(["git", "add", "-A"], path, env)
    run(["git", "commit", "-q", "-m", "data"], path, env)
    return path


def tracked_md5(repo: Path, name: str = "data") -> str:
    import yaml

    return yaml.safe_load((repo / f"{name}.dvc").read_text())["outs"][0]["md5"]


# ---------------------------------------------------------------- fetching by md5 (fast)

def test_fetch_by_md5_from_a_local_remote_into_a_fresh_clone(tmp_path):
    repo = git_dvc_repo(tmp_path / "repo")
    dvc(["remote", "add", "-d", "local", str(tmp_path / "store")], repo)
    run(["git", "commit", "-q", "-am", "remote"], repo, pipeline_env())
    dvc(["push", "-q"], repo)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, pipeline_env())
    cache = remote.cache_dir(clone)
    md5 = tracked_md5(repo)
    assert not remote.in_cache(cache, md5)
    remote.fetch_object(clone, cache, "raw", md5)
    assert remote.in_cache(cache, md5)
    remote.copy_from_cache(cache, md5, clone / "restored")
    assert (clone / "restored/a.txt").read_text() == "radiograph\n"
    assert not (clone / remote.FETCH_DIR / "raw.dvc").exists()  # the side .dvc file is gone


def test_fetch_without_a_remote_or_from_one_missing_the_data_is_refused(tmp_path):
    repo = git_dvc_repo(tmp_path / "repo")
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, pipeline_env())
    cache = remote.cache_dir(clone)
    with pytest.raises(ChexopsError, match=r"^no DVC remote is configured; add one with "
                                           r"`dvc remote add -d NAME URL`"):
        remote.fetch_object(clone, cache, "raw", tracked_md5(repo))
    (tmp_path / "empty").mkdir()
    dvc(["remote", "add", "-d", "empty", str(tmp_path / "empty")], clone)
    with pytest.raises(ChexopsError, match=r"^the data is not in the DVC remote empty; run "
                                           r"`dvc push`"):
        remote.fetch_object(clone, cache, "raw", tracked_md5(repo))
    assert not remote.in_cache(cache, tracked_md5(repo))
    assert remote.default_remote(clone) == "empty"


def test_dvc_errors_have_a_kind_and_never_echo_credentials():
    kinds = {"no remote specified": "no-remote", "InvalidAccessKeyId": "credentials",
             "Could not connect to the endpoint URL": "unreachable", "NoSuchBucket": "no-bucket",
             "Missing cache files:": "not-pushed", "boom": "other"}
    for output, kind in kinds.items():
        err = remote.classify_dvc_error(f"ERROR: {output}", "team")
        assert isinstance(err, ChexopsError) and err.kind == kind
        assert str(err) == f"{err.problem}; {err.fix}"
    err = remote.classify_dvc_error("ERROR: unexpected error - https://alice:pw1@host/x?a=1 "
                                    "secret_access_key=abc123 key AKIAABCDEFGHIJKLMNOP", "team")
    assert err.kind == "other"
    assert err.problem == ("dvc failed with the DVC remote team (ERROR: unexpected error - "
                           "https://***@host/x?*** secret_access_key=*** key ***)")
    assert redact_text("password: hunter2, token=t0k") == "password: ***, token=***"


def remote_config(root: Path) -> dict[str, str]:
    """`dvc config --list` (merged levels, paths resolved) as a dict."""
    out = dvc(["config", "--list"], root).stdout
    return dict(ln.split("=", 1) for ln in out.splitlines() if "=" in ln)


def test_relative_remote_paths_are_pinned_to_the_original_repo(tmp_path):
    """DVC resolves a relative remote url against the config file's folder, so a clone elsewhere
    sees another folder until the paths are pinned (in its config.local only)."""
    repo = git_dvc_repo(tmp_path / "repo")
    dvc(["remote", "add", "-d", "local", "../store"], repo)  # .dvc/config: url = ../../store
    dvc(["remote", "add", "team", "s3://bucket/x"], repo)     # not a path: left alone
    dvc(["remote", "modify", "team", "credentialpath", "creds.json"], repo)
    dvc(["remote", "add", "--local", "mine", "../mine"], repo)  # config.local, relative
    dvc(["remote", "add", "--local", "abs", str(tmp_path / "abs")], repo)
    run(["git", "commit", "-q", "-am", "remotes"], repo, pipeline_env())
    clone = tmp_path / "a" / "b" / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, pipeline_env())
    shutil.copyfile(repo / ".dvc/config.local", clone / ".dvc/config.local")  # as reproduce does
    project = (clone / ".dvc/config").read_text()
    assert remote.pin_remote_paths(repo, clone) == {
        "local.url": str(tmp_path / "store"), "team.credentialpath": str(repo / "creds.json"),
        "mine.url": str(tmp_path / "mine")}
    resolved = remote_config(clone)  # what DVC resolves them to, in the clone and in repo
    assert resolved == remote_config(repo)
    assert resolved == {"remote.local.url": str(tmp_path / "store"),
                        "remote.team.url": "s3://bucket/x",
                        "remote.team.credentialpath": str(repo / "creds.json"),
                        "remote.mine.url": str(tmp_path / "mine"),
                        "remote.abs.url": str(tmp_path / "abs"), "core.remote": "local"}
    assert (clone / ".dvc/config").read_text() == project  # the tracked config is untouched
    assert remote.pin_remote_paths(repo, clone) == {}  # nothing relative is left


# ---------------------------------------------------------------- an S3 API on loopback

@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 with IAM enforced after set-up: a bucket and a user key."""
    import boto3

    tmp = tmp_path_factory.mktemp("moto")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    # the first 4 requests (IAM user, key, policy, bucket) are unauthenticated; then keys count
    env = {**pipeline_env(), "INITIAL_NO_AUTH_ACTION_COUNT": "4"}
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with server(cmd, f"{endpoint}/moto-api/", tmp / "moto.log", 120, env):
        kw = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                  aws_secret_access_key="setup")
        iam = boto3.client("iam", **kw)
        iam.create_user(UserName="dvc")
        key = iam.create_access_key(UserName="dvc")["AccessKey"]
        iam.put_user_policy(UserName="dvc", PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17",
             "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        boto3.client("s3", **kw).create_bucket(Bucket="chexops-team")
        yield {"endpoint": endpoint, "key": key["AccessKeyId"], "secret": key["SecretAccessKey"]}


def add_s3_remote(repo: Path, s3: dict, key: str, secret: str, commit: bool) -> None:
    """URL and endpoint in .dvc/config (shared through git); credentials in config.local."""
    dvc(["remote", "add", "-f", "-d", "team", "s3://chexops-team/dvcstore"], repo)
    dvc(["remote", "modify", "team", "endpointurl", s3["endpoint"]], repo)
    dvc(["remote", "modify", "--local", "team", "access_key_id", key], repo)
    dvc(["remote", "modify", "--local", "team", "secret_access_key", secret], repo)
    if commit:
        run(["git", "commit", "-q", "--allow-empty", "-am", "team remote"], repo, pipeline_env())


@pytest.fixture(scope="module")
def data_repo(tmp_path_factory) -> Path:
    """A reduced repo copy with the data stages run (download, clean, resample)."""
    params = reduced_params({"runtime": {"threads": 1}})
    repo = make_repo_copy(tmp_path_factory.mktemp("remote") / "repo", params)
    dvc(["repro", "resample"], repo)
    env = pipeline_env()  # as a user would: commit dvc.lock (and DVC's .gitignores), then push
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-q", "-m", "data stages"], repo, env)
    return repo


def outputs_md5(repo: Path) -> dict[str, str]:
    import yaml

    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for name in DATA_STAGES for o in lock["stages"][name]["outs"]}


def assert_nothing_recomputed(clone: Path, origin: Path) -> None:
    out = dvc(["repro", "resample"], clone).stdout
    # DVC runs the source fingerprint every time; it finds the source as it was
    assert re.findall(r"Running stage '([^']+)'", out) == ["source-fingerprint"], out
    for stage in DATA_STAGES:
        assert f"'{stage}' didn't change" in out, out
    status = json.loads(dvc(["status", "--json", "--with-deps", "resample"], clone).stdout)
    assert status == {"source-fingerprint": ["always changed"]}, status
    assert outputs_md5(clone) == outputs_md5(origin)
    assert (clone / "data/raw/chexpert.zip").read_bytes() == \
        (origin / "data/raw/chexpert.zip").read_bytes()


@pytest.mark.slow
def test_local_directory_remote_push_pull_and_repro_in_a_fresh_clone(data_repo, tmp_path):
    store = tmp_path / "dvc-remote"
    dvc(["remote", "add", "-f", "-d", "local", str(store)], data_repo)
    try:
        dvc(["push"], data_repo)
        clone = tmp_path / "clone"
        run(["git", "clone", "-q", str(data_repo), str(clone)], tmp_path, pipeline_env())
        dvc(["remote", "add", "-f", "-d", "local", str(store)], clone)
        dvc(["pull", "--with-deps", "resample"], clone)  # what was run and pushed
        assert_nothing_recomputed(clone, data_repo)
    finally:
        dvc(["remote", "remove", "local"], data_repo)


@pytest.mark.slow
def test_s3_remote_push_pull_and_repro_in_a_fresh_clone(data_repo, s3, tmp_path):
    add_s3_remote(data_repo, s3, s3["key"], s3["secret"], commit=True)
    pushed = dvc(["push"], data_repo).stdout
    assert "pushed" in pushed
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(data_repo), str(clone)], tmp_path, pipeline_env())
    assert "chexops-team" in (clone / ".dvc/config").read_text()  # shared through git
    # credentials are per user: a clone has none until it sets its own
    dvc(["remote", "modify", "--local", "team", "access_key_id", s3["key"]], clone)
    dvc(["remote", "modify", "--local", "team", "secret_access_key", s3["secret"]], clone)
    dvc(["pull", "--with-deps", "resample"], clone)  # what was run and pushed
    assert_nothing_recomputed(clone, data_repo)


@pytest.mark.slow
def test_s3_wrong_credentials_and_unreachable_endpoint_are_one_line_and_write_nothing(
        data_repo, s3, tmp_path):
    clone = tmp_path / "clone"
    add_s3_remote(data_repo, s3, s3["key"], s3["secret"], commit=True)
    dvc(["push", "-q"], data_repo)
    run(["git", "clone", "-q", str(data_repo), str(clone)], tmp_path, pipeline_env())
    dvc(["remote", "modify", "--local", "team", "access_key_id", "AKIAWRONGWRONGWRONG1"], clone)
    dvc(["remote", "modify", "--local", "team", "secret_access_key", "wrong"], clone)
    raw_md5 = outputs_md5(data_repo)["data/raw"]
    cache = remote.cache_dir(clone)
    with pytest.raises(ChexopsError) as err:
        remote.fetch_object(clone, cache, "raw", raw_md5)
    assert str(err.value).startswith("the DVC remote team rejected the credentials; set them "
                                     "with `dvc remote modify --local team access_key_id")
    assert "wrong" not in str(err.value)  # the secret is never echoed
    proc = dvc(["pull", "--with-deps", "resample"], clone, check=False)
    assert proc.returncode != 0
    assert not (clone / "data/raw").exists() and not remote.in_cache(cache, raw_md5)
    dvc(["remote", "modify", "--local", "team", "endpointurl", f"http://127.0.0.1:{free_port()}"],
        clone)
    with pytest.raises(ChexopsError, match=r"^the DVC remote team is unreachable; check its URL"):
        remote.fetch_object(clone, cache, "raw", raw_md5)
