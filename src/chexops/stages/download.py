"""`chexops download`: the CheXpert zip (synthetic, a signed URL, a local folder or zip) into
data/raw, one atomic folder; the logic lives in chexops.data.download."""
from __future__ import annotations

import errno
from pathlib import Path

from chexops import paths
from chexops.atomic import atomic_dir
from chexops.config import Params
from chexops.data.download import STAGE, produce
from chexops.errors import ChexopsError
from chexops.tracking import runs as tracking


def main(params: Params, root: Path) -> None:
    root = Path(root)
    with tracking.stage_run(params, root, STAGE) as run:
        try:
            with atomic_dir(root / paths.RAW_DIR) as tmp:
                facts = produce(params, root, tmp)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise ChexopsError(f"disk full while writing {paths.RAW_DIR}; free space "
                                   f"(the CheXpert zip needs ~11 GB) and re-run") from None
            raise
        litter = (f", {facts['skipped_entries']} archive litter entries skipped (__MACOSX/, "
                  f".DS_Store, Thumbs.db, ._ files)" if facts["skipped_entries"] else "")
        print(f"download ({facts['source']}): {facts['train_rows']} train + "
              f"{facts['valid_rows']} valid + {facts['test_rows']} held-out test rows, "
              f"{facts['images']} images{litter}")
        run.log_params({"source": facts["source"]})
        run.log_metrics({k: v for k, v in facts.items() if k != "source"})
