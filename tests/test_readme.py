"""Every command the README shows is exercised by a test: this keeps the two in step."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# README command (its first words) -> the test that runs it
COVERED = {
    "make repro": "tests.test_pipeline_e2e:repo",
    "make test": ".ci/run",  # CI runs exactly this on a fresh clone
    "make ui": "tests.test_ui:test_make_ui_serves_mlflow_on_loopback",
    "source .venv/bin/activate": "tests.test_pipeline_e2e:repo",  # pipeline_env puts .venv/bin first
    "dvc repro": "tests.test_pipeline_e2e:test_noop_repro_has_nothing_to_do",
    "dvc exp run -S lr=": "tests.test_pipeline_e2e:test_exp_run_set_param_lr_changes_round_one_and_lands_as_a_new_trial",
    "dvc exp show": "tests.test_pipeline_e2e:test_exp_run_set_param_lr_changes_round_one_and_lands_as_a_new_trial",
    "dvc plots show": "tests.test_pipeline_e2e:test_plots_show_renders",
    "cp profiles/chexpert-seed.yaml params.yaml": "tests.test_config:test_seed_profile_is_the_seed_studys_recipe",
    "export CHEXPERT_URL=": "tests.test_download:test_url_source_reads_env_and_redacts",
}


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            command = line.split("#", 1)[0].strip()
            if command:
                commands.append(command)
    return commands


def covering_test(command: str) -> str | None:
    for prefix, test in COVERED.items():
        if command.startswith(prefix):
            return test
    return None


def test_every_readme_command_has_a_test():
    uncovered = [c for c in readme_commands() if covering_test(c) is None]
    assert not uncovered, f"README commands with no test: {uncovered}"


def test_the_named_tests_exist():
    for test in set(COVERED.values()):
        if test == ".ci/run":
            assert "make test" in (REPO / ".ci/run").read_text()
            continue
        module, name = test.split(":")
        assert hasattr(importlib.import_module(module), name), test
