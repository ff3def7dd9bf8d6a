"""Check (and optionally download) COCO 2017 for `dataset=coco2017` and `experiment=coco_ppal`.

    python scripts/prepare_coco.py [--root DIR] [--download] [--write-config NAME]

The root holds train2017/, val2017/ and annotations/instances_{train,val}2017.json, as the
official archives unpack (default: $ALRUN_COCO_ROOT, else ./data/coco). alrun reads COCO JSON in
place, so "preparing" is checking: the files exist, the image counts are the official ones
(118,287 / 5,000; a smaller copy is reported, not refused), and the copy reads with alrun's own
reader (every image exists and has its declared size; with --classes, the class list matches
the categories). It prints how to point alrun at the copy and, with --write-config NAME, writes
./configs/dataset/NAME.yaml (the user config folder alrun searches).

--download fetches the official zip files into the root first. Problems end as one line
`prepare_coco: error: <path>: <what>` and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.request
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alrun.data.coco import coco_root_splits  # noqa: E402
from alrun.errors import AlrunError  # noqa: E402

#: the official archives (Lin et al., the COCO site)
ARCHIVES = (
    "http://images.cocodataset.org/zips/train2017.zip",
    "http://images.cocodataset.org/zips/val2017.zip",
    "http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
)
SPLITS = ("train2017", "val2017")
OFFICIAL = {"train2017": 118287, "val2017": 5000}


class PrepareError(Exception):
    """A one-line problem with the copy."""


def default_root() -> Path:
    return Path(os.environ.get("ALRUN_COCO_ROOT", "data/coco"))


def download(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for url in ARCHIVES:
        archive = root / url.rsplit("/", 1)[-1]
        if not archive.is_file():
            print(f"prepare_coco: downloading {url}", flush=True)
            partial = archive.with_suffix(".part")
            try:
                urllib.request.urlretrieve(url, partial)
            except OSError as err:
                raise PrepareError(
                    f"{url}: download failed ({err}); offline? copy it by hand"
                ) from None
            partial.rename(archive)
        print(f"prepare_coco: unpacking {archive.name}", flush=True)
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(root)


def check_layout(root: Path) -> dict[str, int]:
    """Image entries per split, after checking every file and folder exists."""
    counts = {}
    for split in SPLITS:
        ann = root / "annotations" / f"instances_{split}.json"
        for path, what in ((ann, "annotation file"), (root / split, "image folder")):
            if not path.exists():
                raise PrepareError(f"{path}: the {split} {what} does not exist")
        try:
            data = json.loads(ann.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise PrepareError(f"{ann}: not readable as JSON ({err})") from None
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise PrepareError(f"{ann}: not a COCO annotation file (no 'images' list)")
        counts[split] = len(data["images"])
    return counts


def write_config(name: str, root: Path, classes: list[str] | None) -> Path:
    path = Path("configs") / "dataset" / f"{name}.yaml"
    if path.exists():
        raise PrepareError(f"{path}: exists; choose another --write-config name")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# Written by scripts/prepare_coco.py: the checked COCO 2017 copy.\n"
        "defaults:\n  - coco2017@_here_\n  - _self_\n"
        f"root: {root.resolve()}\n" + (f"classes: [{', '.join(classes)}]\n" if classes else "")
    )
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=None, help="the COCO folder")
    parser.add_argument("--download", action="store_true", help="fetch the official archives")
    parser.add_argument("--classes", nargs="+", default=None, help="expected class names")
    parser.add_argument("--write-config", metavar="NAME", help="write ./configs/dataset/NAME.yaml")
    parser.add_argument("--skip-invalid", action="store_true", help="count bad items, do not fail")
    args = parser.parse_args(argv)
    root = args.root or default_root()
    try:
        if args.download:
            download(root)
        if not root.is_dir():
            raise PrepareError(
                f"{root.resolve()}: does not exist; pass --root, set ALRUN_COCO_ROOT, or add "
                "--download"
            )
        for split, count in check_layout(root).items():
            note = (
                ""
                if count == OFFICIAL[split]
                else f" (official: {OFFICIAL[split]}; a partial copy)"
            )
            print(f"prepare_coco: {split}: {count} images{note}")
        try:
            splits = coco_root_splits(root, classes=args.classes, skip_invalid=args.skip_invalid)
        except AlrunError as err:
            raise PrepareError(str(err)) from None
        skipped = len(splits.pool.skipped) + len(splits.test.skipped)
        print(
            f"prepare_coco: ok: pool {len(splits.pool)} images / {splits.pool.num_boxes} boxes, "
            f"test {len(splits.test)} images / {splits.test.num_boxes} boxes, "
            f"{len(splits.classes)} classes" + (f", {skipped} items skipped" if skipped else "")
        )
        print(f"prepare_coco: use it with: export ALRUN_COCO_ROOT={root.resolve()}")
        if args.write_config:
            path = write_config(args.write_config, root, args.classes)
            print(f"prepare_coco: wrote {path}: alrun dataset={args.write_config}")
    except PrepareError as err:
        print(f"prepare_coco: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
