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
* ``state.json``, ``results.csv``  copies of the newest round's state, rewritten after each
                    commit; if a crash leaves them behind, resume rewrites them.

Resume therefore derives what is complete from the round directories alone, whatever order the
other files were written in: temp leftovers are removed, the newest round state is loaded,
lagging copies are rewritten and checkpoints older than the last are pruned
(``keep_checkpoints=last``). A corrupt or contradicting file is an error naming the file and
how to recover, never a silent restart from zero.
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
from omegaconf import DictConfig, OmegaConf

from alrun.errors import AlrunError
from alrun.io import (
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
_ROUND = re.compile(r"round_(\d+)$")

#: config keys that only steer how a run is executed: they may change when a run is resumed
RUN_CONTROL_KEYS = ("resume", "quiet", "keep_checkpoints", "save_predictions", "logger")


@dataclass(frozen=True)
class RunOptions:
    """Run control, checked once before any work starts (``alrun resume=... quiet=...``).

    ``resume``: ``"auto"`` continues a run found in the output dir, ``True`` requires one,
    ``False`` refuses one. ``quiet``: ``None`` means quiet inside sweeps only.
    """

    resume: str | bool = "auto"
    quiet: bool | None = None
    keep_checkpoints: str = "last"
    save_predictions: bool = False

    def __post_init__(self) -> None:
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

    @classmethod
    def from_config(cls, cfg: DictConfig | dict[str, Any]) -> RunOptions:
        return cls(
            resume=cfg.get("resume", "auto"),
            quiet=cfg.get("quiet", None),
            keep_checkpoints=cfg.get("keep_checkpoints", "last"),
            save_predictions=cfg.get("save_predictions", False),
        )


class RunDirError(AlrunError):
    """The run directory is in use, belongs to another config, or holds a damaged file."""


def config_fingerprint(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config minus run-control keys: what must match for a run to resume."""
    data = OmegaConf.to_container(cfg, resolve=True)
    for key in RUN_CONTROL_KEYS:
        data.pop(key, None)
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

    def clean_leftovers(self) -> None:
        """Remove what a crash can leave: unfinished round dirs and atomic-write temp files."""
        for path in sorted(self.root.glob(".round_*.tmp")):
            remove_tree(path)
        for pattern in (".*.tmp", "round_*/.*.tmp", ".hydra/.*.tmp"):
            for path in sorted(self.root.glob(pattern)):
                if path.is_file():
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
            return read_json(self.config_path, recover)["config"]
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

    def load_state(self, keep_checkpoints: str) -> dict[str, Any] | None:
        """The state after the newest complete round (None: no round completed yet).

        Removes leftovers, rewrites a lagging ``state.json``/``results.csv`` and prunes old
        checkpoints, so the directory looks as if the run had never been interrupted.
        """
        self.clean_leftovers()
        rounds = self.completed_rounds()
        if rounds != list(range(len(rounds))):
            missing = sorted(set(range(max(rounds) + 1)) - set(rounds))
            raise RunDirError(
                f"{self.round_dir(missing[0])}: missing while later rounds exist; delete the "
                "later round directories to redo them"
            )
        top = self._read_top_state() if self.state_path.exists() else None
        if not rounds:
            if top is not None and top.get("last_completed_round", -1) >= 0:
                raise RunDirError(
                    f"{self.state_path}: records round {top['last_completed_round']} as complete "
                    f"but no round directory exists; delete {self.state_path} to start over"
                )
            return None
        last = rounds[-1]
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
        self.prune_checkpoints(last, keep_checkpoints)
        return state

    def _top_state(self, state: dict[str, Any]) -> dict[str, Any]:
        recorded = self._recorded_config()
        return {**state, "config": recorded} if recorded is not None else dict(state)

    def _write_results(self, rows: list[dict[str, Any]]) -> None:
        """Rewrite results.csv when it does not hold exactly these rows."""
        text = csv_text(rows)
        if not self.results_path.exists() or self.results_path.read_text() != text:
            write_csv(self.results_path, rows)

    # -- rounds ---------------------------------------------------------------------------------
    @contextmanager
    def building_round(self, r: int) -> Iterator[Path]:
        """A fresh ``.round_XX.tmp/`` to write round ``r`` into; removed if the round fails."""
        tmp = self.tmp_round_dir(r)
        remove_tree(tmp)
        tmp.mkdir()
        try:
            yield tmp
        except BaseException:
            if tmp.exists():
                remove_tree(tmp)
            raise

    def commit_round(self, r: int, tmp: Path, state: dict[str, Any], keep_checkpoints: str) -> None:
        """Make round ``r`` complete: its state, then the rename, then the lagging copies."""
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
