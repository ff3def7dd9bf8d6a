"""Atomic writes: permissions follow the umask, temp files never survive, fault points fire."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from alrun import io as alrun_io
from alrun.errors import AlrunError
from alrun.io import atomic_write_bytes, read_json, write_csv, write_json
from tests.helpers import REPO


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        write_csv(tmp_path / "b.csv", [{"round": 0}])
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == mode
    assert (tmp_path / "b.csv").stat().st_mode & 0o777 == mode


def test_replace_leaves_no_temp_file(tmp_path):
    atomic_write_bytes(tmp_path / "f", b"old")
    atomic_write_bytes(tmp_path / "f", b"new")
    assert (tmp_path / "f").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_corrupt_json_names_the_file_and_the_way_out(tmp_path):
    path = tmp_path / "state.json"
    path.write_text('{"last_completed_round": 1, "res')
    with pytest.raises(AlrunError, match=r"state\.json: corrupt JSON .*; delete it"):
        read_json(path, "delete it")


def test_enospc_fault_point_fails_that_write_and_keeps_the_old_file(tmp_path, monkeypatch):
    monkeypatch.setattr(alrun_io, "_fault_count", 0)
    monkeypatch.setenv("ALRUN_FAULT_KIND", "enospc")
    monkeypatch.setenv("ALRUN_FAULT_AT", "write-tmp-done")
    monkeypatch.setenv("ALRUN_FAULT_LOG", str(tmp_path / "log"))
    target = tmp_path / "out" / "x.json"
    target.parent.mkdir()
    target.write_text("old")
    with pytest.raises(OSError) as caught:
        write_json(target, {"x": 1})
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.json"]  # temp removed
    assert (tmp_path / "log").read_text().splitlines() == [
        f"1 write {target}",
        f"2 write-tmp-done {target}",
    ]


def test_sigkill_fault_point_kills_at_the_nth_operation(tmp_path):
    code = (
        "from pathlib import Path; from alrun.io import write_json\n"
        f"for i in range(5): write_json(Path({str(tmp_path)!r}) / f'{{i}}.json', i)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "ALRUN_FAULT_AT": "5"}
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO)
    assert result.returncode == -9
    # points 1-3 are file 0 (before, temp written, after), 4-5 file 1: killed with its temp
    # file written but not renamed
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["0.json"]
    assert [p.name.endswith(".tmp") for p in tmp_path.iterdir() if p.name.startswith(".")] == [True]
