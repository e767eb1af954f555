"""The CheXpert CSV layout, shared by the generator, the ingest checks and the clean stage."""
from __future__ import annotations

from chexops.config import OBSERVATIONS

CHEXPERT_ROOTS = ("CheXpert-v1.0-small", "CheXpert-v1.0")
META_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
CSV_COLUMNS = (*META_COLUMNS, *OBSERVATIONS)   # the 19 real columns, in order
LABEL_VALUES = (1.0, 0.0, -1.0)                # plus blank (not mentioned)
