"""The run directory on its own: lock, config record, resume from what is on disk, damage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from alrun.errors import AlrunError
from alrun.io import write_json
from alrun.rundir import (
    RunDir,
    RunDirError,
    check_run_names,
    check_threads,
    config_differences,
)
from tests.helpers import REPO

CONFIG = {"seed": 0, "trainer": {"lr": 0.01, "init": "continue"}, "budget": {"rounds": 2}}


def _state(r: int) -> dict:
    rows = [{"round": i, "images": 10 * (i + 1)} for i in range(r + 1)]
    return {"last_completed_round": r, "stopped": None, "results": rows, "labels": []}


def _committed(tmp_path, rounds: int) -> RunDir:
    """A run directory as the loop leaves it after ``rounds`` complete rounds."""
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    run.record_config(CONFIG, {".hydra/config.yaml": "seed: 0\n"})
    for r in range(rounds):
        with run.building_round(r) as tmp:
            (tmp / "checkpoint.pt").write_bytes(b"weights")
            run.commit_round(r, tmp, _state(r), keep_checkpoints="last")
    return run


def _unfinished_round(run: RunDir, r: int) -> None:
    """What a crash inside round ``r`` leaves: its temp dir, made by ``building_round``."""
    cm = run.building_round(r)
    tmp = cm.__enter__()  # never exited: the process "died" here
    (tmp / "labelled.json").write_text("{}")


def test_commit_keeps_only_the_last_checkpoint_and_mirrors_state(tmp_path):
    run = _committed(tmp_path, 3)
    assert [p.parent.name for p in run.root.glob("round_*/checkpoint.pt")] == ["round_02"]
    top = json.loads(run.state_path.read_text())
    assert top["last_completed_round"] == 2 and top["config"] == CONFIG
    assert run.results_path.read_text().splitlines()[1:] == ["0,10", "1,20", "2,30"]


def test_round_dir_without_top_state_is_resumed_not_redone(tmp_path):
    """Issue 7.1: killed between the round dir rename and the first state.json."""
    run = _committed(tmp_path, 1)
    run.state_path.unlink()
    run.results_path.unlink()
    state = run.load_state("last")
    assert state["last_completed_round"] == 0
    assert json.loads(run.state_path.read_text())["last_completed_round"] == 0
    assert run.results_path.read_text().splitlines() == ["round,images", "0,10"]


def test_lagging_state_and_leftovers_are_repaired(tmp_path):
    run = _committed(tmp_path, 2)
    write_json(run.state_path, {**_state(0), "config": CONFIG})  # state lags round_01
    (run.root / "round_00" / "checkpoint.pt").write_bytes(b"old")  # survived a crash
    leftovers = [  # the names alrun.io's atomic writes give their temp files
        run.root / ".state.json.alrun-abcd1234.tmp",
        run.root / ".results.csv.alrun-abcd_234.tmp",
        run.root / "round_01" / ".metrics.json.alrun-x1x2x3x4.tmp",
        run.root / ".hydra" / ".config.yaml.alrun-y1y2y3y4.tmp",
    ]
    for path in leftovers:
        path.write_text("partial")
    _unfinished_round(run, 2)
    state = run.load_state("last")
    assert state["last_completed_round"] == 1
    assert json.loads(run.state_path.read_text())["last_completed_round"] == 1
    assert not any(p.exists() for p in leftovers)
    assert not (run.root / ".round_02.tmp").exists()
    assert [p.parent.name for p in run.root.glob("round_*/checkpoint.pt")] == ["round_01"]


def test_keep_checkpoints_all_prunes_nothing(tmp_path):
    run = _committed(tmp_path, 1)
    (run.root / "round_00" / "checkpoint.pt").write_bytes(b"w")
    with run.building_round(1) as tmp:
        (tmp / "checkpoint.pt").write_bytes(b"w")
        run.commit_round(1, tmp, _state(1), keep_checkpoints="all")
    assert len(list(run.root.glob("round_*/checkpoint.pt"))) == 2


@pytest.mark.parametrize(
    "damage,needle",
    [
        (lambda run: run.state_path.write_text('{"last_com'), r"state\.json: corrupt JSON"),
        (
            lambda run: (run.round_dir(1) / "state.json").write_text("{"),
            r"round_01/state\.json: corrupt JSON .*delete .*round_01 to redo round 1",
        ),
        (
            lambda run: (run.round_dir(1) / "state.json").unlink(),
            r"round_01/state\.json: missing .*delete .*round_01 to redo round 1",
        ),
        (
            lambda run: __import__("shutil").rmtree(run.round_dir(0)),
            r"round_00: missing while later rounds exist",
        ),
        (
            lambda run: write_json(run.state_path, {**_state(3), "config": CONFIG}),
            r"state\.json: records round 3 as complete but .*round_03 is missing",
        ),
    ],
)
def test_damaged_directory_is_an_error_not_a_restart(tmp_path, damage, needle):
    run = _committed(tmp_path, 2)
    damage(run)
    with pytest.raises(AlrunError, match=needle):
        run.load_state("last")
    assert run.round_dir(1).exists() or "round_00" not in needle


def test_different_config_is_refused_naming_keys_and_record_kept(tmp_path):
    run = _committed(tmp_path, 1)
    before = (run.config_path.read_bytes(), (run.root / ".hydra/config.yaml").read_bytes())
    changed = {**CONFIG, "trainer": {"lr": 0.02, "init": "continue"}, "seed": 1}
    with pytest.raises(RunDirError, match=r"seed: 0 -> 1; trainer\.lr: 0\.01 -> 0\.02"):
        run.check_config(changed, "auto")
    run.record_config(changed, {".hydra/config.yaml": "seed: 1\n"})  # never overwrites
    after = (run.config_path.read_bytes(), (run.root / ".hydra/config.yaml").read_bytes())
    assert after == before
    assert run.check_config(CONFIG, "auto") is True


def test_resume_modes(tmp_path):
    fresh = RunDir(tmp_path / "fresh")
    fresh.root.mkdir()
    with pytest.raises(RunDirError, match="resume=true: no run to resume"):
        fresh.check_config(CONFIG, True)
    assert fresh.check_config(CONFIG, False) is False
    run = _committed(tmp_path, 1)
    with pytest.raises(RunDirError, match="already holds a run"):
        run.check_config(CONFIG, False)
    assert run.check_config(CONFIG, True) is True


def test_config_differences_lists_added_and_removed_keys():
    old = {"a": {"b": 1}, "c": 2}
    new = {"a": {"b": 1, "x": 3}}
    assert config_differences(old, new) == ["a.x: (absent) -> 3", "c: 2 -> (absent)"]


def test_lock_names_the_holder_and_dies_with_it(tmp_path):
    root = tmp_path / "run"
    code = (
        "import sys, time; from pathlib import Path; from alrun.rundir import RunDir\n"
        f"with RunDir(Path({str(root)!r})).lock():\n"
        "    print('locked', flush=True); time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen(
        [sys.executable, "-c", code], env=env, cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"  # observed, not slept for
        with pytest.raises(
            RunDirError, match=rf"in use by another alrun process \(PID {holder.pid}\)"
        ):
            with RunDir(root).lock():
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunDir(root).lock():  # the kernel released the dead holder's lock
        assert (root / ".lock").read_text().strip() == str(os.getpid())


@pytest.mark.integration
def test_fault_drill_small_version(tmp_path):
    """scripts/fault_drill.py on the crash windows issue 7 found: a round dir committed before
    state.json, a temp state file written but not renamed, an old checkpoint not yet pruned,
    and the very last operation. Each killed run resumes to what an uninterrupted run writes."""
    points = "rename-done round_00,write-tmp-done state.json,unlink,unlink-done"
    cmd = [sys.executable, "scripts/fault_drill.py", "--match", points, "--workdir", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0, result.stdout + result.stderr
    assert lines[-1] == "4/4", result.stdout
    assert any("(rename-done round_00): ok" in line for line in lines)


def test_corrupt_config_record_is_named_and_rebuilt_from_state(tmp_path):
    run = _committed(tmp_path, 1)
    run.config_path.write_text('{"config": {"se')
    with pytest.raises(
        AlrunError, match=r"config\.json: corrupt JSON .*rebuilt from .*state\.json"
    ):
        run.check_config(CONFIG, "auto")
    run.config_path.unlink()  # the way out the message gives
    assert run.check_config(CONFIG, "auto") is True
    with pytest.raises(RunDirError, match=r"different config \(seed: 0 -> 5\)"):
        run.check_config({**CONFIG, "seed": 5}, "auto")
    run.record_config(CONFIG, {})
    assert json.loads(run.config_path.read_text()) == {"config": CONFIG}


def _user_files(root) -> dict:
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


def test_resume_cleans_only_what_alrun_made(tmp_path):
    """Issue 25.2: a user's *.tmp files in a run dir survive resume; alrun's own leftovers
    (atomic-write temp names, unfinished round dirs it made) do not."""
    run = _committed(tmp_path, 2)
    user = {
        ".notes.tmp": b"mine",
        ".round_03.tmp/data.txt": b"mine too",
        "round_01/.draft.tmp": b"draft",
        ".hydra/.x.tmp": b"x",
    }
    for name, data in user.items():
        (run.root / name).parent.mkdir(exist_ok=True)
        (run.root / name).write_bytes(data)
    ours = [
        run.root / ".state.json.alrun-0a1b2c3d.tmp",
        run.root / "round_00/.a.alrun-zzzzzzzz.tmp",
    ]
    for path in ours:
        path.write_text("partial")
    _unfinished_round(run, 2)
    assert run.load_state("last")["last_completed_round"] == 1
    assert {name: (run.root / name).read_bytes() for name in user} == user
    assert not any(p.exists() for p in ours)
    assert not run.tmp_round_dir(2).exists()


def test_a_round_temp_dir_alrun_did_not_make_is_refused_not_deleted(tmp_path):
    run = _committed(tmp_path, 1)
    (run.tmp_round_dir(1)).mkdir()
    (run.tmp_round_dir(1) / "data.txt").write_text("mine")
    with pytest.raises(RunDirError, match=r"\.round_01\.tmp: not made by alrun"):
        with run.building_round(1):
            pass
    assert (run.tmp_round_dir(1) / "data.txt").read_text() == "mine"


def test_empty_round_temp_dir_from_a_crash_right_after_mkdir_is_reused(tmp_path):
    run = _committed(tmp_path, 1)
    run.tmp_round_dir(1).mkdir()  # killed between mkdir and the marker
    assert run.load_state("last")["last_completed_round"] == 0
    assert not run.tmp_round_dir(1).exists()


@pytest.mark.parametrize(
    "files",
    [
        {"notes.txt": b"mine"},
        {".notes.tmp": b"a", ".round_03.tmp/data.txt": b"b", "round_07/.draft.tmp": b"c"},
        {"round_00/labelled.json": b"{}", "results.csv": b"round\n0\n"},  # no config record
    ],
)
def test_a_folder_that_is_not_a_run_is_refused_untouched(tmp_path, files):
    """Issue 25.2: an existing non-empty folder that alrun did not make is not a run dir."""
    root = tmp_path / "mine"
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    before = _user_files(root)
    with pytest.raises(RunDirError, match=rf"^{root}: not an alrun run directory \(holds "):
        RunDir(root).check_ours()
    assert _user_files(root) == before


@pytest.mark.parametrize(
    "names",
    [[], [".lock"], [".lock", "cli.log"], [".hydra/config.yaml", "error.json", "traceback.txt"]],
)
def test_an_empty_folder_or_a_run_that_failed_before_its_record_is_ours(tmp_path, names):
    root = tmp_path / "r"
    root.mkdir()
    for name in names:
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_text("x")
    RunDir(root).check_ours(log_name="cli.log")
    RunDir(tmp_path / "absent").check_ours()
    _committed(tmp_path, 1).check_ours()  # a recorded run, whatever else it holds


def test_finished_run_is_never_pruned(tmp_path):
    """Issue 25.1: a finished keep_checkpoints=all run keeps every checkpoint when it is
    re-run with the default keep_checkpoints=last."""
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    run.record_config(CONFIG, {})
    for r in range(3):
        with run.building_round(r) as tmp:
            (tmp / "checkpoint.pt").write_bytes(b"weights")
            run.commit_round(r, tmp, _state(r), keep_checkpoints="all")
    assert run.load_state("last", rounds=2)["last_completed_round"] == 2
    assert len(list(run.root.glob("round_*/checkpoint.pt"))) == 3
    assert run.load_state("last")["keep_checkpoints"] == "all"  # recorded by the commit


def test_finished_run_completes_the_pruning_it_was_killed_before(tmp_path):
    run = _committed(tmp_path, 2)
    (run.round_dir(0) / "checkpoint.pt").write_bytes(b"old")  # killed before the last prune
    run.load_state("all", rounds=1)
    assert [p.parent.name for p in run.root.glob("round_*/checkpoint.pt")] == ["round_01"]


def test_non_utf8_results_csv_is_rewritten_on_resume(tmp_path):
    run = _committed(tmp_path, 2)
    run.results_path.write_bytes(b"round,images\n\xff\xfe\x00garbage\n")
    assert run.load_state("last")["last_completed_round"] == 1
    assert run.results_path.read_text().splitlines() == ["round,images", "0,10", "1,20"]


def test_thread_count_change_is_refused_unless_allowed(tmp_path):
    """Issue 25.7: the torch thread count a run computed with is part of its record."""
    state = {**_state(0), "torch_threads": 3}
    check_threads(state, allow_change=False, threads=3)
    with pytest.raises(
        RunDirError,
        match=r"torch threads: round 0 ran with 3, this process has 2 .*OMP_NUM_THREADS=3 .*"
        r"allow_thread_change=true",
    ):
        check_threads(state, allow_change=False, threads=2)
    check_threads(state, allow_change=True, threads=2)
    check_threads(_state(0), allow_change=False, threads=2)  # not recorded: nothing to compare


@pytest.mark.parametrize("value", ["", ".", "..", "../../x", "a/b", "a\\b", "/abs"])
def test_run_names_cannot_leave_the_output_root(value):
    """Issue 25.3: names that form the run dir are plain names."""
    with pytest.raises(AlrunError, match=r"^strategy\.name: expected a plain name"):
        check_run_names({"name": "ok", "strategy": {"name": value}, "seed": 0})
    with pytest.raises(AlrunError, match=r"^name: expected a plain name"):
        check_run_names({"name": value, "strategy": {"name": "entropy"}, "seed": 0})
    check_run_names({"name": "a..b", "strategy": {"name": "entropy-v2.1"}, "seed": 3})


def test_a_config_json_that_is_not_alruns_record_is_named(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    (root / "config.json").write_text('{"theme": "dark"}')
    with pytest.raises(RunDirError, match=r"config\.json: not an alrun config record"):
        RunDir(root).check_config(CONFIG, "auto")
