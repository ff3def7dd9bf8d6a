"""The ``alrun`` command: bad input gives a one-line error, a non-zero exit and no round dir."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest

from tests.helpers import REPO

#: one torch thread per test process: on a shared 2-core machine threads only fight
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}


def alrun(tmp_path: Path, *overrides: str, preset: str = "smoke") -> subprocess.CompletedProcess:
    """Run the CLI; ``preset`` is the experiment (smoke sizes the synthetic data, so tests of
    other datasets pass ``preset="demo"``: they fail before any training)."""
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "alrun.cli",
        f"experiment={preset}",
        "quiet=true",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300)


def assert_clean_failure(result: subprocess.CompletedProcess, tmp_path: Path, *needles: str):
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr
    run = tmp_path / "run"
    assert not list(run.glob("round_*")), "a partial round dir was left behind"
    assert not list(run.glob(".round_*"))
    written = {p.name for p in run.glob("*")} - {"cli.log", ".lock"}  # Hydra's log, the lock
    assert not written, f"bad input must write nothing, found {sorted(written)}"


@pytest.mark.integration  # ~10 s: the fast tier keeps one end-to-end run per family
def test_smoke_runs_and_help_introduces_alrun(tmp_path):
    help_text = subprocess.run(
        [sys.executable, "-m", "alrun.cli", "--help"],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=REPO,
        check=True,
    ).stdout
    assert help_text.startswith("alrun - active learning for object detection")
    assert "powered by Hydra" not in help_text
    assert f"strategy: {', '.join(_strategies())}" in help_text
    assert "resume=auto|true|false" in help_text and "keep_checkpoints=last|all" in help_text
    assert "alrun -m experiment=demo strategy=random,entropy,margin seed=0,1,2" in help_text
    result = alrun(tmp_path, "budget.rounds=1")
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    assert json.loads((run / "round_01" / "selection.json").read_text())["round"] == 1
    recorded = (run / ".hydra" / "overrides.yaml").read_text()
    assert "budget.rounds=1" in recorded and "experiment=smoke" in recorded


@pytest.mark.integration
def test_version_is_alruns():
    result = subprocess.run(
        [sys.executable, "-m", "alrun.cli", "--version"],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=REPO,
        check=True,
    )
    assert result.stdout.strip() == f"alrun {version('alrun')}"


def _strategies() -> list[str]:
    """Every strategy option, as Hydra lists them (sorted config names, base/ excluded)."""
    return sorted(p.stem for p in (REPO / "alrun" / "configs" / "strategy").glob("*.yaml"))


def test_unknown_strategy(tmp_path):
    result = alrun(tmp_path, "strategy=entropyy")
    assert_clean_failure(result, tmp_path, "strategy/entropyy")
    assert result.stderr.strip().splitlines() == [
        "alrun: error: In 'run': Could not find 'strategy/entropyy'; "
        f"available: {', '.join(_strategies())}",
        "  see docs/reference/config-groups.md",
    ]


@pytest.mark.integration  # a CLI process: ~5-8 s on 2 shared cores
def test_missing_capability_is_one_line_and_writes_nothing(tmp_path):
    """The tiny FCOS has no region proposals: refused before any data is read."""
    result = alrun(tmp_path, "strategy=loc_tightness")
    assert result.returncode == 2
    assert_clean_failure(result, tmp_path)
    error, see = result.stderr.strip().splitlines()
    assert error.startswith(
        "alrun: error: strategy=loc_tightness (strategy.scorer): needs proposals (the region "
        "proposal each box was regressed from (two-stage models)), which detector=tiny_fcos does "
        "not have; detectors "
        "that have it: detector=fasterrcnn_mobilenet_v3_large_320_fpn, "
    )
    assert "detector=mmdet_faster_rcnn_r50" in error
    assert see == "  see docs/reference/capabilities.md"


@pytest.mark.integration
def test_config_key_typo(tmp_path):
    result = alrun(tmp_path, "trainer.lrr=0.1")
    assert_clean_failure(result, tmp_path, "lrr")
    assert result.stderr.strip().splitlines() == [
        "alrun: error: Could not override 'trainer.lrr'. "
        "To append to your config use +trainer.lrr=0.1",
        "  see docs/reference/config-groups.md",
    ]


@pytest.mark.integration
def test_missing_dataset_path(tmp_path):
    result = alrun(tmp_path, "dataset=voc", "dataset.root=/no/such/dir", preset="demo")
    assert_clean_failure(result, tmp_path, "alrun: error: dataset.root", "/no/such/dir")
    assert result.stderr.strip().splitlines()[1:] == ["  see docs/getting-started.md"]


@pytest.mark.integration
def test_malformed_annotation(tmp_path):
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "Annotations" / "broken.xml").write_text("<annotation><object>")
    result = alrun(
        tmp_path,
        "dataset=voc",
        f"dataset.root={root}",
        "dataset.pool_split=null",
        "dataset.test_split=null",
        "dataset.test_fraction=0.5",
        preset="demo",
    )
    assert_clean_failure(result, tmp_path, "alrun: error:", "broken.xml")


@pytest.mark.integration
def test_budget_unit_typo(tmp_path):
    result = alrun(tmp_path, "budget.unit=imgs")
    assert_clean_failure(result, tmp_path, "budget.unit", "imgs")


BAD_VALUES = [
    ("dataset.num_pool=0", "dataset.num_pool: expected an integer >= 1, got 0"),
    ("budget.initial=5000", "budget.initial"),
    ("detector.pretrained=/no/such.pt", "detector.pretrained"),
    ("budget.per_round=0", "budget.per_round"),
    ("trainer.init=warm", "trainer.init"),
    ("strategy.scorer.aggregator=median", "strategy.scorer.aggregator"),
    ("trainer.lr=-1", "trainer.lr: expected a finite number > 0, got -1"),
    ("trainer.epochs=-1", "trainer.epochs: expected an integer >= 0, got -1"),
    ("keep_checkpoints=foo", "keep_checkpoints: expected last|all, got 'foo'"),
    ("save_predictions=maybe", "save_predictions: expected true|false, got 'maybe'"),
    ("resume=foo", "resume: expected auto|true|false, got 'foo'"),
    ("budget.per_round=[5,5,5]", "budget.per_round: 3 amounts listed for 2 rounds"),
    ("strategy.scorer.distribution=softmax", "strategy.scorer.distribution: expected one of"),
    ("strategy.scorer.distribution=with_background", "needs a softmax head"),
    ("budget.fill=greedy", "budget.fill: expected one of stop|skip, got 'greedy'"),
    ("detector.pretrained_backbone=/no/such.pth", "detector.pretrained_backbone: file"),
]
FAST_BAD_VALUES = ("budget.initial=5000",)  # one in the fast tier, the rest in the second


@pytest.mark.parametrize(
    "override,needle",
    [v if v[0] in FAST_BAD_VALUES else pytest.param(*v, marks=pytest.mark.integration)
     for v in BAD_VALUES],
)  # fmt: skip
def test_bad_values(tmp_path, override, needle):
    result = alrun(tmp_path, override)
    assert_clean_failure(result, tmp_path, "alrun: error:", needle)


def _sweep(sweep: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "alrun.cli", "-m", *overrides, f"hydra.sweep.dir={sweep}"]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=600)


@pytest.mark.integration
def test_sweep_writes_one_run_per_job_and_counts_failures(tmp_path):
    sweep = tmp_path / "sweep"
    result = _sweep(sweep, "experiment=smoke", "budget.rounds=0,-1", "strategy=random,entropy")
    assert result.returncode == 0, result.stderr
    runs = sorted(p.parent.relative_to(sweep).as_posix() for p in sweep.glob("*/results.csv"))
    assert runs == [
        "budget.rounds=0,experiment=smoke,strategy=entropy",
        "budget.rounds=0,experiment=smoke,strategy=random",
    ]
    errors = sorted(sweep.glob("*/error.json"))
    assert len(errors) == 2
    assert "budget.rounds: expected an integer >= 0" in json.loads(errors[0].read_text())["error"]
    last = result.stderr.strip().splitlines()[-1]
    # smoke models are expected to look collapsed; the line counts what results.csv says
    collapsed = sum(
        any(row["collapsed"] == "1" for row in csv.DictReader(p.open()))
        for p in sweep.glob("*/results.csv")
    )
    assert last.startswith(
        f"alrun: sweep finished: 2 of 4 jobs failed; errors in {sweep}/*/error.json; "
        f"{collapsed} of 2 runs had collapsed rounds"
    )


@pytest.mark.integration
def test_sweep_in_which_every_job_failed_exits_non_zero(tmp_path):
    sweep = tmp_path / "sweep"
    result = _sweep(sweep, "experiment=smoke", "budget.unit=imgs,pixels")
    assert result.returncode == 1, result.stderr
    assert "alrun: sweep finished: 2 of 2 jobs failed" in result.stderr
    assert len(list(sweep.glob("*/error.json"))) == 2


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path} never appeared: {proc.communicate()}")
        time.sleep(0.01)


@pytest.mark.integration
def test_ctrl_c_says_how_to_resume(tmp_path):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "alrun.cli",
        "experiment=smoke",
        "quiet=true",
        "trainer.first_iterations=200",
        f"hydra.run.dir={run}",
    ]
    # a background job of a non-interactive shell (as CI may run us) inherits SIGINT ignored;
    # give the child the default disposition so it sees Ctrl-C as a terminal user's alrun would
    proc = subprocess.Popen(
        cmd,
        env=ENV,
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    _wait_for(run / ".round_00.tmp", proc)  # round 0 is training (200 iterations)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert stderr.strip().splitlines()[-1] == (
        "alrun: interrupted; re-run the same command to resume"
    )
    assert "Traceback" not in stderr
    assert not (run / ".round_00.tmp").exists() and not (run / "round_00").exists()


@pytest.mark.integration
def test_second_process_in_the_same_run_dir_is_refused(tmp_path):
    run = tmp_path / "run"
    code = (
        "import time; from pathlib import Path; from alrun.rundir import RunDir\n"
        f"with RunDir(Path({str(run)!r})).lock():\n"
        "    print('locked', flush=True); time.sleep(120)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code], env=ENV, cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = alrun(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"alrun: error: {run}: in use by another alrun process (PID {holder.pid}); wait for it "
        "to finish or choose another hydra.run.dir\n  see docs/crash-safety.md"
    )
    assert not (run / "config.json").exists()


@pytest.mark.integration
def test_refused_rerun_names_the_keys_and_keeps_the_record(tmp_path):
    first = alrun(tmp_path, "budget.rounds=0")
    assert first.returncode == 0, first.stderr
    run = tmp_path / "run"
    record = {p: p.read_bytes() for p in [run / "config.json", *run.glob(".hydra/*.yaml")]}
    result = alrun(tmp_path, "budget.rounds=0", "trainer.lr=0.02", "seed=3")
    assert result.returncode == 2
    assert "different config (" in result.stderr
    assert "; seed: 0 -> 3; trainer.lr: 0.01 -> 0.02)" in result.stderr  # sorted dotted keys
    assert {p: p.read_bytes() for p in record} == record
    assert len(record) == 4  # config.json + .hydra/{config,hydra,overrides}.yaml


@pytest.mark.integration
def test_full_disk_is_one_line_naming_the_file(tmp_path):
    target = tmp_path / "run" / ".round_00.tmp" / "metrics.json"
    cmd_env = {**ENV, "ALRUN_FAULT_KIND": "enospc", "ALRUN_FAULT_AT": f"write {target}"}
    cmd = [
        sys.executable,
        "-m",
        "alrun.cli",
        "experiment=smoke",
        "quiet=true",
        "budget.rounds=0",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=cmd_env, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"alrun: error: {target}: cannot write (No space left on device); free space or choose "
        "a writable hydra.run.dir, then re-run the same command to resume\n"
        "  see docs/crash-safety.md"
    )
    assert not list((tmp_path / "run").glob("*round_00*"))


@pytest.mark.integration
def test_wrong_key_for_the_chosen_dataset(tmp_path):
    """A synthetic-only key with a VOC dataset is a one-line config error naming the key."""
    result = alrun(tmp_path, "dataset=voc", "dataset.root=/tmp", "+dataset.num_pool=60")
    assert_clean_failure(result, tmp_path, "alrun: error: dataset.num_pool: not a setting of")
    assert result.stderr.strip().splitlines()[1:] == ["  see docs/getting-started.md"]


@pytest.mark.integration
@pytest.mark.parametrize("key", ["hydra.run.dir", "hydra.sweep.dir"])
def test_unwritable_output_dir_is_one_line(key):
    cmd = [sys.executable, "-m", "alrun.cli", "experiment=smoke", f"{key}=/proc/alrun/run"]
    if key == "hydra.sweep.dir":
        cmd.insert(3, "-m")
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"alrun: error: {key}: cannot create or write /proc/alrun/run (No such file or directory)"
        "\n  see docs/configuration.md"
    )


def test_hints_name_keys_the_way_they_must_be_typed():
    from alrun.cli import hint_keys
    from tests.helpers import compose_config

    cfg = compose_config(["dataset=yolo"])  # dataset.root stays ??? (in the schema)
    message = "/data: no data.yaml or labels/classes.txt; set dataset.classes explicitly"
    assert hint_keys(message, cfg) == (
        "/data: no data.yaml or labels/classes.txt; set +dataset.classes explicitly"
    )
    kept = "dataset.root: /x not found; check dataset.root and dataset.pool_split"
    assert hint_keys(kept, cfg) == kept  # keys in the schema are typed without +


@pytest.mark.integration
def test_pretrained_backbone_of_another_architecture(tmp_path):
    import torch
    import torchvision

    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    result = alrun(tmp_path, f"detector.pretrained_backbone={path}")
    assert_clean_failure(result, tmp_path, "detector.pretrained_backbone:", "does not fit")


INTEGRATION = pytest.mark.integration


def _tree(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


def test_a_users_folder_is_refused_untouched(tmp_path):
    """Issue 25.2: hydra.run.dir at a folder of the user's: nothing deleted, nothing written."""
    mine = tmp_path / "run"
    for name in (".notes.tmp", ".round_03.tmp/data.txt", "round_07/.draft.tmp", "paper.tex"):
        (mine / name).parent.mkdir(parents=True, exist_ok=True)
        (mine / name).write_text(f"the user's {name}")
    before = _tree(mine)
    result = alrun(tmp_path, "budget.rounds=0")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        f"alrun: error: {mine}: not an alrun run directory (holds .notes.tmp, .round_03.tmp, "
        "paper.tex, round_07); choose another hydra.run.dir or empty it\n"
        "  see docs/crash-safety.md"
    )
    assert _tree(mine) == before


@pytest.mark.integration
def test_a_users_folder_is_refused_as_sweep_dir_untouched(tmp_path):
    mine = tmp_path / "sweep"
    (mine / "data").mkdir(parents=True)
    (mine / "data" / ".x.tmp").write_text("mine")
    before = _tree(mine)
    result = _sweep(mine, "experiment=smoke", "budget.rounds=0", "seed=0,1")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        f"alrun: error: {mine}: not an alrun sweep directory (holds data); choose another "
        "hydra.sweep.dir or empty it\n  see docs/crash-safety.md"
    )
    assert _tree(mine) == before


@pytest.mark.parametrize(
    "override,key",
    [
        ("name=../../../escaped", "name"),
        pytest.param("strategy.name=../../../escaped", "strategy.name", marks=INTEGRATION),
        pytest.param("strategy.name=a/b", "strategy.name", marks=INTEGRATION),
        pytest.param("name=", "name", marks=INTEGRATION),
    ],
)
def test_run_names_cannot_leave_the_output_root(tmp_path, override, key):
    """Issue 25.3: the default run dir is outputs/<name>/<strategy.name>/seed<seed>."""
    work = tmp_path / "a" / "b" / "c" / "work"
    work.mkdir(parents=True)
    cmd = [sys.executable, "-m", "alrun.cli", "experiment=smoke", "budget.rounds=0", override]
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=work, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"alrun: error: {key}: expected a plain name"), result.stderr
    page = "strategies" if key.startswith("strategy") else "configuration"
    assert result.stderr.strip().splitlines()[1:] == [f"  see docs/{page}.md"]
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # nothing written anywhere


FULL_LOG_DISK = """
import errno, logging, sys
class Full:
    def write(self, text):
        raise OSError(errno.ENOSPC, "No space left on device")
    def flush(self):
        pass
    def close(self):
        pass
logging.FileHandler._open = lambda self: Full()
from alrun.cli import main
sys.argv = ["alrun", *sys.argv[1:]]
main()
"""


@pytest.mark.integration
def test_full_disk_at_the_first_log_write_is_one_line(tmp_path):
    """Issue 25: the job log (Hydra's file handler) cannot write: one line, exit 2."""
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-c",
        FULL_LOG_DISK,
        "experiment=smoke",
        "quiet=true",
        "budget.rounds=0",
        f"hydra.run.dir={run}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        f"alrun: error: {run / 'cli.log'}: cannot write the log (No space left on device); "
        "free space or choose a writable hydra.run.dir, then re-run the same command to resume"
        "\n  see docs/crash-safety.md"
    )


def test_cfg_with_multirun_is_one_line(tmp_path):
    result = _sweep(tmp_path / "sweep", "--cfg", "hydra", "experiment=smoke", "seed=0,1")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert result.stderr.startswith("alrun: error: -m/--multirun, --cfg/-c")
    assert not (tmp_path / "sweep").exists()
