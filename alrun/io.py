"""Crash-safe file operations: write a temp file beside the target, fsync, then rename over it.

Every operation that changes a run directory goes through this module, so that a fault drill
(``scripts/fault_drill.py``) can stop the process at each of them:

* ``ALRUN_FAULT_AT=N`` kills the process with SIGKILL at the N-th fault point (1-based);
  ``ALRUN_FAULT_AT="<op> <path part>"`` (not a number) at the first point whose
  ``"<op> <path>"`` contains it, e.g. ``"rename-done round_00"``;
  ``ALRUN_FAULT_KIND=enospc`` raises ``OSError(ENOSPC)`` there instead (a full disk),
  ``ALRUN_FAULT_KIND=bug`` a ``RuntimeError`` (a genuine bug: the sweep tests use it);
* ``ALRUN_FAULT_LOG=<file>`` appends one line per fault point reached (``N <op> <path>``),
  which is how the drill learns how many points a run has.

Each operation has a fault point before it and one after it (an atomic write also has one
between writing its temp file and renaming it), so "killed just before" and "killed just
after" every change of the directory are both exercised.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from alrun.errors import AlrunError

#: the temp files of :func:`atomic_write_bytes` (``.<name>.alrun-<8 random chars>.tmp``): the
#: only ``*.tmp`` files resume may delete, so a user's own ``.notes.tmp`` is never touched
TEMP_FILE = re.compile(r"\..+\.alrun-[a-z0-9_]{8}\.tmp$")

_fault_count = 0
_bug_raised: list[Path | str] = []


def fault_point(op: str, path: Path | str) -> None:
    """Count one fault point; kill (or fail) here when ``ALRUN_FAULT_AT`` names it."""
    at = os.environ.get("ALRUN_FAULT_AT")
    log_file = os.environ.get("ALRUN_FAULT_LOG")
    if not at and not log_file:
        return
    global _fault_count
    _fault_count += 1
    if log_file:
        with open(log_file, "a") as handle:
            handle.write(f"{_fault_count} {op} {path}\n")
    if at and (int(at) == _fault_count if at.isdigit() else at in f"{op} {path}"):
        kind = os.environ.get("ALRUN_FAULT_KIND")
        if kind == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        if kind == "bug":
            if _bug_raised:  # once: the job's error handling writes files too
                return
            _bug_raised.append(path)
            raise RuntimeError(f"injected fault at {op} {path}")
        os.kill(os.getpid(), signal.SIGKILL)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` so that readers see the old file or the new one, never half.

    The file gets the permissions an ordinary new file would (``0o666 & ~umask``), not the
    0600 that ``mkstemp`` uses.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fault_point("write", path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.alrun-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), 0o666 & ~_umask())
            os.fsync(handle.fileno())
        fault_point("write-tmp-done", path)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    fault_point("write-done", path)


def atomic_rename(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` (a file or a directory) durably."""
    fault_point("rename", src)
    os.rename(src, dst)
    _fsync_dir(Path(dst).parent)
    fault_point("rename-done", dst)


def remove_file(path: Path) -> None:
    """Unlink ``path`` if it exists."""
    path = Path(path)
    if not path.exists():
        return
    fault_point("unlink", path)
    path.unlink(missing_ok=True)
    fault_point("unlink-done", path)


def remove_tree(path: Path) -> None:
    """Delete a directory tree if it exists."""
    path = Path(path)
    if not path.exists():
        return
    fault_point("rmtree", path)
    shutil.rmtree(path)
    fault_point("rmtree-done", path)


def write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


def read_json(path: Path, recover: str = "") -> Any:
    """Parse a JSON file; a truncated or corrupt file is a one-line :class:`AlrunError`
    naming the file (and ``recover``: how to get out of it)."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        hint = f"; {recover}" if recover else ""
        raise AlrunError(f"{path}: corrupt JSON ({err}){hint}") from None


def csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    atomic_write_bytes(path, csv_text(rows).encode())


def save_torch(path: Path, obj: Any) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())
