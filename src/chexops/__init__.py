"""chexops: a reproducible, experiment-tracked CheXpert pipeline (DVC + MLflow + PyTorch/timm)."""
__version__ = "0.1.0"
