"""The run directory: lock, config record, per-round commits and resume from what is on disk.

Layout and commit protocol (every change goes through :mod:`alrun.io`, atomically):

* ``.lock``         ``fcntl.flock`` lock held while a process works in the directory; the
                    kernel drops it when the process dies, so a killed run leaves no stale lock.
                    It holds the holder's PID for the refusal message.
* ``config.json``   the resolved config the run was started with (minus run-control keys),
                    written once and never rewritten: a rerun with another config is refused
                    with the keys that differ, and the record stays intact. ``.hydra/`` is
                    written by alrun too (``hydra.output_subdir: null``), once, after the
                    config has been checked, so a refused rerun cannot rewrite it either.
* ``round_XX/``     built as ``.round_XX.tmp/`` (artifacts + ``state.json``, the run state
                    after round XX) and renamed when complete: **the rename is the commit**.
                    The temp dir holds a marker (``.alrun_round``) from its creation on, so
                    cleanup removes only round dirs alrun made.
* ``state.json``, ``results.csv``  copies of the newest round's state, rewritten after each
                    commit; if a crash leaves them behind, resume rewrites them.

Resume therefore derives what is complete from the round directories alone, whatever order the
other files were written in: alrun's temp leftovers are removed (its atomic-write temp names and
marked round dirs; nothing else), the newest round state is loaded, lagging copies are rewritten
and checkpoints older than the last are pruned (``keep_checkpoints=last``; a finished run only as
it was committed). A corrupt or contradicting file is an error naming the file and how to
recover, never a silent restart from zero. A folder that holds anything else and no config
record is not a run directory: it is refused before anything is written into it.
"""

from __future__ import annotations

import fcntl
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from alrun.acquisition.streaming import check_shard_size
from alrun.errors import AlrunError
from alrun.io import (
    TEMP_FILE,
    atomic_rename,
    atomic_write_bytes,
    csv_text,
    read_json,
    remove_file,
    remove_tree,
    write_csv,
    write_json,
)
from alrun.pool import LabelPool
from alrun.types import ImageLabels

STATE_FILE = "state.json"
CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"
RESULTS_FILE = "results.csv"
CHECKPOINT_FILE = "checkpoint.pt"
ROUND_MARKER = ".alrun_round"
_ROUND = re.compile(r"round_(\d+)$")
_TMP_ROUND = re.compile(r"\.round_(\d+)\.tmp$")
#: what alrun (or Hydra for it) can leave in a run dir before its config record exists: the
#: lock, and what a job that failed on bad input writes (.hydra/, error.json, traceback.txt)
_BEFORE_RECORD = {LOCK_FILE, ".hydra", "error.json", "traceback.txt"}

#: oracle keys that change between the export and the import of a batch (oracle=human)
ORACLE_CONTROL_KEYS = ("labels", "partial")
#: config keys that only steer how a run is executed: they may change when a run is resumed
RUN_CONTROL_KEYS = (
    "resume",
    "quiet",
    "keep_checkpoints",
    "save_predictions",
    "logger",
    "allow_thread_change",
    "acquisition",
)
#: trainer keys left out of the config record at their one-process value 1: a run recorded
#: before they existed resumes; any other value (or a change of it) is a different config
SINGLE_DEVICE_KEYS = ("devices", "nodes", "accumulate")
#: config keys whose values form the default run dir
#: ``outputs/<name>/<dataset>/<strategy.name>/seed<seed>``
RUN_NAME_KEYS = ("name", "strategy.name", "seed")


@dataclass(frozen=True)
class RunOptions:
    """Run control, checked once before any work starts (``alrun resume=... quiet=...``).

    ``resume``: ``"auto"`` continues a run found in the output dir, ``True`` requires one,
    ``False`` refuses one. ``quiet``: ``None`` means quiet inside sweeps only.
    ``allow_thread_change``: resume a run with another torch thread count than it ran with
    (its results then match neither count; refused by default).
    """

    resume: str | bool = "auto"
    quiet: bool | None = None
    keep_checkpoints: str = "last"
    save_predictions: bool = False
    allow_thread_change: bool = False
    shard_size: int | None = None

    def __post_init__(self) -> None:
        check_shard_size(self.shard_size)
        if not (isinstance(self.resume, bool) or self.resume == "auto"):
            raise AlrunError(f"resume: expected auto|true|false, got {self.resume!r}")
        if self.quiet is not None and not isinstance(self.quiet, bool):
            raise AlrunError(f"quiet: expected true|false|null, got {self.quiet!r}")
        if self.keep_checkpoints not in ("last", "all"):
            raise AlrunError(f"keep_checkpoints: expected last|all, got {self.keep_checkpoints!r}")
        if not isinstance(self.save_predictions, bool):
            raise AlrunError(
                f"save_predictions: expected true|false, got {self.save_predictions!r}"
            )
        if not isinstance(self.allow_thread_change, bool):
            raise AlrunError(
                f"allow_thread_change: expected true|false, got {self.allow_thread_change!r}"
            )

    @classmethod
    def from_config(cls, cfg: DictConfig | dict[str, Any]) -> RunOptions:
        return cls(
            resume=cfg.get("resume", "auto"),
            quiet=cfg.get("quiet", None),
            keep_checkpoints=cfg.get("keep_checkpoints", "last"),
            save_predictions=cfg.get("save_predictions", False),
            allow_thread_change=cfg.get("allow_thread_change", False),
            shard_size=(cfg.get("acquisition") or {}).get("shard_size", None),
        )


def check_run_names(cfg: DictConfig | Mapping[str, Any]) -> None:
    """Refuse a value of :data:`RUN_NAME_KEYS` that is not one plain path component: the run
    dir must stay inside the output root (``name=../x`` would write outside ``outputs/``)."""
    for key in RUN_NAME_KEYS:
        node: Any = cfg
        for part in key.split("."):
            node = node.get(part) if isinstance(node, (Mapping, DictConfig)) else None
        if node is None and key != "name":
            continue
        text = "" if node is None else str(node)
        if text in ("", ".", "..") or any(c in text for c in "/\\\0"):
            raise AlrunError(
                f"{key}: expected a plain name (no '/', '\\', '..', not empty) since it names "
                f"the run directory, got {text!r}"
            )


def job_log_name() -> str | None:
    """The file name of Hydra's job log (``<job name>.log``) inside a Hydra job, else None."""
    if not HydraConfig.initialized():
        return None
    return f"{HydraConfig.get().job.name}.log"


def check_threads(state: Mapping[str, Any], allow_change: bool, threads: int | None = None) -> None:
    """Refuse to continue a run with another torch thread count than its last round ran with
    (``torch.get_num_threads()``): float reductions differ, so would the selections."""
    recorded = state.get("torch_threads")
    threads = torch.get_num_threads() if threads is None else threads
    if recorded is None or recorded == threads or allow_change:
        return
    raise RunDirError(
        f"torch threads: round {state['last_completed_round']} ran with {recorded}, this process "
        f"has {threads} (results would match neither); resume with OMP_NUM_THREADS={recorded} "
        "or pass allow_thread_change=true"
    )


class RunDirError(AlrunError):
    """The run directory is in use, belongs to another config, or holds a damaged file."""


def config_fingerprint(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config minus run-control keys: what must match for a run to resume."""
    data = OmegaConf.to_container(cfg, resolve=True)
    for key in RUN_CONTROL_KEYS:
        data.pop(key, None)
    trainer = data.get("trainer")
    if isinstance(trainer, dict):  # runs recorded before these keys existed resume as they were
        for key in SINGLE_DEVICE_KEYS:
            if trainer.get(key) == 1:
                trainer.pop(key)
    if isinstance(data.get("oracle"), dict):  # oracle=human: where this batch's labels are
        for key in ORACLE_CONTROL_KEYS:
            data["oracle"].pop(key, None)
    return data


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``key: old -> new`` for every dotted key whose value differs."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    missing = object()
    lines = []
    for key in sorted(set(flat_old) | set(flat_new)):
        a, b = flat_old.get(key, missing), flat_new.get(key, missing)
        if a != b:
            shown = ["(absent)" if v is missing else repr(v) for v in (a, b)]
            lines.append(f"{key}: {shown[0]} -> {shown[1]}")
    return lines


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


class RunDir:
    """Paths, lock and persistence of one run directory."""

    #: whether this process writes the directory (rank 0 of a distributed run; FollowerDir)
    writes = True

    def __init__(self, root: Path):
        self.root = Path(root)

    def round_dir(self, r: int) -> Path:
        return self.root / f"round_{r:02d}"

    def tmp_round_dir(self, r: int) -> Path:
        return self.root / f".round_{r:02d}.tmp"

    @property
    def state_path(self) -> Path:
        return self.root / STATE_FILE

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def results_path(self) -> Path:
        return self.root / RESULTS_FILE

    # -- lock ---------------------------------------------------------------------------------
    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold an OS-level exclusive lock on the directory (released when the process dies).

        The lock file is kept afterwards: deleting it would let two processes lock two
        different inodes of the same name.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                raise RunDirError(
                    f"{self.root}: in use by another alrun process (PID {holder}); wait for it "
                    "to finish or choose another hydra.run.dir"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the lock

    # -- what is on disk ----------------------------------------------------------------------
    def completed_rounds(self) -> list[int]:
        return sorted(
            int(m.group(1))
            for p in self.root.glob("round_*")
            if p.is_dir() and (m := _ROUND.match(p.name))
        )

    def exists(self) -> bool:
        """Whether a run was started here (its config recorded or a round completed)."""
        return (
            self.config_path.exists() or self.state_path.exists() or bool(self.completed_rounds())
        )

    def check_ours(self, log_name: str | None = None) -> None:
        """Refuse a folder that is not an alrun run dir, before anything is written into it.

        Ours: absent or empty, a recorded run (``config.json``, or ``state.json`` from before
        config.json existed), or a run that stopped before its record was written (only the
        lock, the job log ``log_name``, and what a failed job writes). Anything else is the
        user's folder and is left untouched.
        """
        if not self.root.is_dir() or self.config_path.exists() or self.state_path.exists():
            return
        allowed = _BEFORE_RECORD | ({log_name} if log_name else set())
        foreign = sorted(
            p.name for p in self.root.iterdir() if p.name not in allowed and not _is_temp(p)
        )
        if foreign:
            shown = ", ".join(foreign[:5]) + (f", … {len(foreign) - 5} more" if foreign[5:] else "")
            raise RunDirError(
                f"{self.root}: not an alrun run directory (holds {shown}); choose another "
                "hydra.run.dir or empty it"
            )

    def clean_leftovers(self) -> None:
        """Remove what a crash can leave, and only that: round dirs alrun began (marked, or
        still empty) and the temp files of its atomic writes."""
        for path in sorted(self.root.glob(".round_*.tmp")):
            if _TMP_ROUND.match(path.name) and _is_our_tmp_round(path):
                remove_tree(path)
        for pattern in (".*.tmp", "round_*/.*.tmp", ".hydra/.*.tmp"):
            for path in sorted(self.root.glob(pattern)):
                if path.is_file() and _is_temp(path):
                    remove_file(path)

    def check_config(self, fingerprint: dict[str, Any], resume: str | bool) -> bool:
        """Apply ``resume=auto|true|false`` and refuse a different config. True: a run exists."""
        exists = self.exists()
        if resume is True and not exists:
            raise RunDirError(f"resume=true: no run to resume in {self.root}")
        if not exists:
            return False
        if resume is False:
            raise RunDirError(
                f"{self.root}: already holds a run; resume it (resume=auto) or choose another "
                "hydra.run.dir"
            )
        recorded = self._recorded_config()
        if recorded is not None and recorded != fingerprint:
            diff = config_differences(recorded, fingerprint)
            shown = "; ".join(diff[:6]) + (f"; … {len(diff) - 6} more" if len(diff) > 6 else "")
            raise RunDirError(
                f"{self.root}: holds a run with a different config ({shown}); rerun with the "
                f"recorded config ({self.config_path}) or choose another hydra.run.dir"
            )
        return True

    def _recorded_config(self) -> dict[str, Any] | None:
        if self.config_path.exists():
            recover = (
                f"delete it: it is rebuilt from {self.state_path}'s copy"
                if self.state_path.exists()
                else "delete it to start this run over"
            )
            record = read_json(self.config_path, recover)
            if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
                raise RunDirError(
                    f"{self.config_path}: not an alrun config record (no 'config' object); "
                    f"{recover}, or choose another hydra.run.dir if this folder is not a run"
                )
            return record["config"]
        if self.state_path.exists():  # a run directory written before config.json existed
            return self._read_top_state().get("config")
        return None

    def record_config(self, fingerprint: dict[str, Any], files: Mapping[str, str]) -> None:
        """Write the config record (and e.g. ``.hydra/*.yaml``) once; never overwrite it."""
        if not self.config_path.exists():
            write_json(self.config_path, {"config": fingerprint})
        for name, text in files.items():
            path = self.root / name
            if not path.exists():
                atomic_write_bytes(path, text.encode())

    # -- state ----------------------------------------------------------------------------------
    def _read_top_state(self) -> dict[str, Any]:
        return read_json(
            self.state_path,
            "delete it to rebuild it from the round directories (they hold the complete state)",
        )

    def load_state(self, keep_checkpoints: str, rounds: int | None = None) -> dict[str, Any] | None:
        """The state after the newest complete round (None: no round completed yet).

        Removes leftovers, rewrites a lagging ``state.json``/``results.csv`` and prunes old
        checkpoints, so the directory looks as if the run had never been interrupted. A
        finished run (stopped, or round ``rounds`` done) is pruned only as it was committed
        (``keep_checkpoints`` recorded in its state; not at all when none is recorded): a
        re-run of it computes nothing and must not delete anything.
        """
        self.clean_leftovers()
        done = self.completed_rounds()
        if done != list(range(len(done))):
            missing = sorted(set(range(max(done) + 1)) - set(done))
            raise RunDirError(
                f"{self.round_dir(missing[0])}: missing while later rounds exist; delete the "
                "later round directories to redo them"
            )
        top = self._read_top_state() if self.state_path.exists() else None
        if not done:
            if top is not None and top.get("last_completed_round", -1) >= 0:
                raise RunDirError(
                    f"{self.state_path}: records round {top['last_completed_round']} as complete "
                    f"but no round directory exists; delete {self.state_path} to start over"
                )
            return None
        last = done[-1]
        round_state_path = self.round_dir(last) / STATE_FILE
        if not round_state_path.exists():
            raise RunDirError(
                f"{round_state_path}: missing (incomplete round directory); delete "
                f"{self.round_dir(last)} to redo round {last}"
            )
        state = read_json(round_state_path, f"delete {self.round_dir(last)} to redo round {last}")
        if top is not None and top.get("last_completed_round", -1) > last:
            raise RunDirError(
                f"{self.state_path}: records round {top['last_completed_round']} as complete but "
                f"{self.round_dir(top['last_completed_round'])} is missing; the directory was "
                f"changed by something else: delete {self.state_path} to continue after round "
                f"{last}"
            )
        if top is None or top.get("last_completed_round") != last:
            write_json(self.state_path, self._top_state(state))
        self._write_results(state["results"])
        finished = state.get("stopped") is not None or (rounds is not None and last >= rounds)
        self.prune_checkpoints(
            last, state.get("keep_checkpoints", "all") if finished else keep_checkpoints
        )
        return state

    def _top_state(self, state: dict[str, Any]) -> dict[str, Any]:
        recorded = self._recorded_config()
        return {**state, "config": recorded} if recorded is not None else dict(state)

    def _write_results(self, rows: list[dict[str, Any]]) -> None:
        """Rewrite results.csv when it does not hold exactly these rows."""
        data = csv_text(rows).encode()
        if not self.results_path.is_file() or self.results_path.read_bytes() != data:
            write_csv(self.results_path, rows)  # also replaces a damaged (e.g. non-UTF-8) copy

    # -- rounds ---------------------------------------------------------------------------------
    @contextmanager
    def building_round(self, r: int) -> Iterator[Path]:
        """A fresh ``.round_XX.tmp/`` to write round ``r`` into; removed if the round fails.

        It is marked as alrun's right after ``mkdir`` (a crash in between leaves it empty,
        which cleanup may remove too); one alrun did not make is refused, never deleted.
        """
        tmp = self.tmp_round_dir(r)
        if tmp.exists():
            if not _is_our_tmp_round(tmp):
                raise RunDirError(
                    f"{tmp}: not made by alrun (no {ROUND_MARKER} inside); move it away, alrun "
                    f"builds round {r} under this name"
                )
            remove_tree(tmp)
        tmp.mkdir()
        os.close(os.open(tmp / ROUND_MARKER, os.O_WRONLY | os.O_CREAT, 0o666))
        try:
            yield tmp
        except BaseException:
            if tmp.exists():
                remove_tree(tmp)
            raise

    def commit_round(self, r: int, tmp: Path, state: dict[str, Any], keep_checkpoints: str) -> None:
        """Make round ``r`` complete: its state, then the rename, then the lagging copies.

        The state records ``keep_checkpoints``, how the round was pruned (see ``load_state``).
        """
        state = {**state, "keep_checkpoints": keep_checkpoints}
        write_json(tmp / STATE_FILE, state)
        atomic_rename(tmp, self.round_dir(r))
        write_json(self.state_path, self._top_state(state))
        write_csv(self.results_path, state["results"])
        self.prune_checkpoints(r, keep_checkpoints)

    def prune_checkpoints(self, last: int, keep_checkpoints: str) -> None:
        """``keep_checkpoints=last``: only round ``last`` keeps its checkpoint."""
        if keep_checkpoints != "last":
            return
        for r in self.completed_rounds():
            if r != last:
                remove_file(self.round_dir(r) / CHECKPOINT_FILE)

    def has_checkpoint(self, r: int) -> bool:
        return (self.round_dir(r) / CHECKPOINT_FILE).is_file()

    def load_checkpoint(self, r: int) -> dict[str, Any]:
        """Round ``r``'s detector weights, to continue training from them."""
        path = self.round_dir(r) / CHECKPOINT_FILE
        redo = f"delete {self.round_dir(r)} to redo round {r}"
        if not path.exists():
            raise RunDirError(f"{path}: missing, needed by trainer.init=continue; {redo}")
        try:
            return torch.load(path, weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling failure means a damaged file
            raise RunDirError(
                f"{path}: unreadable checkpoint ({type(err).__name__}); {redo}"
            ) from None


def _is_temp(path: Path) -> bool:
    """An atomic-write temp file of :mod:`alrun.io` (nothing else ends in alrun's pattern)."""
    return path.is_file() and TEMP_FILE.match(path.name) is not None


def _is_our_tmp_round(path: Path) -> bool:
    """A round temp dir alrun made: it holds the marker, or nothing at all."""
    return path.is_dir() and ((path / ROUND_MARKER).is_file() or not any(path.iterdir()))


def pool_state(pool: LabelPool) -> list[dict[str, Any]]:
    """Every oracle label given so far, with the round it was given in (JSON-ready)."""
    return [
        {**pool.labels[i].to_json(), "round": int(pool.labelled_round[pool.index[i]])}
        for i in pool.labelled_ids
    ]


def restore_pool(pool: LabelPool, labels: list[dict[str, Any]]) -> None:
    """Give ``pool`` back the labels recorded by :func:`pool_state`."""
    for item in labels:
        pool.add([ImageLabels.from_json(item)], int(item["round"]))


class FollowerDir(RunDir):
    """The run directory as a rank > 0 of a distributed run sees it: rank 0 builds and commits
    every round (:func:`alrun.loop.run_round` puts barriers around the commit), so the
    crash-safety protocol above has exactly one writer."""

    writes = False

    @contextmanager
    def building_round(self, r: int) -> Iterator[Path]:
        yield self.tmp_round_dir(r)  # never created by this rank

    def commit_round(self, r: int, tmp: Path, state: dict[str, Any], keep_checkpoints: str) -> None:
        pass
