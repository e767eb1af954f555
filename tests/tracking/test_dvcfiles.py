"""tracking/dvcfiles.py: which stages bring the data in (what `chexops reproduce` restores by md5
and re-derives), now that download depends on the source fingerprint an always-run stage writes."""
from __future__ import annotations

from pathlib import Path

import yaml

from chexops.tracking import dvcfiles

REPO = Path(__file__).resolve().parents[2]


def test_the_pipelines_source_stage_is_download_through_its_fingerprint():
    assert dvcfiles.source_stages(REPO) == {"download": ["data/raw", "runs/download.json"]}


def test_only_code_and_always_run_fingerprints_leave_a_stage_a_source(tmp_path):
    stages = {
        "watch": {"cmd": "x", "always_changed": True, "deps": ["src/a.py"], "outs": ["fp.json"]},
        "fetch": {"cmd": "x", "deps": ["src/b.py", "fp.json"], "outs": ["data/raw"]},
        "made": {"cmd": "x", "deps": ["src/c.py"], "outs": [{"data/made": {"cache": True}}]},
        "use": {"cmd": "x", "deps": ["src/d.py", "data/raw"], "outs": ["data/clean"]},
        "notes": {"cmd": "x", "deps": ["notes.txt"], "outs": ["out.txt"]},
    }
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    assert dvcfiles.source_stages(tmp_path) == {"fetch": ["data/raw"], "made": ["data/made"]}
