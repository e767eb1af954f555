"""docs/EXPERIMENTS.md: every documented `dvc exp run -S ...` parses with DVC's own override
parser (Hydra grammar) and gives a params.yaml that chexops accepts; a key with a space goes
through a real `dvc exp run`; and in a real DVC repo that declares metrics as dvc.yaml does,
`dvc exp show` and the documented compare commands open with the final AUROC and its CI."""
from __future__ import annotations

import json
import re
import shlex
import shutil
import types
from pathlib import Path

import pytest
import yaml

from chexops.config import load_params, to_dict

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "EXPERIMENTS.md"


def documented_runs() -> list[list[str]]:
    """The -S overrides of each `dvc exp run` line in the doc's code blocks."""
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.S)
    runs = []
    for line in (ln for b in blocks for ln in b.splitlines()):
        if line.startswith("dvc exp run"):
            args = shlex.split(line)
            runs.append([args[i + 1] for i, a in enumerate(args) if a in ("-S", "--set-param")])
    return runs


def test_the_doc_covers_the_five_uncertainty_approaches():
    overrides = {o for run in documented_runs() for o in run}
    for policy in ("ignore", "zeros", "ones", "multiclass", "selftrained"):
        assert f"clean.default_uncertainty={policy}" in overrides
    assert len(documented_runs()) >= 10


@pytest.mark.parametrize("overrides", documented_runs(), ids=lambda o: " ".join(o)[:60])
def test_documented_overrides_parse_and_validate(overrides, tmp_path):
    from dvc.utils.hydra import apply_overrides

    target = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", target)
    apply_overrides(str(target), overrides)
    params = load_params(target)
    assert params.runtime.distributed == "off"  # DVC rewrites "off" unquoted: YAML 1.1 false
    for override in overrides:  # the override reached the typed params
        key, value = override.lstrip("+").split("=", 1)
        got = params
        for part in key.split("."):
            got = got[part] if isinstance(got, dict) else getattr(got, part)
        assert to_dict(got) == yaml.safe_load(value), override


# ---------------------------------------------------------------- real DVC repos

def dvc_repo(root: Path, stages: dict, metrics: list[str] | None = None) -> dict[str, str]:
    """A git + DVC repo at `root` with chexops' params.yaml and `stages` (trivial commands);
    returns the environment to run dvc in."""
    from tests.pipeline_repo import pipeline_env, run

    env = pipeline_env()
    root.mkdir(parents=True, exist_ok=True)
    run(["git", "init", "-q", "-b", "main"], root, env)
    run(["dvc", "init", "-q"], root, env)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    doc = {"stages": stages, **({"metrics": metrics} if metrics else {})}
    (root / "dvc.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return env


def commit_repro(root: Path, env: dict[str, str]) -> None:
    from tests.pipeline_repo import run

    run(["dvc", "repro", "-q"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-q", "-m", "baseline"], root, env)


def experiment(shown: list, name: str) -> dict:
    """The `dvc exp show --json` record of the experiment called `name`."""
    for baseline in shown:
        for branch in baseline.get("experiments") or []:
            for rev in branch["revs"]:
                if rev.get("name") == name:
                    return rev
    raise AssertionError(f"no experiment {name!r} in dvc exp show --json")


@pytest.mark.slow
def test_a_key_with_a_space_is_set_as_a_mapping_on_its_parent(tmp_path):
    """The documented `-S '++clean.uncertainty={Pleural Effusion: ones}'` runs with DVC and lands
    as a nested mapping that chexops reads; the dotted path with a space is refused."""
    from tests.pipeline_repo import run
    from tests.processes import run_group

    override = "++clean.uncertainty={Pleural Effusion: ones}"
    assert [override] in documented_runs()
    touch = {"cmd": "python -c \"open('out.txt', 'w').write('x')\"",
             "params": ["clean.uncertainty"], "outs": ["out.txt"]}
    env = dvc_repo(tmp_path, {"touch": touch})
    commit_repro(tmp_path, env)
    refused = run_group(["dvc", "exp", "run", "-S", "clean.uncertainty.Pleural Effusion=ones"],
                        cwd=tmp_path, env=env, timeout=300)
    assert refused.returncode != 0 and "LexerNoViableAltException" in refused.stderr
    run(["dvc", "exp", "run", "-n", "effusion-ones", "-S", override], tmp_path, env)
    assert yaml.safe_load((tmp_path / "params.yaml").read_text())["clean"]["uncertainty"] == \
        {"Pleural Effusion": "ones"}
    params = load_params(tmp_path / "params.yaml")
    assert params.clean.uncertainty == {"Pleural Effusion": "ones"}
    assert params.uncertainty_policy("Pleural Effusion") == "ones"
    assert params.uncertainty_policy("Edema") == params.clean.default_uncertainty
    shown = json.loads(run(["dvc", "exp", "show", "--json"], tmp_path, env).stdout)
    recorded = experiment(shown, "effusion-ones")["data"]["params"]["params.yaml"]["data"]
    assert recorded["clean"]["uncertainty"] == {"Pleural Effusion": "ones"}


# ---------------------------------------------------------------- what `dvc exp show` shows first

POLICIES = ("zeros", "ones", "ignore")
WRITE = """import shutil, yaml
policy = yaml.safe_load(open("params.yaml"))["clean"]["default_uncertainty"]
shutil.copytree(f"fixtures/{policy}", ".", dirs_exist_ok=True)
"""


def write_stage_metrics(out: Path, policy: str, seed: int) -> None:
    """metrics/*.json as chexops' stages write them (their own writers, tiny data), one set per
    uncertainty policy so that trials differ."""
    import numpy as np
    import pandas as pd

    from chexops import atomic, paths
    from chexops.data import clean
    from chexops.data.resample import class_counts
    from chexops.evaluation import targets
    from chexops.evaluation.metrics import binary_metrics
    from chexops.stages import evaluate, evaluate_report
    from chexops.training.rounds import round_metrics
    from chexops.training.selection import HISTORY_KEYS
    from tests.helpers import make_params, write_chexpert_zip

    params = make_params({"clean": {"default_uncertainty": policy}})
    out.mkdir(parents=True)
    table, _, clean_metrics = clean.clean_table(write_chexpert_zip(out / "chexpert.zip"), params)
    (out / "chexpert.zip").unlink()
    atomic.write_json(out / paths.METRICS_DIR / "clean.json", clean_metrics)
    train, valid = table[~table["valid"]], table[table["valid"]].reset_index(drop=True)
    atomic.write_json(out / paths.METRICS_DIR / "resample.json", {
        "target": "Cardiomegaly", "before": class_counts(train, "Cardiomegaly"),
        "train": class_counts(train, "Cardiomegaly"), "valid": class_counts(valid, "Cardiomegaly")})
    rng = np.random.default_rng(seed)
    y = (np.arange(40) % 3 == 0).astype(int)
    p = np.clip(0.4 * y + 0.6 * rng.random(40), 0, 1)
    frame = pd.DataFrame({"Path": [f"v/patient{i:05d}/study1/view1_frontal.jpg" for i in range(40)],
                          "Cardiomegaly": y, "Sex": rng.choice(["Male", "Female"], 40),
                          "Age": rng.integers(20, 90, 40), "Frontal/Lateral": "Frontal",
                          "AP/PA": "AP"})
    metrics, _ = targets.evaluate_targets(frame, p[:, None], params.targets, 0.5)
    evaluate_report.extend_metrics(params, frame, p[:, None], metrics)
    evaluate.write_metrics(out, metrics)
    for k in range(1, 6):
        row = {key: float(rng.random()) for key in HISTORY_KEYS}
        best = {**row, "targets": {"Cardiomegaly": binary_metrics(y, np.roll(p, k))}}
        result = types.SimpleNamespace(best_metrics=best, best_epoch=1, batch_size=16, micro_batch=16,
                                       loss="bce")
        atomic.write_json(out / paths.round_metrics(k), round_metrics(result))


def flat_names(data, prefix: str = "") -> list[str]:
    """DVC's column names for one file's data (nested keys joined by dots)."""
    if not isinstance(data, dict):
        return [prefix]
    return [n for k, v in data.items() for n in flat_names(v, f"{prefix}{k}" if not prefix
                                                           else f"{prefix}.{k}")]


def column_owner(column: str, names: dict[str, set[str]]) -> str:
    """The file a `dvc exp show` column comes from: `path:name` names it, else the one file
    holding that name."""
    if ":" in column:
        return column.split(":", 1)[0]
    owners = [path for path, keys in names.items() if column in keys]
    assert len(owners) <= 1, (column, owners)
    return owners[0] if owners else "other"


@pytest.fixture(scope="module")
def trials(tmp_path_factory):
    """A DVC repo declaring metrics exactly as chexops' dvc.yaml does (stage metrics, then the
    top-level `metrics:` list), a trivial stage that writes them, and two trials beside the
    baseline (U-Ones and U-Ignore)."""
    from tests.pipeline_repo import run

    root = tmp_path_factory.mktemp("exp-show")
    real = yaml.safe_load((REPO / "dvc.yaml").read_text())
    stage_metrics = [m for s in real["stages"].values() for m in s.get("metrics") or []]
    listed = real["metrics"]
    write = {"cmd": "python write.py", "deps": ["write.py", "fixtures"],
             "params": ["clean.default_uncertainty"],
             "outs": [{path: {"cache": False}} for path in listed], "metrics": stage_metrics}
    env = dvc_repo(root, {"write": write}, listed)
    (root / "write.py").write_text(WRITE)
    for seed, policy in enumerate(POLICIES):
        write_stage_metrics(root / "fixtures" / policy, policy, seed)
    commit_repro(root, env)
    for policy in POLICIES[1:]:
        run(["dvc", "exp", "run", "-n", f"u-{policy}", "-S", f"clean.default_uncertainty={policy}"],
            root, env)
    files = [next(iter(m)) if isinstance(m, dict) else m for m in stage_metrics] + listed
    names = {path: set(flat_names(json.loads((root / path).read_text()))) for path in files}
    names["params.yaml"] = set(flat_names(yaml.safe_load((root / "params.yaml").read_text())))
    return root, env, files, names


def show_csv(root: Path, env: dict[str, str], args: list[str]) -> list[dict[str, str]]:
    import csv
    import io

    from tests.pipeline_repo import run

    out = run([*args, "--csv", "--no-pager"], root, env).stdout
    return list(csv.DictReader(io.StringIO(out)))


@pytest.mark.slow
def test_exp_show_opens_with_the_final_auroc_and_its_ci(trials):
    root, env, files, names = trials
    rows = show_csv(root, env, ["dvc", "exp", "show"])
    columns = list(rows[0])
    data = columns[columns.index("parent") + 1:]
    assert data[:3] == ["Cardiomegaly.auroc", "Cardiomegaly.auroc_lo", "Cardiomegaly.auroc_hi"]
    owners = [column_owner(c, names) for c in data]
    runs = [o for i, o in enumerate(owners) if i == 0 or owners[i - 1] != o]
    # each file's columns together, in dvc.yaml's order: evaluate, rounds 1-5, clean,
    # resample; then params (and the stage's deps)
    assert runs[:len(files) + 1] == [*files, "params.yaml"], runs
    assert files[0] == "metrics/evaluate.json"


@pytest.mark.slow
def test_documented_compare_commands_put_the_result_beside_the_varied_params(trials):
    root, env, _, _ = trials
    text = DOC.read_text() + (REPO / "README.md").read_text()
    commands = [shlex.split(line, comments=True)
                for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
                for line in block.splitlines() if line.startswith("dvc exp show")]
    assert len(commands) >= 3
    for args in commands:
        rows = show_csv(root, env, args)
        columns = list(rows[0])
        metrics = [c for c in columns if c not in ("Experiment", "rev", "typ", "Created", "parent")]
        assert metrics[:3] == ["Cardiomegaly.auroc", "Cardiomegaly.auroc_lo", "Cardiomegaly.auroc_hi"]
        assert "clean.default_uncertainty" in columns, args
        if "--keep" in args:  # only the result and the varied param, best trial first
            assert metrics == [*metrics[:3], "clean.default_uncertainty"]
            trials_shown = [r for r in rows if r["Experiment"]]
            assert {r["Experiment"] for r in trials_shown} == {"u-ones", "u-ignore"}
            aurocs = [float(r["Cardiomegaly.auroc"]) for r in trials_shown]
            assert aurocs == sorted(aurocs, reverse=True)
        if "--only-changed" in args:
            assert not [c for c in columns if c.startswith("metrics/round-")]
