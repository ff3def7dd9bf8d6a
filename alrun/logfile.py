"""The job log file (``<run dir>/<job name>.log``, Hydra's ``hydra/job_logging``): opened at
the first record, and a disk that cannot take it ends the run with one line.

Python's logging prints a traceback per failed record (``--- Logging error ---``) and goes on;
a full or read-only disk then breaks the run's own writes a moment later anyway. This handler
raises :class:`LogWriteError` from the logging call instead, which the CLI reports as
``alrun: error: <log file>: cannot write the log (...)`` with exit 2. It detaches itself first,
so reporting that error (which logs it) cannot fail the same way again.
"""

from __future__ import annotations

import logging
import sys

from alrun.errors import DISK_ERRNOS, AlrunError


class LogWriteError(AlrunError):
    """The job log file cannot be written (full disk, read-only or unwritable directory)."""


class RunLogFile(logging.FileHandler):
    """``logging.FileHandler`` opened lazily (``delay=True``), failing loudly on a bad disk."""

    def __init__(self, filename: str, mode: str = "a", encoding: str | None = None) -> None:
        super().__init__(filename, mode, encoding, delay=True)

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is None:  # the first record opens the file: a failure is handled alike
            try:
                self.stream = self._open()
            except OSError:
                self.handleError(record)
                return
        super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        err = sys.exc_info()[1]
        if not (isinstance(err, OSError) and err.errno in DISK_ERRNOS):
            super().handleError(record)  # a genuine bug in a log call: logging's own report
            return
        self._detach()
        raise LogWriteError(
            f"{self.baseFilename}: cannot write the log ({err.strerror}); free space or choose a "
            "writable hydra.run.dir, then re-run the same command to resume"
        ) from None

    def _detach(self) -> None:
        for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
            if isinstance(logger, logging.Logger) and self in logger.handlers:
                logger.removeHandler(self)
        try:
            self.close()
        except OSError:  # flushing the buffered record fails the same way
            self.stream = None
