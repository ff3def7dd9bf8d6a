"""A run's initial labelled set read from a file (``budget.initial_ids``) instead of drawn.

Papers ship their initial splits (PPAL: ``data/active_learning/voc/voc_827_labeled_1.json``, a
COCO file made by its ``tools/al_data/create_al_dataset.py``), so a comparison can start from
the paper's own images. Two formats:

* a COCO json (``.json``): its ``images`` entries; each is matched by ``alrun_id`` (files alrun
  wrote), else by ``str(id)`` when that is a pool id (a COCO pool), else by the base name of its
  ``file_name`` (PPAL's VOC files carry their own integer ids);
* a text file: one image id or file name a line (blank lines and ``#`` comments skipped); a
  line is a pool id, else a file path or base name (``000005.jpg``), else a file stem.

Checked against the pool before anything is written: an unknown entry, one that names two pool
images, or a file that lists an image twice is one line naming the file and that entry; so is a
set costing more than ``budget.initial`` (a smaller set is taken as it is).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from alrun.data.dataset import DatasetSplits, ImageRecord
from alrun.errors import BudgetError

KEY = "budget.initial_ids"


def read_entries(path: Path) -> list[tuple[str, ...]]:
    """Each listed image as its candidate keys, in the order they are tried."""
    if not path.is_file():
        raise BudgetError(f"{KEY}: no file at {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() == ".json":
        return _coco_entries(path, text)
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [(line,) for line in lines if line]


def _coco_entries(path: Path, text: str) -> list[tuple[str, ...]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise BudgetError(
            f"{KEY}: {path} is not valid JSON ({err.msg}, line {err.lineno})"
        ) from None
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise BudgetError(f"{KEY}: {path} has no COCO 'images' list")
    entries = []
    for i, image in enumerate(images):
        if not isinstance(image, dict) or ("id" not in image and "file_name" not in image):
            raise BudgetError(f"{KEY}: {path}: images[{i}] needs an 'id' or a 'file_name'")
        keys = [str(image[k]) for k in ("alrun_id", "id") if k in image]
        if "file_name" in image:
            keys.append(Path(str(image["file_name"])).name)
        entries.append(tuple(keys))
    return entries


def _index(records: Iterable[ImageRecord]) -> Callable[[str], list[str]]:
    """``key -> pool ids`` it names: an id, else a path or base name, else a stem."""
    records = list(records)
    ids = {r.image_id for r in records}
    by_name: dict[str, set[str]] = {}
    by_stem: dict[str, set[str]] = {}
    for r in records:
        for name in {str(r.file), r.file.name}:
            by_name.setdefault(name, set()).add(r.image_id)
        by_stem.setdefault(r.file.stem, set()).add(r.image_id)

    def lookup(key: str) -> list[str]:
        if key in ids:
            return [key]
        found = by_name.get(key) or by_name.get(Path(key).name) or by_stem.get(key)
        return sorted(found or ())

    return lookup


def resolve(path: Path, splits: DatasetSplits) -> tuple[str, ...]:
    """The pool ids ``path`` lists, in its order (see the module docstring)."""
    entries = read_entries(path)
    if not entries:
        raise BudgetError(f"{KEY}: {path} lists no image")
    lookup = _index(splits.pool.images)
    picked: list[str] = []
    seen: dict[str, str] = {}
    for keys in entries:
        found = [m for m in map(lookup, keys) if m]
        matches = found[0] if found else []
        shown = "' / '".join(keys)  # a COCO entry: its id and its file name
        if not matches:
            raise BudgetError(f"{KEY}: {path}: '{shown}' {_where(keys, splits)}")
        if len(found) > 1 and len({tuple(m) for m in found}) > 1:
            raise BudgetError(
                f"{KEY}: {path}: '{shown}' name different pool images "
                f"({found[0][0]}, {found[-1][0]}); fix the entry's id or file_name"
            )
        if len(matches) > 1:
            raise BudgetError(
                f"{KEY}: {path}: '{keys[0]}' names {len(matches)} pool images "
                f"({', '.join(matches[:3])}); list image ids instead"
            )
        image_id = matches[0]
        if image_id in seen:
            raise BudgetError(f"{KEY}: {path}: image '{image_id}' is listed twice")
        seen[image_id] = keys[0]
        picked.append(image_id)
    return tuple(picked)


def _where(keys: Sequence[str], splits: DatasetSplits) -> str:
    """Why an entry is not in the pool: in the test split, left out by a subset, or unknown."""
    if any(_index(splits.test.images)(k) for k in keys):
        return f"is in the test split of '{splits.test.name}', not in the pool"
    if any(_index(splits.excluded)(k) for k in keys):
        return "was left out of the pool (dataset.max_pool_images)"
    return f"is not an image of the pool '{splits.pool.name}' (the first unknown entry)"


def check_affordable(
    path: Path, ids: Sequence[str], initial: float, unit: str, cost_of: Callable[[str], float]
) -> None:
    """More than ``budget.initial`` buys: one line with both amounts."""
    total = sum(cost_of(i) for i in ids)
    if total > initial + 1e-9:
        raise BudgetError(
            f"{KEY}: {path} lists {len(ids)} images costing {total:g} {unit}, more than "
            f"budget.initial ({initial:g} {unit}); raise budget.initial or shorten the file"
        )
