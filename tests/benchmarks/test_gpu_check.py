"""benchmarks/gpu_check.py's own machinery, on the CPU: the import closure it checks before running
(the GPU machine has no mlflow or dvc), the one-line failure for a missing module, a phase killed
at its limit with what it had measured kept, and the verdict drawn from the phases."""
from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

import pytest

from tests.test_packaging import DISTRIBUTION, declared

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def bench(monkeypatch):
    """The benchmarks folder importable as the scripts see it (their own folder on sys.path)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    return importlib.import_module("gpu_check"), importlib.import_module("closure")


def test_closure_sorts_module_level_lazy_and_type_checking_imports(tmp_path, bench):
    _, closure = bench
    (tmp_path / "script.py").write_text(
        "from __future__ import annotations\nimport os\nfrom typing import TYPE_CHECKING\n"
        "import numpy\nimport helper\nif TYPE_CHECKING:\n    import pandas\n"
        "def f():\n    import scipy.stats\n    from chexops.evaluation import metrics\n")
    (tmp_path / "helper.py").write_text(
        "import yaml\nfrom chexops.errors import ChexopsError\ndef g():\n    import numpy\n")
    found = closure.third_party([tmp_path / "script.py"])
    Use = closure.Use
    assert found == {
        "numpy": [Use("script", False), Use("chexops.evaluation.metrics", True), Use("helper", True)],
        "scipy": [Use("script", True)],
        "sklearn": [Use("chexops.evaluation.metrics", True)],  # reached only from inside f
        "yaml": [Use("helper", False)],
    }


def test_the_gpu_check_path_needs_no_mlflow_or_dvc_and_only_declared_modules(bench):
    _, closure = bench
    found = closure.third_party([REPO / "benchmarks/gpu_phases.py"])
    assert not {"mlflow", "dvc"} & found.keys(), {m: found[m] for m in {"mlflow", "dvc"} & found.keys()}
    assert {"torch", "timm", "numpy", "pandas", "yaml", "safetensors", "filelock"} <= found.keys()
    deps = {d.replace("_", "-") for d in declared()}
    undeclared = [m for m in found if DISTRIBUTION.get(m, m).lower().replace("_", "-") not in deps]
    assert not undeclared


def test_a_missing_module_fails_fast_in_one_line(tmp_path, bench, monkeypatch, capsys):
    gpu_check, _ = bench
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "safetensors" else real(name, *a))
    assert gpu_check.main([str(tmp_path), "--tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "safetensors" in err and "CHEXOPS_WHEELS" in err
    written = json.loads((tmp_path / "gpu_check.cpu-dryrun.json").read_text())
    assert written["status"] == "missing-modules" and written["imports"]["missing"] == ["safetensors"]
    assert written["phases"] == {}


CHILD_THEN_HANG = """
import json, subprocess, sys, time
from pathlib import Path
work = Path(sys.argv[1])
(work / "slow.json").write_text(json.dumps({"measured": 1}))
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
(work / "child.pid").write_text(str(child.pid))
time.sleep(120)
"""


def _gone(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().split(")")[-1].split()[0] == "Z"


def test_a_phase_past_its_limit_is_killed_with_its_children_and_keeps_what_it_measured(
        tmp_path, bench, monkeypatch):
    gpu_check, _ = bench
    monkeypatch.setattr(gpu_check, "phase_command",
                        lambda name, work: [sys.executable, "-c", CHILD_THEN_HANG, str(work)])
    log = tmp_path / "slow.log"
    monkeypatch.setattr(gpu_check, "POLL_S", 0.5)
    ticks: list[dict] = []

    def tick(offset: int) -> None:
        ticks.append(gpu_check.phase_result("slow", tmp_path, "running", 0, 8.0, ""))

    status, _, offset = gpu_check.run_phase("slow", tmp_path, 8.0, log, tick)
    assert status == "timeout"
    assert ticks and ticks[-1]["measured"] == 1  # seen while it ran, before the kill
    result = gpu_check.phase_result("slow", tmp_path, status, 8.0, 8.0,
                                    gpu_check.phase_output(log, offset))
    assert result["measured"] == 1 and result["status"] == "timeout"
    assert result["error"] == "stopped at its 8 s limit"
    pid = int((tmp_path / "child.pid").read_text())
    for _ in range(50):  # the kill is sent to the whole process group; let the child die
        if _gone(pid):
            break
        time.sleep(0.1)
    assert _gone(pid)


def _results(mode: str, **phases) -> dict:
    summary = importlib.import_module("gpu_summary")
    results = {"mode": mode, "phases": phases}
    results["summary"] = summary.summary(results)
    return results


@pytest.mark.parametrize("phases, expected", [
    ({"setup": {"status": "ok"}, "throughput": {"status": "timeout"}}, "failed"),
    ({"setup": {"status": "ok"}, "oom": {"status": "ok", "fallback_ok": False}}, "failed"),
    ({"setup": {"status": "ok"}, "oom": {"status": "skipped"}}, "incomplete"),
    ({"setup": {"status": "ok"}, "oom": {"status": "ok", "fallback_ok": True,
                                         "floor": {"raised": True}},
      "determinism": {"status": "ok", "weights": {"identical": True}},
      "torchrun": {"status": "ok", "matches_plain_round": {"identical": True},
                   "loaded_mlflow_or_dvc": []},
      "gpu-tests": {"status": "ok", "pytest": {"skipped": 4}}}, "ok"),
])
def test_the_verdict_follows_the_phases_and_their_checks(bench, phases, expected):
    summary = importlib.import_module("gpu_summary")
    assert summary.status(_results("cpu-dryrun", **phases)) == expected


def test_gpu_mode_judges_the_goals(bench):
    arm = {"batch": 256, "ours_images_per_s": 2400.0, "bare_images_per_s": 2500.0,
           "speed_ratio": 0.96}
    results = _results("gpu", setup={"status": "ok"},
                       throughput={"status": "ok", "auto": arm, "fixed": {**arm, "batch": 32}})
    met = results["summary"]["goals"]["met"]
    assert list(met.values()) == [False, True]  # 2,400 < 2,500 images/s; 0.96 >= 0.95
