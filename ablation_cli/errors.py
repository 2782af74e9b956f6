"""Expected failures, each carrying its exit code.

    AblateError                 exit 2 unless stated
    ├── ConfigError             a bad config file or flag value
    │   └── PluginError         a researcher's representation that does not import, clashes or returns bad features
    ├── DataError               unreadable or invalid input data
    ├── ExperimentError         a missing / unusable experiment folder, unmergeable results
    ├── LockHeldError           another live run holds the experiment (exit 3)
    ├── EnvironmentFailure      the machine refused: a full disk or quota, a read-only or forbidden folder (exit 4)
    └── Stopped                 SIGINT / SIGTERM after saving what finished (exit 130 / 143)

The command line maps each, for every command, to one red line and its exit code (``cli.root``).
Anything else raised is a bug: it keeps its traceback.
"""

from __future__ import annotations

import errno

EXIT_OK = 0
EXIT_FAILED_CELLS = 1
EXIT_USAGE = 2
EXIT_LOCKED = 3
EXIT_ENVIRONMENT = 4
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

    def __reduce__(self) -> tuple[type, tuple[str, str | None]]:  # whole across processes (workers)
        return self.__class__, (self.message, self.hint)


class ConfigError(AblateError):
    pass


class DataError(AblateError):
    pass


class PluginError(ConfigError):
    """A researcher's plugin that cannot be used: it does not import, clashes, or returns bad features.
    ``details``: the plugin's own traceback, for run.log (and the console with -v)."""

    def __init__(self, message: str, hint: str | None = None, details: str | None = None) -> None:
        super().__init__(message, hint)
        self.details = details

    def __reduce__(self) -> tuple[type, tuple[str, str | None, str | None]]:  # type: ignore[override]
        return self.__class__, (self.message, self.hint, self.details)


class ExperimentError(AblateError):
    pass


class NoExperimentError(ExperimentError):
    """No experiment folder matched (an output folder that is missing or holds none of them)."""


class LockHeldError(AblateError):
    exit_code = EXIT_LOCKED


class Stopped(AblateError):
    """Raised from a signal handler; everything finished is already on disk."""

    def __init__(self, signum_name: str, exit_code: int) -> None:
        super().__init__(f"stopped by {signum_name}; finished runs and cells are saved")
        self.signum_name = signum_name
        self.exit_code = exit_code

    def __reduce__(self) -> tuple[type, tuple[str, int]]:  # type: ignore[override]
        return self.__class__, (self.signum_name, self.exit_code)


class EnvironmentFailure(AblateError):
    """Not a cell's fault: the machine refused a write (or a read). The run stops at once, keeping
    everything finished; the same command resumes once the cause is fixed."""

    exit_code = EXIT_ENVIRONMENT


_ADVICE = {
    errno.ENOSPC: "free space on that disk",
    errno.EDQUOT: "free space within your quota on that disk",
    errno.EROFS: "it is on a read-only filesystem: use a writable folder",
    errno.EACCES: "this user may not write (or read) there: fix its permissions or use another folder",
    errno.EPERM: "this user may not write (or read) there: fix its permissions or use another folder",
}


def environment_failure(exc: OSError) -> EnvironmentFailure | None:
    """The one-line failure for an OSError the machine caused (full disk, quota, read-only or forbidden
    path); None for any other OSError."""
    if exc.errno not in _ADVICE:
        return None
    where = f"{exc.filename}: " if exc.filename else ""
    return EnvironmentFailure(f"{where}{exc.strerror or 'refused'} ({errno.errorcode[exc.errno]})",
                              hint=f"{_ADVICE[exc.errno]}, then rerun the same command: everything finished is kept")


def environment_or(exc: BaseException, error: AblateError) -> AblateError:
    """What to raise for ``exc`` caught while reading input: the machine's refusal (exit 4) when it is
    one (a forbidden or vanished-permission file is not bad data), else ``error``."""
    failure = environment_failure(exc) if isinstance(exc, OSError) else None
    return failure if failure is not None else error
