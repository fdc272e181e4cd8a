"""The errors a run ends with on purpose. UserErrors (bad input) are printed by projbench/cli.py as
one line with exit code 2 (no traceback unless HYDRA_FULL_ERROR=1) and are raised before training
starts; the others stop a run that did start, with one line and its status in summary.json."""

import signal


class UserError(Exception):
    """Bad input the user can fix: a config value, a missing or malformed data set."""


class ConfigError(UserError):
    """An invalid config value; the message names the key and what is accepted."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


class DataError(UserError):
    """A missing or malformed data set; the message names the path and what was expected."""

    def __init__(self, path, message: str | None = None, hint: str | None = None):
        if message is None:
            # Rebuilt from its text alone: torch re-raises a DataLoader worker's exception that way,
            # with the worker's traceback in front; keep the original one-line message.
            text = str(path).rstrip().splitlines()[-1] if str(path).strip() else ""
            super().__init__(text.split(f"{type(self).__name__}: ", 1)[-1])
            self.path = None
            return
        text = f"{path}: {message}"
        if hint:
            text += f". {hint}"
        super().__init__(text)
        self.path = path


def raised_user_error(exc: BaseException) -> UserError | None:
    """The UserError behind `exc`: OmegaConf wraps an error that a config resolver raises (e.g.
    a recipe row without an entry for the optimizer) in InterpolationResolutionErrors."""
    while exc is not None:
        if isinstance(exc, UserError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf; the run is stopped and recorded as failed."""

    def __init__(self, step: int, value: float):
        super().__init__(f"loss became {value} at step {step}; the run is stopped (summary.json: status failed)")
        self.step = step


class StorageError(RuntimeError):
    """A run's records could not be written (a full disk, a vanished mount): the run stops with
    one line and `status: failed`; what was written before is kept."""


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Interrupted(RuntimeError):
    """A stop signal ended the run after a finished step and its checkpoint (projbench/signals.py):
    `status: interrupted`, exit code 128 + the signal's number; the same command continues it."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"{signal_name(signum)} at step {step}: stopped after that step with a checkpoint; "
                         "the same command continues the run")
        self.signum, self.step = signum, step
