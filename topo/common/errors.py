"""Errors that describe a user's mistake rather than a bug in topo."""


class UserError(Exception):
    """A mistake the user can fix: a bad path, flag, data set or spec file.

    The message is one line that names the offending thing and says how to fix
    it. The command line prints it without a traceback and exits with status 2.
    """


class SpecError(UserError, ValueError):
    """An invalid network or module spec (a ``ValueError`` too)."""


class ParameterError(UserError, ValueError):
    """An invalid estimator parameter (a ``ValueError`` too, as scikit-learn expects)."""


class DataError(UserError):
    """A missing, malformed or corrupt data set."""


class StatsError(UserError, ValueError):
    """Statistics that cannot support the requested computation."""


class SettingError(UserError):
    """A configuration setting with a value it does not take. ``setting`` is the dataclass field, so that the
    command line can name its flag (library code names no flag)."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting
