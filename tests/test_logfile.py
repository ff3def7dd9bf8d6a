"""The job log file handler: opened at the first record, a full disk is one AlrunError."""

from __future__ import annotations

import errno
import logging

import pytest

from alrun.logfile import LogWriteError, RunLogFile


class _Broken:
    def __init__(self, code: int):
        self.code = code

    def write(self, text: str) -> None:
        raise OSError(self.code, "No space left on device" if self.code == errno.ENOSPC else "x")

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture
def logger():
    log = logging.getLogger("alrun.test_logfile")
    log.propagate = False
    yield log
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()


def test_the_file_appears_with_the_first_record(tmp_path, logger):
    path = tmp_path / "cli.log"
    logger.addHandler(RunLogFile(str(path)))
    assert not path.exists()  # nothing written into the run dir before alrun has checked it
    logger.warning("first")
    assert path.read_text() == "first\n"


def test_full_disk_raises_one_error_naming_the_file_and_detaches(tmp_path, logger, monkeypatch):
    path = tmp_path / "cli.log"
    handler = RunLogFile(str(path))
    monkeypatch.setattr(handler, "_open", lambda: _Broken(errno.ENOSPC))
    logger.addHandler(handler)
    with pytest.raises(LogWriteError) as caught:
        logger.warning("first")
    assert str(caught.value) == (
        f"{path}: cannot write the log (No space left on device); free space or choose a "
        "writable hydra.run.dir, then re-run the same command to resume"
    )
    assert handler not in logger.handlers
    logger.warning("reporting the error does not fail again")


def test_unwritable_directory_at_open_is_the_same_error(tmp_path, logger, monkeypatch):
    handler = RunLogFile(str(tmp_path / "cli.log"))

    def refuse():
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "cli.log"))

    monkeypatch.setattr(handler, "_open", refuse)
    logger.addHandler(handler)
    with pytest.raises(LogWriteError, match=r"cli\.log: cannot write the log \(Permission denied"):
        logger.warning("first")


def test_other_errors_keep_loggings_own_report(tmp_path, logger, monkeypatch, capsys):
    handler = RunLogFile(str(tmp_path / "cli.log"))
    monkeypatch.setattr(handler, "_open", lambda: _Broken(errno.EIO))
    logger.addHandler(handler)
    logger.warning("first")  # not a disk-full kind of error: logging reports it and goes on
    assert "--- Logging error ---" in capsys.readouterr().err
    assert handler in logger.handlers
