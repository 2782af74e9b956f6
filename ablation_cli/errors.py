"""Expected failures, each carrying its exit code.

    AblateError                 exit 2 unless stated
    ├── ConfigError             a bad config file or flag value
    ├── DataError               unreadable or invalid input data
    ├── ExperimentError         a missing / unusable experiment folder, unmergeable results
    ├── LockHeldError           another live run holds the experiment (exit 3)
    └── Stopped                 SIGINT / SIGTERM after saving what finished (exit 130 / 143)

Anything else raised is a bug: it keeps its traceback.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED_CELLS = 1
EXIT_USAGE = 2
EXIT_LOCKED = 3
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class AblateError(Exception):
    """An expected failure: the message says what was wrong and what to do next."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(AblateError):
    pass


class DataError(AblateError):
    pass


class ExperimentError(AblateError):
    pass


class LockHeldError(AblateError):
    exit_code = EXIT_LOCKED


class Stopped(AblateError):
    """Raised from a signal handler; everything finished is already on disk."""

    def __init__(self, signum_name: str, exit_code: int) -> None:
        super().__init__(f"stopped by {signum_name}; finished runs and cells are saved")
        self.exit_code = exit_code
