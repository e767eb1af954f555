"""User-facing errors: one line that names the problem and the fix."""


class ChexopsError(Exception):
    """Raised for bad input or an unusable environment; the CLI prints it as one line and exits 2."""


class TrialPruned(ChexopsError):
    """A `chexops tune` trial that its pruner stopped after round `after_round`: not a fault of
    the stage that stops it; the CLI prints it and exits 3, and the trial's runs say PRUNED."""

    def __init__(self, after_round: int, message: str) -> None:
        super().__init__(message)
        self.after_round = after_round
