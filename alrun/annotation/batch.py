"""One batch sent to annotators: what was asked, for which images, and where its files live.

A batch is the labels bought for pool round ``batch`` (0: the initial set); a regime that asks
in steps (verification: verify, then draw the rejected) makes one *part* per step. The
manifest written beside the export names the run and the batch so that an export for another
round or run is refused by its ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alrun.errors import AlrunError
from alrun.io import read_json

#: label kinds a person can give through the exported tools (extreme clicking has no tool here)
HUMAN_KINDS = ("box", "click", "center_click", "image_label", "verify")
MANIFEST = "manifest.json"
ANSWERS = "answers.json"
DROP_FOLDER = "export"  # where a user may drop the tool's export instead of oracle.labels


@dataclass(frozen=True)
class BatchImage:
    image_id: str
    file: (
        str  # the image file as the tools see it (path relative to nothing: as the dataset has it)
    )
    width: int
    height: int


@dataclass(frozen=True)
class Batch:
    run_id: str
    batch: int
    part: int
    kind: str
    classes: tuple[str, ...]
    images: tuple[BatchImage, ...]

    @property
    def name(self) -> str:
        return f"batch_{self.batch:02d}_part{self.part}"

    def by_id(self) -> dict[str, BatchImage]:
        return {image.image_id: image for image in self.images}

    def to_json(self) -> dict[str, Any]:
        return {
            "alrun_run": self.run_id,
            "alrun_batch": self.batch,
            "alrun_part": self.part,
            "kind": self.kind,
            "classes": list(self.classes),
            "images": [vars(image) for image in self.images],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Batch:
        return cls(
            data["alrun_run"],
            int(data["alrun_batch"]),
            int(data["alrun_part"]),
            data["kind"],
            tuple(data["classes"]),
            tuple(BatchImage(**image) for image in data["images"]),
        )


def read_manifest(folder: Path) -> Batch:
    data = read_json(folder / MANIFEST, f"delete {folder} to export the batch again")
    try:
        return Batch.from_json(data)
    except (KeyError, TypeError, ValueError) as err:
        raise AlrunError(
            f"{folder / MANIFEST}: damaged batch manifest ({err}); delete {folder} to export the "
            "batch again"
        ) from None


@dataclass(frozen=True)
class Drawn:
    """What an export holds for one image, in pixels, before it is checked against the batch."""

    image_id: str
    item: str  # where in the export file ("task 3", "image 'a.jpg'") for error messages
    boxes: tuple[tuple[tuple[float, float, float, float], str, str | None], ...] = ()
    points: tuple[tuple[tuple[float, float], str], ...] = ()
    choices: tuple[str, ...] = ()
    seconds: float | None = None  # the annotator's time (Label Studio's lead_time)


@dataclass(frozen=True)
class Prelabels:
    """The model's predictions shown to the annotator (xyxy pixels, class indices, scores)."""

    boxes: tuple[tuple[float, float, float, float], ...]
    labels: tuple[int, ...]
    scores: tuple[float, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "boxes": [list(b) for b in self.boxes],
            "labels": list(self.labels),
            "scores": list(self.scores),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Prelabels:
        return cls(
            tuple(tuple(b) for b in data["boxes"]), tuple(data["labels"]), tuple(data["scores"])
        )
