"""User-facing errors: one line naming what and where, never a deep traceback."""

import errno

#: ``OSError`` numbers that mean "the disk cannot take this write": reported as one line
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT})


class AlrunError(Exception):
    """Bad input or configuration. The CLI prints ``str(err)`` on one line and exits with 2."""


class DatasetError(AlrunError):
    """A dataset file or annotation is missing or malformed."""


class BudgetError(AlrunError):
    """A budget schedule cannot be met by the pool."""
