"""``oracle=human``: people label each batch in Label Studio or CVAT; the run waits for them.

:meth:`HumanOracle.annotate` exports the batch (``annotation/batch_XX_partY/`` in the run
directory: Label Studio tasks with the model's predictions, the label config XML, a COCO file
of pre-annotations, the image list), records the run as ``awaiting_labels`` and raises
:class:`AwaitingLabels`; the CLI prints what to do and exits 0. The same command re-run with
``oracle.labels=<export>`` (or the export dropped into the batch's ``export/`` folder) checks
the export and continues: the round that was waiting is computed again (all randomness comes
from ``(seed, round)``, and the manifest refuses a selection that came out different), then
its batch is answered from the checked labels stored in ``answers.json``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from alrun.annotation.batch import (
    ANSWERS,
    DROP_FOLDER,
    HUMAN_KINDS,
    MANIFEST,
    Batch,
    BatchImage,
    Prelabels,
    read_manifest,
)
from alrun.annotation.coco_export import coco_file
from alrun.annotation.import_ import check_export, read_labels_file
from alrun.annotation.labelstudio import label_config, tasks
from alrun.data.dataset import DatasetSplits, ImageRecord
from alrun.errors import AlrunError
from alrun.io import atomic_write_bytes, read_json, remove_file, write_json
from alrun.oracle import SimulatedOracle
from alrun.types import ImageLabels, Needs

log = logging.getLogger(__name__)

AWAITING_FILE = "awaiting_labels.json"
PARTIAL_POLICIES = ("no", "ok")
#: the files of an export, in the order the CLI lists them
FILES = ("labelstudio_tasks.json", "labelstudio_config.xml", "coco_prelabels.json", "images.txt")


@dataclass(eq=False)  # not frozen: context managers set __traceback__ on what they re-raise
class AwaitingLabels(Exception):
    """Not a failure: a batch is exported and the run waits for its labels (exit 0)."""

    folder: Path
    batch: int
    kind: str
    waiting: int  # images still without labels
    total: int

    def __str__(self) -> str:
        return f"awaiting labels for {self.waiting} of {self.total} images in {self.folder}"


class HumanOracle:
    """Answers ``annotate`` with labels people made in an annotation tool (see module doc).

    ``fallback`` (the simulated oracle) supplies the cost model, the kinds and the budget's
    price estimates; nothing here reads ground truth.
    """

    def __init__(
        self,
        fallback: SimulatedOracle,
        labels: str | None = None,
        partial: Literal[PARTIAL_POLICIES] = "no",
        prelabel_score: float = 0.3,
        image_url: str = "/data/local-files/?d={file}",
    ):
        if not isinstance(fallback, SimulatedOracle):
            raise AlrunError(
                "oracle.fallback: expected the simulated oracle config (oracle/default)"
            )
        if partial not in PARTIAL_POLICIES:
            raise AlrunError(f"oracle.partial: expected no|ok, got {partial!r}")
        if not 0.0 <= prelabel_score <= 1.0:
            raise AlrunError(
                f"oracle.prelabel_score: expected a value in [0, 1], got {prelabel_score}"
            )
        if "{file}" not in image_url and "{image_id}" not in image_url:
            raise AlrunError(
                f"oracle.image_url: expected {{file}} or {{image_id}} in {image_url!r}"
            )
        self.fallback = fallback
        self.labels = Path(labels) if labels else None
        if self.labels is not None and not self.labels.is_file():
            raise AlrunError(
                f"oracle.labels: {self.labels}: no such file; expected the export "
                "of Label Studio (JSON) or CVAT (COCO)"
            )
        self.partial = partial
        self.prelabel_score = float(prelabel_score)
        self.image_url = image_url
        self.classes: tuple[str, ...] = ()
        self.root: Path | None = None
        self._batch, self._part, self._detector = 0, 0, None
        self._labels_used = False  # oracle.labels answers the first batch awaiting, not later ones

    # -- the oracle interface (as SimulatedOracle) ------------------------------------------
    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(k for k in self.fallback.kinds if k in HUMAN_KINDS)

    @property
    def cost_model(self):
        return self.fallback.cost_model

    def require(self, kinds: Sequence[str], who: str) -> None:
        for kind in kinds:
            if kind in self.fallback.kinds and kind not in HUMAN_KINDS:
                raise AlrunError(
                    f"{who}: asks for '{kind}' labels, which oracle=human cannot export; "
                    f"expected a regime asking for {', '.join(HUMAN_KINDS)}"
                )
        self.fallback.require(kinds, who)

    def cost(self, record: ImageRecord, kind: str | None = None) -> float:
        """The cost model's estimate (what the budget prices candidates with)."""
        return self.fallback.cost(record, kind)

    def hold_truth(self, truth) -> None:
        """The simulated fallback holds the hidden truth, only to price candidates for the
        budget before anyone labels them (the cost model's estimate, recorded beside the
        annotators' real seconds); the labels themselves come from the people's export."""
        self.fallback.hold_truth(truth)

    def objects(self, image) -> int:
        """Objects a box budget counts for ``image`` (the fallback's estimate)."""
        return self.fallback.objects(image)

    @property
    def audit(self):
        """Counts for regimes' pseudo-box diagnostics (the fallback's audit)."""
        return self.fallback.audit

    def check_data(self, splits: DatasetSplits) -> None:
        self.classes = tuple(splits.classes)

    # -- where the loop is ----------------------------------------------------------------
    def attach(self, root: Path) -> None:
        """The run directory the batches are written into (the loop calls this)."""
        self.root = Path(root)

    def begin_batch(self, batch: int, detector: Any = None) -> None:
        """Labels bought next are for pool round ``batch``; ``detector`` pre-annotates them."""
        self._batch, self._part, self._detector = batch, 0, detector

    # -- answering --------------------------------------------------------------------------
    def annotate(
        self,
        records: Sequence[ImageRecord],
        kind: str | None = None,
        proposals: Mapping[str, Any] | None = None,
    ) -> list[ImageLabels]:
        if self.root is None:
            raise AlrunError("oracle=human: needs a run directory (use the alrun command)")
        kind = kind or self.fallback.kind or "box"
        self.require([kind], "oracle.annotate")
        if not records:
            return []
        part, self._part = self._part, self._part + 1
        batch = Batch(
            self._run_id(),
            self._batch,
            part,
            kind,
            self.classes,
            tuple(
                BatchImage(r.image_id, str(r.file), int(r.width), int(r.height)) for r in records
            ),
        )
        folder = self.root / "annotation" / batch.name
        prelabels = self._export(folder, batch, records, proposals)
        answers = read_json(folder / ANSWERS) if (folder / ANSWERS).exists() else {}
        wanted = [image.image_id for image in batch.images if image.image_id not in answers]
        source = self._source(folder) if wanted else None
        if source is not None:
            drawn = read_labels_file(source, batch)
            found = check_export(source, drawn, batch, wanted, self.cost_model, prelabels)
            missing = [i for i in wanted if i not in found]
            if missing and self.partial != "ok":
                raise AlrunError(
                    f"oracle.labels: {source}: {len(missing)} of {len(batch.images)} selected "
                    f"images have no labels (first: '{missing[0]}'); expected every image of "
                    f"{batch.name}, or oracle.partial=ok to import these and wait for the rest"
                )
            for image_id, imported in found.items():
                answers[image_id] = {
                    **imported.record(),
                    "source": str(source),
                    "labels": imported.labels.to_json(),
                }
            write_json(folder / ANSWERS, answers)
            log.info(
                "oracle=human: imported %d images of %s from %s", len(found), batch.name, source
            )
            wanted = missing
        if wanted:
            self._await(folder, batch, wanted, prelabels)
        remove_file(self.root / AWAITING_FILE)
        return [ImageLabels.from_json(answers[image.image_id]["labels"]) for image in batch.images]

    def _run_id(self) -> str:
        path = self.root / "annotation" / "run_id"
        if not path.exists():
            atomic_write_bytes(path, uuid.uuid4().hex[:12].encode())
        return path.read_text().strip()

    def _export(self, folder: Path, batch: Batch, records, proposals) -> dict[str, Prelabels]:
        """Write the batch once; a re-run must ask for the very same batch."""
        if (folder / MANIFEST).exists():
            recorded = read_manifest(folder)
            if recorded != batch:
                raise AlrunError(
                    f"{folder / MANIFEST}: this run now asks for other images or another kind "
                    f"than the batch it exported (the config or torch threads changed?); expected "
                    f"the same {recorded.kind} batch of {len(recorded.images)} images, or delete "
                    f"{folder} to export the new one"
                )
            data = read_json(folder / "prelabels.json", f"delete {folder} to export it again")
            return {k: Prelabels.from_json(v) for k, v in data.items()}
        prelabels = self._prelabels(batch, records, proposals)
        write_json(folder / "prelabels.json", {k: v.to_json() for k, v in prelabels.items()})
        write_json(folder / "coco_prelabels.json", coco_file(batch, prelabels))
        write_json(
            folder / "labelstudio_tasks.json",
            tasks(batch, prelabels, self.image_url, f"alrun batch {batch.batch}"),
        )
        atomic_write_bytes(
            folder / "labelstudio_config.xml", label_config(batch.kind, batch.classes).encode()
        )
        atomic_write_bytes(
            folder / "images.txt", "".join(f"{image.file}\n" for image in batch.images).encode()
        )
        (folder / DROP_FOLDER).mkdir(exist_ok=True)
        write_json(folder / MANIFEST, batch.to_json())  # last: the export is complete
        return prelabels

    def _prelabels(self, batch: Batch, records, proposals) -> dict[str, Prelabels]:
        """verify: the proposals to judge (all of them); otherwise the model's confident boxes."""
        if batch.kind == "verify":
            found, floor = proposals or {}, -1.0
        elif self._detector is not None and batch.batch > 0:
            found = {d.image_id: d for d in self._detector.predict(list(records), Needs())}
            floor = self.prelabel_score
        else:
            return {}  # the initial set: no trained model yet
        out = {}
        for image_id, det in found.items():
            boxes = _rows(det.boxes)
            labels = [int(v) for v in _rows(det.labels)]
            scores = [float(v) for v in _rows(getattr(det, "scores", None))] or [1.0] * len(labels)
            keep = [n for n, s in enumerate(scores) if s >= floor]
            out[image_id] = Prelabels(
                tuple(tuple(float(v) for v in boxes[n]) for n in keep),
                tuple(labels[n] for n in keep),
                tuple(round(scores[n], 4) for n in keep),
            )
        return out

    def _source(self, folder: Path) -> Path | None:
        """``oracle.labels``, else the newest file dropped into the batch's export folder."""
        if self.labels is not None and not self._labels_used:
            self._labels_used = True
            return self.labels
        dropped = sorted(
            (p for p in (folder / DROP_FOLDER).glob("*.json") if p.is_file()),
            key=lambda p: (p.stat().st_mtime, p.name),
        )
        return dropped[-1] if dropped else None

    def _await(self, folder: Path, batch: Batch, wanted: list[str], prelabels) -> None:
        if len(wanted) < len(batch.images):  # the rest of a partial import, as its own tasks
            rest = Batch(
                batch.run_id,
                batch.batch,
                batch.part,
                batch.kind,
                batch.classes,
                tuple(i for i in batch.images if i.image_id in set(wanted)),
            )
            write_json(
                folder / "labelstudio_tasks_remaining.json",
                tasks(rest, prelabels, self.image_url, f"alrun batch {batch.batch}"),
            )
            atomic_write_bytes(
                folder / "images_remaining.txt",
                "".join(f"{i.file}\n" for i in rest.images).encode(),
            )
        write_json(
            self.root / AWAITING_FILE,
            {
                "state": "awaiting_labels",
                "batch": batch.batch,
                "part": batch.part,
                "kind": batch.kind,
                "folder": str(folder),
                "waiting": wanted,
                "files": [str(folder / name) for name in FILES],
            },
        )
        raise AwaitingLabels(folder, batch.batch, batch.kind, len(wanted), len(batch.images))


def _rows(x: Any) -> list:
    if x is None:
        return []
    return (x.detach().cpu() if hasattr(x, "detach") else x).tolist()


@runtime_checkable
class BatchedOracle(Protocol):
    """An oracle that answers by batches and must know where the loop is (``oracle=human``:
    :class:`HumanOracle`); the simulated and recorded oracles answer at once and are not one."""

    def attach(self, root: Path) -> None: ...

    def begin_batch(self, batch: int, detector: Any = None) -> None: ...


def attach_oracle(oracle: object, root: Path) -> None:
    """Give a batched oracle the run directory its batch folders live in."""
    if isinstance(oracle, BatchedOracle):
        oracle.attach(root)


def begin_oracle_batch(oracle: object, batch: int, detector: Any = None) -> None:
    """Tell a batched oracle that the loop now asks batch ``batch``, picked by ``detector``."""
    if isinstance(oracle, BatchedOracle):
        oracle.begin_batch(batch, detector)
