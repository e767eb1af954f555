"""The console entry point: its parser is built from chexops.commands.arguments alone, so
`chexops --help` and a bad params file answer without importing torch, mlflow, pandas or optuna."""
from __future__ import annotations

import json
import subprocess
import sys

from chexops import cli


def test_building_the_parser_imports_no_heavy_library():
    code = ("import sys, json; from chexops import cli; cli._parser(); "
            "print(json.dumps([m for m in ('torch', 'mlflow', 'pandas', 'timm', 'optuna') "
            "if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert json.loads(out) == []


def test_every_command_has_its_arguments_and_a_run():
    import importlib

    for name, (module, _) in cli.COMMANDS.items():
        assert callable(getattr(cli.arguments, name.replace("-", "_")))
        assert callable(importlib.import_module(module).run)
    for module in cli.STAGES.values():
        assert callable(importlib.import_module(module).main)


def test_a_bad_params_file_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "params.yaml").write_text("lr: fast\n")
    assert cli.main(["--root", str(tmp_path), "clean"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["chexops clean: error: lr: expected a number, got 'fast'"]
