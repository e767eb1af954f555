"""Every command the README shows is exercised by a test: this keeps the two in step."""
from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

from tests.processes import run_group

REPO = Path(__file__).resolve().parents[1]

# README command (its first words) -> the test that runs it
COVERED = {
    "make repro": "tests.pipeline.test_e2e:repo",
    "make test": ".ci/run",  # CI runs exactly this on a fresh clone: test_ci_runs_make_test
    "make ui": "tests.commands.test_ui:test_make_ui_serves_mlflow_on_loopback",
    "source .venv/bin/activate": "tests.pipeline.test_e2e:repo",  # pipeline_env puts .venv/bin first
    "dvc repro": "tests.pipeline.test_e2e:test_noop_repro_has_nothing_to_do",
    "dvc exp run -S lr=": "tests.pipeline.test_e2e:test_exp_run_set_param_lr_changes_round_one_and_lands_as_a_new_trial",
    "dvc exp show": "tests.test_experiments:test_documented_compare_commands_put_the_result_beside_the_varied_params",
    "dvc plots show": "tests.pipeline.test_e2e:test_plots_show_renders",
    "cp profiles/chexpert-seed.yaml params.yaml": "tests.test_config:test_seed_profile_is_the_seed_studys_recipe",
    "export CHEXPERT_URL=": "tests.data.test_download:test_url_download_verifies_checksum_and_redacts_the_token",
    "chexops compare lr-small workspace --split test":
        "tests.commands.test_compare:test_compare_on_the_held_out_test_cohort",
    "chexops compare": "tests.commands.test_compare:test_compare_by_experiment_name_finds_the_better_trial",
    "chexops predict": "tests.commands.test_predict:test_cli_prints_csv_and_json_and_writes_heatmaps",
    "chexops champion": "tests.tracking.test_registry:test_champion_command_and_unknown_model",
    "mlflow models serve": "tests.tracking.test_serve:test_served_champion_answers_rest_invocations",
    "chexops reproduce": "tests.commands.test_reproduce:test_reproduce_gives_identical_metrics_and_weights",
    "chexops lr-find": "tests.training.test_lr_finder:test_lr_find_command_writes_the_plot_and_prints_the_suggestion",
    "dvc exp run --queue": "tests.pipeline.test_queue:test_queued_experiments_run_two_at_once_into_the_main_store",
    "dvc queue start": "tests.pipeline.test_queue:test_queued_experiments_run_two_at_once_into_the_main_store",
    "chexops tune": "tests.pipeline.test_tune:test_two_workers_share_one_study_without_losing_or_doubling_a_trial",
    "dvc push": "tests.tracking.test_remote:test_local_directory_remote_push_pull_and_repro_in_a_fresh_clone",
    "dvc pull": "tests.tracking.test_remote:test_local_directory_remote_push_pull_and_repro_in_a_fresh_clone",
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
            continue  # test_ci_runs_make_test_and_make_test_runs_the_whole_suite
        module, name = test.split(":")
        assert hasattr(importlib.import_module(module), name), test


def test_chexops_commands_are_run_through_the_cli_by_their_tests():
    """The test named for `chexops SUB ...` runs that subcommand (console script or
    chexops.cli.main), not only the function behind it."""
    for command in readme_commands():
        words = command.split()
        if words[0] != "chexops":
            continue
        module, name = covering_test(command).split(":")
        source = inspect.getsource(getattr(importlib.import_module(module), name))
        assert f'"{words[1]}"' in source, f"{module}:{name} does not run `chexops {words[1]}`"


def test_ci_runs_make_test_and_make_test_runs_the_whole_suite():
    script = REPO / ".ci/run"
    assert run_group(["bash", "-n", str(script)], timeout=60).returncode == 0  # it parses
    commands = [line.strip() for line in script.read_text().splitlines()
                if line.strip() and not line.strip().startswith("#")]
    assert "set -euo pipefail" in commands  # a failing command fails CI
    assert "make test" in commands          # a command of its own, not words in a comment
    # what `make test` runs (-n: print the recipe, run nothing): pytest on the whole suite
    dry = run_group(["make", "-n", "test"], cwd=REPO, timeout=60)
    assert dry.returncode == 0, dry.stderr
    pytest_lines = [ln for ln in dry.stdout.splitlines() if re.search(r"-m pytest\b", ln)]
    assert len(pytest_lines) == 1, dry.stdout
    assert " -m " not in pytest_lines[0].split("-m pytest", 1)[1], pytest_lines  # no marker filter
    assert " -k " not in pytest_lines[0], pytest_lines
    # and, before it, the linter and the type checker over the package
    assert re.search(r"ruff check src\b", dry.stdout) and re.search(r"/mypy\b", dry.stdout), dry.stdout
