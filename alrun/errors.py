"""User-facing errors: one line naming what and where, never a deep traceback."""


class AlrunError(Exception):
    """Bad input or configuration. The CLI prints ``str(err)`` on one line and exits with 2."""


class DatasetError(AlrunError):
    """A dataset file or annotation is missing or malformed."""


class BudgetError(AlrunError):
    """A budget schedule cannot be met by the pool."""
